"""`xattn-video generate` configuration and planning: layering, validation errors, naming, work splitting.

No model loads here: everything in this file is what the command checks before it loads one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from xattn_video.pipelines.generate_config import (
    DEFAULT_YAML,
    VBENCH_NAMING,
    ConfigError,
    load_config,
    to_yaml,
)
from xattn_video.pipelines.generate_plan import (
    Layout,
    dist_env,
    job_state,
    plan_jobs,
    read_prompt_file,
    read_vbench_prompts,
    resolve_prompts,
    shard,
    slugify,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


# ------------------------------------------------------------------------------------------ shipped configs


def test_embedded_default_equals_configs_tiny():
    embedded = load_config()
    shipped = load_config(CONFIGS / "tiny.yaml")
    assert embedded == shipped
    assert embedded.resolved == shipped.resolved
    assert OmegaConf.to_container(OmegaConf.create(DEFAULT_YAML)) == OmegaConf.to_container(
        OmegaConf.load(CONFIGS / "tiny.yaml")
    )
    assert embedded.model.id == "tiny"
    assert {v.mode for v in embedded.variants} == {"dense", "xattn"}


@pytest.mark.parametrize("name,height,width", [("hunyuan_544x960", 544, 960), ("hunyuan_720x1280", 720, 1280)])
def test_hunyuan_configs(name, height, width):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert (cfg.video.height, cfg.video.width, cfg.video.frames, cfg.video.steps) == (height, width, 129, 50)
    assert cfg.model.id == "hunyuanvideo-community/HunyuanVideo"
    modes = {v.name: v for v in cfg.variants}
    assert modes["dense"].mode == "dense"
    sparse = [v for v in cfg.variants if v.mode == "xattn"]
    assert sorted(v.threshold for v in sparse) == [0.9, 0.95]
    assert all(v.stride == 8 and v.warmup_steps == 5 and v.block_size == 128 for v in sparse)
    # the tiny default's variant names must not leak into a config that names its own
    assert "xattn" not in modes
    assert cfg.output.root == f"outputs/{name}"


def test_configs_are_documented():
    for path in CONFIGS.glob("*.yaml"):
        text = path.read_text()
        assert text.lstrip().startswith("#"), f"{path.name} has no header comment"
        assert text.count("#") > 15, f"{path.name} is barely commented"


# ------------------------------------------------------------------------------------------------ overrides


def test_overrides_layer_over_the_file(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(
        "video: {steps: 7}\n"
        "attention:\n"
        "  variants:\n"
        "    base: {mode: dense}\n"
        "    fast: {mode: xattn, threshold: 0.8}\n"
        "    slow: {mode: xattn}\n"
    )
    cfg = load_config(cfg_file, ["attention.threshold=0.95", "seeds=[0,1]", "attention.variants.slow.stride=16"])
    assert cfg.video.steps == 7  # from the file
    assert cfg.video.height == 128  # from the embedded default
    assert cfg.seeds == (0, 1)
    v = {x.name: x for x in cfg.variants}
    assert set(v) == {"base", "fast", "slow"}  # the file's variants replace the default ones
    assert v["fast"].threshold == 0.8  # a variant's own value beats the shared one
    assert v["slow"].threshold == 0.95 and v["slow"].stride == 16
    assert cfg.resolved["attention"]["threshold"] == 0.95


def test_override_every_variant_shadows_warns_in_one_line(capsys):
    """On the 720p config every xattn variant sets its own threshold: attention.threshold=0.95 changes nothing,
    and says so in one line naming the key that works; that key does change the variant; where a variant
    inherits the shared value (the tiny default) there is no warning."""
    cfg = load_config(CONFIGS / "hunyuan_720x1280.yaml", ["attention.threshold=0.95"])
    assert {v.name: v.threshold for v in cfg.variants if v.mode == "xattn"} == {"xattn_t090": 0.9, "xattn_t095": 0.95}
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "attention.threshold=0.95" in err[0] and "changes nothing" in err[0]
    suggested = err[0].rsplit("e.g. ", 1)[1]
    assert suggested == "attention.variants.xattn_t090.threshold=0.95"
    fixed = load_config(CONFIGS / "hunyuan_720x1280.yaml", [suggested])
    assert {v.name: v.threshold for v in fixed.variants}["xattn_t090"] == 0.95
    assert capsys.readouterr().err == ""
    inherited = load_config(None, ["attention.threshold=0.95", "attention.stride=16"])
    assert [v.stride for v in inherited.variants if v.mode == "xattn"] == [16]
    assert capsys.readouterr().err == ""
    load_config(None, ["attention.stride=16", "attention.select=[dense]"])  # no xattn variant selected
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no selected variant is an xattn variant" in err[0]


def test_readme_and_docstring_generate_examples_change_what_they_say(capsys):
    """Every `xattn-video generate CONFIG key=value` example in the README and the module docs loads, and none of
    its overrides is shadowed by the config's variants."""
    import shlex

    from xattn_video.pipelines import attn_report, generate

    text = "\n".join([(ROOT / "README.md").read_text(), generate.__doc__, attn_report.__doc__])
    examples = [line.split("#")[0].strip() for line in text.splitlines()
                if line.strip().startswith(("xattn-video generate configs/", "xattn-video attn-report configs/"))]
    assert len(examples) >= 4
    for example in examples:
        args = [a for a in shlex.split(example.rstrip("\\"))[2:] if not a.startswith("--") and a != "\\"]
        args = [a for a in args if a != "xattn_t090" and not a.startswith("prompts.")]  # --variant's value; files
        load_config(ROOT / args[0], args[1:])
        assert "changes nothing" not in capsys.readouterr().err, example


def test_override_shorthands_and_strings():
    cfg = load_config(None, ["prompts=[one, two]", "seeds=3", "output.naming={slug}-{seed}-{k}",
                             "video.negative_prompt=blurry: low quality", "attention.select=[xattn]"])
    assert cfg.prompts.list == ("one", "two")
    assert cfg.seeds == (3,)
    assert cfg.output.naming == "{slug}-{seed}-{k}"
    assert cfg.video.negative_prompt == "blurry: low quality"
    assert [v.name for v in cfg.variants] == ["xattn"]
    replaced = load_config(None, ["attention.variants={only: {mode: stock}}"])
    assert [(v.name, v.mode) for v in replaced.variants] == [("only", "stock")]


def test_print_config_roundtrip(tmp_path):
    cfg = load_config(None, ["video.steps=3", "attention.variants.x2.mode=xattn"])
    dumped = tmp_path / "dump.yaml"
    dumped.write_text(to_yaml(cfg))
    again = load_config(dumped)
    assert again == cfg


# -------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "overrides,fragments",
    [
        (["attention.threshold=1.5"], ["attention.threshold", "1.5", "(0, 1]"]),
        (["attention.variants.xattn.stride=3"], ["attention.variants.xattn.stride", "3", "power of two"]),
        (["attention.block_size=100"], ["attention.block_size", "100", "power of two"]),
        (["attention.backend=cuda"], ["attention.backend", "'cuda'", "triton"]),
        (["attention.estimate_fp8=maybe"], ["attention.estimate_fp8", "'maybe'", "true, false or auto"]),
        (["attention.attention_fp8=1"], ["attention.attention_fp8", "1", "true or false"]),
        (["attention.warmup_steps=-1"], ["attention.warmup_steps", "-1", ">= 0"]),
        (["attention.dense_layers=[0, x]"], ["attention.dense_layers[1]", "'x'", "index"]),
        (["attention.variants.dense.threshold=0.5"], ["attention.variants.dense.threshold", "mode dense"]),
        (["attention.variants.bad.mode=sparse"], ["attention.variants.bad.mode", "'sparse'", "dense, xattn, stock"]),
        (["attention.variants={meta: {mode: dense}}"], ["attention.variants.meta", "not meta"]),
        (["attention.variants={quality: {mode: dense}}"], ["attention.variants.quality", "or quality or"]),
        (["attention.select=[nope]"], ["attention.select[0]", "'nope'", "dense"]),
        (["video.frames=10"], ["video.frames", "10", "4k + 1"]),
        (["video.height=100"], ["video.height", "100", "multiple of 16"]),
        (["video.fps=0"], ["video.fps", "0", "> 0"]),
        (["video.steps=2.5"], ["video.steps", "2.5", "integer"]),
        (["video.true_cfg_scale=3"], ["video.true_cfg_scale", "3", "negative_prompt"]),
        (["video.fram=9"], ["video.fram", "not a known key", "frames"]),
        (["model.dtype=fp8"], ["model.dtype", "'fp8'", "bfloat16"]),
        (["model.device=tpu"], ["model.device", "'tpu'", "cuda:N"]),
        (["model.cpu_offload=true", "model.device=cpu"], ["model.cpu_offload", "True", "CUDA"]),
        (["model.id=./no/such/folder"], ["model.id", "./no/such/folder", "not a folder"]),
        (["model.vae_tiling=yes please"], ["model.vae_tiling", "'yes please'", "true or false"]),
        (["seeds=[0, 0]"], ["seeds", "[0, 0]", "distinct"]),
        (["seeds=[-1]"], ["seeds[0]", "-1", "2**63"]),
        (["seeds=[]"], ["seeds", "[]", "non-empty"]),
        (["videos_per_prompt=0"], ["videos_per_prompt", "0", "1"]),
        (["prompts.list=[]"], ["prompts.list", "[]", "at least one prompt"]),
        (["prompts.file=/no/such/prompts.txt"], ["prompts.file", "/no/such/prompts.txt", "existing file"]),
        (["output.naming={prompt}-{bogus}"], ["output.naming", "{bogus}", "prompt_index"]),
        (["output.naming=a/{seed}"], ["output.naming", "a/{seed}", "no slashes"]),
        (["output.crf=60"], ["output.crf", "60", "[0, 51]"]),
        (["progress=sometimes"], ["progress", "'sometimes'", "auto"]),
        (["colour=red"], ["colour", "not a known key"]),
        (["video.steps"], ["video.steps", "key=value"]),
        (["seeds=[0,"], ["seeds=[0,", "not valid YAML"]),
    ],
)
def test_validation_errors_name_key_value_and_allowed(overrides, fragments):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("video: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)
    typo = tmp_path / "typo.yaml"
    typo.write_text("video:\n  height: 64\n  widht: 64\n")
    with pytest.raises(ConfigError, match=r"video\.widht is not a known key.*did you mean video\.width"):
        load_config(typo)


# ------------------------------------------------------------------------------------------ prompts, names


def test_prompt_files(tmp_path):
    plain = tmp_path / "p.txt"
    plain.write_text("# a comment\nfirst prompt\n\n  second prompt  \n")
    assert read_prompt_file(plain) == ["first prompt", "second prompt"]
    cfg = load_config(None, [f"prompts.file={plain}"])
    assert resolve_prompts(cfg) == ["first prompt", "second prompt"]  # the inline list is not used

    vb_txt = tmp_path / "vb.txt"
    vb_txt.write_text("a red bicycle\nClose up of grapes on a rotating table. \na red bicycle\n")
    assert read_vbench_prompts(vb_txt) == ["a red bicycle", "Close up of grapes on a rotating table."]
    vb_json = tmp_path / "VBench_full_info.json"
    vb_json.write_text(json.dumps([{"prompt_en": "a dog running happily", "dimension": ["dynamic_degree"]},
                                   {"prompt_en": "a red bicycle ", "dimension": ["color"]}]))
    assert read_vbench_prompts(vb_json) == ["a dog running happily", "a red bicycle"]

    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ConfigError, match="prompts.file.*holds no prompt"):
        resolve_prompts(load_config(None, [f"prompts.file={empty}"]))
    with pytest.raises(ConfigError, match="prompts.file.*null when prompts.vbench_file"):
        load_config(None, [f"prompts.file={plain}", f"prompts.vbench_file={vb_txt}"])


def test_vbench_naming(tmp_path):
    vb = tmp_path / "vb.txt"
    vb.write_text("a red bicycle\nCinematic shot of Van Gogh's selfie, Van Gogh style\n")
    cfg = load_config(None, [f"prompts.vbench_file={vb}", "seeds=[0,1,2]", "videos_per_prompt=2"])
    assert cfg.vbench and cfg.output.naming == VBENCH_NAMING
    jobs = plan_jobs(cfg, resolve_prompts(cfg))
    dense = sorted(j.name for j in jobs if j.variant.name == "dense")
    expected = sorted(f"{p}-{i}" for p in ["a red bicycle", "Cinematic shot of Van Gogh's selfie, Van Gogh style"]
                      for i in range(6))
    assert dense == expected
    by_name = {j.name: j for j in jobs if j.variant.name == "dense"}
    assert (by_name["a red bicycle-3"].seed, by_name["a red bicycle-3"].k) == (1, 1)
    with pytest.raises(ConfigError, match="output.naming.*vbench"):
        load_config(None, [f"prompts.vbench_file={vb}", "output.naming={slug}"])
    slashed = tmp_path / "slash.txt"
    slashed.write_text("AC/DC on stage\n")
    cfg = load_config(None, [f"prompts.vbench_file={slashed}"])
    with pytest.raises(ConfigError, match="prompts.vbench_file.*AC/DC"):
        plan_jobs(cfg, resolve_prompts(cfg))


def test_default_names_and_duplicates():
    assert slugify("A cat walks on the grass, realistic style.") == "a-cat-walks-on-the-grass-realistic-style"
    assert slugify("!!!") == "prompt"
    cfg = load_config(None, ["prompts=[same words, Same words!]", "seeds=[4]"])
    names = sorted({j.name for j in plan_jobs(cfg, resolve_prompts(cfg))})
    assert names == ["0000_same-words_seed4_0", "0001_same-words_seed4_0"]
    clash = load_config(None, ["prompts=[same words, Same words!]", "output.naming={slug}"])
    with pytest.raises(ConfigError, match=r"output.naming = '\{slug\}'.*two videos 'same-words'"):
        plan_jobs(clash, resolve_prompts(clash))
    long = load_config(None, ["prompts=[" + "x" * 300 + "]", "output.naming={prompt}"])
    with pytest.raises(ConfigError, match="bytes"):
        plan_jobs(long, resolve_prompts(long))


def test_fingerprint_tracks_what_shapes_the_video():
    def keys(*overrides):
        cfg = load_config(None, list(overrides))
        return {(j.variant.name, j.name): j.key for j in plan_jobs(cfg, resolve_prompts(cfg))}

    base = keys()
    assert len(set(base.values())) == len(base)
    thr = keys("attention.variants.xattn.threshold=0.5")
    assert all((thr[k] == base[k]) == (k[0] == "dense") for k in base)
    assert keys("model.vae_tiling=true") == base  # a memory option does not change the video's identity
    assert keys("video.steps=5") != base


# ------------------------------------------------------------------------------------------- work splitting


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7, 32])
def test_shards_are_disjoint_and_complete(world_size):
    cfg = load_config(None, ["prompts=[a, b, c]", "seeds=[0, 1]", "attention.variants.x2.mode=xattn"])
    jobs = plan_jobs(cfg, resolve_prompts(cfg))
    assert len(jobs) == 3 * 2 * 3
    shares = [shard(jobs, r, world_size) for r in range(world_size)]
    flat = [j for share in shares for j in share]
    assert len(flat) == len(jobs) and set(flat) == set(jobs)  # no job twice, none lost
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= len(cfg.variants)  # balanced to one video
    for share in shares:  # a video's variants share a process (and a GPU): their times compare
        videos = {(j.prompt_index, j.seed, j.k) for j in share}
        assert len(share) == len(videos) * len(cfg.variants)
    # every process computes the same plan on its own
    assert plan_jobs(cfg, resolve_prompts(cfg)) == jobs
    with pytest.raises(ValueError):
        shard(jobs, world_size, world_size)


def test_dist_env(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist_env() == (3, 4, 1)
    assert dist_env(0, 2)[:2] == (0, 2)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match="rank 4 of world size 4"):
        dist_env()


def test_job_state_needs_video_and_matching_sidecar(tmp_path):
    cfg = load_config(None, [f"output.root={tmp_path}", "prompts=[a]"])
    job = plan_jobs(cfg, ["a"])[0]
    layout = Layout(tmp_path)
    assert job_state(job, layout, keep_latents=False) == "todo"
    layout.video(job).parent.mkdir(parents=True)
    layout.video(job).write_bytes(b"x")
    assert job_state(job, layout, keep_latents=False) == "todo"  # an mp4 without its sidecar is unfinished
    layout.sidecar(job).parent.mkdir(parents=True)
    layout.sidecar(job).write_text("{truncated")
    assert job_state(job, layout, keep_latents=False) == "todo"
    layout.sidecar(job).write_text(json.dumps({"key": "other"}))
    assert job_state(job, layout, keep_latents=False) == "stale"
    layout.sidecar(job).write_text(json.dumps({"key": job.key}))
    assert job_state(job, layout, keep_latents=False) == "done"
    assert job_state(job, layout, keep_latents=True) == "todo"  # latents asked for but missing



def test_attention_fp8_reaches_the_variants():
    """attention.attention_fp8: off by default, inherited by xattn variants, a variant may set its own."""
    assert [v.attention_fp8 for v in load_config(None, []).variants if v.mode == "xattn"] == [False]
    cfg = load_config(None, ["attention.attention_fp8=true", "attention.variants={a: {mode: xattn}, "
                             "b: {mode: xattn, attention_fp8: false}}"])  # fmt: skip
    assert {v.name: v.attention_fp8 for v in cfg.variants} == {"a": True, "b": False}
