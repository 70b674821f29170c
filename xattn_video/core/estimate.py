"""The block estimate: antidiagonal scoring, then threshold selection, on the backend that fits the device."""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch

from .config import XAttnConfig
from .inputs import autocast_inputs, check_qkv, resolve_backend_for, resolve_estimate_fp8
from .reference import block_scores_torch, fp8_roundtrip, select_blocks_torch


class BlockSelection(NamedTuple):
    """Kept key blocks per (batch, head, query block), as a mask and as compact ascending lists."""

    mask: torch.Tensor  # bool [B, H, nqb, nkb]
    kv_count: torch.Tensor  # int32 [B, H, nqb]
    kv_indices: torch.Tensor  # int32 [B, H, nqb, nkb]: kept blocks ascending, then -1


def all_blocks(q: torch.Tensor, n_k: int, *, block_size: int, causal: bool) -> BlockSelection:
    """Every block kept (threshold 1.0): dense attention, with no estimate to pay for."""
    batch, heads, n_q = q.shape[:3]
    n_qb, n_kb = -(-n_q // block_size), -(-n_k // block_size)
    scores = torch.ones(batch, heads, n_qb, n_kb, device=q.device)
    return BlockSelection(*select_blocks_torch(scores, threshold=1.0, causal=causal))


def append_dense_rows(selection: BlockSelection, n_q_blocks: int) -> BlockSelection:
    """``selection`` grown to ``n_q_blocks`` query blocks, the added ones keeping every key block. The diffusers
    processor uses it for query blocks made only of padded text tokens."""
    batch, heads, n_qb, n_kb = selection.mask.shape
    extra = n_q_blocks - n_qb
    if extra < 0:
        raise ValueError(f"n_q_blocks={n_q_blocks} is below the selection's {n_qb} query blocks")
    if extra == 0:
        return selection
    mask = torch.cat([selection.mask, selection.mask.new_ones(batch, heads, extra, n_kb)], 2)
    kv_count = torch.cat([selection.kv_count, selection.kv_count.new_full((batch, heads, extra), n_kb)], 2)
    every = torch.arange(n_kb, dtype=selection.kv_indices.dtype, device=mask.device).expand(batch, heads, extra, n_kb)
    return BlockSelection(mask, kv_count, torch.cat([selection.kv_indices, every], 2))


def estimate_blocks(
    q: torch.Tensor, k: torch.Tensor, config: XAttnConfig, *, scale: float | None = None
) -> BlockSelection:
    """Score blocks and select them, with checked inputs and a resolved backend in ``config``.

    The Triton estimate serves the ``triton`` and ``fa4`` backends and ``flex`` on CUDA; ``torch`` everywhere else. Both
    compute the same function (the Triton kernels are tested against the torch reference).
    """
    if config.threshold >= 1.0 or q.shape[0] == 0:  # every block; for an empty batch, empty tensors
        return all_blocks(q, k.shape[2], block_size=config.block_size, causal=config.causal)
    use_triton = config.backend in ("triton", "fa4") or (config.backend == "flex" and q.is_cuda)
    if use_triton:
        from ..kernels.estimate import block_scores_triton
        from ..kernels.select import select_blocks_triton

        scores = block_scores_triton(
            q,
            k,
            stride=config.stride,
            block_size=config.block_size,
            causal=config.causal,
            scale=scale,
            fp8=config.estimate_fp8,
        )
        _check_finite(scores)
        return BlockSelection(*select_blocks_triton(scores, threshold=config.threshold, causal=config.causal))
    if config.estimate_fp8:  # the same quantised values the Triton kernel multiplies
        q, k = fp8_roundtrip(q), fp8_roundtrip(k)
    scores = block_scores_torch(
        q, k, stride=config.stride, block_size=config.block_size, causal=config.causal, scale=scale
    )
    _check_finite(scores)
    return BlockSelection(*select_blocks_torch(scores, threshold=config.threshold, causal=config.causal))


def _check_finite(scores: torch.Tensor) -> None:
    # A NaN or Inf anywhere in q or k reaches the block scores of its rows (q) or of every row (k).
    if not torch.isfinite(scores).all():
        raise ValueError("q or k contains NaN or Inf: the block estimate is undefined for such inputs")


def estimate_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    threshold: float,
    stride: int,
    block_size: int = 128,
    causal: bool = False,
    backend: str = "auto",
    scale: float | None = None,
    estimate_fp8: bool | str = False,
) -> torch.Tensor:
    """Which key blocks XAttention keeps: bool ``[batch, heads, ceil(Nq/block), ceil(Nk/block)]``.

    q [batch, heads, Nq, head_dim], k [batch, kv_heads, Nk, head_dim] (SDPA layout). See DESIGN.md for the
    algorithm: antidiagonal scores with stride ``stride``, softmax over valid keys, per-row selection of
    the smallest set of blocks whose score mass reaches ``threshold`` (the crossing block kept; ties with
    it kept; causal: diagonal and first block always kept). ``threshold=1.0`` keeps every block.
    ``estimate_fp8`` scores on float8 e4m3 copies of q and k (see :class:`XAttnConfig`). A batch of 0 gives
    an empty mask; under ``torch.autocast`` q and k are cast as :func:`xattn_attention` casts them.
    """
    q, k, _ = autocast_inputs(q, k, None)
    config = checked_config(q, k, None, XAttnConfig(threshold, stride, block_size, causal, backend, estimate_fp8))
    return estimate_blocks(q, k, config, scale=scale).mask


def checked_config(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, config: XAttnConfig) -> XAttnConfig:
    """Check the tensors against a validated config; return it with "auto" (backend, estimate_fp8) resolved for
    their device."""
    check_qkv(q, k, v, causal=config.causal)
    backend = resolve_backend_for(config.backend, q, block_size=config.block_size, attention_fp8=config.attention_fp8)
    return replace(config, backend=backend, estimate_fp8=resolve_estimate_fp8(config.estimate_fp8, q, backend))
