"""Fixed-density block selection: the top-scoring share of key blocks per query block, instead of a mass threshold.

XAttention's threshold keeps, per query block, the fewest key blocks whose estimated mass reaches ``threshold``;
the density that results depends on how diffuse the model's attention is. On the trained fixture no threshold
gives a density below 0.49 (docs/quality.md). Keeping instead ``ceil(density * key blocks)`` blocks of each
query block, the ones with the highest antidiagonal scores, fixes the density exactly (what a speed target
needs) and gives every query block the same share (on the fixture this beat spending one budget over all query
blocks and heads by their mass: docs/quality.md, "Levers").

    sel = estimate_topk_blocks(q, k, density=0.3, stride=8, block_size=128)   # a BlockSelection
    out = xattn_video.core.attention._sparse_attention("torch")(q, k, v, sel, block_size=128, causal=False,
                                                                 scale=None)

The processor exposes it as ``XAttnProcessor(density=...)`` (``xattn_video.enable(..., density=0.3)``), as does the
``xattn`` backend; both choose between it and the threshold through :func:`select_for`.
"""

from __future__ import annotations

import math

import torch

from .config import XAttnConfig, check_backend, check_estimate_fp8
from .estimate import BlockSelection, checked_config, estimate_blocks
from .inputs import resolve_estimate_fp8
from .reference import block_scores_torch, compact_blocks

__all__ = ["check_density", "estimate_topk_blocks", "select_for", "select_topk"]


def check_density(density: float | None) -> float | None:
    """``density`` as a float in (0, 1], or None (threshold selection); else a one-line error naming it."""
    if density is None:
        return None
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"density must be a number in (0, 1] or None, got {density!r}")
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be in (0, 1] (share of key blocks kept per query block), got {density!r}")
    return float(density)


def blocks_kept(density: float, n_key_blocks: int) -> int:
    """Key blocks kept per query block: ``ceil(density * n_key_blocks)``, at least 1 (float round-off aside)."""
    return max(1, min(n_key_blocks, math.ceil(density * n_key_blocks - 1e-9)))


def select_topk(scores: torch.Tensor, density: float) -> BlockSelection:
    """Keep the ``ceil(density * nkb)`` highest-scoring key blocks of each query-block row of ``scores``
    [B, H, nqb, nkb] (non-causal). Ties at the cut are broken by ``torch.topk``'s order."""
    density = check_density(density)
    n_kb = scores.shape[-1]
    keep = blocks_kept(density, n_kb)
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if keep == n_kb:
        mask.fill_(True)
    else:
        mask.scatter_(-1, scores.float().topk(keep, dim=-1).indices, True)
    return BlockSelection(mask, *compact_blocks(mask))


def estimate_topk_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    density: float,
    stride: int,
    block_size: int = 128,
    scale: float | None = None,
    estimate_fp8: bool | str = False,
    backend: str = "auto",
) -> BlockSelection:
    """The antidiagonal estimate followed by :func:`select_topk`. q/k [B, H, N, D] (SDPA layout). The scores
    come from the Triton kernel for ``backend`` "triton" and "fa4", and "auto" or "flex" on CUDA (as
    :func:`~xattn_video.core.estimate.estimate_blocks` chooses), else from the torch reference."""
    check_backend(backend)
    use_triton = backend in ("triton", "fa4") or (backend in ("auto", "flex") and q.is_cuda)
    estimate_fp8 = resolve_estimate_fp8(check_estimate_fp8(estimate_fp8), q, "triton" if use_triton else "torch")
    if use_triton:
        from ..kernels.estimate import block_scores_triton

        scores = block_scores_triton(
            q, k, stride=stride, block_size=block_size, causal=False, scale=scale, fp8=estimate_fp8
        )
    else:
        if estimate_fp8:
            from .reference import fp8_roundtrip

            q, k = fp8_roundtrip(q), fp8_roundtrip(k)
        scores = block_scores_torch(q, k, stride=stride, block_size=block_size, causal=False, scale=scale)
    if not torch.isfinite(scores).all():
        raise ValueError("q or k contains NaN or Inf: the block estimate is undefined for such inputs")
    return select_topk(scores, density)


def select_for(
    q: torch.Tensor, k: torch.Tensor, config: XAttnConfig, *, density: float | None, scale: float | None = None
) -> tuple[BlockSelection, XAttnConfig]:
    """The key blocks kept for one valid segment (q/k [B, H, L, D], no mask) under ``config``: the threshold's
    selection, or with ``density`` its top-k. Returns them with ``config`` as resolved for q ("auto" backend and
    ``estimate_fp8``), which the integrations record."""
    config = checked_config(q, k, None, config)
    if density is not None and q.shape[0]:
        selection = estimate_topk_blocks(
            q,
            k,
            density=density,
            stride=config.stride,
            block_size=config.block_size,
            scale=scale,
            estimate_fp8=config.estimate_fp8,
            backend=config.backend,
        )
        return selection, config
    return estimate_blocks(q, k, config, scale=scale), config
