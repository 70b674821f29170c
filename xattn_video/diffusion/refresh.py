"""Pay the block estimate less often: ``refresh_every=k`` reuses one step's kept blocks for the next k-1 steps.

XAttention's kept blocks change slowly from one denoising step to the next, so the estimate (a strided QK^T
product, a softmax and a sort per layer) can run at one step and its selection serve the steps after it. A
:class:`BlockReuse` holds, per *call kind*, the selection of the step that last estimated it:

- the call kind is (forward kind, layer, sample group): true classifier-free guidance runs two forwards a step
  (cond, uncond) whose attention differs, Wan 2.2 A14B's two transformers have layers of their own, and a batch
  whose samples have different valid lengths attends per sample (see the callers for their keys);
- a selection estimated at step s serves steps s+1 .. s+k-1 of the same generation, then the call estimates
  again; the first sparse step after warmup always estimates (nothing is kept from dense steps), and a new
  generation (or a step count that goes back, as after ``tracker.reset()``) forgets everything;
- a kept selection serves a call only if the call's batch, heads and token counts (and device) are those it
  was estimated for; otherwise the call estimates again, so a reused selection is never one for other inputs;
- selections whose window has passed are dropped when the step advances, so memory holds at most one
  selection per call kind: ``B x H x nqb x nkb x 5`` bytes (mask and block lists), about 104 MB per layer at
  HunyuanVideo 720p (931 blocks of 128, 24 heads).

``refresh_every=1`` (the default) estimates at every sparse step and keeps nothing.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch

from ..core.estimate import BlockSelection

__all__ = ["BlockReuse", "ReuseSlot", "check_refresh_every"]


def check_refresh_every(value) -> int:
    """``refresh_every`` as an int >= 1, or a one-line error naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"refresh_every must be an int >= 1 (1: estimate at every sparse step), got {value!r}")
    if value < 1:
        raise ValueError(f"refresh_every must be an int >= 1 (1: estimate at every sparse step), got {value!r}")
    return value


@dataclass
class _Entry:
    generation: int
    step: int
    signature: tuple
    selection: BlockSelection


class ReuseSlot:
    """One call's view of a :class:`BlockReuse`: ``selection`` is the kept selection it may reuse (None: estimate),
    ``store(selection)`` keeps a fresh estimate for the next steps. ``reused`` says which happened."""

    __slots__ = ("_owner", "_key", "_position", "_signature", "selection")

    def __init__(self, owner: BlockReuse, key: Hashable, position, signature: tuple, selection) -> None:
        self._owner, self._key, self._position, self._signature = owner, key, position, signature
        self.selection: BlockSelection | None = selection

    @property
    def reused(self) -> bool:
        return self.selection is not None

    def store(self, selection: BlockSelection) -> None:
        self._owner._store(self._key, self._position, self._signature, selection)


class BlockReuse:
    """Selections kept across steps per call kind (see the module docs); ``refresh_every`` >= 1."""

    def __init__(self, refresh_every: int = 1) -> None:
        self.refresh_every = check_refresh_every(refresh_every)
        self._entries: dict[Hashable, _Entry] = {}
        self._at: tuple[int, int] | None = None  # (generation, step) of the latest call
        self.mismatches = 0  # kept selections not reused because the call's shapes differed

    @property
    def active(self) -> bool:
        return self.refresh_every > 1

    def clear(self) -> None:
        self._entries.clear()
        self._at = None

    def __len__(self) -> int:
        return len(self._entries)

    def slot(self, key: Hashable, position, q: torch.Tensor, k: torch.Tensor) -> ReuseSlot | None:
        """The slot of call kind ``key`` at ``position`` (a StepPosition) for q [B, H, Lq, D] and k [B, Hk, Lk, D]:
        None when nothing is reused (refresh_every 1, or no step known), else a slot whose ``selection`` is the
        kept one when it may serve this call."""
        if not self.active or position is None:
            return None
        at = (position.generation, position.step)
        if self._at is not None and (at[0] != self._at[0] or at[1] < self._at[1]):
            self._entries.clear()  # a new generation, or the count went back: nothing kept is this one's
        if self._at != at:
            self._entries = {
                key_: e for key_, e in self._entries.items() if position.step < e.step + self.refresh_every
            }
        self._at = at
        signature = (tuple(q.shape[:3]), tuple(k.shape[:3]), q.device)
        entry = self._entries.get(key)
        selection = None
        if entry is not None and entry.step < position.step < entry.step + self.refresh_every:
            if entry.signature == signature:
                selection = entry.selection
            else:
                self.mismatches += 1
        return ReuseSlot(self, key, position, signature, selection)

    def _store(self, key: Hashable, position, signature: tuple, selection: BlockSelection) -> None:
        self._entries[key] = _Entry(position.generation, position.step, signature, selection)
