"""Report mode: exact attention beside XAttention, per-head density and relative error per step and layer.

What ``xattn-video attn-report`` records, for both integrations (the HunyuanVideo processor's report subclass and
the ``xattn`` backend's :meth:`~.backend.XAttnSession.start_probe`), with one definition:

- every sparse call: dense attention over the same valid segment (the same q/k/v, no mask) computed beside it;
  per head, the block density (kept / all blocks) and the relative error ||out_xattn - out_dense||_F /
  ||out_dense||_F over tokens and channels, pooled over the batch and over the calls of a (step, layer);
- every dense call (warmup steps, ``dense_layers``): density 1 and error 0 (exact), and, with ``probe_dense``,
  XAttention with the same settings run beside it on the same q/k/v, its output unused ("what if this step were
  sparse").

This costs a dense attention (or an XAttention probe) per layer and synchronises with the device once per call,
so it only runs when asked for; the generation itself is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["AttentionProbe", "Cell", "HeadSums", "report_steps"]


@dataclass
class HeadSums:
    """Per-head sums over the calls of one (step, layer): squared error, squared reference, densities."""

    err2: Any = None
    ref2: Any = None
    density: Any = None
    samples: int = 0
    calls: int = 0

    def add(self, density_per_head: torch.Tensor, out: torch.Tensor, ref: torch.Tensor) -> None:
        """Add one call: per-head densities [B, H] and outputs [B, H, N, D]. Sums of squares are taken one head
        at a time in float32 with float64 accumulation, so a 119k-token layer needs no float64 copy."""
        sums = []
        for h in range(out.shape[1]):
            o, r = out[:, h].detach().float(), ref[:, h].detach().float()
            sums.append(torch.stack([(o - r).pow(2).sum(dtype=torch.float64), r.pow(2).sum(dtype=torch.float64)]))
        err2, ref2 = torch.stack(sums).cpu().unbind(dim=1)  # one device-to-host copy per call
        dens = density_per_head.detach().to(torch.float64).cpu().sum(dim=0)
        if self.err2 is None:
            self.err2, self.ref2, self.density = err2, ref2, dens
        else:
            self.err2, self.ref2, self.density = self.err2 + err2, self.ref2 + ref2, self.density + dens
        self.samples += density_per_head.shape[0]
        self.calls += 1

    def per_head(self) -> tuple[list[float], list[float]]:
        """(density, relative error) per head."""
        density = (self.density / self.samples).tolist()
        error = [
            math.sqrt(e / r) if r > 0 else 0.0 for e, r in zip(self.err2.tolist(), self.ref2.tolist(), strict=True)
        ]
        return density, error


@dataclass
class Cell:
    """One (generation, step, layer): its mode, what ran, and the probe beside a dense call."""

    mode: str  # "sparse" or "dense" (warmup step or dense layer)
    actual: HeadSums = field(default_factory=HeadSums)
    probe: HeadSums = field(default_factory=HeadSums)


def report_steps(cells: dict[tuple[int, int, int], Cell], timesteps: dict[tuple[int, int], float]) -> list[dict]:
    """Per (generation, step): mode, timestep and per-layer per-head density and relative error (and probe)."""
    steps = []
    for gen, step in sorted({key[:2] for key in cells}):
        layers = sorted(layer for (g, s, layer) in cells if (g, s) == (gen, step))
        row = [cells[(gen, step, layer)] for layer in layers]
        modes = {c.mode for c in row}
        entry: dict[str, Any] = {
            "generation": gen,
            "step": step,
            "timestep": timesteps.get((gen, step)),
            "mode": modes.pop() if len(modes) == 1 else "mixed",
            "layers": layers,
            "layer_modes": [c.mode for c in row],
            "density": [],
            "rel_error": [],
            "probe_density": None,
            "probe_rel_error": None,
        }
        for c in row:
            d, e = c.actual.per_head() if c.actual.samples else ([], [])
            entry["density"].append(d)
            entry["rel_error"].append(e)
        if any(c.probe.samples for c in row):
            entry["probe_density"], entry["probe_rel_error"] = [], []
            for c in row:
                d, e = c.probe.per_head() if c.probe.samples else (None, None)
                entry["probe_density"].append(d)
                entry["probe_rel_error"].append(e)
        steps.append(entry)
    return steps


class AttentionProbe:
    """The records of a report run on the ``xattn`` backend (see the module); fed by the attention op while it is
    the session's :attr:`~.backend.XAttnSession.probe`.

    ``native_lengths`` counts the self-attention calls that ran native instead, by (reason, tokens): a report
    with no cells and only ``("short", n)`` here means ``min_len`` sent every call native."""

    def __init__(self, probe_dense: bool = True) -> None:
        self.probe_dense = probe_dense
        self.cells: dict[tuple[int, int, int], Cell] = {}
        self.timesteps: dict[tuple[int, int], float] = {}
        self.layer_kinds: dict[int, str] = {}
        self.native_lengths: dict[tuple[str, int], int] = {}

    def _cell(self, position, layer: int, dense: bool) -> Cell:
        key = (position.generation, position.step, layer)
        self.timesteps[key[:2]] = position.timestep
        self.layer_kinds.setdefault(layer, "self")
        cell = self.cells.setdefault(key, Cell("dense" if dense else "sparse"))
        if dense:
            cell.mode = "dense"
        return cell

    def native(self, reason: str, n: int) -> None:
        self.native_lengths[(reason, n)] = self.native_lengths.get((reason, n), 0) + 1

    def sparse(self, position, layer: int, q, k, v, out, pending, scale: float | None) -> None:
        """A sparse call on one valid segment: q/k/v [B, H, L, D], ``out`` its XAttention output [B, H, L, D],
        ``pending`` its statistics. The reference is unmasked SDPA on the same q/k/v."""
        ref = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
        self._cell(position, layer, False).actual.add(pending.resolve().density_per_head, out, ref)

    def dense(self, session, position, layer: int, q, k, v, out, scale: float | None, order=None) -> None:
        """A dense call on one valid segment (``out`` its exact output): recorded exact, and probed with
        XAttention through the session's own sparse path (its ``select_blocks``, its token ``order``) when
        ``probe_dense``."""
        cell = self._cell(position, layer, True)
        cell.actual.add(q.new_ones(q.shape[0], q.shape[1]), out, out)  # exact: density 1, error 0
        if self.probe_dense:
            from .attention_op import sparse_valid

            probe, pending = sparse_valid(session, q, k, v, scale, None, order)
            cell.probe.add(pending.resolve().density_per_head, probe, out)

    def report_steps(self) -> list[dict]:
        return report_steps(self.cells, self.timesteps)
