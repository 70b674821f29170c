"""GPU benchmark: the language-model prefill of Qwen2-VL-7B at video lengths, SDPA against ``xattn``.

The model is transformers' ``Qwen2VLTextModel`` with Qwen2-VL-7B's language model architecture
(``QWEN2VL_7B_TEXT``: 28 layers, hidden 3584, 28 query heads sharing 4 key/value heads of 128 channels, MLP
18944, M-RoPE sections 16/24/24), random weights in bfloat16, built on the GPU (no download). The input is
random embeddings of ``--tokens`` positions (an hour of video at 1 fps and 64 tokens a frame pair is about
115k); positions are 1D, repeated on the three M-RoPE axes. The vision tower is not run: it is the same for
both and attends per frame pair. Each variant goes through ``attn_implementation`` exactly as a user's model
does: ``sdpa`` (transformers' SDPA, flash/cuDNN kernels, grouped-query heads) or ``xattn`` (this project's
registry function: XAttention on the prefill, ``--stride``, block 128).

Random weights give nearly uniform attention, so a threshold t keeps about a share t of the blocks: the
``xattn-T`` rows measure the prefill at the densities a trained model reaches at other thresholds (report
the density column, not the threshold, when comparing). ``xattn-T-fp8`` scores blocks on float8 copies of
q and k (``estimate_fp8``).

Order: a correctness check first (``--check-tokens`` positions: ``xattn`` at threshold 1.0 against ``sdpa``,
relative error of the last hidden state, beside the noise floor of swapping one exact SDPA kernel for another;
the run stops when it exceeds both 2e-2 and 3x that floor), then per size a warm-up forward
through the first layer only (compiles and autotunes the kernels at the right shapes), then ``--repeats``
timed full forwards per variant (CUDA events, median), with the relative error of each variant's last hidden
state against ``sdpa``'s, the density and the summed estimate / attention kernel times. ``--budget-s``
(default 520) skips what would not fit in one 10-minute call.

    python bench/videollm_prefill.py                                     # 16k, 32k, 64k, 115k tokens
    python bench/videollm_prefill.py --tokens 65536 --variants sdpa xattn-0.9 xattn-0.5 --repeats 3
    python bench/videollm_prefill.py --smoke                             # CPU smoke test of this script

Prints a Markdown table; writes JSON to ``--json`` or, when $OUT is set, to $OUT/videollm_prefill.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_hunyuan import import_project  # noqa: E402  (makes xattn_video importable from a bare checkout)

QWEN2VL_7B_TEXT = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
)
SMOKE_TEXT = dict(
    vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
)
DEFAULT_TOKENS = [16384, 32768, 65536, 114688]
DEFAULT_VARIANTS = ["sdpa", "xattn-0.9", "xattn-0.9-fp8", "xattn-0.5", "xattn-0.25"]


def build_model(config: dict, device: torch.device, dtype: torch.dtype, seed: int):
    from transformers import Qwen2VLTextConfig, Qwen2VLTextModel

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2VLTextModel._from_config(Qwen2VLTextConfig(**config), attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(previous)
    model.embed_tokens = None  # not used: inputs are embeddings (saves 1 GB)
    return model.eval().requires_grad_(False)


def set_variant(model, variant: str, args) -> None:
    from xattn_video.llm import transformers_attention as xta

    if variant == "sdpa":
        model.set_attn_implementation("sdpa")
        return
    parts = variant.split("-")  # xattn-T or xattn-T-fp8
    xta.configure(threshold=float(parts[1]), stride=args.stride, block_size=args.block_size,
                  min_len=args.block_size, backend=args.backend, estimate_fp8=parts[2:] == ["fp8"])
    model.set_attn_implementation(xta.NAME)


def inputs(n: int, hidden: int, device, dtype, seed: int) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    embeds = torch.randn(1, n, hidden, device=device, dtype=dtype, generator=gen)
    positions = torch.arange(n, device=device).view(1, 1, n).expand(3, 1, n)
    return {"inputs_embeds": embeds, "position_ids": positions}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward(model, batch: dict, device) -> tuple[torch.Tensor, float]:
    """One prefill (with a fresh cache, as generate's) and its time in seconds."""
    from transformers import DynamicCache

    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model(**batch, use_cache=True, past_key_values=DynamicCache(config=model.config)).last_hidden_state
    sync(device)
    return out, time.perf_counter() - start


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def check(model, args, device, dtype) -> tuple[float, float]:
    """xattn at threshold 1.0 against sdpa on ``--check-tokens`` positions, and the noise floor: another exact
    SDPA kernel against the default one. 28 random layers amplify bf16 rounding, so a correct kernel's error
    is judged against what swapping one exact kernel for another gives."""
    batch = inputs(args.check_tokens, model.config.hidden_size, device, dtype, args.seed)
    set_variant(model, "sdpa", args)
    ref, _ = forward(model, batch, device)
    floor = float("nan")
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            other, _ = forward(model, batch, device)
        floor = rel_err(other, ref)
    set_variant(model, "xattn-1.0", args)
    out, _ = forward(model, batch, device)
    return rel_err(out, ref), floor


def run_size(model, n: int, args, device, dtype, deadline: float) -> list[dict]:
    from xattn_video.llm import transformers_attention as xta

    batch = inputs(n, model.config.hidden_size, device, dtype, args.seed)
    rows, ref = [], None
    layers = model.layers
    for variant in args.variants:
        set_variant(model, variant, args)
        model.layers = layers[:1]  # warm-up: kernels compile and tune at these shapes, at 1/28 of the cost
        forward(model, batch, device)
        model.layers = layers
        times: list[float] = []
        for _ in range(max(args.repeats, 1)):  # the first forward always runs, so out and stats are set
            if times and time.perf_counter() + max(times) > deadline:
                break
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with xta.collect_stats() as stats:
                out, seconds = forward(model, batch, device)
            times.append(seconds)
        if not times:
            rows.append({"tokens": n, "variant": variant, "skipped": "budget"})
            continue
        if variant == "sdpa":
            ref = out
        row = {
            "tokens": n, "variant": variant, "prefill_s": statistics.median(times), "repeats": len(times),
            "density": stats.density, "estimate_ms": stats.estimate_ms or None,
            "attention_ms": stats.attention_ms or None, "dense_calls": dict(stats.dense_calls),
            "rel_err_vs_sdpa": rel_err(out, ref) if ref is not None else None,
            "peak_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        }
        rows.append(row)
        del out
        if time.perf_counter() > deadline:
            break
    base = next((r["prefill_s"] for r in rows if r["variant"] == "sdpa" and "prefill_s" in r), None)
    for r in rows:
        if base and "prefill_s" in r:
            r["speedup_vs_sdpa"] = base / r["prefill_s"]
    return rows


def markdown(rows: list[dict], check_err: float, device_name: str) -> str:
    def f(x, spec):
        return "-" if x is None else format(x, spec)

    lines = [f"Device: {device_name}; xattn at threshold 1.0 vs sdpa, relative error: {check_err:.2e}", "",
             "| tokens | variant | density | prefill s | vs sdpa | estimate ms | sparse attention ms | rel err vs sdpa "
             "| peak GB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['tokens']} | {r['variant']} | skipped ({r['skipped']}) | | | | | | |")
            continue
        lines.append(f"| {r['tokens']} | {r['variant']} | {f(r['density'], '.3f')} | {r['prefill_s']:.3f} | "
                     f"{f(r.get('speedup_vs_sdpa'), '.2f')}x | {f(r['estimate_ms'], '.1f')} | "
                     f"{f(r['attention_ms'], '.1f')} | {f(r['rel_err_vs_sdpa'], '.2e')} | {f(r['peak_gb'], '.1f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=None,
                        help=f"prefill lengths (default {DEFAULT_TOKENS})")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                        help="sdpa, xattn-T (T: threshold), xattn-T-fp8 (float8 estimate)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--check-tokens", type=int, default=8192)
    parser.add_argument("--budget-s", type=float, default=520.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true", help="CPU smoke test: tiny model, float32, short prefills")
    args = parser.parse_args(argv)
    deadline = time.perf_counter() + args.budget_s
    import_project()
    if args.smoke:
        device, dtype, config = torch.device("cpu"), torch.float32, SMOKE_TEXT
        args.tokens = args.tokens or [512]
        args.check_tokens, args.block_size, args.stride, args.repeats = 256, 64, 8, 1
    else:
        if not torch.cuda.is_available():
            print("needs a CUDA GPU (or --smoke)", file=sys.stderr)
            return 2
        device, dtype, config = torch.device("cuda"), torch.bfloat16, QWEN2VL_7B_TEXT
        args.tokens = args.tokens or DEFAULT_TOKENS
    if "sdpa" in args.variants:
        args.variants = ["sdpa"] + [v for v in args.variants if v != "sdpa"]  # the reference runs first
    from xattn_video.llm import transformers_attention as xta

    xta.register()
    model = build_model(config, device, dtype, args.seed)
    check_err, floor = check(model, args, device, dtype)
    print(f"xattn threshold 1.0 vs sdpa at {args.check_tokens} tokens: relative error {check_err:.2e} "
          f"(noise floor, math SDPA vs the default: {floor:.2e})", flush=True)
    if not check_err < max(2e-2, 3 * floor if floor == floor else 0.0):
        print("FAILED: xattn at threshold 1.0 does not reproduce sdpa; no timing", file=sys.stderr)
        return 1
    rows = []
    for n in args.tokens:
        if time.perf_counter() > deadline:
            rows.append({"tokens": n, "variant": "all", "skipped": "budget"})
            continue
        rows.extend(run_size(model, n, args, device, dtype, deadline))
        print(f"{n} tokens done ({time.perf_counter() - deadline + args.budget_s:.0f} s)", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    table = markdown(rows, check_err, name)
    print(table)
    path = args.json or (os.path.join(os.environ["OUT"], "videollm_prefill.json") if os.environ.get("OUT") else None)
    if path:
        Path(path).write_text(json.dumps({"device": name, "check_rel_err": check_err, "rows": rows,
                                          "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
