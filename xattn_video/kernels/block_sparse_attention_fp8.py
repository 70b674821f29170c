"""Block-sparse attention forward in float8 (Triton): the kept blocks of an XAttention selection, with q, k, P and V
in float8 e4m3 and float32 accumulation (the SageAttention recipe), for Hopper's float8 tensor cores.

What it computes
    The blocks and the softmax of :func:`~xattn_video.kernels.block_sparse_attention.block_sparse_attention_triton`,
    on quantised operands:

    - q is quantised with one scale per (batch, head, query block): ``q8 = e4m3(q / sq)`` with ``sq`` the
      smallest power of two >= ``amax(|q|) / 448`` over the block's rows (a power of two, so the division is
      exact and nothing saturates);
    - k likewise with one scale per (batch, kv head, key block): ``k8``, ``sk``;
    - V with one scale per (batch, kv head, channel) over all its tokens: ``v8``, ``sv``;
    - per key tile, the base-2 logits ``s = (q8 . k8) * (sq * scale * log2 e) * sk`` in float32 (the first factor
      one float32 number per query block); the online softmax keeps the row maximum ``m`` and the
      sum ``l`` of ``p = 2^(s - m)`` in float32; ``p`` enters the PV product as ``e4m3(448 p)``, each tile's
      product ``e4m3(448 p) . v8`` is accumulated into a float32 accumulator outside the tensor core (a fresh
      product per tile, so Hopper's reduced-precision float8 accumulation spans one tile only);
    - ``out = acc * sv / (448 l)``.

    Rounding is to nearest even everywhere (torch's and the hardware's float8 casts). ``tests`` compare it with
    these steps written out in float64 on the same quantised values, and bound its error against exact attention.

Why these scales
    e4m3 keeps 3 mantissa bits: a relative rounding of 2^-4 per element, the same in every binade above its
    subnormals, so a power-of-two scale loses nothing against ``amax / 448``. Per-block q/k scales follow the local
    magnitude of the tokens; V's channels differ in magnitude more than its tokens do, hence per-channel scales.
    P lies in [0, 1] after the running-max subtraction, so one fixed scale (448) uses e4m3's whole range.

Layout
    The launcher quantises with three fused Triton passes (torch under the interpreter, whose float8 casts
    misround; the GPU tests check the two agree bit for bit) into padded buffers: q8/k8
    [B, H, blocks * block_size, BLOCK_D] and V transposed, v8t [B, Hkv, BLOCK_D, Nk_pad],
    so that both float8 products read their reduction dimension contiguously (what Hopper's float8 tensor core
    instructions require) and no load needs a bounds mask. Grid, schedules, tails and grouped-query handling are
    those of the 16-bit kernel.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from xattn_video.core.inputs import check_qkv

from ._launch import INTERPRETED, LOG2E, is_pow2, launch_fitting_stages
from .block_sparse_attention import _ORDER_CODES, SCHEDULES, _check_tile, _tile_order

E4M3_MAX = 448.0
P_SCALE = 448.0  # P in [0, 1] enters the PV product as e4m3(P_SCALE * p)


@triton.jit
def _block_sparse_attention_fp8_fwd(
    Q8,
    K8,
    V8T,
    QS,
    KS,
    VS,
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
    stride_vd,
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
    H_KV,
    GROUP,
    N_Q,
    N_K,
    N_QB,
    N_KB,
    N_TILES,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    CAUSAL: tl.constexpr,
    ORDER: tl.constexpr,
    P_SCALE_C: tl.constexpr,
    INTERP: tl.constexpr,
):
    SUB_N: tl.constexpr = BLOCK_SIZE // BLOCK_N

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

    count = tl.load(KV_COUNT + b64 * stride_cb + h * stride_ch + qb * stride_cq)
    idx_row = KV_INDICES + b64 * stride_ib + h.to(tl.int64) * stride_ih + qb.to(tl.int64) * stride_iq
    last = tl.load(idx_row + (count - 1) * stride_ik, mask=count > 0, other=0)
    key_end = (last + 1) * BLOCK_SIZE
    needs_mask = key_end > N_K
    if CAUSAL:
        needs_mask = needs_mask | (key_end - 1 > m0)
    has_tail = (count > 0) & needs_mask
    n_full = count - has_tail.to(tl.int32)

    # Quantised q tile (padded buffer: no bounds mask) and its block's scale.
    q_base = Q8 + b64 * stride_qb + h.to(tl.int64) * stride_qh + m0.to(tl.int64) * stride_qm
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :])
    if INTERP:
        q = q.to(tl.float32)
    q_scale = tl.load(QS + bh.to(tl.int64) * N_QB + qb)
    ks_row = KS + (b64 * H_KV + hkv) * N_KB

    k_base = K8 + b64 * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = V8T + b64 * stride_vb + hkv.to(tl.int64) * stride_vh
    k_tile = offs_n[:, None] * stride_kn + offs_d[None, :]
    v_tile = offs_d[:, None] * stride_vd + offs_n[None, :]  # [BLOCK_D, BLOCK_N] of V transposed

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    # Mask-free main loop (written out twice rather than through a helper: see the 16-bit kernel).
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
        qk_scale = q_scale * tl.load(ks_row + kb)
        kb = tl.load(idx_row + nxt * stride_ik, mask=it + 1 < n_iter, other=0)
        k = tl.load(k_base + start_n.to(tl.int64) * stride_kn + k_tile)
        vt = tl.load(v_base + start_n.to(tl.int64) + v_tile)
        if INTERP:
            k = k.to(tl.float32)
            vt = vt.to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        else:
            qk = tl.dot(q, tl.trans(k)) * qk_scale
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if INTERP:  # the interpreter's float8 cast misrounds some values: round to nearest even by hand
            x = p * P_SCALE_C
            bits = x.to(tl.int32, bitcast=True)
            normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
            sub = ((x * 512.0 + 8388608.0) - 8388608.0) / 512.0
            p8 = tl.where(x < 0.015625, sub, normal)
            pv = tl.dot(p8, tl.trans(vt), input_precision="ieee")
        else:
            pv = tl.dot((p * P_SCALE_C).to(tl.float8e4nv), tl.trans(vt))
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    # Masked tail: the last kept block when it is ragged or the causal diagonal.
    tail_start = last * BLOCK_SIZE
    tail_end = tl.minimum(key_end, N_K)
    if CAUSAL:
        tail_end = tl.minimum(tail_end, m0 + BLOCK_M)
    n_tail = tl.where(has_tail, tl.cdiv(tail_end - tail_start, BLOCK_N), 0)
    tail_scale = q_scale * tl.load(ks_row + last)
    for j in tl.range(0, n_tail, num_stages=1):
        start_n = tail_start + j * BLOCK_N
        key = start_n + offs_n
        k = tl.load(k_base + start_n.to(tl.int64) * stride_kn + k_tile)
        vt = tl.load(v_base + start_n.to(tl.int64) + v_tile)
        valid = (key < N_K)[None, :]
        if CAUSAL:
            valid = valid & (key[None, :] <= (m0 + offs_m)[:, None])
        if INTERP:
            k = k.to(tl.float32)
            vt = vt.to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision="ieee") * tail_scale
        else:
            qk = tl.dot(q, tl.trans(k)) * tail_scale
        qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if INTERP:
            x = p * P_SCALE_C
            bits = x.to(tl.int32, bitcast=True)
            normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
            sub = ((x * 512.0 + 8388608.0) - 8388608.0) / 512.0
            p8 = tl.where(x < 0.015625, sub, normal)
            pv = tl.dot(p8, tl.trans(vt), input_precision="ieee")
        else:
            pv = tl.dot((p * P_SCALE_C).to(tl.float8e4nv), tl.trans(vt))
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    v_scale = tl.load(VS + (b64 * H_KV + hkv) * BLOCK_D + offs_d)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc * (v_scale[None, :] / P_SCALE_C) / l_safe[:, None]
    o_base = Out + b64 * stride_ob + h.to(tl.int64) * stride_oh + m0.to(tl.int64) * stride_om
    o_ptrs = o_base + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=((m0 + offs_m)[:, None] < N_Q) & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _pow2_at_least(amax):
    """The smallest power of two >= amax / 448 (exact: from the bits of the float32 quotient), 1 where amax is 0."""
    x = amax / 448.0
    bits = x.to(tl.int32, bitcast=True)
    expo = bits & 0x7F800000
    scale = tl.where((bits & 0x007FFFFF) == 0, expo, expo + 0x00800000).to(tl.float32, bitcast=True)
    return tl.where(amax > 0, scale, 1.0)


@triton.jit
def _quantize_rows_kernel(
    X, Y, S, stride_xb, stride_xh, stride_xn, H, N, N_PAD, N_BLOCKS, s_factor,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    """One block of ROWS tokens of one head: its power-of-two scale, and its rows as e4m3 into the padded Y."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = blk * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (rows < N)[:, None] & (offs_d < HEAD_DIM)[None, :]
    x_ptrs = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    x = tl.load(x_ptrs + rows.to(tl.int64)[:, None] * stride_xn + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    scale = _pow2_at_least(tl.max(tl.max(tl.abs(x), 1), 0))
    y_ptrs = Y + bh.to(tl.int64) * N_PAD * BLOCK_D + rows.to(tl.int64)[:, None] * BLOCK_D + offs_d[None, :]
    tl.store(y_ptrs, (x / scale).to(Y.dtype.element_ty))
    tl.store(S + bh.to(tl.int64) * N_BLOCKS + blk, scale * s_factor)


@triton.jit
def _quantize_v_kernel(
    X, Y, SV, stride_xb, stride_xh, stride_xn, N, N_PAD,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    """ROWS tokens of V of one head divided by the per-channel scales, stored transposed ([BLOCK_D, N_PAD]) as e4m3."""
    blk = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b.to(tl.int64) * tl.num_programs(1) + h
    rows = blk * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (rows < N)[:, None] & (offs_d < HEAD_DIM)[None, :]
    x_ptrs = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    x = tl.load(x_ptrs + rows.to(tl.int64)[:, None] * stride_xn + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    sv = tl.load(SV + bh * BLOCK_D + offs_d)
    y = tl.trans((x / sv[None, :]).to(Y.dtype.element_ty))  # [BLOCK_D, ROWS]
    tl.store(Y + bh * BLOCK_D * N_PAD + offs_d.to(tl.int64)[:, None] * N_PAD + rows[None, :], y)


def _blocked_amax(x: torch.Tensor, block: int) -> torch.Tensor:
    """amax(|x|) over each run of ``block`` rows: x [B, H, N_pad, D] -> [B, H, N_pad // block] float32."""
    batch, heads, n, dim = x.shape
    return x.reshape(batch, heads, n // block, block * dim).abs().amax(-1).float()


def _pad(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, cols - x.shape[-1], 0, rows - x.shape[-2]))


def _e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).to(torch.float8_e4m3fn)


def _pow2_scale(amax: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= amax / 448 (1 where amax is 0), float32."""
    mantissa, exponent = torch.frexp(amax.float() / E4M3_MAX)  # x = mantissa * 2^exponent, mantissa in [0.5, 1)
    scale = torch.ldexp(torch.ones_like(mantissa), exponent - (mantissa == 0.5).to(exponent.dtype))
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def quantize_for_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int, scale: float, block_d: int
) -> tuple[torch.Tensor, ...]:
    """``(q8, qs, k8, sk, v8t, sv)`` as the kernel reads them (see the module): q8 [B, H, nqb*bs, block_d] and
    qs = sq * scale * log2(e) [B, H, nqb], k8 [B, Hkv, nkb*bs, block_d] and sk [B, Hkv, nkb], v8t
    [B, Hkv, block_d, nkb*bs] (V transposed) and sv [B, Hkv, block_d]; float32 scales (sq, sk, sv powers of two)."""
    n_q, n_k = q.shape[2], k.shape[2]
    rows_q, rows_k = -(-n_q // block_size) * block_size, -(-n_k // block_size) * block_size
    if q.is_cuda and not INTERPRETED:
        return _quantize_triton(q, k, v, block_size=block_size, scale=scale, block_d=block_d)
    # the interpreter's float8 casts misround some values: its tests quantise with torch (exact), as here
    qp, kp, vp = _pad(q, rows_q, block_d), _pad(k, rows_k, block_d), _pad(v, rows_k, block_d)
    sq = _pow2_scale(_blocked_amax(qp, block_size))
    sk = _pow2_scale(_blocked_amax(kp, block_size))
    sv = _pow2_scale(vp.abs().amax(2))
    q8 = _e4m3(qp.float(), sq.repeat_interleave(block_size, 2)[..., None])
    k8 = _e4m3(kp.float(), sk.repeat_interleave(block_size, 2)[..., None])
    v8t = _e4m3(vp.float(), sv[:, :, None, :]).transpose(-1, -2).contiguous()
    qs = sq * (scale * LOG2E)
    return q8.contiguous(), qs.contiguous(), k8.contiguous(), sk.contiguous(), v8t, sv.contiguous()


def _quantize_triton(q, k, v, *, block_size: int, scale: float, block_d: int) -> tuple[torch.Tensor, ...]:
    """:func:`quantize_for_attention` in three fused passes (q, k: one read each; V: its channel amax, then one
    quantise-and-transpose pass); the same values as the torch path (tested on the GPU)."""
    batch, heads, n_q, dim = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    n_qb, n_kb = -(-n_q // block_size), -(-n_k // block_size)
    fp8 = torch.float8_e4m3fn
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    q8 = torch.empty(batch, heads, n_qb * block_size, block_d, dtype=fp8, device=q.device)
    k8 = torch.empty(batch, kv_heads, n_kb * block_size, block_d, dtype=fp8, device=q.device)
    qs = torch.empty(batch, heads, n_qb, dtype=torch.float32, device=q.device)
    sk = torch.empty(batch, kv_heads, n_kb, dtype=torch.float32, device=q.device)
    common = dict(HEAD_DIM=dim, BLOCK_D=block_d, ROWS=block_size, num_warps=8)
    for x, y, s_out, n, n_b, h, factor in ((q, q8, qs, n_q, n_qb, heads, scale * LOG2E),
                                          (k, k8, sk, n_k, n_kb, kv_heads, 1.0)):  # fmt: skip
        _quantize_rows_kernel[(n_b, batch * h)](
            x, y, s_out, *x.stride()[:3], h, n, n_b * block_size, n_b, factor, **common
        )  # fmt: skip
    sv = _pow2_scale(_pad(v.abs().amax(2, keepdim=True), 1, block_d)[:, :, 0])  # [B, Hkv, block_d]
    v8t = torch.empty(batch, kv_heads, block_d, n_kb * block_size, dtype=fp8, device=q.device)
    _quantize_v_kernel[(n_kb, kv_heads, batch)](v, v8t, sv, *v.stride()[:3], n_k, n_kb * block_size, **common)
    return q8, qs, k8, sk, v8t, sv


def block_sparse_attention_fp8(
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
) -> torch.Tensor:
    """Float8 attention over the kept blocks (see the module); the contract of
    :func:`~xattn_video.kernels.block_sparse_attention.block_sparse_attention_triton` (q [B, H, Nq, D], k/v
    [B, Hkv, Nk, D], kv_count/kv_indices int32 of the selection; q may have more query blocks than the keys'),
    approximate to float8's precision. Returns a new tensor like q, or fills ``out``. Tiles default to 128 x 128
    (``block_n`` 64 also works); ``schedule`` as there."""
    check_qkv(q, k, v, causal=causal)
    if not isinstance(block_size, int) or not is_pow2(block_size) or not 32 <= block_size <= 256:
        raise ValueError(f"block_size must be a power of two in [32, 256] for the float8 kernel, got {block_size!r}")
    batch, heads, n_q, dim = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    n_qb, n_kb = math.ceil(n_q / block_size), math.ceil(n_k / block_size)
    for name, t, shape in (
        ("kv_count", kv_count, (batch, heads, n_qb)),
        ("kv_indices", kv_indices, (batch, heads, n_qb, n_kb)),
    ):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or tuple(t.shape) != shape:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be an int32 tensor of shape {shape}, got {got}")
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
        if out.device != q.device or out.stride(-1) != 1:
            raise ValueError("out must be on q's device with a contiguous last dimension (stride 1)")

    block_d = max(32, triton.next_power_of_2(dim))  # float8 tensor-core products reduce over 32 at a time
    block_m = min(block_size, 128) if block_m is None else block_m
    block_n = min(block_size, 128) if block_n is None else block_n
    _check_tile("block_m", block_m, block_size)
    _check_tile("block_n", block_n, block_size)
    if block_n < 32:
        raise ValueError(f"block_n must be >= 32 for float8 products, got {block_n}")
    num_warps = (8 if block_m >= 128 else 4) if num_warps is None else num_warps
    num_stages = (3 if block_d <= 128 else 2) if num_stages is None else num_stages

    result = torch.empty_like(q) if out is None else out
    if batch * heads == 0:
        return result
    q8, sq, k8, sk, v8t, sv = quantize_for_attention(q, k, v, block_size=block_size, scale=scale, block_d=block_d)

    n_tiles = triton.cdiv(n_q, block_m)
    if schedule == "auto":
        schedule = "reverse" if causal else "natural"
    if schedule == "heavy_first" and n_qb == 1:
        schedule = "natural"
    order = _ORDER_CODES[schedule]
    tile_order = _tile_order(kv_count, n_tiles, block_size // block_m) if order == 2 else None

    grid = (n_tiles, batch * heads)
    key = (q.device, q.dtype, dim, block_size, block_m, block_n, num_warps, num_stages, causal)
    launch_fitting_stages(
        _block_sparse_attention_fp8_fwd,
        grid,
        (
            q8, k8, v8t, sq, sk, sv, result, kv_count, kv_indices, tile_order,
            *q8.stride()[:3], *k8.stride()[:3], *v8t.stride()[:3], *result.stride()[:3],
            *kv_count.stride(), *kv_indices.stride(),
            heads, kv_heads, heads // kv_heads, n_q, n_k, n_qb, n_kb, n_tiles,
        ),
        dict(
            HEAD_DIM=dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_SIZE=block_size,
            CAUSAL=causal, ORDER=order, P_SCALE_C=P_SCALE, INTERP=INTERPRETED, num_warps=num_warps,
        ),
        key=key,
        num_stages=num_stages,
    )  # fmt: skip
    return result


__all__ = ["E4M3_MAX", "P_SCALE", "block_sparse_attention_fp8", "quantize_for_attention"]
