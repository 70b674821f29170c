"""End-to-end GPU benchmark: one HunyuanVideo transformer forward (a denoising step) per attention variant.

The model is diffusers' ``HunyuanVideoTransformer3DModel`` with the real HunyuanVideo 13B architecture
(``HUNYUAN_VIDEO_13B`` below: 20 double-stream + 40 single-stream blocks, 24 heads x 128 channels, hidden
3072, MLP ratio 4, patch 1x2x2, RoPE axes 16/56/56, text_embed_dim 4096 (LLaVA-Llama-3 hidden size),
pooled_projection_dim 768 (CLIP-L), guidance embedding; 12.8B parameters). No weights are downloaded: the
model is built on the meta device in bfloat16, materialised on the GPU with ``to_empty`` and filled with a
cheap random init (uniform +-1/sqrt(fan_in) for matrices, as torch's default Linear init; norm weights 1;
biases 0).

Sizes (129 frames; the VAE compresses 4x in time and 8x in space, the patch is 2x2):
  544x960:  33 x 68 x 120 latents -> 33 x 34 x 60 = 67,320 video tokens, + 256 text tokens
  720x1280: 33 x 90 x 160 latents -> 33 x 45 x 80 = 118,800 video tokens, + 256 text tokens
Of the 256 text tokens, ``--text-valid`` (default 120) are valid and the rest are padding, as with a real
prompt: diffusers' stock processor masks them, the XAttention processor drops them from the segment.

Variants (``--variants``):
  stock         diffusers' HunyuanVideoAttnProcessor2_0 (SDPA with the key-padding mask)
  dense         XAttnProcessor on a dense (warmup) step over the valid segment, with ``--backend``'s dense kernel:
                FlashAttention-4's dense forward for fa4 (and for auto where FA4 runs), else unmasked SDPA, cuDNN
                first. The reference of the "vs dense" column and of the output comparison
  dense-cudnn   the same step on cuDNN SDPA whatever ``--backend``; dense-fa4: on FA4's dense forward
  xattn-T       XAttnProcessor at threshold T (stride ``--stride``) on a sparse step
  ...+fp8       the same with the float8 block estimate (``estimate_fp8=True``), e.g. fixed-0.35+fp8
  ...@backend   dense, xattn-T and fixed-D through the ``xattn`` diffusers attention backend instead of the
                processor (``xattn_video.enable(model, integration="backend")``: diffusers' stock processors
                dispatching to the backend; fixed-D through the session's ``select_blocks`` override point, with
                the same random blocks as the processor's fixed-D), e.g. ``dense@backend fixed-0.35@backend``:
                which integration is faster for HunyuanVideo, and by how much
  ...+fp8attn   the same with float8 attention over the kept blocks (``attention_fp8=True``, the Triton float8
                kernel; ``--attention-fp8`` adds it to every xattn/fixed variant), e.g. fixed-0.35+fp8+fp8attn
  fixed-D       FIXED DENSITY: XAttnProcessor with its block choice replaced by random blocks at density D (each
                query-block row keeps round(D x blocks) random key blocks); the real estimate still runs and
                is timed. Random weights give nearly
                uniform attention, so the measured xattn-T densities are not those of a trained model; the
                fixed-density rows show the step time at densities a real model reaches.

Per variant: a warm-up forward through the first double- and first single-stream block only (compiles and
autotunes every kernel at the right shapes at 1/30 of the cost), then ``--repeats`` full forwards timed with
CUDA events (median reported). ``--refresh-every K`` (K > 1; xattn and fixed variants): the processor estimates
the kept blocks every K steps and reuses them in between (``refresh_every``); each timed forward is then a new
denoising step (its timestep one lower), whole cycles of K forwards are timed (at least ``--repeats``), the first
of each estimating, and the step time reported is their mean (the estimating and the reusing steps' means are
in the row too). Attention time is the sum over layers of the estimate and attention kernels
(the processor's statistics; for stock, CUDA events around diffusers' attention call). Peak memory is
``torch.cuda.max_memory_allocated`` over the variant. Before timing: an attention-level check of the dense
path against stock's masked SDPA at full size, and every variant's output is compared with the dense one.

A time budget (``--budget-s``, default 520 s) keeps the run inside one 10-minute call: repeats are cut, then
variants skipped (and reported as such), when the next forward would not fit.

Prints a Markdown table; writes JSON to ``--json`` or, when $OUT is set, to $OUT/e2e_hunyuan.json.
Needs torch with CUDA, triton, diffusers >= 0.42 and transformers; the project itself may be installed or not
(see ``import_project``). Expected run time on one H100 with the defaults: about 7-8 minutes.

    python bench/e2e_hunyuan.py                                   # both sizes, all variants, 2 repeats
    python bench/e2e_hunyuan.py --sizes 544x960 --variants stock dense xattn-0.9 fixed-0.1 --repeats 3
    python bench/e2e_hunyuan.py --sizes 720x1280 --variants dense dense@backend fixed-0.35 fixed-0.35@backend
    python bench/e2e_hunyuan.py --smoke                           # CPU smoke test of this script
    python bench/e2e_hunyuan.py --sizes 720x1280 --backend fa4 \
        --variants dense dense-cudnn stock fixed-0.35 fixed-0.35+fp8attn fixed-0.15   # FA4 dense as the baseline
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time

import torch

HUNYUAN_VIDEO_13B = dict(
    in_channels=16,
    out_channels=16,
    num_attention_heads=24,
    attention_head_dim=128,
    num_layers=20,
    num_single_layers=40,
    num_refiner_layers=2,
    mlp_ratio=4.0,
    patch_size=2,
    patch_size_t=1,
    qk_norm="rms_norm",
    guidance_embeds=True,
    text_embed_dim=4096,
    pooled_projection_dim=768,
    rope_theta=256.0,
    rope_axes_dim=(16, 56, 56),
)
# latent (frames, height, width) for 129 frames at each resolution
SIZES = {"544x960": (33, 68, 120), "720x1280": (33, 90, 160)}
TEXT_TOKENS = 256
# run in this order (dense first: the reference); under a tight budget the last ones are skipped first
DEFAULT_VARIANTS = ["dense", "stock", "fixed-0.15", "fixed-0.35", "xattn-0.9", "xattn-0.95"]
# expected forward time relative to dense, for the budget check before a variant's first forward
EXPECTED_VS_DENSE = {"dense": 1.0, "stock": 3.0, "xattn": 1.6, "fixed": 1.0}

# --smoke: the same script on the CPU with a narrow model at full depth and a tiny latent grid.
SMOKE_CONFIG = dict(HUNYUAN_VIDEO_13B, num_attention_heads=2, text_embed_dim=64, pooled_projection_dim=32)
SMOKE_SIZES = {"smoke": (3, 16, 32)}  # 3 x 8 x 16 = 384 video tokens
SMOKE_TEXT_TOKENS = 32


# ---------------------------------------------------------------------------------------------- project import


def import_project() -> None:
    """Make ``xattn_video`` importable, installed (``pip install --no-deps --no-build-isolation -e .``) or from a
    bare checkout (the repository root goes on ``sys.path``)."""
    from pathlib import Path

    try:
        import xattn_video  # noqa: F401

        return
    except ImportError:
        pass
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


# ---------------------------------------------------------------------------------------------- timing


class Clock:
    """CUDA events on a GPU, the wall clock elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop_ms(self, start) -> float:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        return (time.perf_counter() - start) * 1e3


class StockAttentionTimer:
    """CUDA events around diffusers' attention call inside HunyuanVideoAttnProcessor2_0 (stock variant only)."""

    def __init__(self, device: torch.device):
        import diffusers.models.transformers.transformer_hunyuan_video as hv

        self.module, self.original, self.clock, self.pairs = hv, hv.dispatch_attention_fn, Clock(device), []

    def __enter__(self):
        def timed(*args, **kwargs):
            start = self.clock.start()
            out = self.original(*args, **kwargs)
            self.pairs.append((start, self.clock.start()))
            return out

        self.module.dispatch_attention_fn = timed
        return self

    def __exit__(self, *exc):
        self.module.dispatch_attention_fn = self.original

    def take_ms(self) -> float:
        if self.clock.cuda:
            if self.pairs:
                self.pairs[-1][1].synchronize()
            total = sum(a.elapsed_time(b) for a, b in self.pairs)
        else:
            total = sum((b - a) * 1e3 for a, b in self.pairs)
        self.pairs = []
        return total


# ---------------------------------------------------------------------------------------------- model


def build_transformer(config: dict, device: torch.device, dtype: torch.dtype, seed: int):
    """HunyuanVideoTransformer3DModel built on the meta device, materialised on ``device`` with random weights."""
    from diffusers import HunyuanVideoTransformer3DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = HunyuanVideoTransformer3DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to_empty(device=device)
    if any(True for _ in model.buffers()):  # none in diffusers 0.42; to_empty would leave them garbage
        raise RuntimeError("the transformer has buffers: to_empty cannot materialise them, initialise them here")
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                bound = 1.0 / math.sqrt(param[0].numel())  # fan_in
                param.uniform_(-bound, bound, generator=gen)
            elif name.endswith("weight"):  # LayerNorm / RMSNorm scales
                param.fill_(1.0)
            else:
                param.zero_()
    return model.eval().requires_grad_(False)


def make_inputs(config: dict, latent: tuple, text_tokens: int, text_valid: int, device, dtype, seed: int) -> dict:
    frames, height, width = latent
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    mask = torch.zeros(1, text_tokens, device=device, dtype=dtype)
    mask[:, :text_valid] = 1
    return dict(
        hidden_states=randn(1, config["in_channels"], frames, height, width),
        timestep=torch.tensor([900.0], device=device),
        encoder_hidden_states=randn(1, text_tokens, config["text_embed_dim"]),
        encoder_attention_mask=mask,
        pooled_projections=randn(1, config["pooled_projection_dim"]),
        guidance=torch.tensor([6000.0], device=device, dtype=dtype),
        return_dict=False,
    )


def video_tokens(config: dict, latent: tuple) -> int:
    frames, height, width = latent
    p, pt = config["patch_size"], config["patch_size_t"]
    return (frames // pt) * (height // p) * (width // p)


@contextlib.contextmanager
def first_blocks_only(model):
    """Run the model through its first double- and first single-stream block only (a cheap kernel warm-up)."""
    double, single = model.transformer_blocks, model.single_transformer_blocks
    model.transformer_blocks = torch.nn.ModuleList([double[0]])
    model.single_transformer_blocks = torch.nn.ModuleList([single[0]])
    try:
        yield
    finally:
        model.transformer_blocks, model.single_transformer_blocks = double, single


# ---------------------------------------------------------------------------------------------- variants


def fixed_density_processor_class():
    from xattn_video import XAttnProcessor
    from xattn_video.core.estimate import BlockSelection, checked_config, estimate_blocks
    from xattn_video.testing.synthetic import random_block_selection

    class FixedDensityProcessor(XAttnProcessor):
        """XAttnProcessor whose block choice is replaced by random blocks at a fixed density (benchmarks only).

        The real estimate still runs, and is timed, so that the step time includes its cost."""

        def __init__(self, density: float, **kwargs):
            super().__init__(**kwargs)
            if not 0 < density <= 1:
                raise ValueError(f"density must be in (0, 1], got {density}")
            self.density = density
            self._selections: dict = {}

        def select_blocks(self, q: torch.Tensor, k: torch.Tensor) -> BlockSelection:
            estimate_blocks(q, k, checked_config(q, k, None, self.config))  # its result is replaced, its cost kept
            n_blocks = math.ceil(q.shape[2] / self.block_size)
            key = (q.shape[0], q.shape[1], n_blocks, q.device)
            if key not in self._selections:
                self._selections[key] = random_block_selection(
                    q.shape[0], q.shape[1], n_blocks, self.density, device=q.device, seed=1234 + n_blocks
                )
            return self._selections[key]

    return FixedDensityProcessor


def fixed_density_session_class():
    """The backend's counterpart of FixedDensityProcessor: an :class:`XAttnSession` whose ``select_blocks`` override
    returns random blocks at a fixed density (the same blocks for the same shape), after running the real
    estimate, which is timed."""
    from xattn_video.diffusion.backend import XAttnSession
    from xattn_video.testing.synthetic import random_block_selection

    class FixedDensitySession(XAttnSession):
        def __init__(self, density: float, **settings):
            super().__init__(**settings)
            if not 0 < density <= 1:
                raise ValueError(f"density must be in (0, 1], got {density}")
            self.density = density
            self._selections: dict = {}

        def select_blocks(self, q, k, *, scale=None):
            super().select_blocks(q, k, scale=scale)  # its result is replaced, its cost kept
            n_blocks = math.ceil(q.shape[2] / self.block_size)
            key = (q.shape[0], q.shape[1], n_blocks, q.device)
            if key not in self._selections:
                self._selections[key] = random_block_selection(
                    *key[:3], self.density, device=q.device, seed=1234 + n_blocks
                )
            return self._selections[key]

    return FixedDensitySession


BACKEND_SUFFIX = "@backend"


def split_integration(name: str) -> tuple[str, str]:
    """(variant name without the integration suffix, "processor" or "backend")."""
    if name.endswith(BACKEND_SUFFIX):
        return name[: -len(BACKEND_SUFFIX)], "backend"
    return name, "processor"


DENSE_VARIANTS = {"dense": None, "dense-cudnn": "triton", "dense-fa4": "fa4"}  # -> the processor's backend


def parse_variant(name: str) -> tuple[str, float | None, bool, bool]:
    """(kind, threshold or density, float8 estimate, float8 attention) of a variant name (an ``@backend`` suffix
    is ignored here: :func:`split_integration` reads it)."""
    name, integration = split_integration(name)
    if name == "stock" and integration == "backend":
        raise ValueError("stock@backend is not a variant: stock is diffusers' own processors and backend")
    if name == "stock" or name in DENSE_VARIANTS:
        return ("dense" if name in DENSE_VARIANTS else name), None, False, False
    base, suffixes = name.split("+")[0], name.split("+")[1:]
    if set(suffixes) <= {"fp8", "fp8attn"} and len(set(suffixes)) == len(suffixes):
        for prefix in ("xattn-", "fixed-"):
            if base.startswith(prefix):
                try:
                    value = float(base[len(prefix) :])
                except ValueError:
                    break
                if 0 < value <= 1:
                    return prefix[:-1], value, "fp8" in suffixes, "fp8attn" in suffixes
    raise ValueError(
        f"unknown variant {name!r}: use stock, dense, dense-cudnn, dense-fa4, xattn-<threshold>, fixed-<density> "
        "(0 < x <= 1), the last two optionally with +fp8 (float8 estimate) and/or +fp8attn (float8 attention), and "
        "all but stock optionally with @backend (the xattn backend)"
    )


def stock_processors(model) -> None:
    """diffusers' own processors on every attention module of ``model``."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

    model.set_attn_processor(
        {
            name: AttnProcessor2_0() if name.startswith("context_embedder") else HunyuanVideoAttnProcessor2_0()
            for name in model.attn_processors
        }
    )


def set_variant(model, variant: str, args):
    """Put the variant's processors (or the xattn backend) on ``model``; returns the XAttnProcessor or the backend's
    XAttnSession (None for stock)."""
    import xattn_video
    from xattn_video.diffusion.steps import StepTracker

    kind, value, fp8, fp8attn = parse_variant(variant)
    fp8attn = fp8attn or (args.attention_fp8 and kind in ("xattn", "fixed"))
    integration = split_integration(variant)[1]
    refresh = dict(refresh_every=args.refresh_every) if args.refresh_every > 1 else {}
    tracker = StepTracker.of(model)
    if tracker is not None:
        tracker.detach()
    if kind == "stock":
        stock_processors(model)
        return None
    backend = args.backend
    if integration == "backend":
        common = dict(stride=args.stride, block_size=128, backend=backend)
        if args.min_len is not None:
            common["min_len"] = args.min_len
        if kind == "dense":  # every forward repeats step 0: a warmup longer than any run keeps it dense
            common["backend"] = DENSE_VARIANTS[split_integration(variant)[0]] or backend
            return xattn_video.enable(model, integration="backend", threshold=0.9, warmup_steps=10**9, **common)
        common.update(estimate_fp8=fp8, attention_fp8=fp8attn, **refresh)
        if fp8attn and backend not in ("auto", "triton"):  # the float8 kernel is Triton's: "auto" picks it
            common["backend"] = "auto"
        if kind == "xattn":
            return xattn_video.enable(model, integration="backend", threshold=value, warmup_steps=0, **common)
        stock_processors(model)  # the backend runs under diffusers' own processors
        session = fixed_density_session_class()(value, threshold=0.9, warmup_steps=0, **common)
        return session.attach([model])
    if kind == "dense":  # every forward here is step 0 (same timestep and latents): warmup keeps it dense
        backend = DENSE_VARIANTS[variant] or backend
        return xattn_video.enable(model, threshold=0.9, warmup_steps=1, stride=args.stride, backend=backend)
    if fp8attn and backend not in ("auto", "triton"):  # the float8 kernel is Triton's: "auto" picks it
        backend = "auto"
    common = dict(stride=args.stride, block_size=128, backend=backend, estimate_fp8=fp8, attention_fp8=fp8attn)
    if kind == "xattn":
        return xattn_video.enable(model, threshold=value, warmup_steps=0, **common, **refresh)
    proc = fixed_density_processor_class()(value, threshold=0.9, warmup_steps=0, **common, **refresh)
    model.set_attn_processor(proc)
    return proc.attach(model)


# ---------------------------------------------------------------------------------------------- checks


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def attention_check(n_video: int, text_tokens: int, text_valid: int, heads: int, head_dim: int, device, dtype):
    """Dense valid-segment path vs stock's masked SDPA at full size, on random q/k/v; relative error."""
    import torch.nn.functional as F

    from xattn_video import XAttnProcessor

    n = n_video + text_tokens
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, head_dim, generator=gen, device=device, dtype=dtype) for _ in range(3))
    mask = torch.arange(n, device=device)[None, None, None, :] < n_video + text_valid
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = XAttnProcessor().attention(q, k, v, [n_video + text_valid], dense=True)
    err = rel_err(out, ref)
    del q, k, v, ref, out
    return err


# ---------------------------------------------------------------------------------------------- main loop


def expected_forward_s(variant: str, size: str, tokens: int, measured: dict) -> float | None:
    """A conservative guess of one forward's time from what was measured (attention ~ tokens^2 dominates)."""
    kind = parse_variant(variant)[0]
    for (_, other_variant), (step_s, other_tokens) in measured.items():
        if other_variant == variant:
            return step_s * (tokens / other_tokens) ** 2
    if (size, "dense") in measured:
        return measured[(size, "dense")][0] * EXPECTED_VS_DENSE[kind]
    for (_, other_variant), (step_s, other_tokens) in measured.items():
        if other_variant == "dense":
            return step_s * (tokens / other_tokens) ** 2 * EXPECTED_VS_DENSE[kind]
    return None


def run_variant(model, variant, inputs, args, clock, deadline, expected_s, ref_out):
    """Warm up, then time up to ``args.repeats`` forwards; returns a result row and the first output."""
    row = dict(
        variant=variant,
        kind="fixed-density" if variant.startswith("fixed-") else "measured",
        integration=split_integration(variant)[1],
    )
    base = split_integration(variant)[0]
    warm_up_s = 5.0 if base in ("stock", "dense-cudnn") else 20.0  # Triton / CuTe compile at a new shape
    if expected_s and time.monotonic() + 1.15 * expected_s + warm_up_s > deadline:
        row["skipped"] = f"skipped: time budget (a forward would take ~{expected_s:.0f} s)"
        return row, None
    proc = set_variant(model, variant, args)
    try:
        return _timed_forwards(model, proc, row, inputs, args, clock, deadline, ref_out)
    finally:
        if proc is not None:
            proc.detach()


def _timed_forwards(model, proc, row, inputs, args, clock, deadline, ref_out):
    device = inputs["hidden_states"].device
    refresh = args.refresh_every if proc is not None and parse_variant(row["variant"])[0] in ("xattn", "fixed") else 1
    forwards = args.repeats if refresh == 1 else refresh * math.ceil(args.repeats / refresh)
    stock_timer = StockAttentionTimer(device) if proc is None else contextlib.nullcontext()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    steps, attention, estimates, densities, blocks = [], [], [], [], []
    out = None
    with torch.inference_mode(), stock_timer:
        with first_blocks_only(model):
            model(**inputs)
        if proc is None:
            stock_timer.take_ms()
        if refresh > 1:
            proc.tracker.reset()  # the timed forwards are steps 0, 1, ... of a generation: step 0 estimates
        for i in range(forwards):
            if i and time.monotonic() + 1.2 * (steps[-1] / 1e3) > deadline:
                row["repeats_cut"] = f"{i} of {forwards} (time budget)"
                break
            if proc is not None:
                proc.reset_stats()
            step_inputs = inputs if refresh == 1 else dict(inputs, timestep=inputs["timestep"] - i)  # a new step
            start = clock.start()
            result = model(**step_inputs)[0]
            steps.append(clock.stop_ms(start))
            if out is None:
                out = result
            if proc is None:
                attention.append(stock_timer.take_ms())
                estimates.append(0.0)
                densities.append(1.0)
            else:
                stats = proc.stats
                totals = stats["totals"]
                blocks.append([s["blocks"] for g in stats["generations"] for s in g["steps"]][-1])
                attention.append(totals["attention_ms"] + totals["estimate_ms"])
                estimates.append(totals["estimate_ms"])
                densities.append(totals["density"])
    median = statistics.median(steps) if refresh == 1 else statistics.fmean(steps)  # refresh: the cycle's mean
    pick = min(range(len(steps)), key=lambda i: abs(steps[i] - median))  # the forward whose breakdown is shown
    row.update(
        step_s=median / 1e3,
        steps_s=[s / 1e3 for s in steps],
        attention_s=attention[pick] / 1e3,
        attention_share=attention[pick] / median,
        estimate_s=estimates[pick] / 1e3,
        density=densities[pick],
        peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        finite=bool(torch.isfinite(out).all()),
    )
    if refresh > 1:
        by = {
            kind: [s / 1e3 for s, b in zip(steps, blocks, strict=True) if b == kind] for kind in ("estimated", "reused")
        }
        row.update(
            refresh_every=refresh,
            blocks=blocks,
            estimate_step_s=statistics.fmean(by["estimated"]) if by["estimated"] else None,
            reuse_step_s=statistics.fmean(by["reused"]) if by["reused"] else None,
            estimate_s=statistics.fmean(estimates) / 1e3,  # the estimate's cost per step, averaged over the cycle
            attention_s=statistics.fmean(attention) / 1e3,
        )
        row["attention_share"] = row["attention_s"] / row["step_s"]
    if ref_out is not None:
        row["rel_err_vs_dense"] = rel_err(out, ref_out)
    return row, out


def run_size(model, label, latent, args, config, device, dtype, clock, deadline, text_tokens, measured) -> list[dict]:
    n_video = video_tokens(config, latent)
    inputs = make_inputs(config, latent, text_tokens, args.text_valid, device, dtype, seed=1)
    tokens = dict(video_tokens=n_video, text_tokens=text_tokens, text_valid=args.text_valid)
    print(f"## {label}: {n_video:,} video + {text_tokens} text tokens ({args.text_valid} valid)", flush=True)
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    check_err = attention_check(n_video, text_tokens, args.text_valid, heads, head_dim, device, dtype)
    print(f"  check: dense valid-segment attention vs stock masked SDPA, rel err {check_err:.2e}", flush=True)
    rows = []
    # dense first: it is the reference for the output comparison and gives the forward-time estimate
    order = sorted(args.variants, key=lambda v: v != "dense")
    if args.dense_again and "dense" in order:
        order.append("dense")  # the baseline measured before and after the others: drift shows, and averages out
    ref_out = None
    outputs: dict[str, torch.Tensor] = {}  # first output per variant: each @backend row is compared with its twin
    n_tokens = n_video + text_tokens
    for variant in order:
        expected = expected_forward_s(variant, label, n_tokens, measured)
        try:
            row, out = run_variant(model, variant, inputs, args, clock, deadline, expected, ref_out)
        except Exception as exc:  # report and go on with the other variants
            row, out = dict(variant=variant, kind="error", error=f"{type(exc).__name__}: {exc}"[:300]), None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row.update(size=label, attention_check_rel_err=check_err if variant == "dense" else None, **tokens)
        if variant == "dense" and out is not None and ref_out is None:
            ref_out = out
        if out is not None:
            outputs.setdefault(variant, out)
            base, integration = split_integration(variant)
            twin = outputs.get(base if integration == "backend" else base + BACKEND_SUFFIX)
            if twin is not None:  # the same attention through the other integration
                row["rel_err_vs_other_integration"] = rel_err(out, twin)
        if "step_s" in row:
            measured[(label, variant)] = (row["step_s"], n_tokens)
            print(
                f"  {variant:>12}: step {row['step_s']:.2f} s, attention {row['attention_s']:.2f} s "
                f"({100 * row['attention_share']:.0f}%), density {row['density']:.3f}"
                + (f", rel err vs dense {row['rel_err_vs_dense']:.2e}" if "rel_err_vs_dense" in row else "")
                + (
                    f", vs the other integration {row['rel_err_vs_other_integration']:.2e}"
                    if "rel_err_vs_other_integration" in row
                    else ""
                )
                + (
                    f"; refresh_every {row['refresh_every']}: estimating steps {row['estimate_step_s']:.2f} s, "
                    f"reusing {row['reuse_step_s']:.2f} s ({' '.join(b[0] for b in row['blocks'])})"
                    if row.get("refresh_every") and row["reuse_step_s"] is not None
                    else ""
                ),
                flush=True,
            )
        else:
            print(f"  {variant:>12}: {row.get('skipped') or row.get('error')}", flush=True)
        rows.append(row)
    del ref_out, outputs
    return rows


def integration_comparison(rows: list[dict]) -> str:
    """Per variant measured through both integrations: processor and backend step times and their ratio."""
    steps: dict[tuple, list[float]] = {}
    for r in rows:
        if "step_s" in r:
            base, integration = split_integration(r["variant"])
            steps.setdefault((r["size"], base, integration), []).extend(r["steps_s"])
    lines = []
    for (size, base, integration), backend in steps.items():
        processor = steps.get((size, base, "processor"))
        if integration != "backend" or not processor:
            continue
        p, b = statistics.median(processor), statistics.median(backend)
        lines.append(f"| {size} | {base} | {p:.2f} | {b:.2f} | {b / p:.3f}x | {100 * (b - p) / p:+.1f}% |")
    if not lines:
        return ""
    head = [
        "| size | variant | processor step s | backend step s | backend / processor | backend slower by |",
        "|---|---|---|---|---|---|",
    ]
    return "\n".join(head + lines)


def markdown(rows: list[dict]) -> str:
    lines = [
        "| size | variant | kind | step s | attention s (share) | estimate s | density | peak GiB | "
        "vs stock | vs dense | rel err vs dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base_steps: dict[tuple, list[float]] = {}
    for r in rows:
        if "step_s" in r and r["variant"] in ("stock", "dense"):
            base_steps.setdefault((r["size"], r["variant"]), []).extend(r["steps_s"])
    # a baseline measured twice (--dense-again): the median of all its forwards
    base = {key: statistics.median(steps) for key, steps in base_steps.items()}
    for r in rows:
        if "step_s" not in r:
            lines.append(f"| {r['size']} | {r['variant']} | {r['kind']} | {r.get('skipped') or r.get('error')} |")
            continue
        speed = []
        for ref in ("stock", "dense"):
            b = base.get((r["size"], ref))
            speed.append(f"{b / r['step_s']:.2f}x" if b else "-")
        err = f"{r['rel_err_vs_dense']:.1e}" if "rel_err_vs_dense" in r else "-"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        name = r["variant"] + (f" (refresh_every {r['refresh_every']})" if r.get("refresh_every") else "")
        lines.append(
            f"| {r['size']} | {name} | {r['kind']} | {r['step_s']:.2f} | {r['attention_s']:.2f} "
            f"({100 * r['attention_share']:.0f}%) | {r['estimate_s']:.2f} | {r['density']:.3f} | {peak} | "
            f"{speed[0]} | {speed[1]} | {err} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=None, help=f"of {list(SIZES)} (default: both)")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=DEFAULT_VARIANTS,
        help="stock, dense, dense-cudnn, dense-fa4, xattn-<threshold>, fixed-<density>; append +fp8 for the float8 "
        "estimate, +fp8attn for float8 attention, @backend for the xattn diffusers backend instead of the processor",
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed forwards per variant (median reported)")
    parser.add_argument("--stride", type=int, default=8, help="XAttention antidiagonal stride")
    parser.add_argument(
        "--backend",
        default="auto",
        help="xattn_attention backend: auto (fa4 where FlashAttention-4 runs, else triton), fa4, triton, flex, torch",
    )
    parser.add_argument(
        "--attention-fp8", action="store_true", help="float8 attention (attention_fp8=True) on every sparse variant"
    )
    parser.add_argument("--text-valid", type=int, default=None, help="valid text tokens of 256 (default 120)")
    parser.add_argument(
        "--budget-s", type=float, default=520.0, help="start no forward that would end after this many seconds"
    )
    parser.add_argument(
        "--refresh-every",
        type=int,
        default=1,
        help="xattn/fixed variants: estimate the kept blocks every K steps, reuse them in between (default 1)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--min-len", type=int, default=None, help="the xattn backend's min_len (@backend variants; default its own)"
    )
    parser.add_argument("--json", default=None, help="JSON output path (default $OUT/e2e_hunyuan.json if $OUT)")
    parser.add_argument("--smoke", action="store_true", help="CPU smoke test: narrow model, tiny grid, float32")
    parser.add_argument(
        "--dense-again",
        action="store_true",
        help="measure dense again after the other variants; ratios use the median of all dense forwards",
    )
    args = parser.parse_args(argv)
    for v in args.variants:
        try:
            parse_variant(v)
        except ValueError as err:
            parser.error(str(err))
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.refresh_every < 1:
        parser.error("--refresh-every must be an integer >= 1")

    t0 = time.monotonic()
    deadline = t0 + args.budget_s
    if args.smoke:
        config, sizes, text_tokens = SMOKE_CONFIG, SMOKE_SIZES, SMOKE_TEXT_TOKENS
        device, dtype = torch.device("cpu"), torch.float32
        args.text_valid = 20 if args.text_valid is None else args.text_valid
        if args.backend == "auto":
            args.backend = "torch"
    else:
        if not torch.cuda.is_available():
            parser.error("this benchmark needs a CUDA GPU (or --smoke for a CPU run of the script)")
        config, sizes, text_tokens = HUNYUAN_VIDEO_13B, SIZES, TEXT_TOKENS
        device, dtype = torch.device("cuda"), torch.bfloat16
        args.text_valid = 120 if args.text_valid is None else args.text_valid
    if not 1 <= args.text_valid <= text_tokens:
        parser.error(f"--text-valid must be in [1, {text_tokens}]")
    names = args.sizes or list(sizes)
    for name in names:
        if name not in sizes:
            parser.error(f"--sizes takes {list(sizes)}, got {name}")

    import_project()
    import diffusers
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"# {device_name}, torch {torch.__version__}, triton {triton_version}, diffusers {diffusers.__version__}, "
        f"transformers {transformers.__version__}",
        flush=True,
    )
    model = build_transformer(config, device, dtype, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"# HunyuanVideoTransformer3DModel, {n_params / 1e9:.2f}B parameters, {dtype}, random weights, "
        f"built in {time.monotonic() - t0:.1f} s",
        flush=True,
    )
    clock = Clock(device)
    rows: list[dict] = []
    measured: dict = {}
    for name in names:
        rows += run_size(model, name, sizes[name], args, config, device, dtype, clock, deadline, text_tokens, measured)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print()
    print(markdown(rows))
    comparison = integration_comparison(rows)
    if comparison:
        print("\nHunyuanVideo processor vs the xattn backend (median of every forward of each):\n" + comparison)
    print(
        "\nfixed-density rows: the block choice is replaced by random blocks at that density, the estimate still "
        "runs (random weights do not give a real model's sparsity). step: median transformer forward; "
        "attention: estimate + attention kernels over all 60 joint layers.",
        flush=True,
    )
    path = args.json or (os.path.join(os.environ["OUT"], "e2e_hunyuan.json") if os.environ.get("OUT") else None)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(
                dict(
                    device=device_name,
                    torch=torch.__version__,
                    triton=triton_version,
                    diffusers=diffusers.__version__,
                    transformers=transformers.__version__,
                    time=time.strftime("%Y-%m-%d %H:%M:%S"),
                    config={k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
                    parameters=n_params,
                    args=vars(args),
                    rows=rows,
                    wall_s=time.monotonic() - t0,
                ),
                f,
                indent=1,
            )
        print(f"# wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
