"""End-to-end GPU benchmark: one Wan 2.1 14B transformer forward per attention variant, through the xattn backend.

The model is diffusers' ``WanTransformer3DModel`` with the Wan 2.1 T2V 14B architecture (``WAN21_14B``: 40
blocks, 40 heads x 128 = 5120 channels, FFN 13824, patch 1x2x2, UMT5 text_dim 4096, freq_dim 256, qk RMS norm
across heads; the Wan 2.2 A14B experts have the same shape). No weights are downloaded: it is built on the
meta device in bfloat16, materialised on the GPU and filled with a cheap random init (as ``e2e_hunyuan.py``);
the modules diffusers keeps in float32 when loading (``_keep_in_fp32_modules``) are float32 here too, and the
RoPE tables are computed, not left empty.

Size: 720x1280, 81 frames -> 21 x 90 x 160 latents -> 21 x 45 x 80 = 75,600 video tokens of self-attention per
block; 512 text tokens (``--text-valid`` of them non-zero, as Wan pads prompts with zeros) reach the video
through cross-attention, which every variant leaves to diffusers. One forward is one transformer call; a
denoising step with classifier-free guidance is two.

Variants (``--variants``), XAttention ones through ``xattn_video.enable(transformer, ...)`` (the ``xattn``
diffusers attention backend):
  stock        diffusers' attention with the fastest native backend of ``--stock-backends`` available here
               (each is timed on the first block; the fastest runs the full forward)
  dense        the xattn backend with every step dense (unmasked SDPA over the valid tokens)
  xattn-T      XAttention at threshold T (random weights give nearly flat attention: read the fixed rows)
  fixed-D      the real estimate runs and is timed, then its block choice is replaced by random blocks at
               density D (each query-block row keeps round(D x blocks) key blocks), as e2e_hunyuan's fixed-D;
               through the session's ``select_blocks`` override point (a subclass of XAttnSession)
  ...+fp8      the float8 block estimate
The attention share of a forward is measured first (the stock row): CUDA events around every
``dispatch_attention_fn`` call of the Wan processor, self-attention and cross-attention apart; the same timer
runs for every variant, so the rows compare at the same point.

Per variant: a warm-up forward through the first block only (kernels compile and autotune at the right shapes),
then ``--repeats`` full forwards timed with CUDA events (median reported); every output is compared with the
dense one. ``--budget-s`` keeps the run inside one 10-minute call. Prints a Markdown table; writes JSON to
``--json`` or $OUT/e2e_wan.json. Expected on one H100: about 12 s a dense forward, 5-6 minutes in all.

    python bench/e2e_wan.py
    python bench/e2e_wan.py --variants stock dense fixed-0.35 fixed-0.15 xattn-0.9 --repeats 3
    python bench/e2e_wan.py --tiny        # CPU smoke run of this script: narrow 2-block model, torch backend
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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_hunyuan import Clock, fixed_density_session_class, import_project, parse_variant, rel_err  # noqa: E402

WAN21_14B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=40,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=13824,
    num_layers=40,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=None,
    added_kv_proj_dim=None,
    rope_max_seq_len=1024,
)
LATENT = (21, 90, 160)  # 81 frames at 720x1280
TEXT_TOKENS = 512
DEFAULT_VARIANTS = ["stock", "dense", "fixed-0.35", "fixed-0.15", "xattn-0.9"]
STOCK_BACKENDS = ["_native_cudnn", "_native_flash", "_native_efficient", "native", "flash", "_flash_3"]

# --tiny: the same script on the CPU, 2 narrow blocks, 3 x 8 x 16 = 384 video tokens in 32-token blocks.
TINY_CONFIG = dict(
    WAN21_14B, num_attention_heads=2, attention_head_dim=32, text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2
)
TINY_LATENT, TINY_TEXT_TOKENS = (3, 16, 32), 32


# ---------------------------------------------------------------------------------------------- model


def build_transformer(config: dict, device: torch.device, dtype: torch.dtype, seed: int):
    """WanTransformer3DModel with random weights, built on the meta device and materialised on ``device``."""
    from diffusers import WanTransformer3DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = WanTransformer3DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                bound = 1.0 / math.sqrt(param[0].numel())  # fan_in, as torch's default Linear init
                param.uniform_(-bound, bound, generator=gen)
            elif name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()
    # the RoPE tables are the model's only buffers: to_empty left them garbage, so compute them again
    with torch.device(device):
        model.rope = type(model.rope)(config["attention_head_dim"], config["patch_size"], config["rope_max_seq_len"])
    if {n for n, _ in model.named_buffers()} != {"rope.freqs_cos", "rope.freqs_sin"}:
        raise RuntimeError("WanTransformer3DModel has buffers this script does not recompute after to_empty")
    keep = set(model._keep_in_fp32_modules or ())  # as from_pretrained(torch_dtype=bfloat16) leaves them
    for name, param in model.named_parameters():
        if keep & set(name.split(".")):
            param.data = param.data.float()
    return model.eval().requires_grad_(False)


def check_against_plain_build(model, config: dict, inputs: dict) -> float:
    """Relative difference between ``model`` and a WanTransformer3DModel built the ordinary way with the same
    weights (float32, CPU only): shows that building on the meta device lost nothing (buffers, dtypes)."""
    from diffusers import WanTransformer3DModel

    plain = WanTransformer3DModel(**config).eval()
    plain.load_state_dict(model.state_dict())
    with torch.inference_mode():
        return rel_err(model(**inputs)[0], plain(**inputs)[0])


def make_inputs(config: dict, latent: tuple, text_tokens: int, text_valid: int, device, dtype, seed: int) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    text = torch.randn(1, text_tokens, config["text_dim"], generator=gen, device=device).to(dtype)
    text[:, text_valid:] = 0  # Wan's prompt embeddings: the prompt's tokens, then zeros
    return dict(
        hidden_states=torch.randn(1, config["in_channels"], *latent, generator=gen, device=device).to(dtype),
        timestep=torch.tensor([900.0], device=device),
        encoder_hidden_states=text,
        return_dict=False,
    )


def video_tokens(config: dict, latent: tuple) -> int:
    return math.prod(n // p for n, p in zip(latent, config["patch_size"], strict=True))


@contextlib.contextmanager
def first_block_only(model):
    blocks = model.blocks
    model.blocks = torch.nn.ModuleList([blocks[0]])
    try:
        yield
    finally:
        model.blocks = blocks


# ---------------------------------------------------------------------------------------------- timing


class AttentionTimer:
    """CUDA events (wall clock on the CPU) around each ``dispatch_attention_fn`` call of the Wan processor,
    summed apart for self-attention (query and key of the same length) and cross-attention."""

    def __init__(self, device: torch.device):
        import diffusers.models.transformers.transformer_wan as wan

        self.module, self.original, self.clock, self.calls = wan, wan.dispatch_attention_fn, Clock(device), []

    def __enter__(self):
        def timed(query, key, *args, **kwargs):
            start = self.clock.start()
            out = self.original(query, key, *args, **kwargs)
            self.calls.append((query.shape[1] == key.shape[1], start, self.clock.start()))
            return out

        self.module.dispatch_attention_fn = timed
        return self

    def __exit__(self, *exc):
        self.module.dispatch_attention_fn = self.original

    def take_ms(self) -> tuple[float, float]:
        """(self-attention ms, cross-attention ms) since the last call."""
        if self.clock.cuda and self.calls:
            self.calls[-1][2].synchronize()
        ms = [(a.elapsed_time(b) if self.clock.cuda else (b - a) * 1e3, is_self) for is_self, a, b in self.calls]
        self.calls = []
        return sum(t for t, s in ms if s), sum(t for t, s in ms if not s)


# ---------------------------------------------------------------------------------------------- variants


def enable_variant(model, variant: str, args):
    """Put the variant on ``model``; returns the xattn session (None for stock)."""
    import xattn_video

    kind, value, fp8, fp8attn = parse_variant(variant)
    if kind == "stock":
        model.set_attention_backend(args.stock_backend)
        return None
    common = dict(stride=args.stride, block_size=args.block_size, backend=args.backend, min_len=args.min_len)
    if kind == "dense":  # every forward here repeats step 0: a warmup longer than any run keeps it dense
        return xattn_video.enable(model, threshold=0.9, warmup_steps=10**9, **common)
    if kind == "xattn":
        return xattn_video.enable(
            model, threshold=value, warmup_steps=0, estimate_fp8=fp8, attention_fp8=fp8attn, **common
        )
    session = fixed_density_session_class()(
        value, threshold=0.9, warmup_steps=0, estimate_fp8=fp8, attention_fp8=fp8attn, **common
    )
    return session.attach([model])


def pick_stock_backend(model, inputs, args, clock) -> list[dict]:
    """Time each of ``--stock-backends`` on the first block; the fastest available becomes ``args.stock_backend``."""
    rows = []
    for name in args.stock_backends:
        try:
            model.set_attention_backend(name)
            times = []
            with torch.inference_mode(), first_block_only(model):
                for i in range(3):
                    start = clock.start()
                    model(**inputs)
                    if i:  # the first call compiles / autotunes
                        times.append(clock.stop_ms(start))
                    else:
                        clock.stop_ms(start)
            rows.append(dict(backend=name, first_block_ms=statistics.median(times)))
        except Exception as exc:  # not built into this torch, package missing, or no kernel for these shapes
            rows.append(dict(backend=name, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:200]))
    model.reset_attention_backend()
    ok = [r for r in rows if "first_block_ms" in r]
    if not ok:
        raise RuntimeError(f"no stock attention backend ran: {rows}")
    args.stock_backend = min(ok, key=lambda r: r["first_block_ms"])["backend"]
    return rows


def run_variant(model, variant, inputs, args, clock, deadline, ref_out, expected_s) -> tuple[dict, torch.Tensor | None]:
    """Warm up on the first block, then time up to ``args.repeats`` forwards; a result row and the first output."""
    row = dict(variant=variant if variant != "stock" else f"stock[{args.stock_backend}]")
    if expected_s is not None and time.monotonic() + 30.0 + 1.15 * expected_s > deadline:  # 30 s: warm-up, tuning
        return {**row, "skipped": f"skipped: time budget (a forward takes ~{expected_s:.0f} s)"}, None
    device = inputs["hidden_states"].device
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    steps, self_ms, cross_ms, estimate_ms, density = [], [], [], [], []
    out = None
    with torch.inference_mode():
        with first_block_only(model):  # warm-up on one block: the session counts that block's layer alone
            session = enable_variant(model, variant, args)
            model(**inputs)
            if session is not None:
                session.detach()
        session = enable_variant(model, variant, args)
        with AttentionTimer(device) as timer:
            for i in range(args.repeats):
                if i and time.monotonic() + 1.2 * steps[-1] / 1e3 > deadline:
                    row["repeats_cut"] = f"{i} of {args.repeats} (time budget)"
                    break
                if session is not None:
                    session.reset_stats()
                start = clock.start()
                result = model(**inputs)[0]
                steps.append(clock.stop_ms(start))
                out = result if out is None else out
                s, c = timer.take_ms()
                self_ms.append(s)
                cross_ms.append(c)
                totals = session.stats["totals"] if session is not None else {}
                estimate_ms.append(totals.get("estimate_ms", 0.0))
                density.append(totals.get("density", 1.0))
        if session is not None:
            session.detach()
        else:
            model.reset_attention_backend()
    median = statistics.median(steps)
    pick = min(range(len(steps)), key=lambda i: abs(steps[i] - median))
    row.update(
        step_s=median / 1e3,
        steps_s=[s / 1e3 for s in steps],
        self_attention_s=self_ms[pick] / 1e3,
        self_attention_share=self_ms[pick] / steps[pick],
        cross_attention_s=cross_ms[pick] / 1e3,
        estimate_s=estimate_ms[pick] / 1e3,
        density=density[pick],
        finite=bool(torch.isfinite(out).all()),
        peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        kind="fixed-density" if variant.startswith("fixed-") else "measured",
    )
    if ref_out is not None:
        row["rel_err_vs_dense"] = rel_err(out, ref_out)
    return row, out


def markdown(rows: list[dict]) -> str:
    lines = [
        "| variant | kind | step s | self-attention s (share) | cross-attn s | estimate s | density | peak GiB "
        "| vs stock | vs dense | rel err vs dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r["variant"].split("[")[0]: r["step_s"] for r in rows if "step_s" in r}
    for r in rows:
        if "step_s" not in r:
            lines.append(f"| {r['variant']} | {r.get('skipped') or r.get('error')} |")
            continue
        speed = [f"{base[b] / r['step_s']:.2f}x" if b in base else "-" for b in ("stock", "dense")]
        err = f"{r['rel_err_vs_dense']:.1e}" if "rel_err_vs_dense" in r else "-"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        lines.append(
            f"| {r['variant']} | {r['kind']} | {r['step_s']:.2f} | {r['self_attention_s']:.2f} "
            f"({100 * r['self_attention_share']:.0f}%) | {r['cross_attention_s']:.2f} | {r['estimate_s']:.2f} "
            f"| {r['density']:.3f} | {peak} | {speed[0]} | {speed[1]} | {err} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=DEFAULT_VARIANTS,
        help="stock, dense, xattn-<threshold>, fixed-<density>; +fp8 for the float8 estimate",
    )
    parser.add_argument(
        "--stock-backends",
        nargs="+",
        default=STOCK_BACKENDS,
        help="diffusers attention backends to try for stock (the fastest available is used)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed forwards per variant (median reported)")
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=None, help="XAttention block size (default 128; tiny 32)")
    parser.add_argument("--backend", default="auto", help="xattn_attention backend: auto, triton, flex, torch")
    parser.add_argument("--min-len", type=int, default=4096, help="the xattn backend's min_len")
    parser.add_argument("--text-valid", type=int, default=None, help="non-zero text tokens of 512 (default 120)")
    parser.add_argument("--budget-s", type=float, default=520.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="JSON output path (default $OUT/e2e_wan.json if $OUT is set)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: 2 narrow blocks, tiny grid, torch backend")
    args = parser.parse_args(argv)
    for v in args.variants:
        try:
            parse_variant(v)
        except ValueError as err:
            parser.error(str(err))
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    t0 = time.monotonic()
    deadline = t0 + args.budget_s
    if args.tiny:
        config, latent, text_tokens = TINY_CONFIG, TINY_LATENT, TINY_TEXT_TOKENS
        device, dtype = torch.device("cpu"), torch.float32
        args.text_valid = 12 if args.text_valid is None else args.text_valid
        args.block_size = args.block_size or 32
        args.min_len = min(args.min_len, 16)
        args.backend = "torch" if args.backend == "auto" else args.backend
        args.stock_backends = [b for b in args.stock_backends if b in ("native", "_native_math")] or ["native"]
    else:
        if not torch.cuda.is_available():
            parser.error("this benchmark needs a CUDA GPU (or --tiny for a CPU run of the script)")
        config, latent, text_tokens = WAN21_14B, LATENT, TEXT_TOKENS
        device, dtype = torch.device("cuda"), torch.bfloat16
        args.text_valid = 120 if args.text_valid is None else args.text_valid
        args.block_size = args.block_size or 128
    if not 1 <= args.text_valid <= text_tokens:
        parser.error(f"--text-valid must be in [1, {text_tokens}]")

    import_project()
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "attention backends are experimental", once per variant

    import xattn_video

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"# {device_name}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"xattn-video {xattn_video.__version__}",
        flush=True,
    )
    model = build_transformer(config, device, dtype, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    n_video = video_tokens(config, latent)
    print(
        f"# WanTransformer3DModel {n_params / 1e9:.2f}B parameters, {dtype}, random weights, built in "
        f"{time.monotonic() - t0:.1f} s; {n_video:,} video tokens, {text_tokens} text ({args.text_valid} "
        "non-zero)",
        flush=True,
    )
    inputs = make_inputs(config, latent, text_tokens, args.text_valid, device, dtype, seed=1)
    if args.tiny:
        err = check_against_plain_build(model, config, inputs)
        print(f"# the meta-built model vs a plainly built one with its weights: rel err {err:.1e}", flush=True)
        if err > 1e-6:
            raise RuntimeError("build_transformer does not reproduce the plainly built model (RoPE tables?)")
    clock = Clock(device)
    stock_rows = pick_stock_backend(model, inputs, args, clock)
    for r in stock_rows:
        print(
            f"  stock backend {r['backend']:>18}: "
            + (f"first block {r['first_block_ms']:.1f} ms" if "first_block_ms" in r else r["error"]),
            flush=True,
        )
    rows, ref_out = [], None
    # stock first (the attention share of a plain step), then dense (the reference of the output comparison)
    order = sorted(args.variants, key=lambda v: (v != "stock", v != "dense"))
    for variant in order:
        expected = max((r["step_s"] for r in rows if "step_s" in r), default=None)  # the slowest so far
        try:
            row, out = run_variant(model, variant, inputs, args, clock, deadline, ref_out, expected)
        except Exception as exc:  # report and go on
            row, out = dict(variant=variant, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300]), None
        if variant == "dense" and out is not None:
            ref_out = out
            for earlier in rows:  # stock ran before dense: compare it now
                if earlier.get("_out") is not None:
                    earlier["rel_err_vs_dense"] = rel_err(earlier.pop("_out"), ref_out)
        elif variant == "stock" and out is not None:
            row["_out"] = out
        rows.append(row)
        if "step_s" in row:
            print(
                f"  {row['variant']:>24}: forward {row['step_s']:.2f} s, self-attention "
                f"{row['self_attention_s']:.2f} s ({100 * row['self_attention_share']:.0f}%), cross "
                f"{row['cross_attention_s']:.3f} s, density {row['density']:.3f}",
                flush=True,
            )
        else:
            print(f"  {row['variant']:>24}: {row.get('skipped') or row.get('error')}", flush=True)
    for r in rows:
        r.pop("_out", None)
    print()
    print(markdown(rows))
    path = args.json or (os.path.join(os.environ["OUT"], "e2e_wan.json") if os.environ.get("OUT") else None)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(
                dict(
                    device=device_name,
                    torch=torch.__version__,
                    diffusers=diffusers.__version__,
                    time=time.strftime("%Y-%m-%d %H:%M:%S"),
                    parameters=n_params,
                    video_tokens=n_video,
                    config={k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
                    args=vars(args),
                    stock_backends=stock_rows,
                    rows=rows,
                    wall_s=time.monotonic() - t0,
                ),
                f,
                indent=1,
            )
        print(f"# wrote {path}", flush=True)
    return 0 if all("step_s" in r or "skipped" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
