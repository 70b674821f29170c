"""The ``torch`` backend: XAttention in plain PyTorch, on any device.

This is the reference the Triton kernels are tested against, written for clarity over speed. It works on
chunks of query blocks so that memory stays O(N x block) (times batch and heads), never N x N.

Shapes follow SDPA: ``q`` [batch, heads, Nq, head_dim], ``k``/``v`` [batch, kv_heads, Nk, head_dim], with
``heads % kv_heads == 0`` (grouped-query attention). Block scores and masks are per query head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Upper bound on the elements of one chunk's score matrix (float32): 2**26 elements = 256 MiB.
CHUNK_ELEMENTS = 1 << 26


def _query_blocks_per_chunk(per_block_elements: int, n_blocks: int, budget: int) -> int:
    return max(1, min(n_blocks, budget // max(1, per_block_elements)))


def block_scores_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    stride: int,
    block_size: int,
    causal: bool,
    scale: float | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Antidiagonal block scores, float32 ``[batch, heads, ceil(Nq/block), ceil(Nk/block)]``.

    Strided row i (tokens i*S .. i*S+S-1) is Q'[i] = concat_s Q[i*S + S-1-s]; strided key j is
    K'[j] = concat_s K[j*S + s]; tokens past the end are zeros. Logits are Q'K'^T * scale / S with
    scale = 1/sqrt(head_dim) by default; each strided row is softmaxed over the ceil(Nk/S) strided keys
    (causal: keys j <= i) and its probabilities are summed per key block. A block score is the sum over
    the strided rows of its query block, so a query block's scores add up to its number of strided rows.
    """
    batch, heads, n_q, dim = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    group = heads // kv_heads
    rows_per_block = block_size // stride
    n_qb, n_kb = math.ceil(n_q / block_size), math.ceil(n_k / block_size)
    rows_q, rows_k = math.ceil(n_q / stride), math.ceil(n_k / stride)
    logit_scale = (scale if scale is not None else dim**-0.5) / stride

    # K' [B, Hkv, 1, Rk, S*D]; Q' [B, Hkv, g, nqb*rows_per_block, S*D] with the S slots reversed.
    k_strided = F.pad(k.float(), (0, 0, 0, rows_k * stride - n_k)).reshape(batch, kv_heads, 1, rows_k, -1)
    q_pad = F.pad(q.float(), (0, 0, 0, n_qb * block_size - n_q))
    q_strided = q_pad.reshape(batch, heads, n_qb * rows_per_block, stride, dim).flip(3)
    q_strided = q_strided.reshape(batch, kv_heads, group, n_qb * rows_per_block, stride * dim)

    scores = torch.empty(batch, heads, n_qb, n_kb, dtype=torch.float32, device=q.device)
    per_block = batch * heads * rows_per_block * rows_k
    chunk = _query_blocks_per_chunk(per_block, n_qb, chunk_elements)
    cols = torch.arange(rows_k, device=q.device)
    for qb0 in range(0, n_qb, chunk):
        qb1 = min(n_qb, qb0 + chunk)
        rows = torch.arange(qb0 * rows_per_block, qb1 * rows_per_block, device=q.device)
        logits = q_strided[:, :, :, rows] @ k_strided.transpose(-1, -2) * logit_scale
        if causal:
            logits = logits.masked_fill(cols[None, :] > rows[:, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        probs = probs * (rows < rows_q)[:, None].to(probs.dtype)  # rows made only of padding count for 0
        probs = F.pad(probs, (0, n_kb * rows_per_block - rows_k))
        tiles = probs.reshape(batch, kv_heads, group, qb1 - qb0, rows_per_block, n_kb, rows_per_block)
        scores[:, :, qb0:qb1] = tiles.sum(dim=(4, 6)).reshape(batch, heads, qb1 - qb0, n_kb)
    return scores


def fp8_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """x quantised to float8 e4m3 with one scale (``amax / 448``, nothing saturates) and back, in float32:
    the values the Triton estimate multiplies when ``estimate_fp8`` is on."""
    amax = torch.linalg.vector_norm(x, ord=float("inf")).float()
    inv = torch.where(amax > 0, 448.0 / amax, torch.ones_like(amax))
    scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    return (x.float() * inv).to(torch.float8_e4m3fn).float() * scale


def select_blocks_torch(
    scores: torch.Tensor, *, threshold: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick the key blocks of each query-block row; returns ``(mask, kv_count, kv_indices)``.

    For each row, blocks are ranked by score; the smallest prefix whose exclusive running sum is still
    below ``threshold * row_mass`` is kept, so the block that crosses the threshold is kept; blocks whose
    score ties the last kept one are kept too. ``threshold >= 1`` keeps every block. Causal: only blocks
    at or left of the diagonal count, and the diagonal and first blocks are always kept.

    mask: bool [B, H, nqb, nkb]; kv_count: int32 [B, H, nqb]; kv_indices: int32 [B, H, nqb, nkb] with the
    kept block indices ascending in the first kv_count places and -1 after them.
    """
    n_qb, n_kb = scores.shape[-2:]
    device = scores.device
    qb = torch.arange(n_qb, device=device)[:, None]
    kb = torch.arange(n_kb, device=device)[None, :]
    valid = kb <= qb if causal else torch.ones(n_qb, n_kb, dtype=torch.bool, device=device)
    if threshold >= 1.0:
        mask = valid.expand(scores.shape).clone()
    else:
        s = scores.float().masked_fill(~valid, 0.0)
        mass = s.sum(-1, keepdim=True)
        ranked = s.sort(dim=-1, descending=True).values
        before = ranked.cumsum(-1) - ranked
        n_keep = (before < threshold * mass).sum(-1, keepdim=True).clamp_min(1)
        cutoff = ranked.gather(-1, n_keep - 1)
        mask = (s >= cutoff) & valid
    if causal:
        mask = mask | (kb == qb) | (kb == 0)
    return (mask, *compact_blocks(mask))


def compact_blocks(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [..., nqb, nkb] -> (kv_count int32 [..., nqb], kv_indices int32 [..., nqb, nkb]): the kept
    block indices of each row ascending, then -1 (the kernels' and FlexAttention's compact format)."""
    n_kb = mask.shape[-1]
    kb = torch.arange(n_kb, device=mask.device)
    order = torch.where(mask, kb, kb + n_kb).sort(dim=-1).values
    return mask.sum(-1, dtype=torch.int32), torch.where(order < n_kb, order, -1).to(torch.int32)


def block_sparse_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    *,
    block_size: int,
    causal: bool,
    scale: float | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Exact attention restricted to the kept blocks of ``mask`` (bool [B, H, nqb, nkb]), float32 inside.

    Causal attention also masks keys after the query inside the diagonal block. Every query row must have
    at least one kept key (selection guarantees it); the output has q's dtype and shape.
    """
    batch, heads, n_q, dim = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    group = heads // kv_heads
    n_qb = mask.shape[2]
    scale = scale if scale is not None else dim**-0.5
    k32 = k.float().unsqueeze(2)  # [B, Hkv, 1, Nk, D]
    v32 = v.float().unsqueeze(2)
    key_block = torch.arange(n_k, device=q.device) // block_size
    key_pos = torch.arange(n_k, device=q.device)
    out = torch.empty_like(q)
    per_block = batch * heads * block_size * n_k
    chunk = _query_blocks_per_chunk(per_block, n_qb, chunk_elements)
    for qb0 in range(0, n_qb, chunk):
        t0, t1 = qb0 * block_size, min(n_q, (qb0 + chunk) * block_size)
        query_pos = torch.arange(t0, t1, device=q.device)
        q_chunk = q[:, :, t0:t1].float().reshape(batch, kv_heads, group, t1 - t0, dim)
        logits = (q_chunk @ k32.transpose(-1, -2)) * scale  # [B, Hkv, g, r, Nk]
        row_block = query_pos // block_size
        allowed = mask[:, :, row_block][..., key_block]  # [B, H, r, Nk]
        allowed = allowed.reshape(batch, kv_heads, group, t1 - t0, n_k)
        if causal:
            allowed = allowed & (key_pos[None, :] <= query_pos[:, None])
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        out[:, :, t0:t1] = (probs @ v32).reshape(batch, heads, t1 - t0, dim).to(q.dtype)
    return out
