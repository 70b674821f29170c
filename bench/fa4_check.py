"""FlashAttention-4 and float8 attention at HunyuanVideo 720p size: correctness first, then timings, one table.

At 119,056 tokens (720x1280x129 + 256 text), 24 heads x 128, bf16, video-like q/k/v
(:func:`xattn_video.testing.synthetic.video_like_qkv`), in one run:

1. checks: FA4 dense vs cuDNN SDPA; FA4 block-sparse vs this project's Triton kernel on XAttention's own kept
   blocks (t=0.9, stride 8); the float8 kernel vs the bf16 kernel on the same blocks (relative error);
2. timings (CUDA events, median): cuDNN dense, FA4 dense; Triton sparse, FA4 sparse and the float8 Triton kernel on
   XAttention's kept blocks and at random densities 0.35 and 0.15; the per-call work that is ours around FA4
   (block-sparse metadata from kv_indices) and around the float8 kernel (quantisation of q/k/v);
3. a table, and everything as JSON with ``--json``.

    python bench/fa4_check.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F
from attention import bench_ms, rel_err, tflops, xattn_and_random_selections  # noqa: E402  (bench/ folder)
from torch.nn.attention import SDPBackend, sdpa_kernel

from xattn_video.core import fa4
from xattn_video.kernels.block_sparse_attention import block_sparse_attention_triton
from xattn_video.kernels.block_sparse_attention_fp8 import block_sparse_attention_fp8, quantize_for_attention
from xattn_video.testing.synthetic import random_block_selection, video_like_qkv


def host_us(fn, repeats: int = 50) -> float:
    """Median host-side microseconds of ``fn`` (what it costs the CPU to issue it), after a warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def smoke() -> int:
    """FA4 dense and block-sparse at a small size against the torch reference: 0 when both agree."""
    from xattn_video.core.reference import block_sparse_attention_torch

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 4, 1000, 128, generator=gen, device="cuda").bfloat16() for _ in range(3))
    sel = random_block_selection(1, 4, 8, 0.5, device="cuda", seed=2)
    dense = rel_err(fa4.fa4_dense_attention(q, k, v), F.scaled_dot_product_attention(q.float(), k.float(), v.float()))
    sparse = rel_err(
        fa4.fa4_block_sparse_attention(q, k, v, sel.kv_count, sel.kv_indices, block_size=128, causal=False),
        block_sparse_attention_torch(q.float(), k.float(), v.float(), sel.mask, block_size=128, causal=False),
    )
    print(f"smoke: flash-attn-4 {fa4.installed_version()}: dense rel err {dense:.1e}, sparse rel err {sparse:.1e}")
    return 0 if dense < 1e-2 and sparse < 1e-2 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--height", type=int, default=45)
    parser.add_argument("--width", type=int, default=80)
    parser.add_argument("--text", type=int, default=256)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--densities", type=float, nargs="*", default=[0.35, 0.15])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true", help="only a small FA4 check against the torch reference")
    parser.add_argument("--no-fa4", action="store_true", help="skip FA4 (the float8 kernel and the baselines only)")
    parser.add_argument(
        "--fp8-configs",
        nargs="*",
        default=["128,128,8,3"],
        help="float8 kernel tiles to time, each block_m,block_n,num_warps,num_stages",
    )
    args = parser.parse_args()
    if args.smoke:
        return smoke()
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    env = {
        "device": props.name,
        "torch": torch.__version__,
        "flash_attn_4": fa4.installed_version(),
        "triton": __import__("triton").__version__,
    }
    print("environment:", env, flush=True)
    reason = fa4.problem_for(torch.empty(1, 1, 1, args.head_dim, device=dev, dtype=torch.bfloat16), block_size=128)
    use_fa4 = not args.no_fa4
    if use_fa4 and reason is not None:
        print(f"FA4 cannot run here: {reason}", file=sys.stderr)
        return 2

    q, k, v = video_like_qkv(frames=args.frames, height=args.height, width=args.width, text_tokens=args.text,
                             heads=args.heads, head_dim=args.head_dim, dtype=torch.bfloat16, device=dev)  # fmt: skip
    n, heads, dim = q.shape[2], args.heads, args.head_dim
    n_blocks = math.ceil(n / 128)
    print(f"tokens {n}, heads {heads}, head_dim {dim}, blocks {n_blocks}", flush=True)

    selections = xattn_and_random_selections(q, k, v, args.threshold, args.densities)
    xsel = selections[0][2]

    def triton_sparse(sel):
        return lambda: block_sparse_attention_triton(q, k, v, sel.kv_count, sel.kv_indices, block_size=128,
                                                     causal=False)  # fmt: skip

    def fa4_sparse(sel):
        return lambda: fa4.fa4_block_sparse_attention(q, k, v, sel.kv_count, sel.kv_indices, block_size=128,
                                                      causal=False)  # fmt: skip

    def fp8_sparse(sel, config="128,128,8,3"):
        bm, bn, warps, stages = (int(x) for x in config.split(","))
        return lambda: block_sparse_attention_fp8(q, k, v, sel.kv_count, sel.kv_indices, block_size=128,
                                                  causal=False, block_m=bm, block_n=bn, num_warps=warps,
                                                  num_stages=stages)  # fmt: skip

    def cudnn_dense():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v)

    # ------------------------------------------------------------------ checks
    checks = {}
    ref_dense = cudnn_dense()
    if use_fa4:
        checks["fa4_dense_vs_cudnn"] = rel_err(fa4.fa4_dense_attention(q, k, v), ref_dense)
    for label, _, sel in selections:
        tri = triton_sparse(sel)()
        if use_fa4:
            checks[f"fa4_sparse_vs_triton [{label}]"] = rel_err(fa4_sparse(sel)(), tri)
        for cfg in args.fp8_configs:
            checks[f"fp8 {cfg} vs bf16_triton [{label}]"] = rel_err(fp8_sparse(sel, cfg)(), tri)
    del ref_dense
    for name, value in checks.items():
        print(f"check {name}: rel err {value:.2e}", flush=True)
    ok = all(v < 1e-2 for name, v in checks.items() if "fp8" not in name) and all(
        v < 0.08 for name, v in checks.items() if "fp8" in name
    )
    if not ok:
        print("CHECKS FAILED", file=sys.stderr)

    # ------------------------------------------------------------------ timings
    rows = []

    def row(what, density, ms, note=""):
        rows.append({"what": what, "density": density, "ms": ms, "tflops": tflops(n, heads, dim, density, ms),
                     "note": note})  # fmt: skip
        print(f"{what:55s} {density:6.3f} {ms:9.2f} ms {rows[-1]['tflops']:6.0f} TFLOP/s", flush=True)

    row("cuDNN SDPA dense", 1.0, bench_ms(cudnn_dense, args.repeats))
    if use_fa4:
        row("FA4 dense", 1.0, bench_ms(lambda: fa4.fa4_dense_attention(q, k, v), args.repeats))
    for label, density, sel in selections:
        row(f"Triton sparse bf16 [{label}]", density, bench_ms(triton_sparse(sel), args.repeats))
        if use_fa4:
            row(f"FA4 sparse bf16 [{label}]", density, bench_ms(fa4_sparse(sel), args.repeats))
        for cfg in args.fp8_configs:
            row(f"Triton sparse fp8 {cfg} [{label}]", density, bench_ms(fp8_sparse(sel, cfg), args.repeats))

    overhead = {}
    if use_fa4:
        overhead["fa4_fields_gpu_ms"] = bench_ms(
            lambda: fa4.block_sparse_fields(xsel.kv_count, xsel.kv_indices, 128), 20
        )
        overhead["fa4_fields_host_us"] = host_us(lambda: fa4.block_sparse_fields(xsel.kv_count, xsel.kv_indices, 128))
        overhead["fa4_checks_host_us"] = host_us(lambda: fa4.problem_for(q, block_size=128))
    overhead |= {
        "fp8_quantize_gpu_ms": bench_ms(
            lambda: quantize_for_attention(q, k, v, block_size=128, scale=dim**-0.5, block_d=128), args.repeats
        ),  # fmt: skip
    }
    for name, value in overhead.items():
        print(f"overhead {name}: {value:.3f}", flush=True)

    print("\n| kernel | density | ms | TFLOP/s on kept blocks |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['density']:.3f} | {r['ms']:.1f} | {r['tflops']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "tokens": n, "heads": heads, "head_dim": dim, "checks": checks, "rows": rows,
                       "overhead": overhead, "checks_ok": ok}, f, indent=1)  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
