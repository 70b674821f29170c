"""Antidiagonal block estimate (Triton): XAttention's block scores in one pass over the strided product.

What it computes
    Strided row i is Q'[i] = concat_s Q[i*S + S-1-s] and strided key j is K'[j] = concat_s K[j*S + s]
    (s = 0..S-1, tokens past the end are zeros). Each strided row is softmaxed over the ceil(Nk/S) strided
    keys with logits Q'K'^T * scale / S (causal: key j visible to row i iff j <= i) and its probabilities are
    summed per key block of B/S strided keys; a block score is the sum over the strided rows of its query
    block (strided rows made only of padding count 0). The result, float32 ``[B, H, ceil(Nq/B),
    ceil(Nk/B)]``, equals :func:`xattn_video.core.reference.block_scores_torch`.

Design
    The strided product is a GEMM of reduction depth S*D that is never materialised: for a tile of
    ``BLOCK_M`` strided rows x ``BLOCK_N`` strided keys, the kernel accumulates, for s = 0..S-1,
    ``dot(Q[rows*S + S-1-s, :], K[cols*S + s, :]^T)``; each operand is a row-strided load of q/k in place
    (no copies of Q'/K'; grouped-query heads read kv head ``h // (H // Hkv)``). One pass with an online
    softmax: after each key tile the running row max ``m`` is updated, ``p = exp2(logit - m)`` (log2(e) is
    folded into the logit scale) is summed over each key block's B/S strided columns, and these per-row
    partial sums (float32) are written to a scratch buffer with the max they were taken against; the row sum
    ``l`` is carried along. The (N/S)^2 score matrix is never written. A small second kernel forms
    ``score[qb, kb] = sum_{i in qb} partial[i, kb] * exp2(m_used[i, tile(kb)] - m[i]) / l[i]``.
    The scratch holds (rows x key blocks) floats per (batch, head); the launcher walks (batch, head) in
    chunks so that it stays under ``scratch_bytes`` (256 MiB by default; 252 MB for 4 heads at 119,056
    tokens, stride 8), choosing the chunk that wastes the fewest GPU waves.

    Grid ``(row tiles, heads of the chunk)``: the row tiles of one head run together and share its K in L2;
    causal grids launch the longest (last) row tiles first. The main loop is flattened over (key tile, s)
    pairs (the softmax step runs on the last s of each tile) so that the software pipeline runs across key
    tiles; ``flatten=False`` nests the s loop instead. ``use_tma`` (default on Hopper, 16-bit) feeds the mask-free tiles
    through TMA descriptors that view q/k as [B, H, S, N // S, D]: slot s of strided rows [m0, m0 + BLOCK_M)
    is one box. Key tiles wholly visible run without masks; the ragged last key tile and the causal tiles that
    cross the diagonal run in a separate masked tail loop. Causal programs stop at the diagonal.

Numerics
    float32 accumulation. bf16/fp16 inputs multiply on the tensor cores in their own dtype (exact products).
    float32 inputs use TF32 products by default (``input_precision="tf32"``, about 1e-3 relative error on the
    logits, plenty for an estimate); pass ``input_precision="ieee"`` for exact float32 products.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from xattn_video.core.config import check_block_size, check_stride
from xattn_video.core.inputs import check_qkv

from ._launch import INTERPRETED, LOG2E, is_pow2, launch_fitting_stages

SCRATCH_BYTES = 256 << 20


@triton.jit
def _estimate_partials_kernel(
    Q,
    K,
    Q_DESC,
    K_DESC,
    PART,
    MUSED,
    MFIN,
    LFIN,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    bh0,
    H,
    GROUP,
    N_Q,
    N_K,
    ROWS_K,
    PART_ROWS,
    PART_COLS,
    N_NTILES,
    qk_scale,
    QK_SCALE_MUL,
    S: tl.constexpr,
    R: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    FLATTEN: tl.constexpr,
    PRECISION: tl.constexpr,
    BF16_VIA_F32: tl.constexpr,
    USE_TMA: tl.constexpr,
    FP8: tl.constexpr,
):
    NB: tl.constexpr = BLOCK_N // R  # key blocks per key tile
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    if FP8:  # q and k arrive quantised; their scales multiply the logits
        qk_scale = qk_scale * tl.load(QK_SCALE_MUL)

    pid_m = tl.program_id(0)
    if CAUSAL:  # the last row tiles see the most keys: launch them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    bh = bh0 + pid_bh
    b = bh // H
    h = bh % H
    hkv = h // GROUP
    m0 = pid_m * BLOCK_M

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_nb = tl.arange(0, NB)
    rows = m0 + offs_m

    # 64-bit scalars: slot offsets never overflow (and the interpreter skips its int32 overflow checks).
    # (tl.cast, not .to: an int argument equal to 1 arrives as a constexpr.)
    n_q64 = tl.cast(N_Q, tl.int64)
    n_k64 = tl.cast(N_K, tl.int64)
    sqn = tl.cast(stride_qn, tl.int64)
    skn = tl.cast(stride_kn, tl.int64)
    # Token (row) offsets of the strided rows/keys at s = 0; slot s adds S-1-s (queries) or s (keys) rows.
    q_tok = rows * S
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    q_ptrs0 = q_base + q_tok.to(tl.int64)[:, None] * stride_qn + offs_d[None, :]
    k_base = K + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh
    k_tok = offs_n * S
    # K is read transposed, [BLOCK_D, BLOCK_N], so that the dot needs no tl.trans.
    k_ptrs0 = k_base + offs_d[:, None] + k_tok.to(tl.int64)[None, :] * stride_kn
    if EVEN_D:
        d_ok = offs_d < BLOCK_D
    else:
        d_ok = offs_d < HEAD_DIM

    # Scratch rows of this program (scratch is [chunk, PART_ROWS, ...], PART_ROWS a multiple of BLOCK_M).
    prow = pid_bh.to(tl.int64) * PART_ROWS + rows
    part_ptrs0 = PART + prow[:, None] * PART_COLS + offs_nb[None, :]
    mused_ptrs0 = MUSED + prow * N_NTILES

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Key tiles [0, n_full) need no mask on the logits: every key exists and (causal) lies at or left of
    # every row of the tile. Tiles [n_full, n_tiles) are the ragged last tile and the diagonal tiles.
    if CAUSAL:
        n_full = tl.minimum(ROWS_K, m0 + 1) // BLOCK_N
        n_tiles = (tl.minimum(ROWS_K, m0 + BLOCK_M) + BLOCK_N - 1) // BLOCK_N
    else:
        n_full = ROWS_K // BLOCK_N
        n_tiles = (ROWS_K + BLOCK_N - 1) // BLOCK_N

    # TMA: the descriptors view q/k as [B, H, S, N // S, D], so they cover whole strided rows only. A program
    # whose rows include the partial last strided row of q uses pointer loads; the partial strided key row
    # falls in the masked tail.
    if USE_TMA:
        tma_here = m0 + BLOCK_M <= N_Q // S
    else:
        tma_here: tl.constexpr = False
    if tma_here:
        if CAUSAL:
            n_full = tl.minimum(N_K // S, m0 + 1) // BLOCK_N
        else:
            n_full = (N_K // S) // BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for it in range(0, n_full * S):
            tile = it // S
            s = it - tile * S
            q = Q_DESC.load([b, h, S - 1 - s, m0, 0]).reshape(BLOCK_M, BLOCK_D)
            k = K_DESC.load([b, hkv, s, tile * BLOCK_N, 0]).reshape(BLOCK_N, BLOCK_D)
            if BF16_VIA_F32:
                q = q.to(tl.float32)
                k = k.to(tl.float32)
            acc = tl.dot(q, tl.trans(k), acc, input_precision=PRECISION)
            if s == S - 1:
                m_new = tl.maximum(m_i, tl.max(acc, 1) * qk_scale)
                p = tl.math.exp2(acc * qk_scale - m_new[:, None])
                psum = tl.sum(tl.reshape(p, [BLOCK_M, NB, R]), 2)
                l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(psum, 1)
                m_i = m_new
                tl.store(part_ptrs0 + tile * NB, psum)
                tl.store(mused_ptrs0 + tile, m_new)
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    elif FLATTEN:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for it in range(0, n_full * S):
            tile = it // S
            s = it - tile * S
            n0 = tile * BLOCK_N
            q = tl.load(
                q_ptrs0 + (S - 1 - s) * sqn,
                mask=(q_tok < n_q64 - (S - 1 - s))[:, None] & d_ok[None, :],
                other=0.0,
            )
            k = tl.load(
                k_ptrs0 + (n0 * S + s) * skn,
                mask=d_ok[:, None] & (k_tok < n_k64 - (n0 * S + s))[None, :],
                other=0.0,
            )
            if BF16_VIA_F32:
                q = q.to(tl.float32)
                k = k.to(tl.float32)
            acc = tl.dot(q, k, acc, input_precision=PRECISION)
            if s == S - 1:
                m_new = tl.maximum(m_i, tl.max(acc, 1) * qk_scale)
                p = tl.math.exp2(acc * qk_scale - m_new[:, None])
                psum = tl.sum(tl.reshape(p, [BLOCK_M, NB, R]), 2)
                l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(psum, 1)
                m_i = m_new
                tl.store(part_ptrs0 + tile * NB, psum)
                tl.store(mused_ptrs0 + tile, m_new)
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        for tile in range(0, n_full):
            n0 = tile * BLOCK_N
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(0, S):
                q = tl.load(
                    q_ptrs0 + (S - 1 - s) * sqn,
                    mask=(q_tok < n_q64 - (S - 1 - s))[:, None] & d_ok[None, :],
                    other=0.0,
                )
                k = tl.load(
                    k_ptrs0 + (n0 * S + s) * skn,
                    mask=d_ok[:, None] & (k_tok < n_k64 - (n0 * S + s))[None, :],
                    other=0.0,
                )
                if BF16_VIA_F32:
                    q = q.to(tl.float32)
                    k = k.to(tl.float32)
                acc = tl.dot(q, k, acc, input_precision=PRECISION)
            m_new = tl.maximum(m_i, tl.max(acc, 1) * qk_scale)
            p = tl.math.exp2(acc * qk_scale - m_new[:, None])
            psum = tl.sum(tl.reshape(p, [BLOCK_M, NB, R]), 2)
            l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(psum, 1)
            m_i = m_new
            tl.store(part_ptrs0 + tile * NB, psum)
            tl.store(mused_ptrs0 + tile, m_new)

    # Masked tail: the ragged last key tile and (causal) the tiles crossing the diagonal.
    for tile in tl.range(n_full, n_tiles, num_stages=1):
        n0 = tile * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for s in range(0, S):
            q = tl.load(
                q_ptrs0 + (S - 1 - s) * sqn,
                mask=(q_tok < n_q64 - (S - 1 - s))[:, None] & d_ok[None, :],
                other=0.0,
            )
            k = tl.load(
                k_ptrs0 + (n0 * S + s) * skn,
                mask=d_ok[:, None] & (k_tok < n_k64 - (n0 * S + s))[None, :],
                other=0.0,
            )
            if BF16_VIA_F32:
                q = q.to(tl.float32)
                k = k.to(tl.float32)
            acc = tl.dot(q, k, acc, input_precision=PRECISION)
        cols = n0 + offs_n
        valid = (cols < ROWS_K)[None, :]
        if CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None])
        x = tl.where(valid, acc * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, 1))
        # A row that has seen no key yet keeps m = -inf; subtracting 0 keeps exp2 at 0 rather than NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(x - m_use[:, None])
        psum = tl.sum(tl.reshape(p, [BLOCK_M, NB, R]), 2)
        l_i = l_i * tl.math.exp2(m_i - m_use) + tl.sum(psum, 1)
        m_i = m_new
        tl.store(part_ptrs0 + tile * NB, psum)
        tl.store(mused_ptrs0 + tile, m_use)

    tl.store(MFIN + prow, m_i)
    tl.store(LFIN + prow, l_i)


@triton.jit
def _estimate_reduce_kernel(
    PART,
    MUSED,
    MFIN,
    LFIN,
    OUT,
    stride_ob,
    stride_oh,
    stride_oq,
    bh0,
    H,
    N_QB,
    N_KB,
    ROWS_Q,
    PART_ROWS,
    PART_COLS,
    N_NTILES,
    R: tl.constexpr,
    NB: tl.constexpr,
    QB_PER: tl.constexpr,
    KB_PER: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    # Rows [ROWS] x key tiles [NT] x key blocks of a tile [NB]: the max a tile used applies to its NB blocks.
    ROWS: tl.constexpr = QB_PER * R
    NT: tl.constexpr = KB_PER // NB
    pid_q = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_bh = tl.program_id(2)
    bh = bh0 + pid_bh
    b = bh // H
    h = bh % H

    rows = pid_q * ROWS + tl.arange(0, ROWS)
    tiles = pid_k * NT + tl.arange(0, NT)
    kbs = tiles[:, None] * NB + tl.arange(0, NB)[None, :]  # [NT, NB]
    row_in = rows < PART_ROWS
    row_ok = rows < ROWS_Q

    prow = pid_bh.to(tl.int64) * PART_ROWS + rows
    m = tl.load(MFIN + prow, mask=row_in, other=0.0)
    row_sum = tl.load(LFIN + prow, mask=row_in, other=1.0)
    inv_l = tl.where(row_ok, 1.0 / row_sum, 0.0)
    tile_ok = row_ok[:, None] & (tiles < N_NTILES)[None, :]
    if CAUSAL:  # tiles right of a row's query block were not computed for it
        tile_ok = tile_ok & ((tiles * NB)[None, :] <= (rows // R)[:, None])
    m_used = tl.load(MUSED + prow[:, None] * N_NTILES + tiles[None, :], mask=tile_ok, other=0.0)
    weight = tl.where(tile_ok, tl.math.exp2(m_used - m[:, None]) * inv_l[:, None], 0.0)  # [ROWS, NT]
    valid = row_ok[:, None, None] & (kbs < N_KB)[None, :, :]
    if CAUSAL:
        valid = valid & (kbs[None, :, :] <= (rows // R)[:, None, None])
    part = tl.load(PART + prow[:, None, None] * PART_COLS + kbs[None, :, :], mask=valid, other=0.0)
    val = tl.where(valid, part * weight[:, :, None], 0.0)
    score = tl.sum(tl.reshape(val, [QB_PER, R, NT, NB]), 1)  # [QB_PER, NT, NB]
    qbs = pid_q * QB_PER + tl.arange(0, QB_PER)
    out_base = OUT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    out_mask = (qbs < N_QB)[:, None, None] & (kbs < N_KB)[None, :, :]
    tl.store(out_base + qbs[:, None, None] * stride_oq + kbs[None, :, :], score, mask=out_mask)


def default_config(head_dim: int, elem_bytes: int) -> dict[str, int]:
    """Tiles and launch settings per head dim and dtype (Hopper); the lead tunes these on the GPU."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m, block_n = 128, 128
    if block_d > 128 or elem_bytes == 4:
        block_n = 64
    if elem_bytes == 1 and block_d <= 128:  # float8: 256-key tiles, 3 stages (12.3 vs 13.9 ms, bench/tune.py)
        block_n = 256
    stage_bytes = (block_m + block_n) * block_d * elem_bytes
    num_stages = max(1, min(4 if elem_bytes > 1 else 3, (200 << 10) // stage_bytes))
    return {"block_m": block_m, "block_n": block_n, "num_warps": 8, "num_stages": num_stages}


def _check_tile(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not is_pow2(value) or value < 16:
        raise ValueError(f"{name} must be a power of two >= 16, got {value!r}")


def _descriptors(q, k, stride, block_m, block_n, block_d):
    """TMA descriptors of q and k viewed as [B, H, S, N // S, D] (whole strided rows), or (None, None) when
    the layout does not allow them (16-byte aligned base and strides) or there is no whole strided row."""
    if not (q.is_cuda or INTERPRETED):
        return None, None
    if q.is_cuda and torch.cuda.get_device_capability(q.device)[0] < 9:
        return None, None
    if max(block_m, block_n) > 256:  # TMA boxes hold at most 256 rows
        return None, None
    from triton.tools.tensor_descriptor import TensorDescriptor

    descs = []
    for t, rows in ((q, block_m), (k, block_n)):
        batch, heads, n, dim = t.shape
        sb, sh, sn = t.stride()[:3]
        strides = [sb, sh, sn, stride * sn, 1]  # slot s, then strided row: unit box dims lead
        aligned = all(x > 0 and x * t.element_size() % 16 == 0 for x in strides[:-1])
        if n // stride < 1 or t.data_ptr() % 16 or not aligned:
            return None, None
        shape = [batch, heads, stride, n // stride, dim]
        descs.append(TensorDescriptor(t, shape, strides, [1, 1, 1, rows, block_d]))
    return tuple(descs)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _pick_chunk(n_bh: int, max_chunk: int, n_mtiles: int, slots: int) -> int:
    """(batch, head) pairs per launch: the fewest waves of ``slots`` programs over all launches, then the
    fewest launches. Chunks of at most ``max_chunk`` (the scratch bound)."""
    max_chunk = max(1, min(max_chunk, n_bh))
    best, best_key = max_chunk, None
    for chunk in range(max_chunk, 0, -1):
        full, rest = divmod(n_bh, chunk)
        waves = full * -(-chunk * n_mtiles // slots) + (-(-rest * n_mtiles // slots) if rest else 0)
        key = (waves, -(-n_bh // chunk))
        if best_key is None or key < best_key:
            best, best_key = chunk, key
    return best


def block_scores_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    stride: int,
    block_size: int,
    causal: bool,
    scale: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    flatten: bool = True,
    use_tma: bool | None = None,
    input_precision: str | None = None,
    fp8: bool = False,
    scratch_bytes: int = SCRATCH_BYTES,
    reduce_rows: int = 64,
    reduce_cols: int = 64,
    reduce_warps: int = 4,
) -> torch.Tensor:
    """Antidiagonal block scores; equals ``xattn_video.core.reference.block_scores_torch``.

    q [B, H, Nq, D], k [B, Hkv, Nk, D] (H % Hkv == 0; any strides, the last dim is made contiguous when it
    is not), bf16/fp16/fp32, D <= 256; causal needs Nq == Nk. Returns float32
    ``[B, H, ceil(Nq/block_size), ceil(Nk/block_size)]``.

    Tuning knobs (defaults from :func:`default_config`): ``block_m``/``block_n`` (strided rows/keys per
    tile, powers of two >= 16; ``block_n`` is raised to ``block_size // stride`` when smaller),
    ``num_warps``, ``num_stages`` (lowered by one, and remembered, when a configuration does not fit in
    shared memory), ``flatten`` (one pipelined loop over (key tile, s) pairs, or nested loops), ``use_tma``
    (None: on for 16-bit inputs on Hopper and later, where it measured 26.1 -> 24.2 ms at 119,056 tokens on an
    H100; the mask-free tiles load q/k through TMA descriptors that view them as [B, H, S, N // S, D];
    always a flattened loop; falls back to pointer loads before Hopper, for tiles over 256 rows, and where
    the base or strides are not 16-byte aligned),
    ``input_precision`` for float32 inputs ("tf32" default, "tf32x3", "ieee"), ``fp8`` (quantise q and k to
    float8 e4m3 with one scale each, :func:`~xattn_video.kernels.quantize.quantize_fp8`, and multiply in
    float8: half the bytes and twice the tensor-core rate of 16 bits; block scores then agree with the exact
    ones to about 1e-3 of a row's mass, see the quantize module), ``scratch_bytes`` (bound on
    the partial-sum scratch; (batch, head) pairs run in chunks under it), and the reduction kernel's tile
    (``reduce_rows`` strided rows, at least one query block, x ``reduce_cols`` key blocks) and warps.
    """
    check_qkv(q, k, None, causal=causal)
    check_block_size(block_size)
    check_stride(stride, block_size)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    batch, heads, n_q, dim = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    if scale is None:
        scale = dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    if input_precision not in (None, "tf32", "tf32x3", "ieee"):
        raise ValueError(f"input_precision must be None, 'tf32', 'tf32x3' or 'ieee', got {input_precision!r}")
    if not isinstance(fp8, bool):
        raise TypeError(f"fp8 must be a bool, got {fp8!r}")
    if isinstance(scratch_bytes, bool) or not isinstance(scratch_bytes, int) or scratch_bytes <= 0:
        raise ValueError(f"scratch_bytes must be a positive int, got {scratch_bytes!r}")

    rows_per_block = block_size // stride
    qk_scale_mul = None
    if fp8 and batch * heads:
        from .quantize import quantize_fp8

        (q, q_scale), (k, k_scale) = quantize_fp8(q), quantize_fp8(k)
        qk_scale_mul = q_scale * k_scale
    config = default_config(dim, q.element_size())
    block_m = config["block_m"] if block_m is None else block_m
    block_n = config["block_n"] if block_n is None else block_n
    _check_tile("block_m", block_m)
    _check_tile("block_n", block_n)
    _check_tile("reduce_cols", reduce_cols)
    if isinstance(reduce_rows, bool) or not isinstance(reduce_rows, int) or not is_pow2(reduce_rows):
        raise ValueError(f"reduce_rows must be a power of two, got {reduce_rows!r}")
    block_n = max(block_n, rows_per_block)
    num_warps = config["num_warps"] if num_warps is None else num_warps
    num_stages = config["num_stages"] if num_stages is None else num_stages
    block_d = max(16, triton.next_power_of_2(dim))

    n_qb, n_kb = math.ceil(n_q / block_size), math.ceil(n_k / block_size)
    rows_q, rows_k = math.ceil(n_q / stride), math.ceil(n_k / stride)
    scores = torch.empty(batch, heads, n_qb, n_kb, dtype=torch.float32, device=q.device)
    if batch * heads == 0:
        return scores
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))

    # Scratch per (batch, head): partial sums [part_rows, part_cols], the max each tile used
    # [part_rows, n_ntiles], final max and sum [part_rows] each.
    n_mtiles = triton.cdiv(n_qb * rows_per_block, block_m)
    n_ntiles = triton.cdiv(rows_k, block_n)
    part_rows = n_mtiles * block_m
    part_cols = n_ntiles * (block_n // rows_per_block)
    per_bh = part_rows * (part_cols + n_ntiles + 2)
    max_chunk = max(1, min(batch * heads, scratch_bytes // (4 * per_bh)))
    chunk = _pick_chunk(batch * heads, max_chunk, n_mtiles, _sm_count(q.device))
    scratch = torch.empty(chunk * per_bh, dtype=torch.float32, device=q.device)
    if INTERPRETED:  # tests: a read of a scratch place the kernel never wrote shows up as NaN
        scratch.fill_(float("nan"))
    part = scratch[: chunk * part_rows * part_cols]
    mused = scratch[part.numel() : part.numel() + chunk * part_rows * n_ntiles]
    mfin = scratch[part.numel() + mused.numel() :][: chunk * part_rows]
    lfin = scratch[part.numel() + mused.numel() + mfin.numel() :]

    via_f32 = INTERPRETED and q.dtype in (torch.bfloat16, torch.float8_e4m3fn)
    if q.dtype == torch.float32:
        precision = "ieee" if INTERPRETED else (input_precision or "tf32")
    else:
        precision = "ieee" if via_f32 else None
    qk_scale = scale / stride * LOG2E

    qb_per = max(1, reduce_rows // rows_per_block)
    # whole key tiles, and at most 4096 elements a program
    kb_per = max(block_n // rows_per_block, min(reduce_cols, 4096 // (qb_per * rows_per_block)))
    if use_tma is None:
        use_tma = q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 9 and q.element_size() <= 2
    q_desc, k_desc = _descriptors(q, k, stride, block_m, block_n, block_d) if use_tma else (None, None)
    key = (q.device, q.dtype, dim, stride, rows_per_block, block_m, block_n, num_warps, num_stages, causal)
    key += (flatten, q_desc is not None, fp8)
    for bh0 in range(0, batch * heads, chunk):
        n_bh = min(chunk, batch * heads - bh0)
        launch_fitting_stages(
            _estimate_partials_kernel,
            (n_mtiles, n_bh),
            (
                q, k, q_desc, k_desc, part, mused, mfin, lfin,
                *q.stride()[:3], *k.stride()[:3],
                bh0, heads, heads // kv_heads, n_q, n_k, rows_k, part_rows, part_cols, n_ntiles, qk_scale,
                qk_scale_mul,
            ),
            dict(
                S=stride, R=rows_per_block, HEAD_DIM=dim, BLOCK_D=block_d,
                BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, FLATTEN=flatten, PRECISION=precision,
                BF16_VIA_F32=via_f32, USE_TMA=q_desc is not None, FP8=fp8, num_warps=num_warps,
            ),
            key=key,
            num_stages=num_stages,
        )  # fmt: skip
        grid = (triton.cdiv(n_qb, qb_per), triton.cdiv(n_kb, kb_per), n_bh)
        _estimate_reduce_kernel[grid](
            part, mused, mfin, lfin, scores, *scores.stride()[:3],
            bh0, heads, n_qb, n_kb, rows_q, part_rows, part_cols, n_ntiles,
            R=rows_per_block, NB=block_n // rows_per_block, QB_PER=qb_per, KB_PER=kb_per, CAUSAL=causal,
            num_warps=reduce_warps,
        )  # fmt: skip
    return scores
