"""bench/train_fixture.py resumes: a second run into the same --out goes on from the first run's checkpoint (step,
weights, optimiser, seconds trained) instead of starting over, and refuses a checkpoint of another model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from bench_scripts import load_bench_script

from xattn_video.testing.fixture import load_fixture

TINY = '{"num_attention_heads": 2, "num_layers": 1, "num_single_layers": 1, "num_refiner_layers": 1}'
ARGS = ["--frames", "2", "--size", "16", "--small-frames", "2", "--small-size", "8", "--batch", "2", "--samples", "1",
        "--device", "cpu", "--warmup", "2", "--config-json", TINY]


@pytest.fixture(scope="module")
def train_fixture():
    return load_bench_script("train_fixture")


def run(module, out: Path, seconds: float, *extra: str) -> dict:
    assert module.main(["--out", str(out), "--seconds", str(seconds), *ARGS, *extra]) == 0
    return torch.load(out / module.CHECKPOINT, weights_only=False)


def test_a_second_run_resumes_where_the_first_stopped(train_fixture, tmp_path):
    first = run(train_fixture, tmp_path, 1.0)
    assert first["step"] > 0 and first["seconds"] >= 1.0
    weights = {k: v.clone() for k, v in first["transformer"].items()}

    second = run(train_fixture, tmp_path, 2.5)
    assert second["step"] > first["step"] and second["seconds"] >= 2.5
    assert second["seconds"] < first["seconds"] + 2.5 + 1.0  # the budget counts the first run's seconds
    assert any(not torch.equal(weights[k], v) for k, v in second["transformer"].items())  # it trained on
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert log["resumed"] == [{"step": first["step"], "seconds": round(first["seconds"], 2)}]
    steps = [e["step"] for e in log["steps"]]
    assert steps == sorted(set(steps)) and steps[0] == 1  # one log, the first run's steps kept
    assert load_fixture(tmp_path / "fixture_model").transformer.config.num_attention_heads == 2

    again = run(train_fixture, tmp_path, 2.5)  # the budget is spent: nothing more to train
    assert again["step"] == second["step"]
    restarted = run(train_fixture, tmp_path, 0.5, "--restart")
    assert restarted["step"] < second["step"] and "resumed" not in restarted["log"]


def test_a_checkpoint_of_another_model_is_refused(train_fixture, tmp_path):
    run(train_fixture, tmp_path, 0.5)
    other = [a if a != TINY else TINY.replace('"num_layers": 1', '"num_layers": 2') for a in ARGS]
    with pytest.raises(SystemExit, match="another transformer config"):
        train_fixture.main(["--out", str(tmp_path), "--seconds", "1", *other])


def test_init_starts_from_a_fixtures_weights_and_refuses_another_config(train_fixture, tmp_path):
    run(train_fixture, tmp_path / "base", 0.5)
    base = load_fixture(tmp_path / "base" / "fixture_model")
    tuned = run(train_fixture, tmp_path / "tuned", 0.0, "--init", str(tmp_path / "base" / "fixture_model"))
    assert tuned["step"] == 0  # no time to train: the saved weights are the init's, bit for bit (float16 both)
    for name, value in load_fixture(tmp_path / "tuned" / "fixture_model").transformer.state_dict().items():
        assert torch.equal(value, base.transformer.state_dict()[name]), name
    fresh = run(train_fixture, tmp_path / "fresh", 0.0)
    assert any(not torch.equal(v, base.transformer.state_dict()[k].float()) for k, v in fresh["transformer"].items())
    other = [a if a != TINY else TINY.replace('"num_layers": 1', '"num_layers": 2') for a in ARGS]
    with pytest.raises(SystemExit, match="not this run's config"):
        train_fixture.main(
            ["--out", str(tmp_path / "x"), "--seconds", "0", *other, "--init", str(tmp_path / "base" / "fixture_model")]
        )
