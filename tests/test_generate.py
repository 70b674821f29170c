"""`xattn-video generate` end to end on the tiny pipeline: videos, sidecars, manifest, resume, failures, ranks.

Small sizes keep it quick: 64x64 pixels, 5 frames, 2 steps -> 128 video tokens in 16-token blocks, so the
XAttention variant really runs sparse on its second step (warmup_steps=1).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from xattn_video import cli
from xattn_video.pipelines import generate, video_io
from xattn_video.pipelines.generate import run_generate, summary_table
from xattn_video.pipelines.generate_config import load_config
from xattn_video.pipelines.generate_plan import Layout, plan_jobs, resolve_prompts
from xattn_video.pipelines.video_io import read_video, video_info

SMALL = [
    "video.height=64",
    "video.width=64",
    "video.frames=5",
    "video.steps=2",
    "video.fps=10",
    "attention.block_size=16",
    "attention.stride=4",
    "attention.warmup_steps=1",
    "progress=false",
]


@pytest.fixture(scope="module")
def pipe():
    from xattn_video.testing.tiny import build_tiny_hunyuan_pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster and steadier next to other suites
    yield build_tiny_hunyuan_pipeline(seed=0)
    torch.set_num_threads(threads)


def small_config(root: Path, *extra: str):
    return load_config(None, [*SMALL, f"output.root={root}", *extra])


def run(cfg, pipe, **kwargs):
    lines: list[str] = []
    result = run_generate(cfg, pipeline=pipe, log=lines.append, **kwargs)
    return result, lines


def all_labels(cfg) -> set[str]:
    return {job.label for job in plan_jobs(cfg, resolve_prompts(cfg))}


def manifest(root: Path) -> list[dict]:
    path = Path(root) / "manifest.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def stamps(root: Path) -> dict[str, int]:
    """Modification times of every finished file, to tell a skipped video from a remade one."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in Path(root).rglob("*")
            if p.is_file() and p.suffix in (".mp4", ".json") and ".partial" not in p.parts}


# ------------------------------------------------------------------------------------------------ one run


def test_videos_sidecars_manifest(tmp_path, pipe):
    root = tmp_path / "out"
    cfg = small_config(root, "prompts=[a cat walks, a dog runs]", "attention.variants.stock.mode=stock",
                       "output.keep_latents=true")
    result, lines = run(cfg, pipe)
    assert result.ok and not result.skipped
    assert sorted(result.made) == sorted(all_labels(cfg)) and len(result.made) == 6
    layout = Layout(root)
    for job in plan_jobs(cfg, resolve_prompts(cfg)):
        frames = read_video(layout.video(job))
        assert frames.shape == (5, 64, 64, 3) and frames.dtype == np.uint8 and frames.std() > 0
        info = video_info(layout.video(job))
        assert info["codec"] == "h264" and info["fps"] == 10
        side = json.loads(layout.sidecar(job).read_text())
        assert (side["prompt"], side["seed"], side["key"]) == (job.prompt, job.seed, job.key)
        assert side["config"] == cfg.resolved and side["variant"] == job.variant.name
        assert len(side["timing"]["step_s"]) == 2 and side["timing"]["total_s"] > 0
        assert side["peak_memory"]["host_max_rss_bytes"] > 0
        assert side["versions"]["torch"] == torch.__version__ and side["versions"]["diffusers"]
        stats = side["attention_stats"]
        if job.variant.mode == "stock":
            assert stats is None
        else:
            assert len(stats["density_per_step"]) == 2 and len(stats["density_per_layer"][0]) == 4
        if job.variant.mode == "dense":
            assert stats["mode_per_step"] == ["dense", "dense"] and stats["density"] == 1.0
        if job.variant.mode == "xattn":
            assert stats["mode_per_step"] == ["dense", "sparse"]
            assert stats["density_per_step"][0] == 1.0 and 0 < stats["sparse_density"] < 1.0  # blocks skipped
        latents = torch.load(layout.latents(job))
        assert latents.shape == (1, 4, 2, 8, 8)
    for variant in ("dense", "xattn", "stock"):  # VBench reads a variant folder as it is: mp4 files only
        assert {p.suffix for p in (root / variant).iterdir()} == {".mp4"}
    records = manifest(root)
    assert len(records) == 6 and all(r["status"] == "ok" for r in records)
    assert len({(r["variant"], r["name"]) for r in records}) == 6
    assert load_config(root / "config.yaml") == cfg
    table = summary_table(result)
    assert all(name in table for name in ("dense", "xattn", "stock", "1.00x"))
    assert any("density" in line for line in lines)

    # the project's dense processor and diffusers' stock one make the same video
    for job in plan_jobs(cfg, resolve_prompts(cfg)):
        if job.variant.name == "dense":
            stock = layout.video(job).parent.parent / "stock" / layout.video(job).name
            diff = np.abs(read_video(layout.video(job)).astype(float) - read_video(stock).astype(float))
            assert diff.mean() < 0.5


# ------------------------------------------------------------------------------------------ resume, crashes


class Killed(BaseException):
    """Stands for a kill: not an Exception, so the per-video error handling does not catch it."""


def test_resume_after_crash_makes_only_the_missing(tmp_path, pipe, monkeypatch):
    root = tmp_path / "out"
    cfg = small_config(root, "prompts=[one, two, three]")
    real_write_frame = video_io._write_frame
    frames_sent = []

    def dying_write_frame(pipe_, frame):  # the 4th video (5 frames each) dies after two of its frames
        frames_sent.append(1)
        if len(frames_sent) == 3 * 5 + 3:
            raise Killed()
        real_write_frame(pipe_, frame)

    monkeypatch.setattr(video_io, "_write_frame", dying_write_frame)
    with pytest.raises(Killed):
        run(cfg, pipe)
    monkeypatch.setattr(video_io, "_write_frame", real_write_frame)

    layout = Layout(root)
    jobs = plan_jobs(cfg, resolve_prompts(cfg))
    finished = [j for j in jobs if layout.sidecar(j).exists()]
    assert [j.label for j in finished] == [j.label for j in jobs[:3]]
    assert not layout.video(jobs[3]).exists()  # no truncated mp4 under a final name
    for variant in ("dense", "xattn"):
        for mp4 in (root / variant).glob("*"):
            assert read_video(mp4).shape[0] == 5  # every mp4 there is whole
    # what a SIGKILL (no clean-up at all) would leave: a partial file in the temporary folder
    (root / ".partial").mkdir(exist_ok=True)
    (root / ".partial" / ".0123456789abcdef.999.tmp.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    before = stamps(root)

    result, _ = run(cfg, pipe)
    assert sorted(result.made) == sorted(j.label for j in jobs[3:])
    assert sorted(result.skipped) == sorted(j.label for j in jobs[:3])
    after = stamps(root)
    assert all(after[name] == stamp for name, stamp in before.items())  # finished files untouched
    assert all(read_video(layout.video(j)).shape[0] == 5 for j in jobs)

    # nothing left: a third run makes nothing
    again, _ = run(cfg, pipe)
    assert again.made == [] and len(again.skipped) == 6

    # settings that change a variant's videos remake that variant only
    changed = small_config(root, "prompts=[one, two, three]", "attention.variants.xattn.threshold=0.5")
    remade, lines = run(changed, pipe)
    assert sorted(remade.made) == sorted(j.label for j in jobs if j.variant.name == "xattn")
    assert any("made with other settings" in line for line in lines)


def test_failed_video_is_reported_and_the_run_goes_on(tmp_path, pipe, monkeypatch, capsys):
    root = tmp_path / "out"
    overrides = [*SMALL, f"output.root={root}", "prompts=[fine, broken, also fine]"]
    real = generate.generate_video

    def flaky(pipe_, proc, job, cfg, device):
        if job.prompt == "broken":
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(pipe_, proc, job, cfg, device)

    monkeypatch.setattr(generate, "generate_video", flaky)
    monkeypatch.setattr(generate, "load_pipeline", lambda model, device, video=None, hub=None: pipe)
    assert cli.main(["generate", *overrides]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("FAILED dense/0001_broken") >= 1 and "simulated" in captured.err
    records = manifest(root)
    failed = [r for r in records if r["status"] == "failed"]
    assert sorted(r["variant"] for r in failed) == ["dense", "xattn"]
    assert all(r["error"] == "RuntimeError: CUDA out of memory (simulated)" for r in failed)
    assert sum(r["status"] == "ok" for r in records) == 4  # the prompt after the failure was made too

    monkeypatch.setattr(generate, "generate_video", real)
    assert cli.main(["generate", *overrides]) == 0
    made = [r for r in manifest(root)[len(records):]]
    assert sorted((r["variant"], r["name"]) for r in made) == [("dense", "0001_broken_seed0_0"),
                                                              ("xattn", "0001_broken_seed0_0")]


# ----------------------------------------------------------------------------------------------- naming


def test_vbench_folder(tmp_path, pipe):
    prompts = ["a red bicycle", "Cinematic shot of Van Gogh's selfie, Van Gogh style"]
    vb = tmp_path / "vbench.txt"
    vb.write_text("\n".join(p + " " for p in prompts) + "\n")
    root = tmp_path / "out"
    cfg = small_config(root, f"prompts.vbench_file={vb}", "seeds=[0, 1]", "attention.select=[dense]")
    result, _ = run(cfg, pipe)
    assert result.ok
    expected = {f"{p}-{i}.mp4" for p in prompts for i in range(2)}
    assert {p.name for p in (root / "dense").iterdir()} == expected
    for name in expected:
        assert read_video(root / "dense" / name).shape == (5, 64, 64, 3)
    # index 1 of a prompt is seed 1: a different video from index 0
    a, b = (read_video(root / "dense" / f"{prompts[0]}-{i}.mp4").astype(float) for i in range(2))
    assert np.abs(a - b).mean() > 1.0


# ---------------------------------------------------------------------------------------------- processes


def test_ranks_split_the_work(tmp_path, pipe):
    root = tmp_path / "out"
    cfg = small_config(root, "prompts=[one, two, three]")
    world = 4  # 3 videos x 2 variants over 4 processes: a video (all its variants) each, one process idle
    results = [run(cfg, pipe, rank=r, world_size=world)[0] for r in range(world)]
    made = [label for res in results for label in res.made]
    assert len(made) == len(set(made)) == 6  # none twice
    assert set(made) == all_labels(cfg)  # none lost
    assert [len(res.made) for res in results] == [2, 2, 2, 0]
    for res in results[:3]:  # a video's dense and XAttention versions share a process: their times compare
        assert len({label.split("/")[1] for label in res.made}) == 1
    records = manifest(root)
    assert len(records) == 6 and len({(r["variant"], r["name"]) for r in records}) == 6
    assert sorted(r["rank"] for r in records) == [0, 0, 1, 1, 2, 2]
    # resume is per process: a rank that reruns finds its share done
    rerun = run(cfg, pipe, rank=2, world_size=world)[0]
    assert rerun.made == [] and len(rerun.skipped) == 2
    assert (rerun.run_finished, rerun.run_total) == (6, 6)
    assert "whole run: 6 of 6 videos finished" in summary_table(rerun)
    # and the split does not change the videos: one process makes the same frames
    single_root = tmp_path / "single"
    single = small_config(single_root, "prompts=[one]")
    run(single, pipe)
    for variant in ("dense", "xattn"):
        name = "0000_one_seed0_0.mp4"
        assert np.array_equal(read_video(root / variant / name), read_video(single_root / variant / name))


# ----------------------------------------------------------------------------------------- the default


def test_the_embedded_default_command(tmp_path, monkeypatch, capsys, pipe):
    """`xattn-video generate` with no arguments: the tiny model on the CPU, dense and XAttention, in well
    under a minute, playable mp4 files in ./outputs/tiny."""
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    assert cli.main(["generate"]) == 0
    elapsed = time.perf_counter() - start
    assert elapsed < 60, f"the default run took {elapsed:.0f} s"
    root = tmp_path / "outputs" / "tiny"
    for variant in ("dense", "xattn"):
        videos = sorted((root / variant).glob("*.mp4"))
        assert len(videos) == 2
        for video in videos:
            assert read_video(video).shape == (9, 128, 128, 3)  # 768 video tokens: six 128-token blocks
    sparse = json.loads(next((root / "meta" / "xattn").glob("*.json")).read_text())["attention_stats"]
    assert sparse["mode_per_step"][0] == "dense" and sparse["sparse_density"] < 1.0
    out = capsys.readouterr().out
    assert "whole run: 4 of 4 videos finished" in out and "xattn" in out


# ------------------------------------------------------------------------------------------ figures that agree


def _speedup_cell(table: str, variant: str) -> str:
    header = next(line for line in table.splitlines() if line.startswith("variant "))
    row = next(line for line in table.splitlines() if line.startswith(f"{variant} "))
    assert header.split()[-1] == "speed-up" and "sparse-step density" in header
    return row.split()[-1]


def test_generate_and_quality_report_one_speedup_and_density(tmp_path, pipe, capsys):
    """The same run read by `generate`'s summary and by `quality` from its sidecars: one speed-up (median step
    of dense / median step of xattn), one density and one sparse-step density, named alike; on the CPU both
    say that the times are not a speed measurement."""
    from xattn_video.pipelines import run_figures

    root = tmp_path / "out"
    cfg = small_config(root, "prompts=[a cat walks, a dog runs, a bird flies]")
    result, _ = run(cfg, pipe)
    table = summary_table(result)
    dense_steps = [x for t in [result.tallies["dense"]] for x in t.step_s]
    xattn_steps = result.tallies["xattn"].step_s
    expected = run_figures.median(dense_steps) / run_figures.median(xattn_steps)
    assert _speedup_cell(table, "xattn") == f"{expected:.2f}x"
    assert run_figures.CPU_TIMING_NOTE in table
    assert cli.main(["quality", str(root), "--no-plots", "--no-lpips"]) == 0
    out = capsys.readouterr().out
    gen = json.loads((root / "quality" / "quality.json").read_text())["candidates"]["xattn"]["generation"]
    assert gen["step_speedup"] == pytest.approx(expected)
    assert gen["sparse_density"] == pytest.approx(sum(result.tallies["xattn"].sparse_density) / 3)
    assert gen["density"] == pytest.approx(sum(result.tallies["xattn"].density) / 3)
    row = next(line for line in out.splitlines() if line.startswith("xattn "))
    assert f"{expected:.2f}x" in row and f"{gen['sparse_density']:.3f}" in row
    assert "sparse-step density" in out and run_figures.CPU_TIMING_NOTE in out


def test_videos_remade_by_another_process_are_not_compared(tmp_path, pipe, monkeypatch):
    """A rerun (another process) that remakes the xattn videos beside dense videos of an earlier run: their
    step times are not comparable, and the summary says so instead of printing a ratio."""
    from xattn_video.pipelines import run_figures

    root = tmp_path / "out"
    cfg = small_config(root, "prompts=[a cat walks]")
    run(cfg, pipe)
    for path in [*(root / "xattn").glob("*.mp4"), *(root / "meta" / "xattn").glob("*.json")]:
        path.unlink()
    monkeypatch.setattr(run_figures, "process_id", lambda: "another-host:4242:later")
    result, _ = run(cfg, pipe)
    assert result.made == ["xattn/0000_a-cat-walks_seed0_0"] and len(result.skipped) == 1
    table = summary_table(result)
    assert _speedup_cell(table, "xattn") == "-"
    assert "xattn: speed-up not comparable: the 1 videos of each side were made by different processes" in table


def test_rank_summaries_are_one_prefixed_write(tmp_path, pipe, monkeypatch, capfd):
    """Under torchrun the ranks share one output: each prints its summary as ONE write, every line prefixed with
    its rank, so two summaries cannot run together on a line."""
    writes: list[tuple[int, bytes]] = []
    real_write = generate.os.write

    def spy(fd: int, data: bytes) -> int:
        writes.append((fd, bytes(data)))
        return real_write(fd, data)

    monkeypatch.setattr(generate.os, "write", spy)
    monkeypatch.setattr(generate, "run_generate", lambda cfg, **kw: run_generate(cfg, pipeline=pipe, log=lambda m: None,
                                                                                   **kw))
    args = ["generate", *SMALL, f"output.root={tmp_path}", "prompts=[one, two]", "--rank", "1", "--world-size", "2"]
    assert cli.main(args) == 0
    out = capfd.readouterr().out
    summaries = [data for _, data in writes if b"speed-up" in data]  # (the manifest is appended with os.write too)
    assert len(summaries) == 1 and summaries[0].decode() == out
    lines = out.splitlines()
    assert len(lines) >= 5 and all(line.startswith("[rank 1/2] ") for line in lines)
    assert any(line.startswith("[rank 1/2] xattn ") for line in lines)
