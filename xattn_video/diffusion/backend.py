"""The ``xattn`` diffusers attention backend and the session that drives it on a pipeline's transformers.

:func:`register_xattn_backend` makes ``"xattn"`` a diffusers backend name (``set_attention_backend("xattn")``,
``with attention_backend("xattn"):``). The backend function itself only routes:

- context parallelism (``_parallel_config``): Ulysses through diffusers' templated attention, the op below per
  rank on its heads (:mod:`.parallel`); ring attention is refused;
- ``return_lse``, dropout, ``is_causal``, and calls that need gradients: diffusers' native backend, unchanged;
- everything else: the ``xattn_video::attention`` custom op (:mod:`.attention_op`), which decides at run time
  between native (cross-attention, short sequences, masks it cannot honour) and XAttention over the valid segment.

:class:`XAttnSession` holds the settings, the step count (shared by every transformer of the pipeline) and the
statistics; :func:`enable_backend` builds one, hooks it onto the transformers and selects the backend on their
attention processors.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable

import torch

from ..core.config import XAttnConfig
from ..core.estimate import BlockSelection
from ..core.token_order import check_tile, check_token_order, default_tile
from ..core.topk import check_density, select_for
from . import _diffusers_private as private
from .attention_op import native_reason, route_native
from .probe import AttentionProbe
from .refresh import BlockReuse, check_refresh_every
from .stats import StepStats, write_json_atomic
from .step_hooks import HOOK_NAME, XAttnStepHook, register, steps_from_scheduler, unregister
from .steps import StepPosition, StepTracker

__all__ = ["DEFAULT_MIN_LEN", "XAttnSession", "enable_backend", "register_xattn_backend", "xattn_backend"]

logger = logging.getLogger(__name__)

# Below this many tokens a self-attention call runs native. Measured on an H200 (docs/benchmarks.md, "one
# self-attention call by token count": 24 heads x 128, bf16, threshold 0.9): a sparse call took 1.37x native
# SDPA's time at 8,192 tokens and 0.68x at 16,384, so the break-even lies between them, at about 11,200 tokens
# interpolating the ratio log-log and 12,600 linearly. 12,288 (96 blocks of 128) sits in that range: every length
# measured slower than native goes native, every length measured faster goes sparse, and a call between them is
# within a few percent of native either way. Real video lengths are far above it (Wan 480p: 32,760 tokens,
# HunyuanVideo 544x960: 67,576).
DEFAULT_MIN_LEN = 12288

_ATTENTION_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks")


# ---------------------------------------------------------------------------------------------- backend


def xattn_backend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    _parallel_config=None,
) -> torch.Tensor:
    """diffusers backend ``xattn``: q/k/v ``[B, S, H, D]``, the arguments of diffusers' native backend."""
    if _parallel_config is not None:  # Ulysses: diffusers' all-to-all around the same op (see .parallel)
        from .parallel import parallel_attention

        return parallel_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse, _parallel_config
        )
    reason = native_reason(query, key, value, dropout_p, is_causal, return_lse)
    if reason is not None:
        return route_native(
            reason,
            query=query,
            key=key,
            value=value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
            return_lse=return_lse,
        )
    return torch.ops.xattn_video.attention(query, key, value, attn_mask, scale, enable_gqa)


def register_xattn_backend() -> None:
    """Register ``xattn`` with diffusers' attention dispatcher (idempotent); one-line error on an untested
    diffusers version."""
    private.register_backend(xattn_backend, supports_context_parallel=True)


# ---------------------------------------------------------------------------------------------- session


def _check_nonneg_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


class XAttnSession:
    """Settings, step count and statistics of XAttention on one pipeline's transformers (the ``xattn`` backend).

    Args:
        threshold, stride, block_size, backend, estimate_fp8, attention_fp8: XAttention's parameters
            (:class:`XAttnConfig`; ``estimate_fp8`` defaults to "auto": float8 on GPUs with float8 tensor cores).
            Dense steps and layers run on FlashAttention-4's dense forward where the backend is "fa4", or "auto"
            and FA4 runs the inputs; on SDPA otherwise.
        warmup_steps: the first ``warmup_steps`` steps of every generation run dense.
        warmup_fraction: or the first ``ceil(warmup_fraction * steps)`` steps (the number of steps read from the
            pipeline at each generation's first forward); not both.
        dense_layers: layer (transformer block) indices kept dense at every step.
        min_len: self-attention calls with fewer tokens run native (default :data:`DEFAULT_MIN_LEN`).
        token_order: "raster" (the model's order) or "tiled": on sparse calls the video tokens of q, k and v are
            gathered into 3D tiles of ``tile`` before the estimate and the attention and the output scattered back
            (text tokens after the video stay in place; see :mod:`xattn_video.core.token_order`). The grid comes
            from the transformer's input latents [B, C, F, H, W] (LTX-Video: its num_frames/height/width
            arguments) and its ``config.patch_size`` (and ``patch_size_t``), read by the step hook. Exact apart
            from the block choice; dense calls stay raster.
        tile: (frames, height, width) of a tile with ``token_order="tiled"``; default one block, (2, 8, 8) for 128.
        refresh_every: estimate the kept blocks at one sparse step and reuse them for the next
            ``refresh_every - 1`` steps, per transformer, forward kind (cond/uncond), layer and sample group
            (:mod:`xattn_video.diffusion.refresh`); 1 (default) estimates at every sparse step.
        density: None (default: ``threshold`` selection) or a share in (0, 1]: sparse calls keep the
            ``ceil(density * key blocks)`` key blocks with the highest estimated scores per query block
            (:mod:`xattn_video.core.topk`, as the HunyuanVideo processor's ``density``); ``threshold`` is then unused.
    """

    def __init__(
        self,
        threshold: float = 0.9,
        stride: int = 8,
        block_size: int = 128,
        warmup_steps: int | None = None,
        warmup_fraction: float | None = None,
        dense_layers: Iterable[int] = (),
        backend: str = "auto",
        estimate_fp8: bool | str = "auto",
        min_len: int = DEFAULT_MIN_LEN,
        attention_fp8: bool = False,
        token_order: str = "raster",
        tile: tuple[int, int, int] | None = None,
        refresh_every: int = 1,
        density: float | None = None,
    ) -> None:
        self.config = XAttnConfig(threshold, stride, block_size, False, backend, estimate_fp8, attention_fp8)
        self.token_order = check_token_order(token_order)
        self.tile = default_tile(block_size) if tile is None else check_tile(tile)
        self.refresh_every = check_refresh_every(refresh_every)
        self.reuse = BlockReuse(self.refresh_every)
        self.density = check_density(density)
        if warmup_steps is not None and warmup_fraction is not None:
            raise ValueError("warmup_steps and warmup_fraction: pass one of them, not both")
        self.warmup_steps = _check_nonneg_int("warmup_steps", 0 if warmup_steps is None else warmup_steps)
        if warmup_fraction is not None and (
            isinstance(warmup_fraction, bool)
            or not isinstance(warmup_fraction, (int, float))
            or not 0.0 <= warmup_fraction <= 1.0
        ):
            raise ValueError(f"warmup_fraction must be a number in [0, 1], got {warmup_fraction!r}")
        self.warmup_fraction = None if warmup_fraction is None else float(warmup_fraction)
        if isinstance(dense_layers, (int, str, bytes)) or not isinstance(dense_layers, Iterable):
            raise ValueError(f"dense_layers must be an iterable of layer indices such as (0, 1), got {dense_layers!r}")
        self.dense_layers = frozenset(_check_nonneg_int("dense_layers entries", i) for i in dense_layers)
        self.min_len = _check_nonneg_int("min_len", min_len)
        self.tracker = StepTracker()  # counting only (no hooks of its own): fed by the XAttnStepHooks
        self.stats_store = StepStats()
        self.scheduler = None
        self.num_steps: int | None = None
        self.num_layers: int | None = None
        self._transformers: list[torch.nn.Module] = []
        self._saved_backends: list[tuple[object, object]] = []
        self._warned: set[str] = set()
        self.probe: AttentionProbe | None = None  # report mode (start_probe): read by the attention op
        self.resolved: dict = {}  # what "auto" settings became on the last estimate (backend, estimate_fp8)

    # ----------------------------------------------------------------- block choice and report mode

    def select_blocks(self, q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None) -> BlockSelection:
        """The key blocks XAttention keeps for one valid segment (q/k ``[B, H, L, D]``, no mask): the antidiagonal
        estimate with this session's parameters (threshold, or ``density``'s top-k). The override point for another
        block choice (a subclass, e.g. benchmarks' fixed densities); it runs inside the attention op, at run time,
        so compiled graphs are unaffected. Called on sparse calls and by the report mode's probe."""
        selection, config = select_for(q, k, self.config, density=self.density, scale=scale)
        self.resolved = {"backend": config.backend, "estimate_fp8": config.estimate_fp8}
        return selection

    def start_probe(self, probe_dense: bool = True) -> AttentionProbe:
        """Report mode (``xattn-video attn-report``): from now on every sparse call also computes dense attention
        over the same valid segment and records per-head density and relative error, and with ``probe_dense``
        every dense call (warmup steps, ``dense_layers``) gets an XAttention probe beside it (see
        :mod:`.probe`). Slow (a second attention per layer, a device sync per call): for measurements only. The
        outputs are unchanged. Returns the :class:`~.probe.AttentionProbe` holding the records."""
        self.probe = AttentionProbe(probe_dense)
        return self.probe

    def stop_probe(self) -> AttentionProbe | None:
        """Leave report mode; returns the probe that recorded (None if none was started)."""
        probe, self.probe = self.probe, None
        return probe

    # ----------------------------------------------------------------- settings and statistics

    threshold = property(lambda self: self.config.threshold)
    stride = property(lambda self: self.config.stride)
    block_size = property(lambda self: self.config.block_size)
    backend = property(lambda self: self.config.backend)
    estimate_fp8 = property(lambda self: self.config.estimate_fp8)
    attention_fp8 = property(lambda self: self.config.attention_fp8)

    def settings(self) -> dict:
        return {
            "integration": "backend",
            "threshold": self.threshold,
            "stride": self.stride,
            "block_size": self.block_size,
            "warmup_steps": self.warmup_steps,
            "warmup_fraction": self.warmup_fraction,
            "dense_layers": sorted(self.dense_layers),
            "backend": self.backend,
            "estimate_fp8": self.estimate_fp8,
            "attention_fp8": self.attention_fp8,
            "min_len": self.min_len,
            "token_order": self.token_order,
            "tile": list(self.tile),
            "refresh_every": self.refresh_every,
            "density": self.density,
        }

    def __repr__(self) -> str:
        return "XAttnSession(" + ", ".join(f"{k}={v!r}" for k, v in self.settings().items()) + ")"

    @property
    def stats(self) -> dict:
        """What XAttention did, in the processor's structure (see :meth:`StepStats.stats`), plus
        ``native_calls``: calls handed to diffusers' native backend by reason, and ``resolved``: what the "auto"
        settings became on the last estimate (``{"backend", "estimate_fp8"}``; empty before one)."""
        return {**self.stats_store.stats("xattn backend", self.settings()), "resolved": dict(self.resolved)}

    def save_stats(self, path: str | os.PathLike) -> str:
        """Write :attr:`stats` as JSON to ``path`` (through a temporary file renamed over it); returns the path."""
        return write_json_atomic(path, self.stats)

    def reset_stats(self) -> None:
        """Forget the statistics (the step count goes on; :meth:`reset_steps` restarts it)."""
        self.stats_store.reset()

    def reset_steps(self) -> None:
        self.tracker.reset()

    # ----------------------------------------------------------------- steps

    def warmup_for(self, num_steps: int | None) -> int:
        if self.warmup_fraction is None:
            return self.warmup_steps
        if num_steps is None:
            raise RuntimeError(
                "warmup_fraction needs the number of denoising steps: enable XAttention on the pipeline "
                "(xattn_video.enable(pipe, ...)), not on its transformer alone, or pass warmup_steps"
            )
        return math.ceil(self.warmup_fraction * num_steps - 1e-9)

    def start_generation(self, position: StepPosition, given_steps: int | None) -> None:
        """Called by the hook at a generation's first forward: learn how many steps it has."""
        steps = given_steps
        if steps is None and self.scheduler is not None:
            steps = steps_from_scheduler(self.scheduler, position.timestep)
        self.num_steps = steps

    def is_dense_step(self, position: StepPosition) -> bool:
        return position.step < self.warmup_for(self.num_steps)

    def on_forward_end(self, state) -> None:
        if (
            self.num_layers is not None
            and state.self_calls not in (0, self.num_layers)
            and "layers" not in self._warned
        ):
            self._warned.add("layers")
            logger.warning(
                "xattn: a forward made %d self-attention calls for %d transformer blocks: layer indices (stats, "
                "dense_layers) count self-attention calls, not blocks, for this model",
                state.self_calls,
                self.num_layers,
            )
        if logger.isEnabledFor(logging.DEBUG):
            pos = state.position
            records = [r for _, r in self.stats_store.step_records(pos.generation, pos.step)]
            if records:
                kept, total = sum(r.kept for r in records), sum(r.total for r in records)
                logger.debug(
                    "xattn generation %d step %d (timestep %.1f, forward %d): %s, density %.3f over %d layers",
                    pos.generation,
                    pos.step,
                    pos.timestep,
                    pos.forward,
                    "/".join(sorted({r.mode for r in records})),
                    kept / total if total else 1.0,
                    len(records),
                )

    # ----------------------------------------------------------------- attach / detach

    def attach(
        self, transformers: list[torch.nn.Module], scheduler=None, *, select_backend: bool = True
    ) -> XAttnSession:
        """Hook the step count onto ``transformers`` (one shared count) and, with ``select_backend``, select
        ``xattn`` on their attention processors, leaving diffusers' process-wide default backend as it was.
        Without it the processors keep their backend: select ``xattn`` yourself (``with attention_backend("xattn"):``
        around the pipeline call, or ``set_attention_backend``)."""
        register_xattn_backend()
        layers = [_count_layers(t) for t in transformers]
        self.num_layers = layers[0] if len(set(layers)) == 1 else None
        if self.token_order == "tiled":
            for transformer in transformers:
                _check_patch(transformer)
        bad = sorted(i for i in self.dense_layers if i >= min(layers))
        if bad:
            raise ValueError(
                f"dense_layers {bad} out of range: {type(transformers[0]).__name__} has {min(layers)} transformer "
                f"blocks (0..{min(layers) - 1})"
            )
        self.detach()
        for transformer in transformers:  # an earlier session on these transformers gives them back first
            earlier = _hook_of(transformer)
            if earlier is not None:
                earlier.session.detach()
        manager = private.StateManager(_ContextForwards)
        for transformer in transformers:
            register(transformer, XAttnStepHook(self, transformer, manager))
            if select_backend:
                self._saved_backends.extend(_select_backend(transformer))
        self._transformers = list(transformers)
        self.scheduler = scheduler
        self.tracker.reset()
        return self

    def detach(self) -> None:
        """Remove the hooks and give the attention processors back the backend they had."""
        for transformer in self._transformers:
            unregister(transformer)
        for processor, previous in self._saved_backends:
            processor._attention_backend = previous
        self._transformers = []
        self._saved_backends = []
        self.reuse.clear()

    disable = detach


class _ContextForwards(private.BaseState):
    """Per cache-context name ("cond", "uncond", ...): forwards run under it since the last reset."""

    def __init__(self) -> None:
        self.forwards = 0

    def reset(self) -> None:
        self.forwards = 0


def _hook_of(transformer: torch.nn.Module) -> XAttnStepHook | None:
    registry = getattr(transformer, "_diffusers_hook", None)
    hook = registry.get_hook(HOOK_NAME) if registry is not None else None
    return hook if isinstance(hook, XAttnStepHook) else None


def _check_patch(transformer: torch.nn.Module) -> None:
    """token_order="tiled" needs the video grid: a patch size in the config (the step hook reads the rest)."""
    config = getattr(transformer, "config", None)
    patch = getattr(config, "patch_size", None)
    ok = isinstance(patch, int) or (isinstance(patch, (tuple, list)) and len(patch) == 3)
    if not ok:
        raise ValueError(
            f"token_order='tiled' needs config.patch_size to find the video grid; {type(transformer).__name__} has "
            f"{patch!r}: use token_order='raster'"
        )


def _count_layers(transformer: torch.nn.Module) -> int:
    return sum(
        len(getattr(transformer, name))
        for name in _ATTENTION_BLOCK_LISTS
        if isinstance(getattr(transformer, name, None), torch.nn.ModuleList)
    )


def _select_backend(transformer: torch.nn.Module) -> list[tuple[object, object]]:
    """``transformer.set_attention_backend("xattn")``, then the process-wide default put back.

    diffusers' ``set_attention_backend`` sets the backend on every attention processor of the model that has an
    ``_attention_backend`` attribute, and also makes it the process-wide default, which every processor whose
    backend is unset (any other model in the process) then dispatches to. Only the first is wanted here."""
    saved = [
        (module.processor, module.processor._attention_backend)
        for module in transformer.modules()
        if getattr(module, "processor", None) is not None and hasattr(module.processor, "_attention_backend")
    ]
    previous = private.active_backend()
    transformer.set_attention_backend(private.BACKEND_NAME)
    private.set_active_backend(previous)
    return saved


def enable_backend(
    transformers: list[torch.nn.Module], scheduler=None, *, select_backend: bool = True, **settings
) -> XAttnSession:
    """An :class:`XAttnSession` with ``settings`` attached to ``transformers`` (see :func:`xattn_video.enable`)."""
    return XAttnSession(**settings).attach(transformers, scheduler, select_backend=select_backend)
