"""The README's quick start runs as written on this machine (CPU without CUDA) and does what its comments say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def quick_start_code() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's quick start has no python block"
    return match.group(1)


def test_quick_start_runs_as_written():
    namespace: dict = {}
    exec(compile(quick_start_code(), "README.md quick start", "exec"), namespace)  # noqa: S102 - our own README
    q, out, stats, mask, n = (namespace[name] for name in ("q", "out", "stats", "mask", "n"))
    assert q.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    blocks = -(-n // 128)
    assert mask.shape == (1, 24, blocks, blocks) and mask.dtype == torch.bool
    assert stats.density == pytest.approx(mask.float().mean().item())
