"""``attn-report`` on the ``xattn`` backend families, the backend session's report mode and its ``select_blocks``
override point: recorded density and error against an independent float64 computation, the report end to end
on tiny Wan 2.1 and HunyuanVideo 1.5, outputs unchanged by the report mode."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from backend_helpers import LOW_THRESHOLD, SPARSE, clean, generate, pipeline

import xattn_video
from reference64 import antidiagonal_block_scores64, block_sparse_attention64, select_blocks64
from xattn_video import cli
from xattn_video.core.estimate import BlockSelection
from xattn_video.core.reference import compact_blocks
from xattn_video.diffusion.attention_op import ForwardState, activate, deactivate
from xattn_video.diffusion.backend import DEFAULT_MIN_LEN, XAttnSession, xattn_backend
from xattn_video.diffusion.probe import AttentionProbe
from xattn_video.diffusion.steps import StepPosition
from xattn_video.pipelines.attn_report import run_attn_report
from xattn_video.pipelines.generate_config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")

# 128x192, 9 frames: 3 x 8 x 12 = 288 video tokens in 16-token blocks; 2 steps, step 0 dense (warmup), step 1 sparse
SMALL = [
    "video.height=128",
    "video.width=192",
    "video.frames=9",
    "video.steps=2",
    "video.fps=8",
    "progress=false",
    "attention.block_size=16",
    "attention.stride=4",
    "attention.warmup_steps=1",
    "attention.min_len=16",
]


@pytest.mark.parametrize("family", ["wan21", "hunyuan15"])
def test_attn_report_end_to_end(tmp_path, capsys, family):
    out = tmp_path / "report"
    args = ["attn-report", f"model.id=tiny-{family}", *SMALL, f"output.root={tmp_path / 'run'}", "--output", str(out)]
    assert cli.main(args) == 0
    report = json.loads((out / "attn_report.json").read_text())
    assert report["integration"] == "backend"
    assert [s["mode"] for s in report["summary"]] == ["dense", "sparse"]
    layers, heads = report["num_layers"], report["num_heads"]
    assert layers == 2 and heads == 2 and report["layer_kinds"] == ["self", "self"]  # the tiny transformers
    dense, sparse = report["steps"]
    np.testing.assert_array_equal(dense["density"], np.ones((layers, heads)))
    np.testing.assert_array_equal(dense["rel_error"], np.zeros((layers, heads)))
    probe_d, probe_e = np.array(dense["probe_density"]), np.array(dense["probe_rel_error"])
    assert probe_d.shape == (layers, heads) and np.all((probe_d > 0) & (probe_d <= 1)) and np.all(probe_e >= 0)
    d, e = np.array(sparse["density"]), np.array(sparse["rel_error"])
    assert d.shape == e.shape == (layers, heads) and np.all((d > 0) & (d <= 1)) and d.min() < 1.0
    assert np.all(e >= 0) and e.max() > 0 and np.all(e[d == 1.0] < 1e-5)
    assert sparse["probe_density"] is None
    for name in ("density_layer_head.png", "error_layer_head.png", "error_vs_step.png", "density_vs_step.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "video.mp4").stat().st_size > 0
    assert f"{d.mean():.3f}" in capsys.readouterr().out


def test_recorded_error_equals_an_independent_computation(tmp_path, monkeypatch):
    captured = []
    original = AttentionProbe.sparse

    def capture(self, position, layer, q, k, v, out, pending, scale):
        if (position.step, layer) == (1, 1):
            captured.append(tuple(t.detach().clone() for t in (q, k, v)))
        return original(self, position, layer, q, k, v, out, pending, scale)

    monkeypatch.setattr(AttentionProbe, "sparse", capture)
    pipe = pipeline("wan21")
    clean(pipe)
    cfg = load_config(None, ["model.id=tiny-wan21", *SMALL, f"output.root={tmp_path}", "attention.threshold=0.5"])
    result = run_attn_report(cfg, pipeline=pipe, output=tmp_path / "r", probe_dense=False, log=lambda m: None)
    assert len(captured) == 2  # true CFG: the conditional and the unconditional forward, pooled in one record
    err2 = ref2 = kept = 0.0
    for q, k, v in captured:
        mask = select_blocks64(
            antidiagonal_block_scores64(q, k, stride=4, block_size=16, causal=False), threshold=0.5, causal=False
        )
        sparse64 = block_sparse_attention64(q, k, v, mask, block_size=16, causal=False)
        dense64 = block_sparse_attention64(q, k, v, torch.ones_like(mask), block_size=16, causal=False)
        err2 = err2 + (sparse64 - dense64).pow(2).sum((0, 2, 3))
        ref2 = ref2 + dense64.pow(2).sum((0, 2, 3))
        kept = kept + mask.double().mean(dim=(0, 2, 3))
    step = result.report["steps"][1]
    row = step["layers"].index(1)
    np.testing.assert_allclose(step["density"][row], (kept / 2).numpy(), rtol=1e-6)
    np.testing.assert_allclose(step["rel_error"][row], (err2 / ref2).sqrt().numpy(), rtol=2e-3, atol=1e-6)
    assert (err2 / ref2).sqrt().max() > 1e-3  # the check has something to compare
    assert result.report["steps"][0]["probe_density"] is None  # --no-probe


def test_report_mode_leaves_the_generation_unchanged():
    pipe = pipeline("wan21")
    session = xattn_video.enable(pipe, threshold=LOW_THRESHOLD, warmup_steps=1, **SPARSE)
    plain = generate(pipe, "wan21")
    probe = session.start_probe()
    recorded = generate(pipe, "wan21")
    assert session.stop_probe() is probe and session.probe is None
    session.disable()
    torch.testing.assert_close(recorded, plain, atol=0, rtol=0)
    modes = {cell.mode for cell in probe.cells.values()}
    assert modes == {"dense", "sparse"} and all(
        cell.probe.samples for cell in probe.cells.values() if cell.mode == "dense"
    )


def test_min_len_leaving_nothing_to_report_is_one_line(tmp_path, capsys):
    args = ["attn-report", "model.id=tiny-wan21", *SMALL[:-1], f"output.root={tmp_path}"]  # default min_len
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"attention.min_len = {DEFAULT_MIN_LEN} is not allowed here: every self-attention call" in err
    assert "set attention.min_len to at most 288" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------ select_blocks


class FixedBlocks(XAttnSession):
    """A session whose block choice is a given mask (the override point benchmarks use)."""

    def __init__(self, mask: torch.Tensor, **kwargs):
        super().__init__(**kwargs)
        self.mask = mask

    def select_blocks(self, q, k, *, scale=None):
        return BlockSelection(self.mask, *compact_blocks(self.mask))


def test_select_blocks_override_chooses_the_blocks():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 96, 2, 16, generator=g) for _ in range(3))  # [B, S, H, D]: 6 blocks of 16
    mask = torch.rand(1, 2, 6, 6, generator=g) < 0.4
    mask[..., 0] = True  # every row keeps a block
    session = FixedBlocks(mask, threshold=LOW_THRESHOLD, **SPARSE)
    activate(ForwardState(session, StepPosition(0, 0, 1.0), False))
    try:
        out = xattn_backend(q, k, v)
    finally:
        deactivate()
    expected = block_sparse_attention64(*(t.transpose(1, 2) for t in (q, k, v)), mask, block_size=16, causal=False)
    torch.testing.assert_close(out.transpose(1, 2).double(), expected, atol=1e-5, rtol=1e-5)
    assert session.stats["totals"]["density"] == pytest.approx(mask.double().mean().item())


def test_default_min_len_is_between_the_measured_lengths():
    # docs/benchmarks.md: a sparse call is 1.37x native at 8,192 tokens and 0.68x at 16,384 (H200, t=0.9)
    assert 8192 < DEFAULT_MIN_LEN <= 16384 and XAttnSession().min_len == DEFAULT_MIN_LEN
