"""Denoising-step tracking for a diffusers transformer, read from the ``timestep`` of each forward.

Attention processors never see the timestep: diffusers 0.42 passes no attention kwargs to HunyuanVideo's
processors, and ``set_attn_processor`` tells a processor nothing about where it sits. A :class:`StepTracker`
is attached to the transformer instead (a forward pre-hook) and turns the sequence of timesteps it sees into
a position ``(generation, step)``:

- the timestep of a forward is the highest value of its ``timestep`` tensor (a timestep per sample, or per token
  with 0 on a conditioning frame's tokens as Wan 2.2 TI2V and LTX image-to-video pass it);
- the first forward starts generation 0 at step 0;
- a lower timestep than the previous forward's is the next step (schedulers count down);
- a higher timestep starts a new generation at step 0 (a new pipeline call starts from high noise);
- the same timestep again is the same step when the latents (``hidden_states``) are unchanged: true
  classifier-free guidance calls the transformer twice per step on the same latents (cond, then uncond);
  a batch of 2 (batched CFG) is one forward per step;
- the same timestep with different latents is a new generation while the current one is still at step 0
  (a one-step generation followed by another, which starts from the same top timestep but fresh noise),
  and the same step otherwise (a second-order scheduler such as Heun evaluates twice at one timestep).

"Unchanged latents" is checked without a copy: the same tensor object at the same version counter (no in-place
change since; inference-mode tensors have no counter, so the same object counts as unchanged), or a tensor
equal to the one kept from the previous forward. The tracker keeps a reference to
the last latents until :meth:`StepTracker.reset` or :meth:`StepTracker.detach`.

A tracker per transformer: :meth:`StepTracker.attach` returns the one already there, so several processors
share it. Listeners registered with :meth:`StepTracker.add_listener` are called after each forward.

The tracker also keeps the shape of the current forward's latents (:attr:`StepTracker.latents_shape`): a
processor that reorders video tokens needs the token grid, which only the transformer's input shows.
"""

from __future__ import annotations

import copy
import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["StepPosition", "StepTracker", "tensor_version"]

_ATTR = "_xattn_step_tracker"


@dataclass(frozen=True)
class StepPosition:
    """Where a transformer forward sits: generation (pipeline call) index, step index in it, the timestep,
    and which forward of the step this is (0, then 1 for true CFG's second forward)."""

    generation: int
    step: int
    timestep: float
    forward: int = 0


class StepTracker:
    """Counts denoising steps of one transformer from the timesteps of its forwards (see the module docs)."""

    def __init__(self) -> None:
        self.position: StepPosition | None = None
        self.latents_shape: tuple[int, ...] | None = None  # shape of the current forward's ``hidden_states``
        self._latents: torch.Tensor | None = None
        self._latents_version: int | None = -1
        self._force_new = False
        self._contexts: set[str] = set()
        self._handles: list = []
        self._listeners: list[Callable[[], Callable[[StepPosition], None] | None]] = []  # (weak) references
        self._timestep_index = 1
        self._latents_index: int | None = 0
        self._module_ref: torch.nn.Module | None = None

    # ----------------------------------------------------------------- attach / detach

    @classmethod
    def attach(cls, transformer: torch.nn.Module) -> StepTracker:
        """The tracker attached to ``transformer``, attaching a new one (a forward pre-hook) if there is none."""
        if not isinstance(transformer, torch.nn.Module):
            raise TypeError(f"transformer must be a torch.nn.Module, got {type(transformer).__name__}")
        existing = getattr(transformer, _ATTR, None)
        if isinstance(existing, StepTracker) and existing._handles:
            return existing
        tracker = cls()
        params = list(inspect.signature(transformer.forward).parameters)
        if "timestep" not in params:
            raise TypeError(
                f"{type(transformer).__name__}.forward has no `timestep` argument: steps cannot be tracked on it"
            )
        tracker._timestep_index = params.index("timestep")
        tracker._latents_index = params.index("hidden_states") if "hidden_states" in params else None
        tracker._handles = [
            transformer.register_forward_pre_hook(tracker._pre_hook, with_kwargs=True),
            transformer.register_forward_hook(tracker._post_hook),
        ]
        setattr(transformer, _ATTR, tracker)
        tracker._module_ref = transformer
        return tracker

    @staticmethod
    def of(transformer: torch.nn.Module) -> StepTracker | None:
        """The tracker attached to ``transformer``, or None."""
        tracker = getattr(transformer, _ATTR, None)
        return tracker if isinstance(tracker, StepTracker) and tracker._handles else None

    def detach(self) -> None:
        """Remove the hooks; the tracker stops counting and forgets its position and latents."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        module = getattr(self, "_module_ref", None)
        if module is not None and getattr(module, _ATTR, None) is self:
            delattr(module, _ATTR)
        self._module_ref = None
        self.reset()

    def __deepcopy__(self, memo):
        # Weak references cannot be deep-copied: copy the live listeners' targets (a copied transformer gets
        # its copied processor listening to its copied tracker).
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        state = {key: value for key, value in self.__dict__.items() if key != "_listeners"}
        new.__dict__.update(copy.deepcopy(state, memo))
        new._listeners = []
        for fn in self._live_listeners():
            new.add_listener(copy.deepcopy(fn, memo))
        return new

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def add_listener(self, fn: Callable[[StepPosition], None]) -> None:
        """Call ``fn(position)`` after every forward of the transformer. Bound methods are held weakly: a
        processor that is no longer referenced anywhere stops listening."""
        if fn not in self._live_listeners():
            self._listeners.append(weakref.WeakMethod(fn) if inspect.ismethod(fn) else (lambda fn=fn: fn))

    def remove_listener(self, fn: Callable[[StepPosition], None]) -> None:
        self._listeners = [ref for ref in self._listeners if ref() is not None and ref() != fn]

    def _live_listeners(self) -> list[Callable[[StepPosition], None]]:
        live = [ref() for ref in self._listeners]
        self._listeners = [ref for ref, fn in zip(self._listeners, live, strict=True) if fn is not None]
        return [fn for fn in live if fn is not None]

    # ----------------------------------------------------------------- counting

    def reset(self) -> None:
        """Forget the position: the next forward starts generation 0 again."""
        self.position = None
        self.latents_shape = None
        self._latents = None
        self._latents_version = -1
        self._force_new = False
        self._contexts = set()

    def new_generation(self) -> None:
        """Make the next forward start a new generation whatever its timestep."""
        self._force_new = True

    def observe(
        self,
        timestep,
        latents: torch.Tensor | None = None,
        *,
        context: str | None = None,
        step_index: int | None = None,
    ) -> StepPosition:
        """Advance on one forward with ``timestep`` (tensor or number) and input ``latents``; the new position.

        ``context`` (the pipeline's cache-context name, "cond"/"uncond") and ``step_index`` (the pipeline's loop
        index) come from diffusers' cache context when the pipeline opens one: the step index, when given, is
        taken as it is; a context name seen again at the same timestep is a new generation at step 0 (else the
        same step), which replaces the latents comparison."""
        t = _timestep_value(timestep)
        prev = self.position
        if prev is None:
            position = StepPosition(0, step_index or 0, t)
        elif self._force_new:
            position = StepPosition(prev.generation + 1, step_index or 0, t)
        elif step_index is not None:
            if step_index < prev.step or (step_index == prev.step and t > prev.timestep):
                position = StepPosition(prev.generation + 1, step_index, t)
            elif step_index == prev.step:
                position = StepPosition(prev.generation, prev.step, t, prev.forward + 1)
            else:
                position = StepPosition(prev.generation, step_index, t)
        elif t > prev.timestep:
            position = StepPosition(prev.generation + 1, 0, t)
        elif t < prev.timestep:
            position = StepPosition(prev.generation, prev.step + 1, t)
        elif context is not None:
            if context in self._contexts and prev.step == 0:  # this context again at the top timestep
                position = StepPosition(prev.generation + 1, 0, t)
            else:
                position = StepPosition(prev.generation, prev.step, t, prev.forward + 1)
        elif self._same_latents(latents) or prev.step > 0:
            position = StepPosition(prev.generation, prev.step, t, prev.forward + 1)
        else:  # same top timestep, fresh latents: a one-step generation followed by another
            position = StepPosition(prev.generation + 1, 0, t)
        self._force_new = False
        if prev is None or (position.generation, position.step) != (prev.generation, prev.step):
            self._contexts = set()
        if context is not None:
            self._contexts.add(context)
        self.position = position
        if isinstance(latents, torch.Tensor):
            self._latents, self._latents_version = latents, tensor_version(latents)
        self.latents_shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else None
        return position

    def _same_latents(self, latents: torch.Tensor | None) -> bool:
        if latents is None or self._latents is None:
            return latents is None
        if latents is self._latents:
            return tensor_version(latents) == self._latents_version
        if tensor_version(self._latents) != self._latents_version:  # the kept tensor changed in place since
            return False
        return (
            latents.shape == self._latents.shape
            and latents.dtype == self._latents.dtype
            and latents.device == self._latents.device
            and bool(torch.equal(latents, self._latents))
        )

    # ----------------------------------------------------------------- hooks

    def _pre_hook(self, module, args, kwargs):
        if "timestep" in kwargs:
            timestep = kwargs["timestep"]
        elif len(args) > self._timestep_index:
            timestep = args[self._timestep_index]
        else:
            raise ValueError(f"{type(module).__name__} was called without a timestep: cannot track the step")
        latents = kwargs.get("hidden_states")
        if latents is None and self._latents_index is not None and len(args) > self._latents_index:
            latents = args[self._latents_index]
        self.observe(timestep, latents if isinstance(latents, torch.Tensor) else None)
        return None

    def _post_hook(self, module, args, output):
        if self.position is not None:
            for fn in self._live_listeners():
                fn(self.position)
        return None


def tensor_version(t: torch.Tensor) -> int | None:
    """The tensor's in-place version counter; None for inference-mode tensors, which have none (the same
    inference tensor object then counts as unchanged)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _timestep_value(timestep) -> float:
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() == 0:
            raise ValueError("timestep is an empty tensor: cannot track the step")
        # the highest value: Wan 2.2 TI2V and LTX image-to-video pass a timestep per token, 0 on the
        # conditioning frame's tokens and the step's timestep on every other token
        return float(timestep.detach().max().item())
    if isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
        return float(timestep)
    raise TypeError(f"timestep must be a tensor or a number, got {type(timestep).__name__}")
