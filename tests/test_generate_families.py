"""``generate`` on every model family: the family read from the pipeline, the call in its vocabulary, one-line
refusals of settings a family cannot take, and the tiny Wan 2.1 pipeline end to end (mp4 files, sidecars,
quality) with its result checked against a direct pipeline call."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from xattn_video import cli
from xattn_video.pipelines import generate_models
from xattn_video.pipelines.generate import initial_latents, run_generate
from xattn_video.pipelines.generate_config import ConfigError, load_config
from xattn_video.pipelines.generate_models import (
    call_kwargs,
    check_family_settings,
    classify,
    family_of,
    load_pipeline,
)
from xattn_video.pipelines.video_io import read_video
from xattn_video.testing.tiny_pipelines import FAMILIES, build_tiny_pipeline, tiny_image

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SMALL = ["video.height=128", "video.width=192", "video.frames=9", "video.steps=2", "video.fps=8", "progress=false",
         "attention.block_size=16", "attention.stride=4", "attention.warmup_steps=1", "attention.min_len=16"]


pytestmark = pytest.mark.usefixtures("one_thread")


def config(*overrides: str, family: str = "wan21"):
    return load_config(None, [f"model.id=tiny-{family}", *SMALL, *overrides])


# ------------------------------------------------------------------------------------------------- families


@pytest.mark.parametrize(("class_name", "index", "family"), [
    # model_index.json as the hub repos write them
    ("HunyuanVideoPipeline", {"transformer": ["diffusers", "HunyuanVideoTransformer3DModel"]}, "hunyuan"),
    ("HunyuanVideo15Pipeline", {"guider": ["diffusers", "ClassifierFreeGuidance"]}, "hunyuan15"),
    ("WanPipeline", {"transformer": ["diffusers", "WanTransformer3DModel"]}, "wan21"),
    ("WanPipeline", {"boundary_ratio": 0.875, "transformer": ["diffusers", "WanTransformer3DModel"],
                     "transformer_2": ["diffusers", "WanTransformer3DModel"]}, "wan22_a14b"),
    ("WanPipeline", {"boundary_ratio": None, "transformer_2": [None, None]}, "wan21"),
    ("WanPipeline", {"expand_timesteps": True, "boundary_ratio": None}, "wan22_ti2v"),
    ("WanImageToVideoPipeline", {"expand_timesteps": True}, "wan22_ti2v"),
])
def test_classify_model_index(class_name, index, family):
    assert classify(class_name, index) == family


@pytest.mark.parametrize("class_name", ["CogVideoXPipeline", "WanImageToVideoPipeline", "FluxPipeline"])
def test_unsupported_pipeline_one_line(class_name):
    with pytest.raises(ConfigError, match=rf"^model.id: pipeline {class_name} is not allowed: generate runs "
                                          r"HunyuanVideo \(hunyuan\), .*Wan 2.2 TI2V \(wan22_ti2v\)$"):
        classify(class_name, {})


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_of_tiny_pipelines(family):
    assert family_of(build_tiny_pipeline(family)) == family
    model = load_config(None, [f"model.id=tiny-{family}"]).model
    assert generate_models.family_of_model(model) == family


def test_ti2v_class_follows_the_image(tmp_path):
    image = tmp_path / "first.png"
    tiny_image(256, 384).save(image)
    cfg = config(f"video.image={image}", "video.height=256", "video.width=384", family="wan22_ti2v")
    i2v = load_pipeline(cfg.model, "cpu", cfg.video)
    t2v = load_pipeline(cfg.model, "cpu", config(family="wan22_ti2v").video)
    assert type(i2v).__name__ == "WanImageToVideoPipeline" and type(t2v).__name__ == "WanPipeline"
    for pipe in (i2v, t2v):
        assert pipe.config.expand_timesteps is True and family_of(pipe) == "wan22_ti2v"


def test_vae_dtype_and_flow_shift():
    cfg = config("model.vae_dtype=bfloat16", "model.transformer_dtype=bfloat16", "video.flow_shift=7.5",
                 family="wan22_a14b")
    pipe = load_pipeline(cfg.model, "cpu", cfg.video)
    assert pipe.vae.dtype == torch.bfloat16
    assert pipe.transformer.dtype == pipe.transformer_2.dtype == torch.bfloat16
    assert pipe.text_encoder.dtype == torch.float32
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    assert pipe.scheduler.config.flow_shift == 7.5
    assert pipe.scheduler.config.use_flow_sigmas  # the rest of the scheduler config is kept


# ------------------------------------------------------------------------------------------ call arguments


def test_call_kwargs_per_family():
    latents = torch.zeros(1)
    hunyuan = call_kwargs(None, "hunyuan", config(family="hunyuan"), "p", latents)
    assert hunyuan["true_cfg_scale"] == 1.0 and hunyuan["max_sequence_length"] == 256
    wan = call_kwargs(None, "wan21", config(), "p", latents)
    assert "true_cfg_scale" not in wan and "guidance_scale_2" not in wan and wan["max_sequence_length"] == 512
    a14b = call_kwargs(None, "wan22_a14b", config("video.guidance_scale_2=3.0", family="wan22_a14b"), "p", latents)
    assert a14b["guidance_scale_2"] == 3.0
    hv15 = call_kwargs(None, "hunyuan15", config(family="hunyuan15"), "p", latents)
    assert not {"guidance_scale", "max_sequence_length", "true_cfg_scale"} & set(hv15)


def test_hunyuan15_guidance_reaches_the_guider(tmp_path):
    pipe = build_tiny_pipeline("hunyuan15")
    cfg = config("video.guidance_scale=3.5", f"output.root={tmp_path}", "attention.select=[stock]",
                 "attention.variants.stock.mode=stock", family="hunyuan15")
    result = run_generate(cfg, pipeline=pipe, log=lambda m: None)
    assert result.ok
    assert pipe.guider.guidance_scale == 3.5
    sidecar = json.loads(next((tmp_path / "meta" / "stock").glob("*.json")).read_text())
    assert len(sidecar["timing"]["step_s"]) == 2  # steps timed without a step-end callback


@pytest.mark.parametrize(("family", "override", "message"), [
    ("wan21", "video.true_cfg_scale=2.0 video.negative_prompt=x",
     r"^video.true_cfg_scale = 2.0 is not allowed for Wan 2.1 T2V: true CFG"),
    ("wan21", "video.guidance_scale_2=3.0", r"^video.guidance_scale_2 = 3.0 is not allowed for Wan 2.1 T2V"),
    ("hunyuan", "video.guidance_scale_2=3.0", r"^video.guidance_scale_2 = 3.0 is not allowed for HunyuanVideo:"),
    ("hunyuan15", "video.max_sequence_length=128", r"^video.max_sequence_length = 128 is not allowed for "
                                                   r"HunyuanVideo 1.5"),
    ("hunyuan15", "output.keep_latents=true", r"^output.keep_latents = true is not allowed for HunyuanVideo 1.5"),
    ("wan22_ti2v", "video.width=208", r"^video.width = 208 is not allowed for Wan 2.2 TI2V: a multiple of 32"),
    ("hunyuan", "attention.min_len=64", r"^attention.min_len = 64 is not allowed for HunyuanVideo: it runs"),
    ("hunyuan", "attention.min_len=null attention.variants.xattn.min_len=64",
     r"^attention.variants.xattn.min_len = 64 is not allowed for HunyuanVideo"),
])
def test_family_refusals_one_line(family, override, message):
    cfg = config(*override.split(), family=family)
    with pytest.raises(ConfigError, match=message) as info:
        check_family_settings(family, cfg)
    assert "\n" not in str(info.value)


def test_image_for_a_text_family_is_refused(tmp_path):
    image = tmp_path / "first.png"
    tiny_image(128, 192).save(image)
    with pytest.raises(ConfigError, match=r"^video.image = .* is not allowed for Wan 2.1 T2V: it generates from "
                                          r"text only"):
        check_family_settings("wan21", config(f"video.image={image}"))


def test_unknown_tiny_id_one_line():
    with pytest.raises(ConfigError, match=r"^model.id = 'tiny-wan3' is not allowed: one of the tiny models tiny, "):
        load_config(None, ["model.id=tiny-wan3"])


def test_refused_before_any_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(generate_models, "load_pipeline", lambda *a: pytest.fail("loaded"))
    cfg = config("video.true_cfg_scale=2.0", "video.negative_prompt=bad", f"output.root={tmp_path}")
    with pytest.raises(ConfigError, match="true_cfg_scale"):
        run_generate(cfg, log=lambda m: None)


# --------------------------------------------------------------------------------------- Wan 2.1 end to end


def test_wan21_end_to_end_videos_sidecars_and_quality(tmp_path, capsys):
    root = tmp_path / "run"
    args = ["generate", *SMALL, "model.id=tiny-wan21", f"output.root={root}", "prompts=[a cat walks]",
            "attention.variants.stock.mode=stock", "output.keep_latents=true", "video.negative_prompt=blurry"]
    assert cli.main(args) == 0
    cfg = config(f"output.root={root}", "prompts=[a cat walks]", "attention.variants.stock.mode=stock",
                 "output.keep_latents=true", "video.negative_prompt=blurry")
    name = "0000_a-cat-walks_seed0_0"
    sidecars = {}
    for variant in ("dense", "xattn", "stock"):
        frames = read_video(root / variant / f"{name}.mp4")
        assert tuple(frames.shape) == (9, 128, 192, 3)
        sidecars[variant] = json.loads((root / "meta" / variant / f"{name}.json").read_text())
        assert len(sidecars[variant]["timing"]["step_s"]) == 2
    assert sidecars["stock"]["attention_stats"] is None
    dense, xattn = sidecars["dense"]["attention_stats"], sidecars["xattn"]["attention_stats"]
    assert dense["mode_per_step"] == ["dense", "dense"] and dense["density"] == 1.0
    assert xattn["mode_per_step"] == ["dense", "sparse"]  # warmup_steps=1, min_len=16: the backend ran sparse
    assert 0 < xattn["sparse_density"] < 1 and xattn["settings"]["min_len"] == 16
    assert len(xattn["density_per_layer"][1]) == 2  # both transformer blocks recorded
    # the stock video is the pipeline itself: a direct call with the same noise gives the same latents
    pipe = build_tiny_pipeline("wan21")
    direct = pipe(prompt="a cat walks", negative_prompt="blurry", height=128, width=192, num_frames=9,
                  num_inference_steps=2, guidance_scale=cfg.video.guidance_scale, max_sequence_length=512,
                  latents=initial_latents(pipe, cfg, 0, 0), output_type="latent").frames
    kept = torch.load(root / "meta" / "stock" / f"{name}.latents.pt")
    torch.testing.assert_close(kept, direct, rtol=0, atol=0)
    # and the dense baseline of the backend matches stock up to float rounding
    dense_latents = torch.load(root / "meta" / "dense" / f"{name}.latents.pt")
    torch.testing.assert_close(dense_latents, direct, rtol=1e-4, atol=1e-5)
    # quality reads the run like any other
    capsys.readouterr()
    assert cli.main(["quality", str(root), "--no-plots"]) == 0
    report = json.loads((root / "quality" / "quality.json").read_text())
    assert set(report["candidates"]) == {"xattn", "stock"}
    assert report["candidates"]["xattn"]["generation"]["sparse_density"] == pytest.approx(xattn["sparse_density"])


def test_a14b_steps_timed_across_both_experts(tmp_path):
    cfg = config(f"output.root={tmp_path}", "video.steps=4", "attention.select=[stock]",
                 "attention.variants.stock.mode=stock", family="wan22_a14b")
    result = run_generate(cfg, log=lambda m: None)
    assert result.ok
    sidecar = json.loads(next((tmp_path / "meta" / "stock").glob("*.json")).read_text())
    assert len(sidecar["timing"]["step_s"]) == 4 and all(s > 0 for s in sidecar["timing"]["step_s"])


# ------------------------------------------------------------------------------------------ shipped configs


@pytest.mark.parametrize("path", sorted(p.name for p in CONFIGS.glob("*.yaml") if "videomme" not in p.name))
def test_shipped_generate_configs_validate(path, capsys):
    assert cli.main(["generate", str(CONFIGS / path), "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "model:" in printed and "attention:" in printed
