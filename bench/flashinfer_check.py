"""FlashInfer's Hopper (FA3-template) block-sparse forward, bf16 and float8, at HunyuanVideo 720p size: is it the
float8 kernel the speed issue's 2.3x target needs? Correctness first, then timings, one table.

The target (docs/benchmarks.md) needs attention on the kept blocks at about 1.55x FA4's bf16 rate; this project's
Triton float8 kernel is level with FA4's bf16. FlashInfer (``flashinfer-python``, PyPI) ships FA3-template prefill
kernels for sm90 with float8 e4m3 q/k/v (per-head scales, bf16 output) behind
``flashinfer.sparse.BlockSparseAttentionWrapper`` (backend ``fa3``): a block-sparse matrix in BSR form whose rows
are R-query blocks and whose kept column blocks are C-token pages of a paged KV cache.

The wrapper's BSR is one matrix for all heads; XAttention keeps blocks per head. So the heads are folded into the
token axis: q [H * N, 1, D], k and v likewise, and row (h, qb) of the folded BSR keeps columns h * nkb + kv_indices
(one launch for all heads). Token counts must be whole blocks here (default: 119,040 = 930 x 128, the 720p
video tokens with 240 text tokens instead of 256); float8 scales are per tensor (one folded head).

In one run: XAttention's own kept blocks (t=0.9, stride 8) and random blocks at 0.35 and 0.15; checks (FlashInfer
bf16 and float8 against the Triton bf16 kernel on the same blocks); timings (CUDA events, median) of cuDNN dense,
the Triton bf16 and float8 kernels, FlashInfer bf16 and float8, and the per-plan host cost; last, a probe of the
real token count (119,056, a ragged last block) through FlashInfer's paged wrapper (``ragged_check``).
``--dense-only`` times FlashInfer's dense forward instead, bf16 and float8, against cuDNN (``dense_check``).
Results: docs/benchmarks.md, "FlashInfer's Hopper float8 block-sparse forward".

On the device (FlashInfer compiles its kernels with nvcc at first use, a few minutes; its cache under
``FLASHINFER_WORKSPACE_BASE`` serves later calls on the same machine)::

    mkdir -p /tmp/fis && tar xJf .whl_fi/flashinfer_trim.tar.xz -C /tmp/fis
    python3 -m pip install -q --no-index --no-deps --target /tmp/fis .whl_fi/apache_tvm_ffi-*.whl
    export PYTHONPATH=/tmp/fis:$PWD FLASHINFER_CUDA_ARCH_LIST=9.0a FLASHINFER_WORKSPACE_BASE=$PWD/outputs/fi_ws
    python3 bench/flashinfer_check.py --json $OUT/flashinfer_check.json

``.whl_fi/flashinfer_trim.tar.xz``: flashinfer-python 0.7.4's package with ``data/csrc`` cut to its top-level files
(the prefill templates; 20 MB compressed, under the 64 MiB a device call carries); ``apache_tvm_ffi`` is its one
import not on the device image. Rebuild (the wheel is 101 MB)::

    pip download --no-deps --only-binary=:all: --python-version 3.12 -d /tmp/fi flashinfer-python==0.7.4
    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
        -d .whl_fi apache-tvm-ffi==0.1.15.post2
    cd /tmp/fi && unzip -q flashinfer_python-0.7.4-py3-none-any.whl 'flashinfer/*' \
        && find flashinfer/data/csrc -mindepth 1 -type d -prune -exec rm -rf {} + \
        && tar cf - flashinfer | xz -6 > .../.whl_fi/flashinfer_trim.tar.xz
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
from attention import bench_ms, rel_err, tflops, xattn_and_random_selections  # noqa: E402  (bench/ folder)
from torch.nn.attention import SDPBackend, sdpa_kernel

from xattn_video.kernels.block_sparse_attention import block_sparse_attention_triton
from xattn_video.kernels.block_sparse_attention_fp8 import block_sparse_attention_fp8
from xattn_video.testing.synthetic import random_block_selection, video_like_qkv

E4M3_MAX = 448.0


def folded_bsr(kv_count: torch.Tensor, kv_indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BSR (indptr, indices), int32, of the heads-folded block matrix: row h * nqb + qb keeps the columns
    h * nkb + kv_indices[0, h, qb, :kv_count[0, h, qb]] (batch 1; nkb = nqb)."""
    count, idx = kv_count[0].long(), kv_indices[0].long()  # [H, nqb], [H, nqb, nkb]
    heads, nqb, nkb = idx.shape
    valid = torch.arange(nkb, device=idx.device) < count[..., None]
    cols = (idx + torch.arange(heads, device=idx.device)[:, None, None] * nkb)[valid]  # row-major: h, qb, slot
    indptr = torch.zeros(heads * nqb + 1, dtype=torch.int32, device=idx.device)
    indptr[1:] = count.reshape(-1).cumsum(0)
    return indptr, cols.to(torch.int32)


def fold(x: torch.Tensor) -> torch.Tensor:
    """[1, H, N, D] -> [H * N, 1, D] (NHD with one head)."""
    return x[0].reshape(-1, 1, x.shape[-1]).contiguous()


def unfold(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.reshape(1, heads, -1, x.shape[-1])


def to_e4m3(x: torch.Tensor, dims: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Float8 e4m3 with power-of-two scales (x = x8 * scale): one scale per tensor, or, with ``dims``, one per
    index of the dimensions not in ``dims`` (e.g. per head of [N, H, D]: dims=(0, 2)); the scales come flat."""
    amax = x.abs().amax(dim=dims, keepdim=True) if dims else x.abs().amax()
    scale = torch.exp2(torch.ceil(torch.log2(amax.float().clamp(min=1e-12) / E4M3_MAX)))
    return (x.float() / scale).to(torch.float8_e4m3fn), scale.reshape(-1)


def ragged_check(
    grid: tuple[int, int, int], text: int, heads: int, dim: int, workspace: torch.Tensor, density: float, repeats: int
) -> dict:
    """A ragged token count (at 720p 119,056: the last key block holds 16 tokens) through FlashInfer's paged wrapper:
    each head padded to whole pages, rows (h, qb) as requests of 128 queries, the kept key blocks as pages, and the
    last page's length 16 where a row keeps the ragged block. Against the Triton bf16 kernel on the unpadded
    tensors, bf16 and float8 (scales as floats: q and k folded into the softmax scale, v applied on the output)."""
    from flashinfer import BatchPrefillWithPagedKVCacheWrapper

    dev = workspace.device
    q, k, v = video_like_qkv(frames=grid[0], height=grid[1], width=grid[2], text_tokens=text, heads=heads,
                             head_dim=dim, dtype=torch.bfloat16, device=dev)  # fmt: skip
    n = q.shape[2]
    nb = -(-n // 128)
    pad = nb * 128 - n
    sel = random_block_selection(1, heads, nb, density, device=dev, seed=2)
    ref = block_sparse_attention_triton(q, k, v, sel.kv_count, sel.kv_indices, block_size=128, causal=False)
    qf, kf, vf = (F.pad(x[0], (0, 0, 0, pad)).reshape(-1, 1, dim) for x in (q, k, v))
    kp, vp = kf.reshape(-1, 128, 1, dim), vf.reshape(-1, 128, 1, dim)
    indptr, indices = folded_bsr(sel.kv_count, sel.kv_indices)
    count = sel.kv_count[0].long()
    last = sel.kv_indices[0].long().gather(-1, (count - 1).clamp(min=0)[..., None])[..., 0]
    last_len = torch.where(last == nb - 1, n - (nb - 1) * 128, 128).reshape(-1).to(torch.int32)
    qo_indptr = torch.arange(heads * nb + 1, dtype=torch.int32, device=dev) * 128
    result = {"tokens": n}
    (q8, sq), (k8, sk), (v8, sv) = to_e4m3(qf), to_e4m3(kp), to_e4m3(vp)
    for name, dtype in (("bf16", torch.bfloat16), ("float8", torch.float8_e4m3fn)):
        try:
            wrapper = BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend="fa3")
            wrapper.plan(qo_indptr, indptr, indices, last_len, 1, 1, dim, 128, causal=False, sm_scale=dim**-0.5,
                         q_data_type=dtype, kv_data_type=dtype, o_data_type=torch.bfloat16)  # fmt: skip
            if dtype == torch.bfloat16:
                fn = lambda w=wrapper: w.run(qf, (kp, vp))  # noqa: E731
            else:
                fn = lambda w=wrapper: w.run(  # noqa: E731
                    q8, (k8, v8), q_scale=float(sq), k_scale=float(sk), v_scale=float(sv)
                )
            out = fn().reshape(heads, nb * 128, dim)[:, :n].unsqueeze(0)
            result[name] = {"rel_err_vs_triton_bf16": rel_err(out, ref), "ms": bench_ms(fn, repeats)}
        except Exception as exc:  # a probe: report what failed, keep the main results
            result[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        print(f"ragged {n} tokens, {name}: {result[name]}", flush=True)
    return result


def dense_check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, repeats: int) -> dict:
    """FlashInfer's FA3-template dense prefill (``single_prefill_with_kv_cache``, backend ``fa3``), bf16 and float8
    (per-head power-of-two scales), against cuDNN dense in the same run: the kernel family's own dense float8 rate,
    which bounds what its block-sparse form can reach."""
    from flashinfer import single_prefill_with_kv_cache

    n, heads, dim = q.shape[2], q.shape[1], q.shape[3]
    qn, kn, vn = (x[0].transpose(0, 1).contiguous() for x in (q, k, v))  # [N, H, D]

    (q8, sq), (k8, sk), (v8, sv) = (to_e4m3(x, dims=(0, 2)) for x in (qn, kn, vn))  # per head
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        ref = F.scaled_dot_product_attention(q, k, v)[0].transpose(0, 1)
    kernels = {
        "cuDNN SDPA dense": lambda: F.scaled_dot_product_attention(q, k, v),
        "FlashInfer fa3 dense float8": lambda: single_prefill_with_kv_cache(
            q8, k8, v8, scale_q=sq, scale_k=sk, scale_v=sv, o_dtype=torch.bfloat16, backend="fa3"
        ),
        "FlashInfer fa3 dense bf16": lambda: single_prefill_with_kv_cache(qn, kn, vn, backend="fa3"),
    }
    result = {}
    for name, fn in kernels.items():
        try:
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                out = fn()
                err = 0.0 if name.startswith("cuDNN") else rel_err(out, ref)
                ms = bench_ms(fn, repeats)
            result[name] = {"rel_err_vs_cudnn": err, "ms": ms, "tflops": tflops(n, heads, dim, 1.0, ms)}
        except Exception as exc:  # a probe: report what failed, keep the others
            result[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        print(f"dense {n} tokens, {name}: {result[name]}", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--height", type=int, default=45)
    parser.add_argument("--width", type=int, default=80)
    parser.add_argument("--text", type=int, default=240, help="text tokens (the total must be whole 128-blocks)")
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--densities", type=float, nargs="*", default=[0.35, 0.15])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-bf16", action="store_true", help="skip FlashInfer's bf16 kernels (one compile less)")
    parser.add_argument("--dense-only", action="store_true", help="only the dense bf16 / float8 rates (dense_check)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import flashinfer
    from flashinfer.sparse import BlockSparseAttentionWrapper

    dev = torch.device("cuda")
    env = {
        "device": torch.cuda.get_device_properties(dev).name,
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "flashinfer": flashinfer.__version__,
    }
    print("environment:", env, flush=True)
    q, k, v = video_like_qkv(frames=args.frames, height=args.height, width=args.width, text_tokens=args.text,
                             heads=args.heads, head_dim=args.head_dim, dtype=torch.bfloat16, device=dev)  # fmt: skip
    n, heads, dim = q.shape[2], args.heads, args.head_dim
    if n % 128:
        print(f"tokens {n} are not whole 128-blocks: change --text", file=sys.stderr)
        return 2
    nb = n // 128
    print(f"tokens {n}, heads {heads}, head_dim {dim}, blocks {nb}", flush=True)
    if args.dense_only:
        dense = dense_check(q, k, v, args.repeats)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"env": env, "tokens": n, "heads": heads, "head_dim": dim, "dense": dense}, f, indent=1)
        return 0 if all("error" not in r for r in dense.values()) else 1

    selections = xattn_and_random_selections(q, k, v, args.threshold, args.densities)

    qf, kf, vf = fold(q), fold(k), fold(v)
    t0 = time.perf_counter()
    (q8, sq), (k8, sk), (v8, sv) = to_e4m3(qf), to_e4m3(kf), to_e4m3(vf)
    torch.cuda.synchronize()
    quant_ms = (time.perf_counter() - t0) * 1e3
    workspace = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=dev)

    def planned(sel, dtype):
        wrapper = BlockSparseAttentionWrapper(workspace, backend="fa3")
        indptr, indices = folded_bsr(sel.kv_count, sel.kv_indices)
        torch.cuda.synchronize()
        t = time.perf_counter()
        wrapper.plan(indptr, indices, heads * n, heads * n, 128, 128, 1, 1, dim, causal=False,
                     sm_scale=dim**-0.5, q_data_type=dtype, kv_data_type=dtype,
                     o_data_type=torch.bfloat16)  # fmt: skip
        torch.cuda.synchronize()
        return wrapper, (time.perf_counter() - t) * 1e3

    variants = {}  # (label, kernel) -> callable
    plans, errors, failed = {}, {}, set()
    for label, _, sel in selections:
        variants[(label, "Triton bf16")] = lambda s=sel: block_sparse_attention_triton(
            q, k, v, s.kv_count, s.kv_indices, block_size=128, causal=False
        )
        variants[(label, "Triton float8")] = lambda s=sel: block_sparse_attention_fp8(
            q, k, v, s.kv_count, s.kv_indices, block_size=128, causal=False
        )
        for name, dtype in [("FlashInfer float8", torch.float8_e4m3fn)] + (
            [] if args.no_bf16 else [("FlashInfer bf16", torch.bfloat16)]
        ):
            if name in failed:  # one failed compile is enough: the next selections would retry it
                continue
            t = time.perf_counter()
            try:  # a compile or plan failure is reported, and the other kernels still run
                wrapper, plan_ms = planned(sel, dtype)
            except Exception as exc:
                what = f"{name} [{label}]"
                errors[what] = f"{type(exc).__name__}: {exc}"[:800]
                print(f"FAILED {what}: {errors[what]}", flush=True)
                failed.add(name)
                continue
            took = time.perf_counter() - t
            print(f"planned {name} [{label}] in {plan_ms:.1f} ms ({took:.0f} s with any compile)", flush=True)
            plans[f"{name} [{label}]"] = plan_ms
            if dtype == torch.bfloat16:
                variants[(label, name)] = lambda w=wrapper: w.run(qf, kf, vf)
            else:
                variants[(label, name)] = lambda w=wrapper: w.run(q8, k8, v8, scale_q=sq, scale_k=sk, scale_v=sv)
    for label, _, sel in selections:  # plans are host work: time them again, warm
        if (label, "FlashInfer float8") in variants:
            plans[f"FlashInfer float8 [{label}] (again)"] = planned(sel, torch.float8_e4m3fn)[1]

    # ------------------------------------------------------------------ checks
    checks = {}
    for label, _, _ in selections:
        ref = variants[(label, "Triton bf16")]()
        for (lab, kernel), fn in variants.items():
            if lab != label or kernel == "Triton bf16":
                continue
            try:
                out = fn()
            except Exception as exc:
                what = f"{kernel} [{label}] run"
                errors[what] = f"{type(exc).__name__}: {exc}"[:800]
                print(f"FAILED {what}: {errors[what]}", flush=True)
                continue
            out = unfold(out, heads) if out.dim() == 3 else out
            checks[f"{kernel} vs Triton bf16 [{label}]"] = rel_err(out, ref)
    for name, value in checks.items():
        print(f"check {name}: rel err {value:.2e}", flush=True)
    ok = not errors and all(v < (0.08 if "float8" in name else 1e-2) for name, v in checks.items())
    if not ok:
        print("CHECKS FAILED", file=sys.stderr)

    # ------------------------------------------------------------------ timings
    rows = []

    def row(what, density, ms):
        rows.append({"what": what, "density": density, "ms": ms, "tflops": tflops(n, heads, dim, density, ms)})
        print(f"{what:50s} {density:6.3f} {ms:9.2f} ms {rows[-1]['tflops']:6.0f} TFLOP/s", flush=True)

    def cudnn_dense():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v)

    row("cuDNN SDPA dense", 1.0, bench_ms(cudnn_dense, args.repeats))
    for label, density, _ in selections:
        for (lab, kernel), fn in variants.items():
            if lab == label and f"{kernel} [{label}] run" not in errors:
                row(f"{kernel} [{label}]", density, bench_ms(fn, args.repeats))
    quant = bench_ms(lambda: (to_e4m3(qf), to_e4m3(kf), to_e4m3(vf)), args.repeats)
    print(f"per-tensor float8 quantisation of q, k, v (torch): {quant:.2f} ms (first {quant_ms:.1f} ms)")
    print("\n| kernel | density | ms | TFLOP/s on kept blocks |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['density']:.3f} | {r['ms']:.1f} | {r['tflops']:.0f} |")
    print("\nplan (host) ms:", json.dumps({k: round(v, 2) for k, v in plans.items()}))
    grid = (args.frames, args.height, args.width)  # 16 text tokens more: a ragged last block
    ragged = ragged_check(grid, args.text + 16, heads, dim, workspace, args.densities[0] if args.densities else 0.35,
                          args.repeats)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            record = {"env": env, "tokens": n, "heads": heads, "head_dim": dim, "checks": checks, "checks_ok": ok}
            record |= {"rows": rows, "plans_ms": plans, "quantise_ms": quant, "ragged": ragged, "errors": errors}
            json.dump(record, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
