"""``xattn_attention``: XAttention as one call in SDPA layout, on the backend of your choice."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import XAttnConfig
from .estimate import BlockSelection, checked_config, estimate_blocks
from .inputs import autocast_inputs
from .reference import block_sparse_attention_torch


@dataclass
class XAttnStats:
    """What one call did: how dense it was and where the time went.

    density: kept blocks / blocks attention may visit (causal: the lower triangle with the diagonal),
    over all batches and heads; NaN for an empty batch (no blocks: 0 / 0, as ``torch.empty(0).mean()``).
    density_per_head: float32 [batch, heads] on the CPU.
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


def _sparse_attention(backend: str, *, fp8: bool = False) -> Callable[..., torch.Tensor]:
    """``attend(q, k, v, selection, *, block_size, causal, scale, out)`` for a resolved backend (``fp8``: the
    float8 Triton kernel, backend "triton")."""
    if fp8:
        from ..kernels.block_sparse_attention_fp8 import block_sparse_attention_fp8

        def run_fp8(q, k, v, sel: BlockSelection, *, out=None, **kw):
            if out is not None and out.stride(-1) != 1:
                return out.copy_(block_sparse_attention_fp8(q, k, v, sel.kv_count, sel.kv_indices, **kw))
            return block_sparse_attention_fp8(q, k, v, sel.kv_count, sel.kv_indices, out=out, **kw)

        return run_fp8
    if backend == "fa4":
        from .fa4 import fa4_block_sparse_attention

        def run_fa4(q, k, v, sel: BlockSelection, *, schedule=None, **kw):  # FA4 schedules its own tiles
            return fa4_block_sparse_attention(q, k, v, sel.kv_count, sel.kv_indices, **kw)

        return run_fa4
    if backend == "triton":
        from ..kernels.block_sparse_attention import block_sparse_attention_triton

        def run(q, k, v, sel: BlockSelection, *, out=None, **kw):
            if out is not None and out.stride(-1) != 1:  # the kernel stores rows of head_dim contiguously
                return out.copy_(block_sparse_attention_triton(q, k, v, sel.kv_count, sel.kv_indices, **kw))
            return block_sparse_attention_triton(q, k, v, sel.kv_count, sel.kv_indices, out=out, **kw)

        return run
    if backend == "flex":
        from .flex import flex_block_sparse_attention

        return _copying_out(lambda q, k, v, sel, **kw: flex_block_sparse_attention(q, k, v, sel.mask, **kw))
    return _copying_out(lambda q, k, v, sel, **kw: block_sparse_attention_torch(q, k, v, sel.mask, **kw))


def _copying_out(attend: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A backend without an ``out`` argument: its result is copied into ``out`` when one is given."""

    def run(q, k, v, sel, *, out=None, **kw):
        result = attend(q, k, v, sel, **kw)
        return result if out is None else out.copy_(result)

    return run


def selection_stats(selection: BlockSelection, *, causal: bool) -> tuple[torch.Tensor, int, int]:
    """Per-head density [B, H] (on the CPU) and the kept / visitable block totals of a selection."""
    per_head_total = _per_head_total(selection, causal=causal)
    kept_per_head = selection.kv_count.sum(-1).float().cpu()
    return kept_per_head / per_head_total, int(kept_per_head.sum()), per_head_total * kept_per_head.numel()


def _per_head_total(selection: BlockSelection, *, causal: bool) -> int:
    n_qb, n_kb = selection.mask.shape[-2:]
    return n_qb * (n_qb + 1) // 2 if causal else n_qb * n_kb  # causal: n_qb == n_kb, lower triangle + diagonal


@dataclass
class PendingStats:
    """The statistics of one call while its numbers still live on the device.

    Reading them synchronises with the GPU, so code that runs many attention calls in a row (the diffusers
    processor: 60 layers a step) keeps these and calls :meth:`resolve` once the forward is done.
    """

    kept_per_head: torch.Tensor  # float32 [B, H], on the inputs' device
    per_head_total: int
    timer: _Timer
    backend: str
    reused: bool = False  # the blocks were kept from an earlier step (refresh_every): no estimate ran, 0 ms

    @property
    def total_blocks(self) -> int:
        return self.per_head_total * self.kept_per_head.numel()

    def resolve(self) -> XAttnStats:
        estimate_ms, attention_ms = self.timer.phases_ms()
        if self.reused:
            estimate_ms = 0.0
        kept_per_head = self.kept_per_head.cpu()
        kept = int(kept_per_head.sum())
        return XAttnStats(
            density=kept / self.total_blocks if self.total_blocks else math.nan,
            density_per_head=kept_per_head / self.per_head_total,
            kept_blocks=kept,
            total_blocks=self.total_blocks,
            estimate_ms=estimate_ms,
            attention_ms=attention_ms,
            backend=self.backend,
        )


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
    estimate_fp8: bool | str = False,
    attention_fp8: bool = False,
    out: torch.Tensor | None = None,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, XAttnStats]:
    """Block-sparse attention over the blocks XAttention's antidiagonal estimate keeps.

    q [batch, heads, Nq, head_dim], k/v [batch, kv_heads, Nk, head_dim] (SDPA layout; heads a multiple of
    kv_heads), any token count, bfloat16/float16/float32. ``scale`` defaults to 1/sqrt(head_dim) and also
    scales the estimate's logits. ``estimate_fp8`` scores blocks on float8 e4m3 copies of q and k (about
    twice as fast on Hopper; see :class:`XAttnConfig`). ``attention_fp8`` runs the attention over the kept blocks
    in float8 (Triton; approximate, see :class:`XAttnConfig`). ``out`` (q's shape, dtype and device, any strides)
    receives the result in place (the Triton backend writes it directly when its last dim is contiguous, and
    through a temporary otherwise). Returns the output in q's shape and dtype, and with ``return_stats`` an
    :class:`XAttnStats`. ``threshold=1.0`` keeps every block and equals
    ``F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)`` up to rounding. A batch of
    0 returns an empty output, as SDPA does.

    Under ``torch.autocast`` q, k and v are cast to the autocast dtype of their device first, as SDPA's
    autocast rule does (so float32 q/k from an RMS norm beside bfloat16 v work), and the output has that dtype.

    Backends: "fa4" (FlashAttention-4's block-sparse forward; Hopper, bfloat16/float16, head_dim <= 128,
    block_size 128; ``pip install 'xattn-video[fa4]'``), "triton" (this project's kernels; CUDA), "flex"
    (FlexAttention with a BlockMask), "torch" (reference, any device), "auto" (fa4 where it runs the inputs, else
    triton on CUDA, torch elsewhere). Asking for a backend that cannot run on the inputs raises a one-line
    error naming why instead of switching. NaN or Inf in q or k raise a ValueError (the
    estimate is undefined); NaN in v propagates to the rows that attend to it, as in SDPA.
    """
    q, k, v = autocast_inputs(q, k, v)
    config = checked_config(
        q, k, v, XAttnConfig(threshold, stride, block_size, causal, backend, estimate_fp8, attention_fp8)
    )
    result, pending = run_xattn(q, k, v, config, scale=scale, out=out, timed=return_stats)
    return (result, pending.resolve()) if return_stats else result


def run_xattn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: XAttnConfig,
    *,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    timed: bool = True,
    reuse=None,
    select: Callable[[torch.Tensor, torch.Tensor], BlockSelection] | None = None,
) -> tuple[torch.Tensor, PendingStats | None]:
    """:func:`xattn_attention` for a config already checked against the inputs (``checked_config``): the
    output and, when ``timed``, :class:`PendingStats` that are read later, so the call itself never waits for
    the GPU beyond the estimate's finiteness check. ``reuse`` (a ``xattn_video.diffusion.refresh.ReuseSlot``):
    attend over its ``selection`` when it holds one instead of estimating, else estimate and ``store`` it.
    ``select(q, k)`` replaces the antidiagonal estimate (the diffusers backend's ``select_blocks`` override)."""
    if out is not None:
        _check_out(out, q)
    timer = _Timer(q.device, enabled=timed)
    selection = None if reuse is None else reuse.selection
    reused = selection is not None
    if not reused:
        selection = estimate_blocks(q, k, config, scale=scale) if select is None else select(q, k)
        if reuse is not None:
            reuse.store(selection)
    timer.mark()
    if q.shape[0] == 0:  # an empty batch: nothing to attend, as SDPA returns an empty tensor
        result = q.new_empty(q.shape) if out is None else out
    else:
        attend = _sparse_attention(config.backend, fp8=config.attention_fp8)
        result = attend(q, k, v, selection, block_size=config.block_size, causal=config.causal, scale=scale, out=out)
    timer.mark()
    if not timed:
        return result, None
    kept_per_head = selection.kv_count.sum(-1).float()
    pending = PendingStats(
        kept_per_head, _per_head_total(selection, causal=config.causal), timer, config.backend, reused
    )
    return result, pending


def _check_out(out: torch.Tensor, q: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(
            f"out must have q's shape {tuple(q.shape)}, dtype {q.dtype} and device {q.device} (any strides); "
            f"got shape {tuple(out.shape)}, {out.dtype} on {out.device}"
        )
