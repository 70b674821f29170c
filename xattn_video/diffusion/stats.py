"""Attention statistics per generation, denoising step and layer: one structure for the HunyuanVideo processor
and the ``xattn`` backend, so that jobs read both the same way.

Numbers that still live on the GPU (CUDA-event timers, kept-block counts) are kept as pending items and read
once asked for (:meth:`StepStats.stats`), so no attention layer waits for the GPU.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field

from ..core.attention import PendingStats

__all__ = ["StepStats", "blocks", "write_json_atomic"]


def blocks(n: int, block_size: int) -> int:
    return math.ceil(n / block_size)


@dataclass
class _Record:
    """Accumulated calls of one layer at one step (two calls with true CFG)."""

    mode: str
    calls: int = 0
    kept: int = 0
    total: int = 0
    estimate_ms: float = 0.0
    attention_ms: float = 0.0
    estimated: int = 0  # sparse calls that ran the block estimate
    reused: int = 0  # sparse calls that reused an earlier step's blocks (refresh_every): estimate 0 ms
    # _Timer (attention phases) and PendingStats (sparse calls) whose numbers still live on the GPU
    pending: list = field(default_factory=list)

    def add(self, mode: str, kept: int, total: int, estimate_ms: float, attention_ms: float, timers: list) -> None:
        if mode != self.mode:
            self.mode = "mixed"
        self.calls += 1
        self.kept += kept
        self.total += total
        self.estimate_ms += estimate_ms
        self.attention_ms += attention_ms
        self.pending.extend(timers)

    def resolve(self) -> None:
        for item in self.pending:
            if isinstance(item, PendingStats):
                stats = item.resolve()
                self.reused += item.reused
                self.estimated += not item.reused
                self.kept += stats.kept_blocks
                self.estimate_ms += stats.estimate_ms
                self.attention_ms += stats.attention_ms
            else:
                self.attention_ms += sum(item.phases_ms())
        self.pending.clear()

    @property
    def density(self) -> float:
        return self.kept / self.total if self.total else 1.0


def summary(records: list[_Record]) -> dict:
    kept = sum(r.kept for r in records)
    total = sum(r.total for r in records)
    return {
        "density": kept / total if total else 1.0,
        "kept_blocks": kept,
        "total_blocks": total,
        "estimate_ms": sum(r.estimate_ms for r in records),
        "attention_ms": sum(r.attention_ms for r in records),
        "calls": sum(r.calls for r in records),
        "estimated_calls": sum(r.estimated for r in records),
        "reused_calls": sum(r.reused for r in records),
    }


def blocks_source(records: list[_Record]) -> str | None:
    """How a step's sparse calls got their blocks: "estimated", "reused" (refresh_every), "mixed", or None
    when it made no sparse call."""
    estimated, reused = sum(r.estimated for r in records), sum(r.reused for r in records)
    if not estimated and not reused:
        return None
    return "mixed" if estimated and reused else "reused" if reused else "estimated"


def _sort_key(key: tuple) -> tuple:
    return tuple(-1 if x is None else x for x in key)


class StepStats:
    """Records keyed by (generation, step, layer); :meth:`stats` gives the JSON-ready dict.

    ``layer_kind(index)`` names a layer's block kind ("double"/"single" for HunyuanVideo; None elsewhere).
    ``native_calls`` counts calls handed to diffusers' native backend, by reason ("cross_attention", "short", ...).
    """

    def __init__(self, layer_kind=None) -> None:
        self.records: dict[tuple, _Record] = {}
        self.timesteps: dict[tuple[int, int], float] = {}
        self.native_calls: dict[str, int] = {}
        self._layer_kind = layer_kind or (lambda index: None)

    def record(self, position, layer, mode, kept, total, estimate_ms, attention_ms, timers) -> None:
        """Add one call; ``position`` is a StepPosition (None: untracked), ``layer`` an int or None."""
        if position is None:
            key = (None, None, None)
        else:
            key = (position.generation, position.step, layer)
            self.timesteps[(position.generation, position.step)] = position.timestep
        record = self.records.get(key)
        if record is None:
            record = self.records[key] = _Record(mode)
        record.add(mode, kept, total, estimate_ms, attention_ms, timers)

    def count_native(self, reason: str) -> None:
        self.native_calls[reason] = self.native_calls.get(reason, 0) + 1

    def reset(self) -> None:
        self.records.clear()
        self.timesteps.clear()
        self.native_calls.clear()

    def step_records(self, generation: int, step: int) -> list[tuple]:
        """(layer, record) pairs of one step, layers ascending, read from the GPU."""
        pairs = sorted(
            ((key[2], r) for key, r in self.records.items() if key[:2] == (generation, step)),
            key=lambda lr: -1 if lr[0] is None else lr[0],
        )
        for _, r in pairs:
            r.resolve()
        return pairs

    def stats(self, name: str, settings: dict) -> dict:
        """``{"processor": name, "settings", "generations": [{"generation", "steps": [{"step", "timestep",
        "mode", "blocks", "density", "kept_blocks", "total_blocks", "estimate_ms", "attention_ms", "calls",
        "estimated_calls", "reused_calls", "layers": [{"layer", "block", "mode", ...}]}]}], "totals", "untracked"?,
        "native_calls"?}``. ``blocks``: "estimated", "reused" (kept from an earlier step, ``refresh_every``),
        "mixed" or None (no sparse call); the estimate time of a reused call is 0."""
        for record in self.records.values():
            record.resolve()
        generations: dict[int, dict[int, list]] = {}
        untracked = None
        for (gen, step, layer), record in sorted(self.records.items(), key=lambda kv: _sort_key(kv[0])):
            if gen is None:
                untracked = record
                continue
            generations.setdefault(gen, {}).setdefault(step, []).append((layer, record))
        out_gens = []
        for gen, steps in generations.items():
            out_steps = []
            for step, layer_records in steps.items():
                records = [r for _, r in layer_records]
                modes = {r.mode for r in records}
                out_steps.append(
                    {
                        "step": step,
                        "timestep": self.timesteps.get((gen, step)),
                        "mode": modes.pop() if len(modes) == 1 else "mixed",
                        "blocks": blocks_source(records),
                        **summary(records),
                        "layers": [
                            {"layer": layer, "block": self._layer_kind(layer), "mode": r.mode, **summary([r])}
                            for layer, r in layer_records
                        ],
                    }
                )
            out_gens.append({"generation": gen, "steps": out_steps})
        result = {
            "processor": name,
            "settings": settings,
            "generations": out_gens,
            "totals": summary(list(self.records.values())),
        }
        if untracked is not None:
            result["untracked"] = {"mode": untracked.mode, **summary([untracked])}
        if self.native_calls:
            result["native_calls"] = dict(sorted(self.native_calls.items()))
        return result


def write_json_atomic(path: str | os.PathLike, data: dict) -> str:
    """Write ``data`` as JSON to ``path`` through a temporary file renamed over it; returns the path."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".xattn_stats.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
