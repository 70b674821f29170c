"""Denoising steps for the ``xattn`` backend, through diffusers' own hooks.

A stateful :class:`XAttnStepHook` (a ``diffusers.hooks.ModelHook`` registered with ``HookRegistry``) sits on
each transformer of the pipeline. Before every forward it works out where the forward sits (generation, step),
whether the step is a dense warmup step, and activates a :class:`~.attention_op.ForwardState` that the attention
op reads at run time; after the forward it deactivates it. Its signals, best first:

- the pipeline's cache context (``with transformer.cache_context("cond", step_index=i, num_inference_steps=n)``,
  handed to the hook's ``StateManager`` by diffusers): its step index when the pipeline gives one (Wan), its
  name (a name seen again at the top timestep starts a new generation);
- the forward's ``timestep`` (its highest value: Wan 2.2 TI2V passes one per token, 0 on the conditioning frame),
  counted by :class:`~.steps.StepTracker`'s rules: that is the fallback for direct transformer calls with no
  cache context;
- diffusers resetting stateful hooks at the end of every pipeline call (``maybe_free_model_hooks``): the next
  forward starts a new generation whatever its timestep.

The tracker and settings live in one :class:`~.backend.XAttnSession` shared by every hook of a pipeline, so
Wan 2.2 A14B's swap from ``transformer`` to ``transformer_2`` mid-generation continues the same count.

The number of steps (for ``warmup_fraction``) is read at the first forward of each generation: the cache
context's ``num_inference_steps`` when the pipeline gives it with a step index, else the pipeline scheduler's
``timesteps`` from the one nearest this forward's timestep on (distinct values: a second-order scheduler
repeats them).
"""

from __future__ import annotations

import inspect

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ..core.token_order import grid_from_latents
from . import _diffusers_private as private
from .attention_op import ForwardState, activate, deactivate

__all__ = ["HOOK_NAME", "XAttnStepHook", "register", "steps_from_scheduler", "unregister"]

HOOK_NAME = "xattn_video_steps"


class XAttnStepHook(ModelHook):
    """Stateful diffusers hook on one transformer: positions each forward and activates its ForwardState."""

    _is_stateful = True

    def __init__(self, session, transformer: torch.nn.Module, state_manager) -> None:
        super().__init__()
        params = list(inspect.signature(transformer.forward).parameters)
        if "timestep" not in params:
            raise TypeError(f"{type(transformer).__name__}.forward has no `timestep` argument: steps cannot be tracked")
        self.session = session
        self.state_manager = state_manager  # shared by the pipeline's hooks; diffusers sets its cache context
        self._timestep_index = params.index("timestep")
        self._latents_index = params.index("hidden_states") if "hidden_states" in params else None
        config = getattr(transformer, "config", None)
        self.patch = (getattr(config, "patch_size", None), getattr(config, "patch_size_t", None))
        self.last_state: ForwardState | None = None

    @torch.compiler.disable
    def pre_forward(self, module, *args, **kwargs):
        timestep = kwargs.get("timestep")
        if timestep is None and len(args) > self._timestep_index:
            timestep = args[self._timestep_index]
        if timestep is None:
            raise ValueError(f"{type(module).__name__} was called without a timestep: cannot track the step")
        latents = kwargs.get("hidden_states")
        if latents is None and self._latents_index is not None and len(args) > self._latents_index:
            latents = args[self._latents_index]
        context = private.cache_context(self.state_manager)
        name = getattr(context, "name", None)
        step_index = getattr(context, "step_index", None)
        if context is not None:
            self.state_manager.get_state().forwards += 1
        tracker = self.session.tracker
        prev = tracker.position
        position = tracker.observe(
            timestep, latents if isinstance(latents, torch.Tensor) else None, context=name, step_index=step_index
        )
        if prev is None or position.generation != prev.generation:
            given = getattr(context, "num_inference_steps", None) if step_index is not None else None
            self.session.start_generation(position, given)
        # whose kept blocks a later step may reuse (refresh_every): this transformer's, this cond/uncond's
        kind = (id(module), name if name is not None else position.forward)
        state = ForwardState(self.session, position, self.session.is_dense_step(position), kind=kind)
        if self.session.token_order == "tiled":
            state.grid = self._grid(module, latents, kwargs)
        self.last_state = state
        activate(state)
        return args, kwargs

    def _grid(self, module, latents, kwargs: dict) -> tuple[int, int, int]:
        """The video token grid of this forward (token_order="tiled"): latents [B, C, F, H, W] over the
        transformer's patch sizes, or, for a transformer fed packed tokens [B, N, C] (LTX-Video), its
        ``num_frames``, ``height`` and ``width`` arguments over them."""
        patch_size, patch_size_t = self.patch
        patch_size_t = 1 if patch_size_t is None else patch_size_t
        if isinstance(latents, torch.Tensor) and latents.dim() == 5:
            return grid_from_latents(latents.shape, patch_size, patch_size_t)
        sizes = [kwargs.get(name) for name in ("num_frames", "height", "width")]
        if isinstance(latents, torch.Tensor) and latents.dim() == 3 and all(isinstance(x, int) for x in sizes):
            grid = grid_from_latents((1, 1, *sizes), patch_size, patch_size_t)
            if grid[0] * grid[1] * grid[2] == latents.shape[1]:
                return grid
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(
            f"token_order='tiled' needs {type(module).__name__}'s video grid: hidden_states as latents [B, C, F, H, "
            f"W], or packed tokens with num_frames/height/width keyword arguments that match them; got {shape}"
        )

    @torch.compiler.disable
    def post_forward(self, module, output):
        deactivate()
        if self.last_state is not None:
            self.session.on_forward_end(self.last_state)
        return output

    def reset_state(self, module):
        """diffusers calls it at the end of every pipeline call: the next forward starts a new generation."""
        self.session.tracker.new_generation()
        self.session.reuse.clear()  # kept blocks (refresh_every) serve one generation: free them
        self.state_manager.reset()
        return module


def steps_from_scheduler(scheduler, timestep: float) -> int | None:
    """Denoising steps left in ``scheduler.timesteps`` from the entry nearest ``timestep`` on (distinct values), or
    None when the scheduler has no timesteps set."""
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        return None
    ts = torch.as_tensor(timesteps).detach().flatten().to("cpu", torch.float64)
    if ts.numel() == 0:
        return None
    start = int((ts - float(timestep)).abs().argmin())
    rest = ts[start:]
    return 1 + int((rest[1:] != rest[:-1]).sum())


def register(transformer: torch.nn.Module, hook) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if registry.get_hook(HOOK_NAME) is not None:
        registry.remove_hook(HOOK_NAME, recurse=False)
    registry.register_hook(hook, HOOK_NAME)


def unregister(transformer: torch.nn.Module) -> None:
    registry = getattr(transformer, "_diffusers_hook", None)
    if isinstance(registry, HookRegistry) and registry.get_hook(HOOK_NAME) is not None:
        registry.remove_hook(HOOK_NAME, recurse=False)
