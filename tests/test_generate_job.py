"""The generate job end to end on the tiny pipeline: outputs, sidecars, resume, failures, ranks."""

from __future__ import annotations

import json

import imageio.v3 as iio
import pytest
import torch

from xattn_video.pipelines import generate
from xattn_video.pipelines.generate_config import load_config
from xattn_video.tiny import build_tiny_hunyuan_pipeline

PROMPTS = ["A red ball rolls.", "Snow falls on a quiet street.", "A boat on the sea."]


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_hunyuan_pipeline(seed=0)


def config(root, *extra):
    prompts = "[" + ",".join(f"'{p}'" for p in PROMPTS) + "]"
    return load_config(None, [f"output.root={root}", "progress=false", "video.steps=2", "video.frames=5",
                              f"prompts.list={prompts}", *extra])


@pytest.fixture
def quiet_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster and keeps CI steady
    yield
    torch.set_num_threads(threads)


def mp4s(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.mp4"))


def test_outputs_sidecars_and_manifest(tmp_path, pipe, quiet_threads):
    result = generate.run_generate(config(tmp_path), pipeline=pipe, log=lambda m: None)
    assert result.ok and len(result.made) == 6 and not result.skipped
    videos = mp4s(tmp_path)
    assert len(videos) == 6 and {v.split("/")[0] for v in videos} == {"dense", "xattn"}
    frames = iio.imread(tmp_path / videos[0])
    assert frames.shape == (5, 128, 128, 3) and frames.std() > 0
    sidecar = json.loads((tmp_path / "meta" / "xattn" / (videos[-1].split("/")[1][:-4] + ".json")).read_text())
    assert sidecar["prompt"] in PROMPTS and sidecar["seed"] == 0
    for key in ("config", "attention_stats", "timing", "versions"):
        assert key in sidecar, key
    densities = sidecar["attention_stats"]["density_per_step"]
    assert densities[0] == 1.0 and densities[1] < 1.0  # warmup 1, then sparse
    assert sidecar["attention_stats"]["mode_per_step"] == ["dense", "sparse"]
    assert sidecar["timing"]["total_s"] > 0 and "peak_memory" in sidecar
    manifest = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 6 and all(r["status"] == "ok" for r in manifest)
    assert len(sidecar["timing"]["step_s"]) == 2


def test_resume_after_a_crash_makes_only_what_is_missing(tmp_path, pipe, quiet_threads, monkeypatch):
    made = []
    real = generate.generate_video

    def crash_on_fourth(pipe_, proc, job, cfg, device):
        if len(made) == 3:
            raise KeyboardInterrupt  # the process is killed in the middle of the fourth video
        made.append(job.label)
        return real(pipe_, proc, job, cfg, device)

    monkeypatch.setattr(generate, "generate_video", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        generate.run_generate(config(tmp_path), pipeline=pipe, log=lambda m: None)
    first = mp4s(tmp_path)
    assert len(first) == 3
    monkeypatch.setattr(generate, "generate_video", real)
    result = generate.run_generate(config(tmp_path), pipeline=pipe, log=lambda m: None)
    assert len(result.skipped) == 3 and len(result.made) == 3
    assert set(result.skipped).isdisjoint(result.made)
    assert len(mp4s(tmp_path)) == 6
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and ".partial" in p.as_posix()
                and p.suffix == ".mp4"], "no stray partial video"


def test_a_failed_prompt_is_reported_and_the_run_goes_on(tmp_path, pipe, quiet_threads, monkeypatch):
    real = generate.generate_video

    def fail_on_snow(pipe_, proc, job, cfg, device):
        if "Snow" in job.prompt:
            raise RuntimeError("out of memory (simulated)")
        return real(pipe_, proc, job, cfg, device)

    monkeypatch.setattr(generate, "generate_video", fail_on_snow)
    result = generate.run_generate(config(tmp_path), pipeline=pipe, log=lambda m: None)
    assert not result.ok and len(result.failures) == 2 and len(result.made) == 4
    assert all("simulated" in error for _, error in result.failures)
    statuses = [json.loads(line)["status"] for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert statuses.count("failed") == 2 and statuses.count("ok") == 4


def test_ranks_share_the_work_without_duplicates_or_gaps(tmp_path, pipe, quiet_threads):
    cfg = config(tmp_path)
    made = []
    for rank in range(2):
        result = generate.run_generate(cfg, rank=rank, world_size=2, pipeline=pipe, log=lambda m: None)
        assert {label.split("/")[0] for label in result.made} == {"dense", "xattn"}
        made += result.made
    assert len(made) == len(set(made)) == 6
    assert len(mp4s(tmp_path)) == 6
    again = generate.run_generate(cfg, rank=1, world_size=2, pipeline=pipe, log=lambda m: None)
    assert not again.made and again.skipped  # resume works per process
