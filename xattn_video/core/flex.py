"""The ``flex`` backend: block-sparse attention through torch's FlexAttention and a BlockMask.

The selection's compact lists (kv_count, kv_indices) are FlexAttention's own BlockMask format. Blocks that
need no per-element mask (not the causal diagonal, not the ragged last key block) go in as "full" blocks;
the others as "partial" blocks, to which the mask_mod applies. The mask_mod itself encodes the whole rule
(kept block, causal, in range), which is what FlexAttention's unfused CPU path evaluates.
"""

from __future__ import annotations

import functools

import torch

from .reference import compact_blocks


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    *,
    block_size: int,
    causal: bool,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention over the kept blocks with FlexAttention; equals ``block_sparse_attention_torch``."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    n_q, n_k = q.shape[2], k.shape[2]
    n_qb, n_kb = mask.shape[-2:]
    ragged_last = n_k % block_size != 0

    def mask_mod(b, h, q_idx, kv_idx):
        keep = mask[b, h, q_idx // block_size, kv_idx // block_size] & (kv_idx < n_k)
        if causal:
            keep = keep & (kv_idx <= q_idx)
        return keep

    qb = torch.arange(n_qb, device=mask.device)[:, None]
    kb = torch.arange(n_kb, device=mask.device)[None, :]
    needs_mask = torch.zeros(n_qb, n_kb, dtype=torch.bool, device=mask.device)
    if causal:
        needs_mask |= kb == qb
    if ragged_last:
        needs_mask |= kb == n_kb - 1
    partial = mask & needs_mask
    full = mask & ~needs_mask
    (partial_count, partial_indices), (full_count, full_indices) = compact_blocks(partial), compact_blocks(full)
    block_mask = BlockMask.from_kv_blocks(
        partial_count,
        partial_indices.clamp_min(0),  # entries past the count are ignored; keep them valid indices
        full_count,
        full_indices.clamp_min(0),
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(n_q, n_k),
    )
    enable_gqa = q.shape[1] != k.shape[1]
    if not q.is_cuda:  # FlexAttention's unfused path: it evaluates mask_mod over the whole score matrix
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
    # The compiled kernel's tiles must divide the BlockMask's blocks; its defaults are 128 on Hopper.
    tiles = {"BLOCK_M": block_size, "BLOCK_N": block_size} if block_size < 128 else None
    return _compiled_flex_attention()(
        q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa, kernel_options=tiles
    )

