"""The Wan fixture family on the CPU at tiny size: bench/train_fixture.py --family wan trains and saves a
WanTransformer3DModel, load_fixture loads it through WanTransformer3DModel.from_pretrained, generate samples it
deterministically, and the xattn backend on it equals stock diffusers attention at threshold 1.0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from bench_scripts import load_bench_script
from diffusers import WanTransformer3DModel

import xattn_video
from xattn_video.testing.fixture import (
    WAN_TRANSFORMER_CONFIG,
    CaptionEncoder,
    generate,
    load_fixture,
    transformer_inputs,
)
from xattn_video.testing.procedural import sample_specs

TINY = '{"num_attention_heads": 2, "num_layers": 2, "ffn_dim": 64, "freq_dim": 32}'
ARGS = [
    *"--family wan --frames 2 --size 16 --small-frames 2 --small-size 8 --batch 2 --samples 1 --device cpu".split(),
    *["--warmup", "2", "--config-json", TINY],
]
# 4 frames of 32x32 px: 4 x 8 x 8 = 256 video tokens, sixteen 16-token blocks (min_len 16: every call sparse)
SIZE = dict(frames=4, height=32, width=32, steps=3)
SPARSE = dict(stride=4, block_size=16, min_len=16)
CAPTION = sample_specs(1, 77_000)[0].caption


@pytest.fixture(scope="module")
def train_fixture():
    return load_bench_script("train_fixture")


@pytest.fixture(scope="module")
def trained(train_fixture, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fixture_wan")
    assert train_fixture.main(["--out", str(out), "--seconds", "1.5", *ARGS]) == 0
    return out


@pytest.fixture(scope="module")
def fixture(trained):
    return load_fixture(trained / "fixture_model")


def test_wan_config_is_the_hunyuan_fixtures_size_and_small():
    model = WanTransformer3DModel(**WAN_TRANSFORMER_CONFIG)
    assert model.config.num_attention_heads * model.config.attention_head_dim == 192
    assert 2 * sum(p.numel() for p in model.parameters()) <= 10_000_000  # float16 bytes


def test_training_records_the_family_and_loads_through_from_pretrained(trained, monkeypatch):
    config = json.loads((trained / "fixture_model" / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "WanTransformer3DModel" and config["num_layers"] == 2
    log = json.loads((trained / "train_log.json").read_text())
    assert log["family"] == "wan" and log["total_steps"] > 0
    calls = []
    original = WanTransformer3DModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(args[0])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(WanTransformer3DModel, "from_pretrained", classmethod(spy))
    loaded = load_fixture(trained / "fixture_model")
    assert calls == [trained / "fixture_model" / "transformer"]
    assert isinstance(loaded.transformer, WanTransformer3DModel) and loaded.family == "wan"
    checkpoint = torch.load(trained / "checkpoint.pt", weights_only=False)
    for name, tensor in loaded.transformer.state_dict().items():  # float16 storage of the trained weights
        torch.testing.assert_close(tensor, checkpoint["transformer"][name].half().float(), atol=0, rtol=0)


def test_a_checkpoint_of_the_other_family_is_refused(train_fixture, trained, tmp_path):
    hunyuan = [a for a in ARGS if a not in ("--family", "wan", TINY)]
    hunyuan = [a for a in hunyuan if a != "--config-json"]
    with pytest.raises(SystemExit, match=r"another transformer config \(--family wan"):
        train_fixture.main(["--out", str(trained), "--seconds", "5", *hunyuan])
    with pytest.raises(SystemExit, match=r"unknown fields \['mlp_ratio'\]; accepted: patch_size"):
        train_fixture.main(["--out", str(tmp_path), *ARGS[:-1], '{"mlp_ratio": 2}'])
    config = trained / "fixture_model" / "transformer" / "config.json"
    (tmp_path / "bad" / "transformer").mkdir(parents=True)
    (tmp_path / "bad" / "transformer" / "config.json").write_text(
        config.read_text().replace("WanTransformer3DModel", "MochiTransformer3DModel")
    )
    with pytest.raises(ValueError, match="_class_name='MochiTransformer3DModel'; accepted: HunyuanVideo"):
        load_fixture(tmp_path / "bad")


def test_wan_gets_zero_padded_captions_without_mask():
    encoder = CaptionEncoder()
    text, mask, pooled = encoder(["red square still on plain", ""])
    model = WanTransformer3DModel(**dict(WAN_TRANSFORMER_CONFIG, num_layers=1))
    inputs = transformer_inputs(model, text, mask, pooled)
    assert set(inputs) == {"encoder_hidden_states"} and inputs["encoder_hidden_states"].shape == (2, 24, 64)
    padded = inputs["encoder_hidden_states"][mask == 0]
    assert padded.shape[0] == 2 * 24 - 5 - 1 and torch.count_nonzero(padded) == 0
    assert torch.count_nonzero(inputs["encoder_hidden_states"][mask == 1].abs().sum(-1)) == 6


def test_generation_is_deterministic(fixture):
    first = generate(fixture, [CAPTION], [0], **SIZE)
    assert first.shape == (1, 4, 32, 32, 3) and 0 <= first.min() and first.max() <= 1
    torch.testing.assert_close(generate(fixture, [CAPTION], [0], **SIZE), first, atol=0, rtol=0)
    assert (generate(fixture, [CAPTION], [1], **SIZE) - first).abs().max() > 1e-3
    with pytest.raises(ValueError, match="multiples of the patch size 4"):
        generate(fixture, [CAPTION], [0], frames=2, height=30, width=32)


def test_generation_in_bfloat16_follows_float32(trained, fixture):
    """Wan keeps some modules in float32 (its first parameter, scale_shift_table, is one): the fixture's dtype is
    diffusers' (the first one outside them), so the inputs go in as bfloat16, as the GPU tables run it."""
    half = load_fixture(trained / "fixture_model", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    video = generate(half, [CAPTION], [0], **SIZE)
    reference = generate(fixture, [CAPTION], [0], **SIZE)
    assert (video - reference).abs().mean() < 0.05


def test_xattn_backend_equals_stock_at_threshold_one_and_goes_sparse_below(fixture):
    stock = generate(fixture, [CAPTION], [0], **SIZE)  # diffusers' default attention
    session = xattn_video.enable(fixture.transformer, integration="backend", threshold=1.0, **SPARSE)
    try:
        full = generate(fixture, [CAPTION], [0], **SIZE)
        steps = session.stats["generations"][0]["steps"]
        assert [(s["mode"], s["density"]) for s in steps] == [("sparse", 1.0)] * SIZE["steps"]
        torch.testing.assert_close(full, stock, atol=2e-5, rtol=1e-5)

        session = xattn_video.enable(fixture.transformer, integration="backend", threshold=0.3, **SPARSE)
        sparse = generate(fixture, [CAPTION], [0], **SIZE)
        steps = session.stats["generations"][0]["steps"]
        assert [s["mode"] for s in steps] == ["sparse"] * SIZE["steps"]
        assert all(s["density"] < 1.0 for s in steps)
        assert (sparse - stock).abs().max() > 1e-4
        assert session.stats["native_calls"] == {"cross_attention": 2 * SIZE["steps"]}  # layers x steps
    finally:
        session.disable()
    torch.testing.assert_close(generate(fixture, [CAPTION], [0], **SIZE), stock, atol=0, rtol=0)


def test_the_quality_table_runs_on_a_wan_fixture(trained, tmp_path):
    """bench/fixture_quality.py --fixture on a Wan fixture: the dense rerun is bit-identical, threshold 1.0 through
    the xattn backend is stock diffusers' video to uint8 rounding, a low threshold keeps fewer blocks."""
    quality = load_bench_script("fixture_quality")
    out = tmp_path / "quality_wan"
    args = [
        *["--out", str(out), "--fixture", str(trained / "fixture_model")],
        *"--device cpu --dtype float32 --prompts 1 --seeds 0 --steps 3 --frames 4 --size 32 --block-size 16".split(),
        *"--thresholds 0.3 --strides 4 --warmups 0 --orders raster --min-len 16 --no-report".split(),
    ]
    assert quality.main(args) == 0
    data = json.loads((out / "quality.json").read_text())
    assert data["meta"]["family"] == "wan" and data["meta"]["min_len"] == 16
    rows = {r["setting"]["name"]: r["summary"] for r in data["rows"]}
    assert rows["dense rerun"]["psnr"]["mean"] == float("inf")
    assert rows["xattn t=1.0 s=8 w=0 raster"]["psnr"]["mean"] > 50  # equal to stock up to float rounding
    assert rows["xattn t=1.0 s=8 w=0 raster"]["sparse_density"]["mean"] == 1.0
    assert rows["xattn t=0.3 s=4 w=0% raster"]["sparse_density"]["mean"] < 1.0
    assert "the wan fixture in" in out.with_suffix(".md").read_text()
