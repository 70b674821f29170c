"""The figures the jobs report about their runs, defined once so that every table says the same thing.

- **density**: kept blocks / blocks attention may visit, over every step and layer of a video (dense steps
  count as 1.0);
- **sparse-step density**: the same over the steps that ran sparse only: what the XAttention threshold buys.
  Sidecars and reports store it as ``sparse_density``; tables call it "sparse-step density";
- **speed-up**: the reference's median time / the candidate's median time (denoising steps for ``generate``
  and ``quality``, every step of the paired videos pooled; prefills for ``videomme``), computed by
  :func:`speedup` from the same medians the tables print beside it.

Times compare only when one process measured both sides: another process may run on another GPU, another
machine, beside other work, or before a driver update. Each sidecar (and Video-MME answer) records the
:func:`process_id` that made it; :func:`step_speedup` pairs videos by name and keeps the pairs that one
process made, and says so when it has to leave pairs out or has none left.
"""

from __future__ import annotations

import os
import socket
import statistics
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

DENSITY = "density"
SPARSE_STEP_DENSITY = "sparse-step density"
SPEEDUP = "speed-up"
CPU_TIMING_NOTE = ("timings on a CPU (such as the tiny default model's) are not a speed measurement: the same config "
                   "has given anything from 0.3x to 1.4x from one run to the next; measure speed on a GPU")

_PROCESS: tuple[int, str] | None = None


def process_id() -> str:
    """This process's identity in sidecars: host, pid and a random tag (a pid is reused, the tag is not); a
    forked child gets its own."""
    global _PROCESS
    if _PROCESS is None or _PROCESS[0] != os.getpid():
        _PROCESS = (os.getpid(), f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}")
    return _PROCESS[1]


def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that are not None; None when there are none."""
    present = [float(v) for v in values if v is not None]
    return statistics.median(present) if present else None


def speedup(reference: float | None, candidate: float | None) -> float | None:
    """reference / candidate for two medians (or other times) of one measurement; None when either is missing."""
    return reference / candidate if reference and candidate else None


@dataclass
class StepSpeedup:
    """A candidate's denoising-step speed-up against a reference, with what went into it."""

    value: float | None
    reference_step_s: float | None  # median step of the reference's comparable videos
    candidate_step_s: float | None  # median step of the candidate's comparable videos
    pairs: int  # videos both made, with step times, by one process
    left_out: int  # videos both made, with step times, by different processes (or an unrecorded one)
    on_cpu: bool  # some of those steps ran on the CPU
    note: str | None  # why the value is missing or covers only some pairs

    def to_dict(self) -> dict:
        return {"value": self.value, "reference_step_s": self.reference_step_s,
                "candidate_step_s": self.candidate_step_s, "pairs": self.pairs, "left_out": self.left_out,
                "on_cpu": self.on_cpu, "note": self.note}


def _steps(sidecar: dict | None) -> list[float]:
    timing = (sidecar or {}).get("timing") or {}
    return [float(x) for x in timing.get("step_s") or []]


def step_speedup(pairs: Sequence[tuple[dict | None, dict | None]]) -> StepSpeedup:
    """Step speed-up over (reference sidecar, candidate sidecar) pairs of the same video name: the median of the
    reference's steps / the median of the candidate's, every step of the pairs one process made pooled.

    Pairs made by different processes (another run, rank or machine) are left out; with none left the value
    is None and ``note`` says why, rather than comparing times that were never comparable.
    """
    timed = [(r, c) for r, c in pairs if _steps(r) and _steps(c)]
    same = [(r, c) for r, c in timed if r.get("process") and r.get("process") == c.get("process")]
    ref_step = median(x for r, _ in same for x in _steps(r))
    cand_step = median(x for _, c in same for x in _steps(c))
    left_out = len(timed) - len(same)
    note = None
    if not timed:
        note = "no step times to compare"
    elif not same:
        note = (f"not comparable: the {len(timed)} videos of each side were made by different processes "
                "(another run, rank or machine, or sidecars that record none)")
    elif left_out:
        note = f"over the {len(same)} of {len(timed)} videos one process made on both sides"
    on_cpu = any(str(s.get("device", "")).startswith("cpu") for pair in same for s in pair)
    return StepSpeedup(speedup(ref_step, cand_step), ref_step, cand_step, len(same), left_out, on_cpu, note)
