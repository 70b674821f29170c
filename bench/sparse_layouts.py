"""GPU check: the sparse kernel at HunyuanVideo 720x1280 (118,920 valid of 119,056 tokens, 24 heads x 128, bf16,
random blocks at density 0.35) in the layouts the diffusers processor hands it (v and the output token-major,
padded query rows appended as dense query blocks, heavy rows first) against contiguous tensors. Each case is
checked against the contiguous one, then timed (median of 7). Prints one line a case.

    python -m bench.sparse_layouts          # results: docs/results/sparse_layouts_h100_run1.log, run2.log
"""

from __future__ import annotations

import torch

from bench.attention import bench_ms
from xattn_video.core.estimate import append_dense_rows
from xattn_video.kernels.block_sparse_attention import block_sparse_attention_triton
from xattn_video.testing.synthetic import random_block_selection

N, VALID, HEADS, DIM, BLOCK = 119056, 118920, 24, 128, 128


def main() -> None:
    def head_major() -> torch.Tensor:
        return torch.randn(1, HEADS, N, DIM, device="cuda", dtype=torch.bfloat16)

    def token_major() -> torch.Tensor:  # [B, N, H, D] storage seen as [B, H, N, D], as diffusers makes it
        return torch.empty(1, N, HEADS, DIM, device="cuda", dtype=torch.bfloat16).permute(0, 2, 1, 3)

    q, k, v = head_major(), head_major(), head_major()
    v_tok = token_major().copy_(v)
    out_tok = token_major()
    sel = random_block_selection(1, HEADS, -(-VALID // BLOCK), 0.35, device="cuda")
    grown = append_dense_rows(sel, -(-N // BLOCK))  # the padded query rows, as the processor adds them
    kv = k[:, :, :VALID]

    def run(q_rows, values, selection, **kw):
        return block_sparse_attention_triton(
            q_rows, kv, values[:, :, :VALID], selection.kv_count, selection.kv_indices, block_size=BLOCK,
            causal=False, **kw,
        )

    valid_q, valid_out = q[:, :, :VALID], out_tok[:, :, :VALID]
    cases = {
        "a contiguous, valid rows": lambda: run(valid_q, v, sel),
        "b v token-major": lambda: run(valid_q, v_tok, sel),
        "c output token-major": lambda: run(valid_q, v, sel, out=valid_out),
        "d v and output token-major": lambda: run(valid_q, v_tok, sel, out=valid_out),
        "e as the processor calls it (all rows, heavy first)": lambda: run(
            q, v_tok, grown, out=out_tok, schedule="heavy_first"
        ),
        "f as e, natural order": lambda: run(q, v_tok, grown, out=out_tok),
        "g as e, head-major v and output": lambda: run(q, v, grown, schedule="heavy_first"),
        "h as a, heavy first": lambda: run(valid_q, v, sel, schedule="heavy_first"),
    }
    ref = run(valid_q, v, sel).float()
    for name, fn in cases.items():
        got = fn()[:, :, :VALID].float()
        err = float((got - ref).norm() / ref.norm())
        print(f"{name}: {bench_ms(fn, 7):.2f} ms (rel err vs a {err:.1e})", flush=True)
    print(f"copy [B,H,N,D] -> token-major: {bench_ms(lambda: out_tok.copy_(q), 7):.2f} ms")


if __name__ == "__main__":
    main()
