"""Block selection (Triton): XAttention's threshold rule on the GPU, rows of query blocks in parallel.

What it computes
    For each row (batch, head, query block) of the float32 block scores, the key blocks are ranked by score;
    the smallest prefix whose exclusive running sum is still below ``threshold * row_mass`` is kept (so the
    block that crosses the threshold is kept), together with every block whose score ties the last kept one.
    ``threshold >= 1`` keeps every valid block. Causal: only blocks at or left of the diagonal are valid
    (the others count as score 0 in the ranking and are never kept), and the diagonal and first blocks are
    always kept. Returns ``(mask, kv_count, kv_indices)`` exactly as
    :func:`xattn_video.core.reference.select_blocks_torch` does on the same scores.

Design
    No sort. For non-negative scores the exclusive running sum along the descending ranking never decreases,
    so the kept prefix ends inside the tie group of the smallest score v whose group starts below the target:
    before(v) = (mass of the scores > v) < threshold * row_mass. The kept set is {score >= v}. before(v)
    only grows as v falls, so v is found by bisection over the bit patterns of non-negative float32 values
    (ordered like the values): 32 steps, each a min and a sum over the row. before(v) is evaluated as the
    reference does it, (running sum including v's first place, rounded to float32) - v, with the sums in
    float64 (torch's CPU cumsum also accumulates in double). The row's largest score is always kept. The kept
    set is compacted with a running count of kept blocks: kept block kb goes to place (#kept before kb), an
    unkept one writes -1 at place kv_count + (#unkept before kb), so every output place is written exactly
    once. ``rows_per_program`` rows are handled together; the host loops over nothing.

    Results equal the reference bit for bit except where a running sum lands within float32 rounding of
    the target (the two sum in different orders). Scores must be non-negative (block scores are).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._launch import INTERPRETED


@triton.jit
def _select_blocks_kernel(
    SCORES,
    MASK,
    COUNT,
    INDICES,
    stride_sb,
    stride_sh,
    stride_sq,
    stride_sk,
    H,
    N_QB,
    N_KB,
    N_ROWS,
    threshold,
    NPAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    CAUSAL: tl.constexpr,
    KEEP_ALL: tl.constexpr,
):
    # BLOCK_R rows (batch, head, query block) of the score matrix, each padded to NPAD key blocks.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N_ROWS
    qb = rows % N_QB
    bh = rows // N_QB
    b = bh // H
    h = bh % H

    kb = tl.arange(0, NPAD)[None, :]
    in_row = row_ok[:, None] & (kb < N_KB)
    if CAUSAL:
        valid = in_row & (kb <= qb[:, None])
    else:
        valid = in_row

    if KEEP_ALL:
        kept = valid
    else:
        row_off = b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh + qb.to(tl.int64) * stride_sq
        x = tl.load(SCORES + row_off[:, None] + kb.to(tl.int64) * stride_sk, mask=in_row, other=0.0)
        s = tl.where(valid, x, 0.0)  # causal: blocks right of the diagonal rank as zeros, as in the reference
        s64 = s.to(tl.float64)
        target = threshold * tl.sum(s64, 1).to(tl.float32)
        # Bisection over the bit patterns of c >= 0 (ordered like the values) for the smallest score v whose
        # exclusive running sum in descending order, before(v) = (A(v) + v) - v with A(v) the mass of the
        # scores > v (rounded to float32 like a float32 cumsum), is below the target. lo is "below 0", hi
        # starts at the row's largest score, which is kept whatever the target.
        lo = tl.full([BLOCK_R], -1, tl.int32)
        hi = tl.max(tl.where(in_row, s, float("-inf")), 1).to(tl.int32, bitcast=True)
        for _ in range(0, 32):
            active = hi - lo > 1
            mid = tl.where(active, lo + (hi - lo) // 2, hi)
            c = mid.to(tl.float32, bitcast=True)
            v = tl.min(tl.where(in_row & (s >= c[:, None]), s, float("inf")), 1)  # smallest score >= c
            v = tl.where(active, v, 0.0)  # finished rows (and rows past the end) compute nothing useful
            above = tl.sum(tl.where(s > v[:, None], s64, 0.0), 1)
            before = (above + v.to(tl.float64)).to(tl.float32) - v
            ok = before < target
            hi = tl.where(active & ok, mid, hi)
            lo = tl.where(active & ~ok, mid, lo)
        cutoff = hi.to(tl.float32, bitcast=True)
        kept = (s >= cutoff[:, None]) & valid
    if CAUSAL:
        kept = kept | (((kb == qb[:, None]) | (kb == 0)) & in_row)

    kept_i = kept.to(tl.int32)
    kept_incl = tl.cumsum(kept_i, 1)
    count = tl.sum(kept_i, 1)
    place = tl.where(kept, kept_incl - 1, count[:, None] + kb - kept_incl)
    out_row = (rows.to(tl.int64) * N_KB)[:, None]
    tl.store(INDICES + out_row + place, tl.where(kept, kb, -1), mask=in_row)
    tl.store(MASK + out_row + kb, kept.to(tl.uint8), mask=in_row)
    tl.store(COUNT + rows, count, mask=row_ok)


def select_blocks_triton(
    scores: torch.Tensor,
    *,
    threshold: float,
    causal: bool,
    rows_per_program: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick the key blocks of each query-block row; equals ``xattn_video.core.reference.select_blocks_torch``.

    scores: float [B, H, nqb, nkb] (any strides; converted to float32). Returns ``(mask, kv_count,
    kv_indices)``: mask bool [B, H, nqb, nkb]; kv_count int32 [B, H, nqb]; kv_indices int32
    [B, H, nqb, nkb], kept block indices ascending in the first kv_count places, then -1.
    Launch knobs: ``rows_per_program`` (a power of two; default: rows of up to 1024 padded blocks in all,
    4096 under the interpreter) and ``num_warps`` (default: one per 256 padded blocks, between 4 and 16).
    """
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 4:
        raise ValueError(
            f"scores must be 4-D [batch, heads, q_blocks, k_blocks], got shape {tuple(scores.shape)}"
        )
    if not scores.is_floating_point():
        raise ValueError(f"scores must be a floating-point tensor, got {scores.dtype}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
        raise ValueError(f"threshold must be a number, got {threshold!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    batch, heads, n_qb, n_kb = scores.shape
    device = scores.device
    mask = torch.empty(batch, heads, n_qb, n_kb, dtype=torch.uint8, device=device)
    kv_count = torch.empty(batch, heads, n_qb, dtype=torch.int32, device=device)
    kv_indices = torch.empty(batch, heads, n_qb, n_kb, dtype=torch.int32, device=device)
    n_rows = batch * heads * n_qb
    if n_rows == 0 or n_kb == 0:
        kv_count.zero_()
        return mask.view(torch.bool), kv_count, kv_indices
    scores = scores.float()
    npad = max(16, triton.next_power_of_2(n_kb))
    if rows_per_program is None:
        budget = 4096 if INTERPRETED else 1024
        rows_per_program = min(max(1, budget // npad), triton.next_power_of_2(n_rows))
    if isinstance(rows_per_program, bool) or not isinstance(rows_per_program, int) or rows_per_program < 1:
        raise ValueError(f"rows_per_program must be a positive power of two, got {rows_per_program!r}")
    if rows_per_program & (rows_per_program - 1):
        raise ValueError(f"rows_per_program must be a positive power of two, got {rows_per_program!r}")
    if num_warps is None:
        num_warps = min(16, max(4, npad * rows_per_program // 256))
    keep_all = float(threshold) >= 1.0
    _select_blocks_kernel[(triton.cdiv(n_rows, rows_per_program),)](
        scores, mask, kv_count, kv_indices, *scores.stride(),
        heads, n_qb, n_kb, n_rows, float(threshold),
        NPAD=npad, BLOCK_R=rows_per_program, CAUSAL=causal, KEEP_ALL=keep_all,
        num_warps=num_warps,
    )  # fmt: skip
    return mask.view(torch.bool), kv_count, kv_indices
