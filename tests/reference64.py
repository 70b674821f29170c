"""Float64 references written straight from the definitions in DESIGN.md, independent of the package."""

from __future__ import annotations

import math

import torch


def antidiagonal_block_scores64(q, k, *, stride: int, block_size: int, causal: bool) -> torch.Tensor:
    """Block scores [B, H, nqb, nkb] in float64, by explicit antidiagonal sums and per-block loops."""
    batch, heads, n_q, dim = q.shape
    n_k = k.shape[2]
    k = k.double().repeat_interleave(heads // k.shape[1], dim=1)
    rows_q, rows_k = math.ceil(n_q / stride), math.ceil(n_k / stride)
    q_pad = torch.zeros(batch, heads, rows_q * stride, dim, dtype=torch.float64)
    k_pad = torch.zeros(batch, heads, rows_k * stride, dim, dtype=torch.float64)
    q_pad[:, :, :n_q] = q.double()
    k_pad[:, :, :n_k] = k
    logits = torch.zeros(batch, heads, rows_q, rows_k, dtype=torch.float64)
    for s in range(stride):  # query offset S-1-s pairs with key offset s
        logits += q_pad[:, :, stride - 1 - s :: stride] @ k_pad[:, :, s::stride].transpose(-1, -2)
    logits /= math.sqrt(dim) * stride
    if causal:
        i = torch.arange(rows_q)[:, None]
        j = torch.arange(rows_k)[None, :]
        logits = logits.masked_fill(j > i, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    per = block_size // stride
    n_qb, n_kb = math.ceil(n_q / block_size), math.ceil(n_k / block_size)
    scores = torch.zeros(batch, heads, n_qb, n_kb, dtype=torch.float64)
    for qb in range(n_qb):
        for kb in range(n_kb):
            scores[:, :, qb, kb] = probs[:, :, qb * per : (qb + 1) * per, kb * per : (kb + 1) * per].sum((-1, -2))
    return scores


def select_blocks64(scores: torch.Tensor, *, threshold: float, causal: bool) -> torch.Tensor:
    """Kept-block mask by the rule in DESIGN.md, one row at a time with Python sorting."""
    mask = torch.zeros(scores.shape, dtype=torch.bool)
    n_qb, n_kb = scores.shape[-2:]
    for index in torch.cartesian_prod(*[torch.arange(n) for n in scores.shape[:-1]]):
        b, h, qb = index.tolist()
        valid = [kb for kb in range(n_kb) if not causal or kb <= qb]
        row = {kb: float(scores[b, h, qb, kb]) for kb in valid}
        if threshold >= 1.0:
            kept = set(valid)
        else:
            mass = sum(row.values())
            kept, running = set(), 0.0
            for kb in sorted(valid, key=lambda kb: -row[kb]):
                if running >= threshold * mass:
                    break
                kept.add(kb)
                running += row[kb]
            cutoff = min(row[kb] for kb in kept)
            kept |= {kb for kb in valid if row[kb] >= cutoff}  # ties with the crossing block
        if causal:
            kept |= {0, qb}
        for kb in kept:
            mask[b, h, qb, kb] = True
    return mask


def block_sparse_attention64(q, k, v, mask, *, block_size: int, causal: bool) -> torch.Tensor:
    """Dense float64 attention with the block mask expanded to tokens."""
    heads, n_q, dim = q.shape[1], q.shape[2], q.shape[3]
    n_k = k.shape[2]
    k = k.double().repeat_interleave(heads // k.shape[1], dim=1)
    v = v.double().repeat_interleave(heads // v.shape[1], dim=1)
    token_mask = mask.repeat_interleave(block_size, 2).repeat_interleave(block_size, 3)[:, :, :n_q, :n_k]
    if causal:
        token_mask = token_mask & torch.ones(n_q, n_k, dtype=torch.bool).tril()
    logits = q.double() @ k.transpose(-1, -2) / math.sqrt(dim)
    return torch.softmax(logits.masked_fill(~token_mask, float("-inf")), -1) @ v
