"""XAttention as a diffusers attention processor for HunyuanVideo (diffusers >= 0.42).

Use::

    import xattn_video
    proc = xattn_video.enable(pipe, threshold=0.9, stride=8, warmup_steps=5)
    video = pipe(prompt, ...).frames[0]
    proc.save_stats("xattn_stats.json")

or, setting the processor yourself::

    proc = XAttnProcessor(threshold=0.9, stride=8, warmup_steps=5)
    pipe.transformer.set_attn_processor(proc)
    proc.attach(pipe.transformer)  # step tracking: the processor cannot see the timestep otherwise

What a joint video attention layer (HunyuanVideo's double- and single-stream blocks) does with it:

1. exactly what diffusers' ``HunyuanVideoAttnProcessor2_0`` does up to the attention call: Q/K/V projections,
   QK RMS-norm, RoPE on the video tokens only, text tokens appended after the video tokens;
2. attention over the *valid segment* (the video tokens and the unpadded text tokens, a prefix of the joint
   sequence) with no mask, per sample when the samples of a batch have different prompt lengths, batched
   when they share one:
   - dense steps (the first ``warmup_steps`` of each generation) and ``dense_layers``: SDPA (cuDNN first on
     CUDA; the diffusers attention backend instead when one was set on the processor);
   - sparse steps: :func:`xattn_video.xattn_attention`;
3. exactly stock's output projections.

Padded text tokens: the mask the HunyuanVideo transformer builds is a key-padding mask ``[B, 1, 1, N]`` (True
for the first ``video + valid text`` tokens), so under stock attention every query row, padded or not,
attends to the valid keys only. On dense steps the padded query rows are computed the same way (one SDPA of
all rows over the valid keys), which reproduces stock for them too. On sparse steps they ride in the sparse
kernel's launch (see :meth:`XAttnProcessor.sparse_attention`) rather than costing a second, poorly parallel
call. They cannot change the video either way: padded tokens are masked out as keys in every layer and the
transformer's output is read from the video tokens alone.

Token order (``token_order="tiled"``, ``tile``): on sparse calls the video tokens are regrouped into 3D tiles
(:mod:`xattn_video.core.token_order`) so that each block is a compact space-time neighbourhood and the estimate
reaches its mass threshold with fewer blocks. The processor gathers the layer's video hidden states and the
rotary embedding into tiled order before the projections (every step up to attention is token-wise, so this is
exactly the gather of q, k and v, at a third of the traffic) and scatters the projected video output back;
text tokens stay after the video tokens. Exact up to the block choice. The grid comes from the latents'
shape, read by the step tracker's forward pre-hook, and the transformer's patch sizes. Why per layer and not once
per forward: the image-to-video (token-replace) blocks modulate the first frame's tokens by their position in
the sequence, which a once-per-forward reorder would break; per layer it is two gathers of [B, video, hidden]
against an attention call over 100x longer (bench/token_order.py). Dense steps and layers keep raster order
(the order cannot change their result). The statistics' ``settings`` carry ``token_order`` and ``tile``: every
sparse call ran in that order, every dense one in raster order.

Attention modules that are not joint video attention (the text token refiner's self-attention) keep their
stock behaviour: they are handed to diffusers' ``AttnProcessor2_0`` as their ``Attention`` would by default.

Statistics (:attr:`XAttnProcessor.stats`, :meth:`~XAttnProcessor.save_stats`, debug-level logging on the
``xattn_video.diffusion.hunyuan`` logger after each forward): per generation, step and layer, the block density (kept
blocks / blocks of the valid segment; exactly 1.0 on dense steps and layers), the estimate time and the
attention time in milliseconds (CUDA events on a GPU, read lazily; the wall clock on a CPU), and with
``refresh_every`` whether each sparse call estimated its blocks or reused an earlier step's (estimate 0 ms).
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from ..core.attention import PendingStats, XAttnStats, _per_head_total, _sparse_attention, _Timer
from ..core.config import XAttnConfig
from ..core.estimate import BlockSelection, append_dense_rows, checked_config
from ..core.fa4 import fa4_dense_attention, use_fa4_dense
from ..core.inputs import autocast_inputs
from ..core.token_order import TokenOrder, check_tile, check_token_order, default_tile, grid_from_latents, tiled_order
from ..core.topk import check_density, select_for
from .refresh import BlockReuse, check_refresh_every
from .stats import StepStats, write_json_atomic
from .stats import blocks as _blocks
from .stats import summary as _summary
from .steps import StepPosition, StepTracker, tensor_version

__all__ = ["XAttnProcessor", "enable"]

logger = logging.getLogger(__name__)

# Dense attention over the valid segment on CUDA: cuDNN first (the fastest dense kernel on H100 for this
# shape), then flash, memory-efficient, math; SDPA takes the first that supports the inputs.
try:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    DENSE_SDPA_PRIORITY = [
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    ]
except ImportError:  # pragma: no cover - torch < 2.3
    sdpa_kernel = None
    DENSE_SDPA_PRIORITY = []


def _dense_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked SDPA in [B, H, N, D] layout; cuDNN-first priority on CUDA."""
    if q.is_cuda and sdpa_kernel is not None and DENSE_SDPA_PRIORITY:
        try:
            ctx = sdpa_kernel(DENSE_SDPA_PRIORITY, set_priority=True)
        except TypeError:  # pragma: no cover - torch without set_priority
            ctx = sdpa_kernel(DENSE_SDPA_PRIORITY)
        with ctx:
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


# ---------------------------------------------------------------------------------------------- processor


def _check_nonneg_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


class XAttnProcessor:
    """XAttention processor for HunyuanVideo's joint (video + text) attention, with dense warmup.

    Args:
        threshold: share of each query block's estimated attention mass the kept key blocks must cover, in
            (0, 1]; 1.0 keeps every block.
        stride: antidiagonal stride of the estimate (a power of two dividing ``block_size``).
        block_size: tokens per query/key block (power of two, 16..256).
        warmup_steps: the first ``warmup_steps`` denoising steps of every generation run dense. Needs the
            step: call :meth:`attach` (or use :func:`enable`).
        dense_layers: joint attention layer indices kept dense at every step: 0..num_layers-1 are the
            double-stream blocks, then the single-stream blocks follow (HunyuanVideo 13B: 0..19 double,
            20..59 single). Needs :meth:`attach`.
        backend: ``xattn_attention`` backend for sparse steps: "auto", "fa4", "triton", "flex" or "torch". With
            "fa4", or "auto" where FlashAttention-4 runs the inputs, dense steps and layers use FA4's dense forward.
        estimate_fp8: score blocks on float8 e4m3 copies of q and k (about twice as fast on Hopper, about 0.15%
            of kept blocks change at threshold 0.9; see :class:`~xattn_video.XAttnConfig`). Attention stays exact.
            "auto" (default): float8 on GPUs with float8 tensor cores (sm89+), where the trained fixture shows no
            quality change (docs/quality.md); the inputs' precision elsewhere (CPU, older GPUs). False: never.
        attention_fp8: sparse attention in float8 on the Triton kernel (approximate; see
            :class:`~xattn_video.XAttnConfig`). Dense steps and layers stay exact.
        token_order: "raster" (diffusers' order: frame, row, column) or "tiled": on sparse calls the video tokens
            are regrouped into 3D tiles of ``tile`` so that blocks are compact neighbourhoods (see the module
            docs). Needs the video grid: call :meth:`attach` (or use :func:`enable`).
        tile: (frames, height, width) of a tile, used with ``token_order="tiled"``; default: one block of
            ``block_size`` tokens, (2, 8, 8) for 128. Tiles of exactly ``block_size`` tokens align blocks and tiles.
        refresh_every: estimate the kept blocks at one sparse step and reuse them for the next
            ``refresh_every - 1`` steps, per forward of the step (true CFG's cond and uncond), layer and sample
            group (:mod:`xattn_video.diffusion.refresh`); 1 (default) estimates at every sparse step. Needs
            :meth:`attach`.
        density: None (default: ``threshold`` selection), or a share in (0, 1]: sparse calls keep the
            ``ceil(density * key blocks)`` key blocks with the highest estimated scores per query block
            (:mod:`xattn_video.core.topk`), a fixed density whatever the model's attention; ``threshold`` is then
            unused. Off by default; on the trained fixture it reaches densities no threshold reaches, with the
            oracle's quality at that density (docs/quality.md, "Levers").

    Set it on the whole transformer with ``transformer.set_attn_processor(proc)``; modules that are not joint
    video attention keep stock diffusers behaviour.
    """

    # Set by diffusers' ``set_attention_backend`` / context parallelism, as on its own processors.
    _attention_backend = None
    _parallel_config = None

    def __init__(
        self,
        threshold: float = 0.9,
        stride: int = 8,
        block_size: int = 128,
        warmup_steps: int = 0,
        dense_layers: Iterable[int] = (),
        backend: str = "auto",
        estimate_fp8: bool | str = "auto",
        token_order: str = "raster",
        tile: tuple[int, int, int] | None = None,
        attention_fp8: bool = False,
        refresh_every: int = 1,
        density: float | None = None,
    ):
        self.config = XAttnConfig(threshold, stride, block_size, False, backend, estimate_fp8, attention_fp8)
        self.refresh_every = check_refresh_every(refresh_every)
        self._reuse = BlockReuse(self.refresh_every)
        self._slot = None  # the reuse slot of the sparse call in progress (see _attend)
        self.resolved: dict = {}  # what "auto" settings became on the last estimate (backend, estimate_fp8)
        self.density = check_density(density)
        self.token_order = check_token_order(token_order)
        self.tile = default_tile(block_size) if tile is None else check_tile(tile)
        self._patch: tuple[int, int] | None = None  # the attached transformer's (patch_size, patch_size_t)
        self._rope_cache: tuple | None = None
        self.warmup_steps = _check_nonneg_int("warmup_steps", warmup_steps)
        if isinstance(dense_layers, (int, str, bytes)) or not isinstance(dense_layers, Iterable):
            raise TypeError(f"dense_layers must be an iterable of layer indices such as (0, 1), got {dense_layers!r}")
        self.dense_layers = frozenset(_check_nonneg_int("dense_layers entries", i) for i in dense_layers)
        self._tracker: StepTracker | None = None
        self._layers: dict[torch.nn.Module, tuple[int, str]] = {}
        self._stats = StepStats(self._layer_kind)
        self._mask_cache: tuple | None = None
        self._stock = None
        self._warned: set[str] = set()
        self._last_position: StepPosition | None = None

    # ----------------------------------------------------------------- parameters

    threshold = property(lambda self: self.config.threshold)
    stride = property(lambda self: self.config.stride)
    block_size = property(lambda self: self.config.block_size)
    backend = property(lambda self: self.config.backend)
    estimate_fp8 = property(lambda self: self.config.estimate_fp8)
    attention_fp8 = property(lambda self: self.config.attention_fp8)

    def __repr__(self) -> str:
        return (
            f"XAttnProcessor(threshold={self.threshold}, stride={self.stride}, block_size={self.block_size}, "
            f"warmup_steps={self.warmup_steps}, dense_layers={tuple(sorted(self.dense_layers))}, "
            f"backend={self.backend!r}, estimate_fp8={self.estimate_fp8}, token_order={self.token_order!r}, "
            f"tile={self.tile}, attention_fp8={self.attention_fp8}, refresh_every={self.refresh_every}, "
            f"density={self.density})"
        )

    def settings(self) -> dict:
        return {
            "threshold": self.threshold,
            "stride": self.stride,
            "block_size": self.block_size,
            "warmup_steps": self.warmup_steps,
            "dense_layers": sorted(self.dense_layers),
            "backend": self.backend,
            "estimate_fp8": self.estimate_fp8,
            "token_order": self.token_order,
            "tile": list(self.tile),
            "attention_fp8": self.attention_fp8,
            "refresh_every": self.refresh_every,
            "density": self.density,
        }

    # ----------------------------------------------------------------- attach

    def attach(self, transformer: torch.nn.Module) -> XAttnProcessor:
        """Attach step tracking to ``transformer`` (a HunyuanVideo transformer) and learn its layer indices.

        Call it after ``transformer.set_attn_processor(self)``; :func:`enable` does both. The step tracker is a
        forward pre-hook reading the transformer's ``timestep`` (one per transformer, shared); attaching resets
        its count, so the next forward starts generation 0.
        """
        layers = _joint_layers(transformer)
        n_layers = len(layers)
        bad = sorted(i for i in self.dense_layers if i >= n_layers)
        if bad:
            raise ValueError(
                f"dense_layers {bad} out of range: {type(transformer).__name__} has {n_layers} joint attention "
                f"layers (0..{n_layers - 1}: double-stream blocks first, then single-stream blocks)"
            )
        config = getattr(transformer, "config", None)
        patch = (getattr(config, "patch_size", None), getattr(config, "patch_size_t", None))
        if self.token_order == "tiled" and not all(isinstance(p, int) and p > 0 for p in patch):
            raise TypeError(
                f"token_order='tiled' needs the transformer's config.patch_size and config.patch_size_t to find the "
                f"video grid; {type(transformer).__name__} has {patch}"
            )
        self.detach()
        self._patch = patch if all(isinstance(p, int) for p in patch) else None
        self._tracker = StepTracker.attach(transformer)
        self._tracker.reset()  # the next forward starts generation 0
        self._tracker.add_listener(self._on_forward_end)
        self._layers = {attn: (i, kind) for i, (attn, kind) in enumerate(layers)}
        others = sorted({type(attn.processor).__name__ for attn, _ in layers if attn.processor is not self})
        if others:
            logger.warning(
                "XAttnProcessor attached, but %d of %d joint attention layers use %s: call "
                "transformer.set_attn_processor(proc) too, or use xattn_video.enable(pipe, ...)",
                sum(attn.processor is not self for attn, _ in layers),
                n_layers,
                ", ".join(others),
            )
        return self

    def detach(self) -> None:
        """Stop listening to the attached transformer's step tracker (the tracker itself stays)."""
        if self._tracker is not None:
            self._tracker.remove_listener(self._on_forward_end)
        self._tracker = None
        self._layers = {}
        self._rope_cache = None
        self._reuse.clear()

    @property
    def tracker(self) -> StepTracker | None:
        return self._tracker

    # ----------------------------------------------------------------- the call

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        layer = self._layers.get(attn)
        if layer is None:
            if encoder_hidden_states is None:  # the token refiner's self-attention: stock behaviour
                return self._stock_processor(attn)(attn, hidden_states, encoder_hidden_states, attention_mask)
            if self._layers:
                raise RuntimeError(
                    "XAttnProcessor was called by a joint attention layer of a transformer it is not attached to; "
                    "use one processor per transformer (xattn_video.enable(transformer, ...))"
                )
        position = self._position(layer)

        n_tokens = hidden_states.shape[1] + (0 if encoder_hidden_states is None else encoder_hidden_states.shape[1])
        lengths = self._valid_lengths(attention_mask, hidden_states.shape[0], n_tokens)
        dense = (position is not None and position.step < self.warmup_steps) or (
            layer is not None and layer[0] in self.dense_layers
        )
        order = None
        if self.token_order == "tiled" and not dense and lengths is not False:
            order = self._token_order(hidden_states, encoder_hidden_states, lengths)
            hidden_states = order.permute(hidden_states, dim=1)  # token-wise up to attention: q, k, v follow
            image_rotary_emb = self._tiled_rope(order, image_rotary_emb)

        query, key, value = _project(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        if lengths is False:  # a mask that is not a key-padding prefix: stock masked attention
            out_bnhd, mode, kept, total, est, att, timers = self._stock_attention(query, key, value, attention_mask)
        else:
            # [B, H, N, D], as diffusers' SDPA; under torch.autocast in its dtype, as SDPA casts (the RMS-normed
            # q/k come out float32 beside a bfloat16 v); the output goes back to query's dtype below, as stock
            q, k, v = (t.permute(0, 2, 1, 3) for t in autocast_inputs(query, key, value))
            out, mode, kept, total, est, att, timers = self._attend(q, k, v, lengths, dense, position, layer)
            out_bnhd = out.permute(0, 2, 1, 3)
        self._record(position, layer, mode, kept, total, est, att, timers)

        hidden_states = out_bnhd.flatten(2, 3).to(query.dtype)
        video_out, text_out = _output(attn, hidden_states, encoder_hidden_states)
        if order is not None:
            video_out = order.unpermute(video_out, dim=1)  # the output projection is token-wise too
        return video_out, text_out

    def _token_order(self, hidden_states, encoder_hidden_states, lengths) -> TokenOrder:
        """The tiled order of this forward's video grid (from the tracker's latents shape and the patch sizes)."""
        tracker = self._tracker
        shape = tracker.latents_shape if tracker is not None and tracker.attached else None
        if shape is None or self._patch is None or encoder_hidden_states is None:
            raise RuntimeError(
                "XAttnProcessor(token_order='tiled') needs the video grid, read from the transformer's input: use "
                "`xattn_video.enable(pipe, ...)`, or call `proc.attach(pipe.transformer)` after set_attn_processor"
            )
        patch_size, patch_size_t = self._patch
        grid = grid_from_latents(shape, patch_size, patch_size_t)
        n_video, n_grid = hidden_states.shape[1], grid[0] * grid[1] * grid[2]
        if n_grid != n_video or min(lengths) < n_video:
            raise RuntimeError(
                f"XAttnProcessor(token_order='tiled'): the latents {tuple(shape)} give a {grid} grid of {n_grid} "
                f"video tokens, but the layer has {n_video} (valid lengths {lengths})"
            )
        return tiled_order(grid, self.tile, device=hidden_states.device)

    def _tiled_rope(self, order: TokenOrder, rope):
        """The rotary embedding (cos, sin) [video, dim] gathered into tiled order; once per forward (every layer
        gets the same tensors)."""
        if rope is None:
            return None
        cached = self._rope_cache
        if cached is not None and cached[0]() is rope[0] and cached[1] is order:
            return cached[2]
        tiled = tuple(order.permute(r, dim=0) for r in rope)
        self._rope_cache = (weakref.ref(rope[0]), order, tiled)
        return tiled

    def _position(self, layer) -> StepPosition | None:
        needs = []
        if self.warmup_steps:
            needs.append(f"warmup_steps={self.warmup_steps}")
        if self.dense_layers:
            needs.append(f"dense_layers={tuple(sorted(self.dense_layers))}")
        if self.refresh_every > 1:
            needs.append(f"refresh_every={self.refresh_every}")
        tracker = self._tracker
        if tracker is None or not tracker.attached:
            if needs:
                raise RuntimeError(
                    f"XAttnProcessor({', '.join(needs)}) needs the denoising step and the layer index, but no step "
                    "tracker is attached (diffusers passes attention processors no timestep). Fix: use "
                    "`xattn_video.enable(pipe, ...)` instead of set_attn_processor, or call "
                    "`proc.attach(pipe.transformer)` after `pipe.transformer.set_attn_processor(proc)`."
                )
            return None
        if tracker.position is None:
            raise RuntimeError(
                "XAttnProcessor is attached but no transformer forward has been seen: call the transformer (or the "
                "pipeline), not its attention modules directly"
            )
        return tracker.position

    def _stock_processor(self, attn):
        if self._stock is None:
            from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

            self._stock = (AttnProcessor2_0(), AttnProcessor())
        return self._stock[0] if getattr(attn, "scale_qk", True) else self._stock[1]

    # ----------------------------------------------------------------- valid segment

    def _valid_lengths(self, mask: torch.Tensor | None, batch: int, n: int):
        """Valid tokens per sample (a list), or False when ``mask`` is not a key-padding prefix mask.

        Computed once per mask tensor: HunyuanVideo builds the mask once per forward and hands the same tensor
        to every block, so this costs one device-to-host copy per forward.
        """
        if mask is None:
            return [n] * batch
        cached = self._mask_cache
        if cached is not None and cached[0]() is mask and cached[1] == tensor_version(mask):
            return cached[2]
        result = _prefix_lengths(mask, batch, n)
        try:
            self._mask_cache = (weakref.ref(mask), tensor_version(mask), result)
        except TypeError:  # pragma: no cover - tensors support weak references
            self._mask_cache = None
        if result is False and "mask" not in self._warned:
            self._warned.add("mask")
            logger.warning(
                "XAttnProcessor: attention_mask of shape %s is not a key-padding prefix mask (as HunyuanVideo's "
                "transformer builds); those calls run diffusers' stock masked attention",
                tuple(mask.shape),
            )
        return result

    # ----------------------------------------------------------------- attention

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid_lengths=None, *, dense: bool = False
    ) -> torch.Tensor:
        """The processor's attention step alone: q/k/v [B, H, N, D] with sample b valid on its first
        ``valid_lengths[b]`` tokens (default: all). Sparse (:meth:`sparse_attention` on each valid segment) or
        ``dense`` (padded query rows then attend to the valid keys, as under stock's key-padding mask).
        Tokens are taken in the order given (``token_order`` applies in the processor call, which knows the
        grid; :func:`xattn_video.core.token_order.attend_in_order` reorders around any attention). Not recorded
        in :attr:`stats`."""
        batch, _, n = q.shape[:3]
        lengths = [n] * batch if valid_lengths is None else [int(x) for x in valid_lengths]
        if len(lengths) != batch or not all(0 < x <= n for x in lengths):
            raise ValueError(f"valid_lengths must hold {batch} lengths in [1, {n}], got {valid_lengths!r}")
        return self._attend(q, k, v, lengths, dense)[0]

    def _attend(self, q, k, v, lengths: list[int], dense: bool, position=None, layer=None):
        """Attention of q/k/v [B, H, N, D] over each sample's valid prefix (padded query rows: see the module).

        Sparse calls write into one output laid out [B, N, H, D] (what the output projection reads, so the
        processor's reshape is free) and keep their statistics on the GPU until the forward ends. With
        ``refresh_every`` > 1 and a ``position``, each group's blocks are kept and reused per (forward of the
        step, layer, group)."""
        batch, heads, n, dim = q.shape
        if len(set(lengths)) == 1:
            groups = [(slice(None), lengths[0], batch)]
        else:
            groups = [(slice(b, b + 1), length, 1) for b, length in enumerate(lengths)]
        if dense:
            out = None if len(groups) == 1 else q.new_empty(q.shape)
        else:
            out = q.new_empty(batch, n, heads, dim).permute(0, 2, 1, 3)
        kept = total = 0
        estimate_ms = attention_ms = 0.0
        timers: list = []
        for index, length, count in groups:
            qg, kg, vg = q[index], k[index, :, :length], v[index, :, :length]
            if dense:
                timer = _Timer(q.device, enabled=True)
                og = self.dense_attention(qg, kg, vg)  # all N query rows over the valid keys, as stock
                timer.mark()
                timers.append(timer)
                blocks = _blocks(length, self.block_size) ** 2 * heads * count
                kept += blocks
                total += blocks
                if out is None:
                    out = og
                else:
                    out[index] = og
                continue
            target = out[index]
            key = (position.forward if position is not None else None, layer[0] if layer else None, index.start)
            self._slot = self._reuse.slot(key, position, qg[:, :, :length], kg)
            try:
                result, stats = self.sparse_attention(qg, kg, vg, out=target)
            finally:
                self._slot = None
            if result is not target:
                target.copy_(result)
            total += stats.total_blocks
            if isinstance(stats, PendingStats):
                timers.append(stats)  # kept blocks and times are read after the forward
            else:
                kept += stats.kept_blocks
                estimate_ms += stats.estimate_ms
                attention_ms += stats.attention_ms
        mode = "dense" if dense else "sparse"
        return out, mode, kept, total, estimate_ms, attention_ms, timers

    def dense_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Dense unmasked attention, [B, H, N, D] layout: the diffusers attention backend set on this processor with
        ``transformer.set_attention_backend(...)``; else FlashAttention-4's dense forward where the backend is "fa4",
        or "auto" and FA4 runs the inputs; else SDPA (cuDNN first on CUDA)."""
        if self._parallel_config is not None:
            raise NotImplementedError("XAttnProcessor does not support diffusers' context parallelism")
        if self._attention_backend is not None:
            from diffusers.models.attention_dispatch import dispatch_attention_fn

            out = dispatch_attention_fn(
                *(t.permute(0, 2, 1, 3) for t in (q, k, v)), attn_mask=None, backend=self._attention_backend
            )
            return out.permute(0, 2, 1, 3)
        if use_fa4_dense(self.backend, q):
            return fa4_dense_attention(q, k, v)
        return _dense_sdpa(q, k, v)

    def select_blocks(self, q: torch.Tensor, k: torch.Tensor) -> BlockSelection:
        """The key blocks XAttention keeps for the valid segment (q/k [B, H, L, D]): the antidiagonal estimate
        with this processor's parameters (threshold, or ``density``'s top-k). Benchmarks override it to
        substitute the block choice."""
        selection, config = select_for(q, k, self.config, density=self.density)
        self.resolved = {"backend": config.backend, "estimate_fp8": config.estimate_fp8}
        return selection

    def sparse_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, XAttnStats | PendingStats]:
        """XAttention for one group of samples: k/v [B, H, L, D] hold the valid tokens, q [B, H, N, D] every
        query (N >= L). The valid queries get exactly :func:`xattn_attention` over the valid segment (the
        blocks :meth:`select_blocks` keeps). Padded text queries, which no valid token attends to and whose
        outputs the transformer drops at its end, ride along in the same kernel launch instead of a second,
        poorly parallel one: those in the block where padding starts use that block's kept blocks, those in
        wholly padded blocks see every valid key (as under stock's key-padding mask). Writes into ``out`` when
        given. Returns the output and its statistics over the valid segment, read (:class:`XAttnStats`) or
        still on the GPU (:class:`PendingStats`, read after the forward). Reports override it to inspect each
        call. Inside a processor call with ``refresh_every`` > 1, the blocks kept from an earlier step replace
        :meth:`select_blocks` when they may (see :mod:`xattn_video.diffusion.refresh`)."""
        length, n = k.shape[2], q.shape[2]
        config = checked_config(q, k, v, self.config)
        timer = _Timer(q.device, enabled=True)
        slot = self._slot
        selection = None if slot is None else slot.selection
        reused = selection is not None
        if not reused:
            selection = self.select_blocks(q[:, :, :length], k)
            if slot is not None:
                slot.store(selection)
        timer.mark()
        attend_selection, extra = selection, {}
        if _blocks(n, self.block_size) > _blocks(length, self.block_size):
            attend_selection = append_dense_rows(selection, _blocks(n, self.block_size))
            if config.backend == "triton":  # the dense rows first, so that no long program runs alone at the end
                extra["schedule"] = "heavy_first"
        attend = _sparse_attention(config.backend, fp8=config.attention_fp8)
        out = attend(q, k, v, attend_selection, block_size=self.block_size, causal=False, scale=None, out=out, **extra)
        timer.mark()
        kept_per_head = selection.kv_count.sum(-1).float()
        total = _per_head_total(selection, causal=False)
        return out, PendingStats(kept_per_head, total, timer, config.backend, reused)

    def _stock_attention(self, query, key, value, mask):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        timer = _Timer(query.device, enabled=True)
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        timer.mark()
        blocks = _blocks(query.shape[1], self.block_size) ** 2 * query.shape[0] * query.shape[2]
        return out, "stock", blocks, blocks, 0.0, 0.0, [timer]

    # ----------------------------------------------------------------- statistics

    def _record(self, position, layer, mode, kept, total, estimate_ms, attention_ms, timers) -> None:
        self._last_position = position
        self._stats.record(position, layer[0] if layer else None, mode, kept, total, estimate_ms, attention_ms, timers)

    def _layer_kind(self, index: int | None) -> str | None:
        for i, kind in self._layers.values():
            if i == index:
                return kind
        return None

    @property
    def stats(self) -> dict:
        """What the processor did, as a JSON-ready dict.

        ``generations``: a list of ``{"generation", "steps": [{"step", "timestep", "mode", "density",
        "estimate_ms", "attention_ms", "calls", "layers": [{"layer", "block", "mode", "density", "estimate_ms",
        "attention_ms", "calls"}]}]}``; ``mode`` is "dense" (warmup or dense layer), "sparse", or "mixed" for a
        step with both; a step's density is kept / total blocks over its layers. ``totals`` sums everything.
        ``untracked`` (present only when used) aggregates calls made without an attached tracker. ``resolved``:
        what the "auto" settings became on the last estimate (``{"backend", "estimate_fp8"}``; empty before one).
        """
        return {**self._stats.stats("XAttnProcessor", self.settings()), "resolved": dict(self.resolved)}

    def save_stats(self, path: str | os.PathLike) -> str:
        """Write :attr:`stats` as JSON to ``path`` (through a temporary file renamed over it); returns the path."""
        return write_json_atomic(path, self.stats)

    def reset_stats(self) -> None:
        """Forget the statistics (the step tracker keeps counting; reset it with ``proc.tracker.reset()``)."""
        self._stats.reset()

    def _on_forward_end(self, position: StepPosition) -> None:
        if self._last_position is not position or not logger.isEnabledFor(logging.DEBUG):
            return  # this processor did not run in that forward, or nobody listens
        layer_records = self._stats.step_records(position.generation, position.step)
        if not layer_records:
            return
        records = [r for _, r in layer_records]
        summary = _summary(records)
        modes = sorted({r.mode for r in records})
        logger.debug(
            "xattn generation %d step %d (timestep %.1f, forward %d): %s, density %.3f over %d layers, "
            "estimate %.2f ms, attention %.2f ms; per layer: %s",
            position.generation,
            position.step,
            position.timestep,
            position.forward,
            "/".join(modes),
            summary["density"],
            len(records),
            summary["estimate_ms"],
            summary["attention_ms"],
            " ".join(f"{layer}:{r.density:.2f}" for layer, r in layer_records),
        )


# ---------------------------------------------------------------------------------------------- stock parts


def _joint_layers(transformer) -> list[tuple[torch.nn.Module, str]]:
    """HunyuanVideo's joint attention modules in forward order: (attn, "double") then (attn, "single")."""
    double = getattr(transformer, "transformer_blocks", None)
    single = getattr(transformer, "single_transformer_blocks", None)
    if not isinstance(double, torch.nn.ModuleList) or not isinstance(single, torch.nn.ModuleList):
        raise TypeError(
            f"attach/enable expect a HunyuanVideo transformer (with transformer_blocks and "
            f"single_transformer_blocks), got {type(transformer).__name__}"
        )
    layers = [(block.attn, "double") for block in double] + [(block.attn, "single") for block in single]
    if not layers:
        raise ValueError(f"{type(transformer).__name__} has no joint attention layers")
    return layers


def _prefix_lengths(mask: torch.Tensor, batch: int, n: int):
    """Per-sample valid lengths of a boolean key-padding mask [B, 1, 1, N] / [B, N] that is True on a prefix."""
    if mask.dtype != torch.bool or mask.numel() != batch * n:
        return False
    flat = mask.reshape(batch, n)
    lengths = flat.sum(dim=1)
    expected = torch.arange(n, device=mask.device).unsqueeze(0) < lengths.unsqueeze(1)
    if not bool(torch.equal(flat, expected)):
        return False
    lengths = [int(x) for x in lengths.tolist()]
    if min(lengths) == 0:
        return False
    return lengths


def _project(attn, hidden_states, encoder_hidden_states, image_rotary_emb):
    """Steps 1-4 of diffusers' HunyuanVideoAttnProcessor2_0 (0.42): query/key/value [B, N, H, D], video first."""
    if attn.add_q_proj is None and encoder_hidden_states is not None:
        hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

    # 1. QKV projections
    query = attn.to_q(hidden_states)
    key = attn.to_k(hidden_states)
    value = attn.to_v(hidden_states)

    query = query.unflatten(2, (attn.heads, -1))
    key = key.unflatten(2, (attn.heads, -1))
    value = value.unflatten(2, (attn.heads, -1))

    # 2. QK normalization
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)

    # 3. Rotary positional embeddings on the video tokens only
    if image_rotary_emb is not None:
        from diffusers.models.embeddings import apply_rotary_emb

        if attn.add_q_proj is None and encoder_hidden_states is not None:
            n_text = encoder_hidden_states.shape[1]
            rope = apply_rotary_emb
            query = _cat_tokens(rope(query[:, :-n_text], image_rotary_emb, sequence_dim=1), query[:, -n_text:])
            key = _cat_tokens(rope(key[:, :-n_text], image_rotary_emb, sequence_dim=1), key[:, -n_text:])
        else:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

    # 4. Text (encoder) stream projections and normalization, appended after the video tokens
    if attn.add_q_proj is not None and encoder_hidden_states is not None:
        encoder_query = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        encoder_key = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        encoder_value = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))

        if attn.norm_added_q is not None:
            encoder_query = attn.norm_added_q(encoder_query)
        if attn.norm_added_k is not None:
            encoder_key = attn.norm_added_k(encoder_key)

        query = _cat_tokens(query, encoder_query)
        key = _cat_tokens(key, encoder_key)
        value = _cat_tokens(value, encoder_value)
    return query, key, value


def _cat_tokens(video: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``torch.cat([video, text], dim=1)`` of [B, N, H, D] tensors, stored head-major ([B, H, N, D] contiguous):
    the same values, at the same cost, in the layout the attention kernels read fastest (the block estimate
    measured 24.5 ms against 25.8 ms on token-major q/k at 119,056 tokens, H100)."""
    return torch.cat([video.transpose(1, 2), text.transpose(1, 2)], dim=2).transpose(1, 2)


def _output(attn, hidden_states, encoder_hidden_states):
    """Step 6 of diffusers' HunyuanVideoAttnProcessor2_0: split video/text, output projections."""
    if encoder_hidden_states is not None:
        n_text = encoder_hidden_states.shape[1]
        hidden_states, encoder_hidden_states = hidden_states[:, :-n_text], hidden_states[:, -n_text:]
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[0](hidden_states)
            hidden_states = attn.to_out[1](hidden_states)
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
    return hidden_states, encoder_hidden_states


# ---------------------------------------------------------------------------------------------- enable


def enable(pipe_or_transformer, **kwargs) -> XAttnProcessor:
    """Put an :class:`XAttnProcessor` on a HunyuanVideo pipeline's transformer (or a transformer) and attach
    its step tracking; ``kwargs`` are the processor's (threshold, stride, block_size, warmup_steps,
    dense_layers, backend, estimate_fp8, token_order, tile, attention_fp8, refresh_every, density). Returns the
    processor, whose
    :attr:`~XAttnProcessor.stats` fill as it runs."""
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    if not hasattr(transformer, "set_attn_processor"):
        raise TypeError(
            "enable expects a HunyuanVideo pipeline or its transformer (HunyuanVideoTransformer3DModel), got "
            f"{type(pipe_or_transformer).__name__}"
        )
    _joint_layers(transformer)  # fail before touching the processors
    processor = XAttnProcessor(**kwargs)
    transformer.set_attn_processor(processor)
    return processor.attach(transformer)
