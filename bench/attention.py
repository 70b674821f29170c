"""GPU benchmark of XAttention's kernels at HunyuanVideo sizes, against cuDNN SDPA and FlexAttention.

For each size it first checks correctness at full size (Triton estimate vs the torch reference estimate;
Triton sparse attention vs FlexAttention on the same blocks; threshold 1.0 vs cuDNN SDPA), then times, in
one run: cuDNN dense SDPA; XAttention at thresholds on video-like inputs (estimate, sparse attention,
total); and fixed random block densities. Prints a Markdown table; with --json writes all numbers.

    python bench/attention.py                      # both HunyuanVideo sizes, defaults below
    python bench/attention.py --sizes 67576 --thresholds 0.9 --densities 0.1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from xattn_video.core.estimate import BlockSelection
from xattn_video.core.flex import flex_block_sparse_attention
from xattn_video.core.reference import block_scores_torch, select_blocks_torch
from xattn_video.kernels.block_sparse_attention import block_sparse_attention_triton
from xattn_video.kernels.estimate import block_scores_triton
from xattn_video.kernels.select import select_blocks_triton
from xattn_video.testing.synthetic import random_block_selection, video_like_qkv

# HunyuanVideo latent grids (129 frames -> 33 latent frames; 2x2 patches) plus 256 text tokens.
SIZES = {
    67576: ("544x960x129", 33, 34, 60, 256),
    119056: ("720x1280x129", 33, 45, 80, 256),
}


def bench_ms(fn, repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` runs after two warm-ups, timed with CUDA events."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def xattn_and_random_selections(q, k, v, threshold: float, densities, seed: int = 1) -> list[tuple]:
    """(label, measured density, BlockSelection) rows: XAttention's own kept blocks (the Triton estimate, stride 8,
    128-token blocks, at ``threshold``), then random blocks at each of ``densities``."""
    from xattn_video.core.config import XAttnConfig
    from xattn_video.core.estimate import checked_config, estimate_blocks

    heads, n_blocks = q.shape[1], math.ceil(q.shape[2] / 128)
    cells = heads * n_blocks * n_blocks
    xsel = estimate_blocks(q, k, checked_config(q, k, v, XAttnConfig(threshold, 8, 128, False, "triton")))
    xdensity = float(xsel.kv_count.sum()) / cells
    rows = [(f"xattn t={threshold} (density {xdensity:.3f})", xdensity, xsel)]
    for d in densities:
        sel = random_block_selection(1, heads, n_blocks, d, device=q.device, seed=seed)
        rows.append((f"random {d}", float(sel.kv_count.sum()) / cells, sel))
    return rows


def extra_memory_mib(fn) -> float:
    """Peak memory ``fn`` needs beyond its inputs and its output (same size as q), in MiB."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before - out.numel() * out.element_size()) / 2**20


def tflops(n: int, heads: int, dim: int, density: float, ms: float) -> float:
    return 4 * n * n * dim * heads * density / (ms * 1e-3) / 1e12


def run_size(n: int, args: argparse.Namespace, device: torch.device, rows: list, checks: list) -> None:
    """Check, then time, every variant at one sequence length; appends to ``rows`` and ``checks``."""
    label, frames, height, width, text = SIZES[n]
    q, k, v = video_like_qkv(frames=frames, height=height, width=width, text_tokens=text, heads=args.heads,
                             head_dim=args.head_dim, dtype=torch.bfloat16, device=device, seed=n)
    assert q.shape[2] == n
    bs = 128
    n_blocks = math.ceil(n / bs)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        dense = F.scaled_dot_product_attention(q, k, v)
        cudnn_ms = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v), args.repeats)
    cudnn_tf = tflops(n, args.heads, args.head_dim, 1.0, cudnn_ms)
    rows.append(dict(size=label, tokens=n, variant="cuDNN SDPA dense", density=1.0, estimate_ms=0.0,
                     attention_ms=cudnn_ms, total_ms=cudnn_ms, vs_cudnn=1.0, tflops=cudnn_tf))
    print(f"{label}: cuDNN dense {cudnn_ms:.1f} ms ({cudnn_tf:.0f} TFLOP/s)", flush=True)

    # ---- correctness at full size
    full = random_block_selection(1, args.heads, n_blocks, 1.0, device=device)
    out = block_sparse_attention_triton(q, k, v, full.kv_count, full.kv_indices, block_size=bs, causal=False)
    checks.append((label, "triton sparse, all blocks, vs cuDNN SDPA", rel_err(out, dense)))
    for threshold in args.thresholds[:1]:
        scores = block_scores_triton(q, k, stride=args.stride, block_size=bs, causal=False)
        heads_ref = slice(0, 3)  # one head of each pattern, to keep the torch reference quick
        ref_scores = block_scores_torch(q[:, heads_ref], k[:, heads_ref], stride=args.stride, block_size=bs,
                                        causal=False)
        checks.append((label, "triton block scores vs torch (3 heads), max abs",
                       float((scores[:, heads_ref] - ref_scores).abs().max())))
        sel = BlockSelection(*select_blocks_triton(scores, threshold=threshold, causal=False))
        ref_mask = select_blocks_torch(ref_scores, threshold=threshold, causal=False)[0]
        checks.append((label, f"mask agreement with torch estimate (3 heads), t={threshold}",
                       float((sel.mask[:, heads_ref] == ref_mask).float().mean())))
        sparse = block_sparse_attention_triton(q, k, v, sel.kv_count, sel.kv_indices, block_size=bs,
                                               causal=False)
        if not args.no_flex:
            flex_out = flex_block_sparse_attention(q, k, v, sel.mask, block_size=bs, causal=False)
            checks.append((label, f"triton sparse vs flex, same blocks, t={threshold}", rel_err(sparse, flex_out)))
        checks.append((label, f"xattn t={threshold} vs dense (approximation error)", rel_err(sparse, dense)))
        checks.append((label, "NaN in sparse output", float(sparse.isnan().any())))
    for c in checks[-6:]:
        print(f"  check {c[1]}: {c[2]:.3g}", flush=True)
    del dense, out

    def time_sparse(sel: BlockSelection) -> tuple[float, float | None]:
        """Median ms of the Triton sparse kernel and (unless --no-flex) FlexAttention on the same blocks."""
        triton_ms = bench_ms(lambda: block_sparse_attention_triton(
            q, k, v, sel.kv_count, sel.kv_indices, block_size=bs, causal=False), args.repeats)
        if args.no_flex:
            return triton_ms, None
        return triton_ms, bench_ms(lambda: flex_block_sparse_attention(
            q, k, v, sel.mask, block_size=bs, causal=False), args.repeats)

    # ---- thresholds on video-like inputs
    for threshold in args.thresholds:
        def estimate(threshold=threshold):
            s = block_scores_triton(q, k, stride=args.stride, block_size=bs, causal=False)
            return BlockSelection(*select_blocks_triton(s, threshold=threshold, causal=False))

        sel = estimate()
        def estimate_and_attend(estimate=estimate):
            chosen = estimate()
            return block_sparse_attention_triton(q, k, v, chosen.kv_count, chosen.kv_indices, block_size=bs,
                                                 causal=False)

        extra_mib = extra_memory_mib(estimate_and_attend)
        density = float(sel.kv_count.sum()) / (args.heads * n_blocks * n_blocks)
        est_ms = bench_ms(estimate, args.repeats)
        att_ms, flex_ms = time_sparse(sel)
        rows.append(dict(size=label, tokens=n, variant=f"xattn t={threshold} s={args.stride}", density=density,
                         estimate_ms=est_ms, attention_ms=att_ms, total_ms=est_ms + att_ms,
                         vs_cudnn=cudnn_ms / (est_ms + att_ms), tflops=tflops(n, args.heads, args.head_dim,
                                                                              density, att_ms),
                         flex_ms=flex_ms, extra_mib=extra_mib))
        print(f"  t={threshold}: density {density:.3f}, estimate {est_ms:.1f} ms, attention {att_ms:.1f} ms, "
              f"flex {flex_ms} ms, extra memory {extra_mib:.0f} MiB", flush=True)

    # ---- fixed random densities
    for density in args.densities:
        sel = random_block_selection(1, args.heads, n_blocks, density, device=device)
        real_density = float(sel.kv_count.sum()) / (args.heads * n_blocks * n_blocks)
        att_ms, flex_ms = time_sparse(sel)
        rows.append(dict(size=label, tokens=n, variant=f"random blocks {density:.2f}", density=real_density,
                         estimate_ms=0.0, attention_ms=att_ms, total_ms=att_ms, vs_cudnn=cudnn_ms / att_ms,
                         tflops=tflops(n, args.heads, args.head_dim, real_density, att_ms), flex_ms=flex_ms))
        print(f"  density {real_density:.3f}: triton {att_ms:.1f} ms, flex {flex_ms} ms", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=sorted(SIZES), help=f"token counts, of {sorted(SIZES)}")
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--thresholds", type=float, nargs="*", default=[0.9, 0.95])
    parser.add_argument("--densities", type=float, nargs="*", default=[0.10, 0.25, 0.35, 0.50])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (it compiles per size)")
    parser.add_argument("--json", default=None, help="write every number to this JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU")
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    print(f"# device: {props.name}, torch {torch.__version__}, triton {_triton_version()}", flush=True)
    rows, checks = [], []
    for n in args.sizes:
        if n not in SIZES:
            parser.error(f"--sizes takes {sorted(SIZES)}, got {n}")
        run_size(n, args, device, rows, checks)
        torch.cuda.empty_cache()
    print("\n| size | variant | density | estimate ms | sparse attn ms | total ms | cuDNN / total | "
          "TFLOP/s on kept blocks (% of cuDNN dense) | Flex ms same blocks | extra MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    dense_tf = {r["size"]: r["tflops"] for r in rows if r["variant"].startswith("cuDNN")}
    for r in rows:
        flex = f"{r['flex_ms']:.1f}" if r.get("flex_ms") else "-"
        extra = f"{r['extra_mib']:.0f}" if r.get("extra_mib") is not None else "-"
        print(f"| {r['size']} | {r['variant']} | {r['density']:.3f} | {r['estimate_ms']:.1f} | "
              f"{r['attention_ms']:.1f} | {r['total_ms']:.1f} | {r['vs_cudnn']:.2f}x | "
              f"{r['tflops']:.0f} ({100 * r['tflops'] / dense_tf[r['size']]:.0f}%) | {flex} | {extra} |")
    print("\n| size | check | value |\n|---|---|---|")
    for label, name, value in checks:
        print(f"| {label} | {name} | {value:.3g} |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(device=props.name, torch=torch.__version__, triton=_triton_version(),
                           time=time.strftime("%Y-%m-%d %H:%M:%S"), args=vars(args), rows=rows,
                           checks=[dict(size=s, check=c, value=v) for s, c, v in checks]), f, indent=1)
    return 0


def _triton_version() -> str:
    import triton

    return triton.__version__


if __name__ == "__main__":
    sys.exit(main())
