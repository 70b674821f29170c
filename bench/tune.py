"""Sweep launch settings of the Triton kernels at one HunyuanVideo size; each setting is checked, then timed.

    python bench/tune.py --tokens 119056 --which attention estimate

Prints one line per setting (error against the default setting's output, median ms, TFLOP/s). The chosen
defaults live in the kernels' launchers; this script is how they were chosen.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from bench.attention import SIZES, bench_ms, rel_err, tflops
from xattn_video.kernels.block_sparse_attention import block_sparse_attention_triton
from xattn_video.kernels.estimate import block_scores_triton
from xattn_video.kernels.select import select_blocks_triton
from xattn_video.testing.synthetic import random_block_selection, video_like_qkv


def tune_attention(q, k, v, heads, dim, repeats):
    n = q.shape[2]
    n_blocks = math.ceil(n / 128)
    sel = random_block_selection(1, heads, n_blocks, 0.35, device=q.device)
    density = float(sel.kv_count.sum()) / (heads * n_blocks * n_blocks)
    ref = block_sparse_attention_triton(q, k, v, sel.kv_count, sel.kv_indices, block_size=128, causal=False)
    grid = [
        dict(),
        dict(num_stages=4),
        dict(num_stages=2),
        dict(block_n=128),
        dict(use_tma=False),
        dict(schedule="heavy_first"),
        dict(num_warps=16),
        dict(block_n=128, num_warps=16, num_stages=2),
    ]
    for cfg in grid:
        try:
            out = block_sparse_attention_triton(q, k, v, sel.kv_count, sel.kv_indices, block_size=128,
                                                causal=False, **cfg)
            err = rel_err(out, ref)
            ms = bench_ms(lambda cfg=cfg: block_sparse_attention_triton(
                q, k, v, sel.kv_count, sel.kv_indices, block_size=128, causal=False, **cfg), repeats)
            print(f"attention {cfg}: err {err:.2e}, {ms:.2f} ms, {tflops(n, heads, dim, density, ms):.0f} TFLOP/s",
                  flush=True)
        except Exception as e:  # report and go on: one setting may not fit the chip
            print(f"attention {cfg}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)


def tune_estimate(q, k, stride, repeats):
    ref = block_scores_triton(q, k, stride=stride, block_size=128, causal=False)
    mib = 1 << 20
    grid = [
        dict(),
        dict(use_tma=True),
        dict(use_tma=True, scratch_bytes=600 * mib),
        dict(use_tma=True, num_warps=4),
        dict(use_tma=True, block_n=256, num_stages=2),
        dict(use_tma=True, block_m=256, num_stages=2),
        dict(use_tma=True, block_m=64, num_warps=4, num_stages=4),
        dict(use_tma=True, num_stages=2),
        dict(scratch_bytes=600 * mib),
        # larger tiles halve/raise the GEMM's reuse of each loaded q/k tile; 16 warps keep the accumulator in
        # registers
        dict(use_tma=True, block_m=256, num_warps=16, num_stages=2),
        dict(use_tma=True, block_n=256, num_warps=16, num_stages=2),
        dict(use_tma=True, block_m=256, block_n=256, num_warps=16, num_stages=1),
        dict(use_tma=True, block_m=256, block_n=64, num_warps=8, num_stages=3),
        # float8 q/k (quantisation included in the time)
        dict(fp8=True),
        dict(fp8=True, num_stages=3),
        dict(fp8=True, block_n=256, num_stages=3),
        dict(fp8=True, block_n=256, num_stages=2),
        dict(fp8=True, block_m=256, num_warps=16, num_stages=3),
        dict(fp8=True, num_warps=4),
    ]
    for cfg in grid:
        try:
            out = block_scores_triton(q, k, stride=stride, block_size=128, causal=False, **cfg)
            err = float((out - ref).abs().max())
            ms = bench_ms(lambda cfg=cfg: block_scores_triton(q, k, stride=stride, block_size=128, causal=False,
                                                              **cfg), repeats)
            n, heads, dim = q.shape[2], q.shape[1], q.shape[3]
            gemm_tf = 2 * n * n * dim * heads / stride / (ms * 1e-3) / 1e12
            print(f"estimate {cfg}: max abs diff {err:.2e}, {ms:.2f} ms, strided GEMM at {gemm_tf:.0f} TFLOP/s",
                  flush=True)
        except Exception as e:
            print(f"estimate {cfg}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
    from xattn_video.kernels.quantize import quantize_fp8

    print(f"quantize_fp8(q) alone: {bench_ms(lambda: quantize_fp8(q), repeats):.2f} ms", flush=True)
    fp8 = block_scores_triton(q, k, stride=stride, block_size=128, causal=False, fp8=True)
    row_mass = ref.sum(-1, keepdim=True)
    print(f"fp8 scores: max |diff| / row mass {float(((fp8 - ref).abs() / row_mass).max()):.2e}", flush=True)
    for threshold in (0.9, 0.95):
        exact, _, _ = select_blocks_triton(ref, threshold=threshold, causal=False)
        approx, _, _ = select_blocks_triton(fp8, threshold=threshold, causal=False)
        print(f"fp8 selection t={threshold}: density {float(approx.float().mean()):.4f} vs "
              f"{float(exact.float().mean()):.4f}, blocks that differ {float((approx != exact).float().mean()):.2e}",
              flush=True)
    for threshold in (0.9, 0.95):
        ms = bench_ms(lambda threshold=threshold: select_blocks_triton(ref, threshold=threshold, causal=False),
                      repeats)
        print(f"selection t={threshold}: {ms:.2f} ms", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=119056, choices=sorted(SIZES))
    parser.add_argument("--which", nargs="+", default=["attention", "estimate"], choices=["attention", "estimate"])
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    _, frames, height, width, text = SIZES[args.tokens]
    q, k, v = video_like_qkv(frames=frames, height=height, width=width, text_tokens=text, heads=24, head_dim=128,
                             dtype=torch.bfloat16, device="cuda", seed=0)
    print(f"# {torch.cuda.get_device_name()}, {args.tokens} tokens", flush=True)
    if "attention" in args.which:
        tune_attention(q, k, v, 24, 128, args.repeats)
    if "estimate" in args.which:
        tune_estimate(q, k, args.stride, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
