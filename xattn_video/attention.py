"""``xattn_attention``: XAttention as one call in SDPA layout, on the backend of your choice."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import XAttnConfig
from .estimate import BlockSelection, checked_config, estimate_blocks
from .reference import block_sparse_attention_torch


@dataclass
class XAttnStats:
    """What one call did: how dense it was and where the time went.

    density: kept blocks / blocks attention may visit (causal: the lower triangle with the diagonal),
    over all batches and heads. density_per_head: float32 [batch, heads] on the CPU.
    Times in milliseconds, measured with CUDA events on a GPU (one synchronisation per call) or the
    wall clock on a CPU. At threshold 1.0 the estimate is skipped and its time is only that of listing
    every block.
    """

    density: float
    density_per_head: torch.Tensor
    kept_blocks: int
    total_blocks: int
    estimate_ms: float
    attention_ms: float
    backend: str

    def to_dict(self) -> dict:
        return {
            "density": self.density,
            "density_per_head": self.density_per_head.tolist(),
            "kept_blocks": self.kept_blocks,
            "total_blocks": self.total_blocks,
            "estimate_ms": self.estimate_ms,
            "attention_ms": self.attention_ms,
            "backend": self.backend,
        }


class _Timer:
    """Times consecutive phases on one device: CUDA events on a GPU, perf_counter elsewhere."""

    def __init__(self, device: torch.device, enabled: bool):
        self.cuda = enabled and device.type == "cuda"
        self.enabled = enabled
        self.marks: list = []
        self.mark()

    def mark(self) -> None:
        if not self.enabled:
            return
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def phases_ms(self) -> list[float]:
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:], strict=False)]


def _sparse_attention(backend: str) -> Callable[..., torch.Tensor]:
    if backend == "triton":
        from .kernels.block_sparse_attention import block_sparse_attention_triton

        def run(q, k, v, sel: BlockSelection, **kw):
            return block_sparse_attention_triton(q, k, v, sel.kv_count, sel.kv_indices, **kw)

        return run
    if backend == "flex":
        from .flex import flex_block_sparse_attention

        return lambda q, k, v, sel, **kw: flex_block_sparse_attention(q, k, v, sel.mask, **kw)
    return lambda q, k, v, sel, **kw: block_sparse_attention_torch(q, k, v, sel.mask, **kw)


def selection_stats(selection: BlockSelection, *, causal: bool) -> tuple[torch.Tensor, int, int]:
    """Per-head density [B, H] and the kept / visitable block totals of a selection."""
    n_qb, n_kb = selection.mask.shape[-2:]
    if causal:  # n_qb == n_kb: the lower triangle with the diagonal
        per_head_total = n_qb * (n_qb + 1) // 2
    else:
        per_head_total = n_qb * n_kb
    kept_per_head = selection.kv_count.sum(-1).float().cpu()
    heads_total = kept_per_head.numel()
    return kept_per_head / per_head_total, int(kept_per_head.sum()), per_head_total * heads_total


def xattn_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    threshold: float,
    stride: int,
    block_size: int = 128,
    causal: bool = False,
    backend: str = "auto",
    scale: float | None = None,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, XAttnStats]:
    """Block-sparse attention over the blocks XAttention's antidiagonal estimate keeps.

    q [batch, heads, Nq, head_dim], k/v [batch, kv_heads, Nk, head_dim] (SDPA layout; heads a multiple of
    kv_heads), any token count, bfloat16/float16/float32. ``scale`` defaults to 1/sqrt(head_dim) and also
    scales the estimate's logits. Returns the output in q's shape and dtype, and with ``return_stats`` an
    :class:`XAttnStats`. ``threshold=1.0`` keeps every block and equals
    ``F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)`` up to rounding.

    Backends: "triton" (this project's kernels; CUDA), "flex" (FlexAttention with a BlockMask), "torch"
    (reference, any device), "auto" (triton on CUDA, torch elsewhere). Asking for a backend that cannot
    run on the inputs' device raises instead of switching. NaN or Inf in q or k raise a ValueError (the
    estimate is undefined); NaN in v propagates to the rows that attend to it, as in SDPA.
    """
    config = checked_config(q, k, v, XAttnConfig(threshold, stride, block_size, causal, backend))

    timer = _Timer(q.device, enabled=return_stats)
    selection = estimate_blocks(q, k, config, scale=scale)
    timer.mark()
    attend = _sparse_attention(config.backend)
    out = attend(q, k, v, selection, block_size=block_size, causal=causal, scale=scale)
    timer.mark()
    if not return_stats:
        return out
    estimate_ms, attention_ms = timer.phases_ms()
    per_head, kept, total = selection_stats(selection, causal=causal)
    stats = XAttnStats(
        density=kept / total,
        density_per_head=per_head,
        kept_blocks=kept,
        total_blocks=total,
        estimate_ms=estimate_ms,
        attention_ms=attention_ms,
        backend=config.backend,
    )
    return out, stats
