"""`xattn-video attn-report` on the tiny pipeline: the report and plots, and the recorded density and error
against an independent float64 computation on one captured q/k/v."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from reference64 import antidiagonal_block_scores64, block_sparse_attention64, select_blocks64
from xattn_video import cli
from xattn_video.diffusion.hunyuan import XAttnProcessor
from xattn_video.pipelines.attn_report import run_attn_report
from xattn_video.pipelines.generate_config import ConfigError, load_config

# 64x64 pixels, 5 frames, 2 steps: 128 video tokens (+ text) in 16-token blocks; step 0 dense (warmup), step 1 sparse
SMALL = ["video.height=64", "video.width=64", "video.frames=5", "video.steps=2", "attention.block_size=16",
         "attention.stride=4", "attention.warmup_steps=1", "progress=false"]


@pytest.fixture(scope="module")
def pipe():
    from xattn_video.testing.tiny import build_tiny_hunyuan_pipeline

    return build_tiny_hunyuan_pipeline(seed=0)


def test_report_and_plots_for_the_tiny_default(tmp_path, capsys):
    out = tmp_path / "report"
    assert cli.main(["attn-report", *SMALL, f"output.root={tmp_path / 'run'}", "--output", str(out)]) == 0
    report = json.loads((out / "attn_report.json").read_text())
    assert [s["mode"] for s in report["summary"]] == ["dense", "sparse"]
    layers, heads = report["num_layers"], report["num_heads"]
    assert layers == len(report["layer_kinds"]) > 0 and heads > 0
    dense, sparse = report["steps"]
    assert np.array(dense["density"]).shape == (layers, heads)
    np.testing.assert_array_equal(dense["density"], 1.0)
    np.testing.assert_array_equal(dense["rel_error"], 0.0)
    probe_d, probe_e = np.array(dense["probe_density"]), np.array(dense["probe_rel_error"])
    assert probe_d.shape == (layers, heads) and np.all((probe_d > 0) & (probe_d <= 1)) and np.all(probe_e >= 0)
    d, e = np.array(sparse["density"]), np.array(sparse["rel_error"])
    assert d.shape == e.shape == (layers, heads)
    assert np.all((d > 0) & (d <= 1)) and d.min() < 1.0  # really sparse somewhere
    assert np.all(e >= 0) and e.max() > 0 and np.all(e[d == 1.0] < 1e-5)  # all blocks kept: dense up to rounding
    assert sparse["probe_density"] is None
    assert report["summary"][1]["density"]["mean"] == pytest.approx(d.mean())
    assert report["summary"][1]["rel_error"]["max"] == pytest.approx(e.max())
    assert report["variant"]["name"] == "xattn" and report["variant"]["threshold"] == 0.9
    import imageio.v2 as imageio

    for name in ("density_layer_head.png", "error_layer_head.png", "error_vs_step.png", "density_vs_step.png",
                 "density_layer_step.png", "error_layer_step.png"):
        image = imageio.imread(out / name)
        assert image.ndim == 3 and min(image.shape[:2]) > 100, name
    assert (out / "video.mp4").stat().st_size > 0
    md = (out / "attn_report.md").read_text()
    assert "| 1 |" in md and "sparse" in md
    printed = capsys.readouterr().out
    assert "sparse" in printed and f"{d.mean():.3f}" in printed


def test_layer_step_matrix_uses_the_probe_on_dense_steps():
    from xattn_video.pipelines.attn_report import layer_step_matrix

    steps = [{"layers": [0, 1], "layer_modes": ["dense", "dense"], "density": [[1, 1], [1, 1]],
              "probe_density": [[0.5, 0.7], [0.2, 0.4]]},
             {"layers": [0, 1], "layer_modes": ["sparse", "dense"], "density": [[0.1, 0.3], [1, 1]],
              "probe_density": None}]
    m = layer_step_matrix(steps, "density", "probe_density")
    np.testing.assert_allclose(m[:, 0], [0.6, 0.3])
    assert m[0, 1] == pytest.approx(0.2) and np.isnan(m[1, 1])  # a dense layer of a sparse step, no probe: blank


def test_recorded_error_equals_an_independent_computation(tmp_path, pipe, monkeypatch):
    captured = {}
    original = XAttnProcessor.sparse_attention

    def capture(self, q, k, v, out=None):
        key = getattr(self, "_current", None)
        if key is not None and key[0][1:] == (1, 2) and "qkv" not in captured:  # step 1, layer 2
            valid = k.shape[2]  # q may carry the padded text queries after the valid segment
            captured["qkv"] = tuple(t[:, :, :valid].detach().clone() for t in (q, k, v))
        return original(self, q, k, v, out=out)

    monkeypatch.setattr(XAttnProcessor, "sparse_attention", capture)
    cfg = load_config(None, [*SMALL, f"output.root={tmp_path}", "attention.threshold=0.8"])
    result = run_attn_report(cfg, pipeline=pipe, output=tmp_path / "r", probe_dense=False, log=lambda m: None)
    q, k, v = captured["qkv"]
    assert q.shape[0] == 1  # one call per step and layer in this config: the record is this call alone
    scores = antidiagonal_block_scores64(q, k, stride=4, block_size=16, causal=False)
    mask = select_blocks64(scores, threshold=0.8, causal=False)
    sparse64 = block_sparse_attention64(q, k, v, mask, block_size=16, causal=False)
    dense64 = block_sparse_attention64(q, k, v, torch.ones_like(mask), block_size=16, causal=False)
    want_error = ((sparse64 - dense64).pow(2).sum((0, 2, 3)) / dense64.pow(2).sum((0, 2, 3))).sqrt()
    want_density = mask.double().mean(dim=(0, 2, 3))
    step = result.report["steps"][1]
    row = step["layers"].index(2)
    np.testing.assert_allclose(step["density"][row], want_density.numpy(), rtol=1e-6)  # float32 counts
    np.testing.assert_allclose(step["rel_error"][row], want_error.numpy(), rtol=2e-3, atol=1e-6)
    assert want_error.max() > 1e-3  # the check has something to compare
    assert result.report["steps"][0]["probe_density"] is None  # --no-probe


def test_processors_are_restored_after_the_report(tmp_path, pipe):
    before = {name: type(p) for name, p in pipe.transformer.attn_processors.items()}
    cfg = load_config(None, [*SMALL, f"output.root={tmp_path}"])
    run_attn_report(cfg, pipeline=pipe, output=tmp_path / "r", log=lambda m: None)
    assert {name: type(p) for name, p in pipe.transformer.attn_processors.items()} == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--variant", "dense"], "it is a dense variant"),
        (["--variant", "nope"], "--variant 'nope' is not allowed"),
        (["--prompt-index", "7"], "--prompt-index 7 is not allowed: the config has 2 prompts"),
        (["attention.select=[dense]"], "the config has no xattn variant"),
        (["attention.threshold=2"], "attention.threshold"),
    ],
)
def test_usage_errors(tmp_path, capsys, args, message):
    code = cli.main(["attn-report", *SMALL, f"output.root={tmp_path}", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_print_config_loads_nothing(capsys):
    assert cli.main(["attn-report", "--print-config", "video.steps=3"]) == 0
    assert "steps: 3" in capsys.readouterr().out


def test_config_errors_are_config_errors():
    cfg = load_config(None, SMALL)
    with pytest.raises(ConfigError, match="one of the config's variants"):
        run_attn_report(cfg, variant="missing", log=lambda m: None)
