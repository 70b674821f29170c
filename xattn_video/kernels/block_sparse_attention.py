"""Block-sparse flash-attention forward (Triton): exact attention over the kept key blocks only.

What it computes
    For query block ``qb`` of head ``h`` the kept key blocks are ``kv_indices[b, h, qb, :kv_count[b, h, qb]]``
    (ascending; the format :func:`xattn_video.core.reference.select_blocks_torch` returns, and FlexAttention's
    ``kv_num_blocks`` / ``kv_indices``). Each query row attends, with a softmax over exactly those keys
    (causal: also only keys at or before the query), to the matching values. The result equals
    :func:`xattn_video.core.reference.block_sparse_attention_torch` with the boolean mask of those blocks, and with
    every block kept it equals ``F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)``.

Numerics
    Online softmax in float32 with ``exp2``: log2(e) is folded into the logit scale, so a logit costs one FMA
    and one exp2. Products run on the tensor cores in the input dtype (bf16/fp16) with float32 accumulation;
    float32 inputs use exact float32 products (``input_precision="ieee"``). A query row that sees no key
    (impossible with a valid selection) gets 0, not NaN.

Launch layout
    Grid ``(query tiles, batch * heads)``: axis 0 walks the query tiles of one head, so the programs running
    together share that head's K/V in L2. A query tile is ``BLOCK_M`` rows inside one selection block
    (``BLOCK_M`` divides ``block_size``); its key loop walks the kept blocks in ``BLOCK_N``-key tiles
    (``BLOCK_N`` divides ``block_size``). The index of the next tile's key block is loaded one iteration
    ahead, so the K/V loads of the software pipeline depend only on loop-carried values. Masks are applied
    only in a separate tail loop over the last kept block, and only when that block needs one (the ragged
    last key block, or the causal diagonal, which is always the last kept block because indices ascend and
    causal selections keep nothing right of the diagonal); every other iteration is mask-free. Q is loaded
    once per program. Causal grids run the query tiles in reverse (later rows keep more blocks, so the heavy
    programs start first); non-causal grids run in order, so programs running together share one head's
    K/V in L2 (a heavy-rows-first order is available; it measured within run-to-run spread of it).
    Grouped-query attention reads kv head ``h // (H // Hkv)`` in place; no K/V copies.

    On Hopper and later, 16-bit K and V tiles are fetched with TMA through host-side 4-D tensor descriptors
    instead of pointer loads (``use_tma``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from xattn_video.core.inputs import check_qkv

from ._launch import INTERPRETED, LOG2E, is_pow2, launch_fitting_stages

SCHEDULES = ("auto", "natural", "reverse", "heavy_first")
_ORDER_CODES = {"natural": 0, "reverse": 1, "heavy_first": 2}


@triton.jit
def _block_sparse_attention_fwd(
    Q,
    K,
    V,
    Out,
    KV_COUNT,
    KV_INDICES,
    TILE_ORDER,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_om,
    stride_cb,
    stride_ch,
    stride_cq,
    stride_ib,
    stride_ih,
    stride_iq,
    stride_ik,
    H,
    GROUP,
    N_Q,
    N_K,
    N_TILES,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    CAUSAL: tl.constexpr,
    ORDER: tl.constexpr,
    USE_TMA: tl.constexpr,
    PRECISION: tl.constexpr,
    P_DTYPE: tl.constexpr,
    BF16_VIA_F32: tl.constexpr,
):
    SUB_N: tl.constexpr = BLOCK_SIZE // BLOCK_N
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hkv = h // GROUP
    if ORDER == 1:
        tile = N_TILES - 1 - pid
    elif ORDER == 2:
        tile = tl.load(TILE_ORDER + bh.to(tl.int64) * N_TILES + pid)
    else:
        tile = pid
    m0 = tile * BLOCK_M
    qb = m0 // BLOCK_SIZE
    b64 = b.to(tl.int64)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    # Kept key blocks of this query block.
    count = tl.load(KV_COUNT + b64 * stride_cb + h * stride_ch + qb * stride_cq)
    idx_row = KV_INDICES + b64 * stride_ib + h.to(tl.int64) * stride_ih + qb.to(tl.int64) * stride_iq
    last = tl.load(idx_row + (count - 1) * stride_ik, mask=count > 0, other=0)
    key_end = (last + 1) * BLOCK_SIZE
    needs_mask = key_end > N_K
    if CAUSAL:
        needs_mask = needs_mask | (key_end - 1 > m0)
    has_tail = (count > 0) & needs_mask
    n_full = count - has_tail.to(tl.int32)

    # Q tile, loaded once.
    q_base = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + m0.to(tl.int64) * stride_qm
    q_ptrs = q_base + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=((m0 + offs_m)[:, None] < N_Q) & d_ok[None, :], other=0.0)
    if BF16_VIA_F32:
        q = q.to(tl.float32)

    if not USE_TMA:
        k_base = K + b64 * stride_kb + hkv.to(tl.int64) * stride_kh
        v_base = V + b64 * stride_vb + hkv.to(tl.int64) * stride_vh
        k_tile = offs_n[:, None] * stride_kn + offs_d[None, :]
        v_tile = offs_n[:, None] * stride_vn + offs_d[None, :]

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    # Mask-free main loop over the key tiles of the first n_full kept blocks. The step below is written out
    # in both loops rather than shared through a @triton.jit helper: the interpreter (CPU tests) re-patches
    # triton.language on every helper call, which would double the test time.
    n_iter = n_full * SUB_N
    kb = tl.load(idx_row, mask=n_iter > 0, other=0)
    for it in range(0, n_iter):
        if SUB_N == 1:
            start_n = kb * BLOCK_SIZE
            nxt = it + 1
        else:
            start_n = kb * BLOCK_SIZE + (it % SUB_N) * BLOCK_N
            nxt = (it + 1) // SUB_N
        start_n = tl.multiple_of(start_n, BLOCK_N)
        # The next tile's key block, loaded one iteration ahead of its use.
        kb = tl.load(idx_row + nxt * stride_ik, mask=it + 1 < n_iter, other=0)
        if USE_TMA:
            k = K.load([b, hkv, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
            v = V.load([b, hkv, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        elif EVEN_D:
            k = tl.load(k_base + start_n.to(tl.int64) * stride_kn + k_tile)
            v = tl.load(v_base + start_n.to(tl.int64) * stride_vn + v_tile)
        else:
            k = tl.load(k_base + start_n.to(tl.int64) * stride_kn + k_tile, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_base + start_n.to(tl.int64) * stride_vn + v_tile, mask=d_ok[None, :], other=0.0)
        if BF16_VIA_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(P_DTYPE).to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    # Masked tail: the last kept block when it is ragged or the causal diagonal.
    tail_start = last * BLOCK_SIZE
    tail_end = tl.minimum(key_end, N_K)
    if CAUSAL:
        tail_end = tl.minimum(tail_end, m0 + BLOCK_M)
    n_tail = tl.where(has_tail, tl.cdiv(tail_end - tail_start, BLOCK_N), 0)
    for j in tl.range(0, n_tail, num_stages=1):  # one block: nothing to overlap
        start_n = tail_start + j * BLOCK_N
        key = start_n + offs_n
        key_ok = key < N_K
        if USE_TMA:
            k = K.load([b, hkv, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
            v = V.load([b, hkv, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        else:
            kv_mask = key_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + start_n.to(tl.int64) * stride_kn + k_tile, mask=kv_mask, other=0.0)
            v = tl.load(v_base + start_n.to(tl.int64) * stride_vn + v_tile, mask=kv_mask, other=0.0)
        if BF16_VIA_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        valid = key_ok[None, :]
        if CAUSAL:
            valid = valid & (key[None, :] <= (m0 + offs_m)[:, None])
        qk = tl.where(valid, tl.dot(q, tl.trans(k), input_precision=PRECISION), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        # A row that has seen no key keeps m = -inf; subtracting 0 instead keeps exp2 at 0 rather than NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk * qk_scale - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(P_DTYPE).to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_base = Out + b64 * stride_ob + h.to(tl.int64) * stride_oh + m0.to(tl.int64) * stride_om
    o_ptrs = o_base + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=((m0 + offs_m)[:, None] < N_Q) & d_ok[None, :])


def _default_config(block_size: int, block_d: int, elem_bytes: int) -> dict[str, int]:
    """Tiles and launch settings per head dim and dtype, chosen by ``bench/tune.py`` on an H100.

    There, at 119,056 tokens, D = 128, bf16, 35% of blocks: 64-key tiles beat 128-key tiles (504 vs 493
    TFLOP/s with pointer loads, 540 vs 522 with TMA); 4 warps or 64-row query tiles were far slower.
    """
    block_m = min(block_size, 128)
    block_n = min(block_size, 64)
    if block_d > 128 and elem_bytes == 4:
        block_m = min(block_m, 64)
    if elem_bytes == 4:
        block_n = min(block_n, 32)
    num_warps = 8 if block_m >= 128 and block_d >= 128 else 4
    num_stages = 3 if block_d <= 128 and elem_bytes <= 2 else 2
    return {"block_m": block_m, "block_n": block_n, "num_warps": num_warps, "num_stages": num_stages}


def _check_tile(name: str, value: int, block_size: int) -> None:
    if not isinstance(value, int) or not is_pow2(value) or value < 16 or block_size % value:
        raise ValueError(
            f"{name} must be a power of two >= 16 dividing block_size={block_size}, got {value!r}"
        )


def _tma_ok(*tensors: torch.Tensor) -> bool:
    for t in tensors:
        if t.data_ptr() % 16:
            return False
        if any(s == 0 or s * t.element_size() % 16 for s in t.stride()[:-1]):
            return False
    return True


def _tile_order(kv_count: torch.Tensor, n_tiles: int, sub_m: int) -> torch.Tensor:
    """[B*H, n_tiles] int32: per head, query tiles of the rows with the most kept blocks first."""
    batch, heads, n_qb = kv_count.shape
    rows = torch.argsort(kv_count.reshape(batch * heads, n_qb), dim=1, descending=True, stable=True)
    tiles = rows[:, :, None] * sub_m + torch.arange(sub_m, device=kv_count.device)
    tiles = tiles.reshape(batch * heads, n_qb * sub_m)
    if n_qb * sub_m != n_tiles:  # the last query block's tiles past Nq: the same ones in every head
        tiles = tiles[tiles < n_tiles].reshape(batch * heads, n_tiles)
    return tiles.to(torch.int32).contiguous()


def block_sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_count: torch.Tensor,
    kv_indices: torch.Tensor,
    *,
    block_size: int,
    causal: bool,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    schedule: str = "auto",
    use_tma: bool | None = None,
) -> torch.Tensor:
    """Attention over the kept blocks; equals ``block_sparse_attention_torch`` with the matching mask.

    q [B, H, Nq, D], k/v [B, Hkv, Nk, D] (H % Hkv == 0; any strides, the last dim is made contiguous);
    kv_count int32 [B, H, nqb] and kv_indices int32 [B, H, nqb, nkb] with nqb = ceil(Nq / block_size),
    nkb = ceil(Nk / block_size) (kept key blocks ascending, then -1). Causal needs Nq == Nk and no kept
    block right of the diagonal (what selection produces). Returns a new tensor shaped, typed and laid out
    like q, or fills and returns ``out`` (q's shape and dtype, any strides with a contiguous last dim).

    Tuning knobs (defaults from the head dim and dtype): ``block_m``/``block_n`` (query/key tile, powers of
    two >= 16 dividing ``block_size``), ``num_warps``, ``num_stages`` (lowered by one, and remembered, when
    a configuration does not fit in shared memory), ``schedule`` ("auto": "reverse" when causal else
    "natural"; "heavy_first": per head, query rows by descending kv_count. On an H100 at 35% random density the
    two measured within run-to-run spread: 519 vs 493 TFLOP/s in one run, 534 vs 548 in another),
    ``use_tma`` (K/V through TMA descriptors; None: on for 16-bit inputs on Hopper and later, where it
    measured 7% faster; falls back to pointer loads when strides are not 16-byte
    aligned).
    """
    check_qkv(q, k, v, causal=causal)
    if not isinstance(block_size, int) or not is_pow2(block_size) or not 16 <= block_size <= 256:
        raise ValueError(f"block_size must be a power of two in [16, 256], got {block_size!r}")
    batch, heads, n_q, dim = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    n_qb, n_kb = math.ceil(n_q / block_size), math.ceil(n_k / block_size)
    for name, t, shape in (
        ("kv_count", kv_count, (batch, heads, n_qb)),
        ("kv_indices", kv_indices, (batch, heads, n_qb, n_kb)),
    ):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{name} must have shape {shape} for q {tuple(q.shape)}, k {tuple(k.shape)} and "
                f"block_size={block_size}, got {tuple(t.shape)}"
            )
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if scale is None:
        scale = dim**-0.5
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype:
            raise ValueError("out must be a tensor with q's shape and dtype")
        if out.device != q.device:
            raise ValueError(f"out is on {out.device} but q is on {q.device}")
        if out.stride(-1) != 1:
            raise ValueError("out must have a contiguous last dimension (stride 1)")

    block_d = max(16, triton.next_power_of_2(dim))
    config = _default_config(block_size, block_d, q.element_size())
    block_m = config["block_m"] if block_m is None else block_m
    block_n = config["block_n"] if block_n is None else block_n
    _check_tile("block_m", block_m, block_size)
    _check_tile("block_n", block_n, block_size)
    num_warps = config["num_warps"] if num_warps is None else num_warps
    num_stages = config["num_stages"] if num_stages is None else num_stages

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    # A new output keeps q's layout (a transposed view of [B, N, H, D] gives one), so the caller's transpose
    # back to [B, N, H*D] stays free.
    result = torch.empty_like(q) if out is None else out
    if batch * heads == 0:
        return result

    n_tiles = triton.cdiv(n_q, block_m)
    if schedule == "auto":
        schedule = "reverse" if causal else "natural"
    if schedule == "heavy_first" and n_qb == 1:
        schedule = "natural"
    order = _ORDER_CODES[schedule]
    tile_order = _tile_order(kv_count, n_tiles, block_size // block_m) if order == 2 else None

    k_arg, v_arg = k, v
    if use_tma is None:  # measured faster on an H100 (bench/tune.py); Hopper and later only
        use_tma = q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 9 and q.element_size() == 2
    use_tma = bool(use_tma) and _tma_ok(k, v)
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        box = [1, 1, block_n, block_d]
        k_arg = TensorDescriptor(k, list(k.shape), list(k.stride()), box)
        v_arg = TensorDescriptor(v, list(v.shape), list(v.stride()), box)

    # Probabilities enter the PV product in the input dtype (float32 inputs: exact float32 products).
    p_dtype = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[q.dtype]
    via_f32 = INTERPRETED and q.dtype == torch.bfloat16
    precision = "ieee" if q.dtype == torch.float32 or via_f32 else None

    grid = (n_tiles, batch * heads)
    key = (q.device, q.dtype, dim, block_size, block_m, block_n, num_warps, num_stages, causal, use_tma)
    launch_fitting_stages(
        _block_sparse_attention_fwd,
        grid,
        (
            q, k_arg, v_arg, result, kv_count, kv_indices, tile_order,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *result.stride()[:3],
            *kv_count.stride(), *kv_indices.stride(),
            heads, heads // kv_heads, n_q, n_k, n_tiles, scale * LOG2E,
        ),
        dict(
            HEAD_DIM=dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_SIZE=block_size,
            CAUSAL=causal, ORDER=order, USE_TMA=use_tma, PRECISION=precision, P_DTYPE=p_dtype,
            BF16_VIA_F32=via_f32, num_warps=num_warps,
        ),
        key=key,
        num_stages=num_stages,
    )  # fmt: skip
    return result
