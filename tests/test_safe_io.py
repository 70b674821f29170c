"""Nothing half-written, ever: encoder and disk failures, writers that fail mid-way, files a killed run left,
and two processes on one output folder (xattn_video.pipelines.safe_io, video_io, generate).

Failures are real where that is cheap: ffmpeg itself runs out of room (its output is /dev/full, or a file size
limit set with ``ulimit -f``) through ``$IMAGEIO_FFMPEG_EXE``; a process is really killed with SIGKILL; two
processes really contend for the same videos.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from xattn_video.pipelines import generate, video_io
from xattn_video.pipelines.generate import run_generate
from xattn_video.pipelines.generate_config import load_config
from xattn_video.pipelines.generate_plan import Layout, plan_jobs, resolve_prompts
from xattn_video.pipelines.safe_io import (
    FileLock,
    clear_stale_temporaries,
    host_name,
    is_disk_full,
    temporary_name,
)
from xattn_video.pipelines.video_io import EncoderError, read_video, write_json_atomic, write_text_atomic, write_video

SMALL = ["video.height=64", "video.width=64", "video.frames=5", "video.steps=2", "video.fps=10",
         "attention.block_size=16", "attention.stride=4", "attention.warmup_steps=1", "progress=false"]
REAL_FFMPEG = video_io.ffmpeg_exe()


@pytest.fixture(scope="module")
def pipe():
    from xattn_video.testing.tiny import build_tiny_hunyuan_pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build_tiny_hunyuan_pipeline(seed=0)
    torch.set_num_threads(threads)


def frames(t=9, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, 64, 64, 3), dtype=np.uint8)  # noise: big files


def fake_ffmpeg(folder: Path, body: str) -> str:
    """A script standing in for ffmpeg; ``$REAL`` is the real one, ``$OUT`` the output path it was given."""
    script = folder / "ffmpeg.sh"
    script.write_text(f'#!/bin/bash\nREAL="{REAL_FFMPEG}"\nOUT="${{@: -1}}"\n{body}\n')
    script.chmod(0o755)
    return str(script)


# the two ways a disk fills up under ffmpeg: no room at all (ENOSPC), or room for part of the file (the trailer
# fails, as in the report: a 12 KB mp4 without its index)
DISK_FULL = 'exec "$REAL" "${@:1:$#-1}" -f mp4 /dev/full'
SIZE_LIMIT = "ulimit -f 4\ntrap '' XFSZ\nexec \"$REAL\" \"$@\""


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name]


@pytest.mark.parametrize("body, code", [(DISK_FULL, errno.ENOSPC), (SIZE_LIMIT, errno.EFBIG)],
                         ids=["no-space", "file-size-limit"])
def test_a_failing_encoder_leaves_no_video_and_keeps_the_old_one(tmp_path, monkeypatch, body, code):
    target = tmp_path / "videos" / "v.mp4"
    write_video(target, frames(t=3), fps=8, tmp_dir=tmp_path / ".partial")
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", fake_ffmpeg(tmp_path, body))
    with pytest.raises(EncoderError) as info:
        write_video(target, frames(t=9, seed=1), fps=8, crf=0, tmp_dir=tmp_path / ".partial")
    assert info.value.errno == code and is_disk_full(info.value)
    assert "ffmpeg failed writing" in str(info.value) and str(target) in str(info.value)
    assert "\n" not in str(info.value)
    monkeypatch.delenv("IMAGEIO_FFMPEG_EXE")  # imageio reads with it too
    assert read_video(target).shape[0] == 3  # the finished file from before is intact
    assert temporaries(tmp_path) == []


def small_config(root: Path, *extra: str):
    return load_config(None, [*SMALL, f"output.root={root}", *extra])


def manifest(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]


def test_a_full_disk_fails_the_video_records_why_and_stops_the_run(tmp_path, pipe, monkeypatch):
    root = tmp_path / "out"
    cfg = small_config(root, "prompts=[one, two]")
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", fake_ffmpeg(tmp_path, DISK_FULL))
    lines: list[str] = []
    result = run_generate(cfg, pipeline=pipe, log=lines.append)
    assert not result.ok and result.made == [] and len(result.failures) == 1  # stopped after the first
    assert result.stopped is not None and "No space left on device" in result.stopped
    records = manifest(root)
    assert [r["status"] for r in records] == ["failed"]
    assert "No space left on device" in records[0]["error"] and "ffmpeg failed writing" in records[0]["error"]
    assert not list(root.glob("*/*.mp4")) and temporaries(root) == []  # no video, whole or half
    assert not list((root / "meta").rglob("*.json"))  # and no sidecar saying it is done
    assert any(line.startswith("stopped: the disk under") and "3 videos not attempted" in line for line in lines)
    assert not any("Traceback" in line for line in lines)
    # room again: the rerun makes every video
    monkeypatch.delenv("IMAGEIO_FFMPEG_EXE")
    rerun = run_generate(cfg, pipeline=pipe, log=lambda m: None)
    assert rerun.ok and len(rerun.made) == 4
    assert all(read_video(p).shape == (5, 64, 64, 3) for p in root.glob("*/*.mp4"))


def test_an_encoder_error_fails_that_video_and_the_run_goes_on(tmp_path, pipe, monkeypatch):
    root = tmp_path / "out"
    cfg = small_config(root, "prompts=[one, two]")
    broken = 'echo "[vost#0:0 @ 0x1] Unknown encoder \'libx264\'" >&2\nexit 8'
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", fake_ffmpeg(tmp_path, broken))
    result = run_generate(cfg, pipeline=pipe, log=lambda m: None)
    assert result.stopped is None and len(result.failures) == 4  # each video tried, each failed
    records = manifest(root)
    assert [r["status"] for r in records] == ["failed"] * 4
    assert all(r["error"] == f"EncoderError: ffmpeg failed writing {root / r['video']} (exit status 8): Unknown "
                             "encoder 'libx264'" for r in records)
    assert not list(root.glob("*/*.mp4")) and temporaries(root) == []


def _fail_half_way(write):
    """A writer that puts half its bytes down, then finds the disk full."""

    def half(self_or_fp, data, *args, **kwargs):
        write(self_or_fp, data[: len(data) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    return half


def test_every_writer_fails_whole_when_the_disk_fills_mid_way(tmp_path, monkeypatch):
    """JSON, JSONL reports, Markdown, PNG and the processor's statistics: a failure half-way leaves neither
    a final name nor a temporary file, and an older file under the name stays as it was."""
    import matplotlib.figure

    import xattn_video
    from xattn_video.pipelines import plots

    folder = tmp_path / "reports"
    old = {"report.json": '{"old": 1}\n', "report.md": "old\n"}
    for name, text in old.items():
        write_text_atomic(folder / name, text)
    real_write_text, real_savefig = Path.write_text, matplotlib.figure.Figure.savefig

    monkeypatch.setattr(Path, "write_text", _fail_half_way(real_write_text))
    for call in (lambda: write_json_atomic(folder / "report.json", {"new": list(range(100))}),
                 lambda: write_text_atomic(folder / "report.md", "new " * 100),
                 lambda: write_json_atomic(folder / "fresh.json", {"new": 1})):
        with pytest.raises(OSError, match="No space left"):
            call()
    monkeypatch.setattr(Path, "write_text", real_write_text)

    def half_png(self, fname, **kwargs):
        real_savefig(self, fname, **kwargs)
        data = Path(fname).read_bytes()
        Path(fname).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_png)
    with pytest.raises(OSError, match="No space left"):
        plots.heatmap(folder / "density.png", np.array([[0.5, 1.0], [1.0, 0.25]]), title="t", xlabel="x", ylabel="y",
                      colorbar="density")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", real_savefig)

    proc = xattn_video.XAttnProcessor(threshold=0.9)
    real_dump = json.dump
    monkeypatch.setattr(json, "dump", lambda obj, fp, **kw: _fail_half_way(lambda f, d: f.write(d))(
        fp, json.dumps(obj, **kw)))
    with pytest.raises(OSError, match="No space left"):
        proc.save_stats(folder / "stats.json")
    monkeypatch.setattr(json, "dump", real_dump)

    assert sorted(p.name for p in folder.iterdir()) == sorted(old)  # nothing new, nothing half, no temporaries
    for name, text in old.items():
        assert (folder / name).read_text() == text


# ------------------------------------------------------------------------------------------ killed runs

KILLED_WRITER = """
import numpy as np, sys
from xattn_video.pipelines.video_io import write_video
frames = np.random.default_rng(0).integers(0, 256, (40, 64, 64, 3), dtype=np.uint8)
write_video(sys.argv[1], frames, fps=8, tmp_dir=sys.argv[2])
"""


def test_a_rerun_clears_what_a_killed_run_left_and_nothing_else(tmp_path, pipe, monkeypatch):
    root = tmp_path / "out"
    partial = root / ".partial"
    # an ffmpeg that writes a little, then hangs: the writing process is killed -9 in the middle of the mp4
    hang = 'head -c 2000 > "$OUT"\nsleep 60'
    env = {**os.environ, "IMAGEIO_FFMPEG_EXE": fake_ffmpeg(tmp_path, hang)}
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(root / "dense" / "v.mp4"), str(partial)],
                             env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while not (partial.is_dir() and list(partial.glob("*.tmp.mp4"))) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(child.pid, signal.SIGKILL)  # the writer and its ffmpeg: nothing runs a clean-up
    child.wait()
    left = list(partial.glob("*.tmp.mp4"))
    assert len(left) == 1 and f".{host_name()}.{child.pid}." in left[0].name
    # temporaries that are not the dead run's: one of this live process, one of another host, a user's file
    mine = partial / temporary_name("0" * 16, ".json")
    mine.write_text("{}")
    elsewhere = partial / f".{'1' * 16}.other-host.{child.pid}.tmp.mp4"
    elsewhere.write_bytes(b"x")
    users = root / "notes.tmp.txt"
    users.write_text("mine")
    dead_lock = FileLock(partial / "locks" / "abc.lock")
    assert dead_lock.acquire() is None
    os.close(dead_lock._fd)  # as if its owner died: the file stays, the lock goes
    dead_lock._fd = None

    lines: list[str] = []
    result = run_generate(small_config(root, "prompts=[one]"), pipeline=pipe, log=lines.append)
    assert result.ok and len(result.made) == 2
    assert not left[0].exists() and not (partial / "locks" / "abc.lock").exists()
    assert mine.exists() and elsewhere.exists() and users.exists()
    assert "removed 2 temporary files that dead runs left under" in "\n".join(lines)
    assert clear_stale_temporaries(root) == []  # nothing else is stale


# ---------------------------------------------------------------------------------------------- locks

HOLDER = """
import sys, time
from xattn_video.pipelines.safe_io import FileLock
lock = FileLock(sys.argv[1], "holder")
assert lock.acquire() is None
print("held", flush=True)
time.sleep(120)
"""


def test_a_lock_names_its_owner_and_dies_with_it(tmp_path):
    path = tmp_path / "locks" / "v.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        owner = FileLock(path).acquire()
        assert owner is not None and owner["pid"] == holder.pid and owner["host"] == host_name()
        assert owner["label"] == "holder"
    finally:
        holder.kill()  # SIGKILL: no release, no clean-up
        holder.wait()
    lock = FileLock(path, "next")
    assert lock.acquire() is None  # the dead owner's lock is gone with it
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.exists()


RUNNER = """
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from xattn_video.pipelines import generate
from xattn_video.pipelines.generate_config import load_config
from xattn_video.testing.tiny import build_tiny_hunyuan_pipeline

root, go = sys.argv[1], Path(sys.argv[2])
pipe = build_tiny_hunyuan_pipeline(seed=0)
real = generate.generate_video
def slow(*args):  # slow enough that the two processes overlap on every video
    time.sleep(0.5)
    return real(*args)
generate.generate_video = slow
cfg = load_config(None, [*json.loads(sys.argv[3]), f"output.root={root}"])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.05)
lines = []
result = generate.run_generate(cfg, pipeline=pipe, log=lines.append)
print(json.dumps({"made": result.made, "elsewhere": result.elsewhere, "skipped": result.skipped,
                  "failures": result.failures, "lines": lines}), flush=True)
"""


def test_two_processes_on_one_folder_make_each_video_once(tmp_path):
    root, go = tmp_path / "out", tmp_path / "go"
    overrides = [*SMALL, "prompts=[one, two, three]"]
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(RUNNER), str(root), str(go),
                               json.dumps(overrides)], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        go.touch()  # both start at once
        outs = [json.loads(p.stdout.readline()) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    cfg = load_config(None, [*overrides, f"output.root={root}"])
    every = {job.label for job in plan_jobs(cfg, resolve_prompts(cfg))}
    made = [label for out in outs for label in out["made"]]
    assert sorted(made) == sorted(every)  # each video made once, by one of the two
    assert all(out["failures"] == [] for out in outs)
    assert all(set(out["made"]) | set(out["elsewhere"]) | set(out["skipped"]) == every for out in outs)
    assert all(out["made"] for out in outs)  # they shared the work
    for out in outs:  # a video's dense and XAttention versions come from one process: their times compare
        names = [label.split("/")[1] for label in out["made"]]
        assert all(names.count(name) == 2 for name in names)
    records = manifest(root)
    assert sorted(f"{r['variant']}/{r['name']}" for r in records) == sorted(every)
    said = [line for out in outs for line in out["lines"] if line.startswith("another generate (pid")]
    assert said and all("leaves each video it holds to it" in line for line in said)
    assert not list((root / ".partial").rglob("*.lock")) and temporaries(root) == []
    layout = Layout(root)
    assert all(read_video(layout.root / f"{label}.mp4").shape == (5, 64, 64, 3) for label in every)


def test_ranks_never_wait_on_each_other(tmp_path, pipe):
    """torchrun ranks share the folder with disjoint shares: the per-video locks never meet."""
    root = tmp_path / "out"
    cfg = small_config(root, "prompts=[one, two]")
    held = {}
    for job in plan_jobs(cfg, resolve_prompts(cfg)):  # rank 1's video is held by "another process"
        if job.prompt == "two" and job.name not in held:
            held[job.name] = FileLock(Layout(root).lock(job), job.name)
            assert held[job.name].acquire() is None
    try:
        result = run_generate(cfg, pipeline=pipe, rank=0, world_size=2, log=lambda m: None)
    finally:
        for lock in held.values():
            lock.release()
    assert result.ok and sorted(result.made) == ["dense/0000_one_seed0_0", "xattn/0000_one_seed0_0"]
    assert result.elsewhere == []


def test_a_failing_manifest_does_not_stop_the_run(tmp_path, pipe, monkeypatch):
    root = tmp_path / "out"

    def full(path, record):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(generate, "append_manifest", full)
    lines: list[str] = []
    result = run_generate(small_config(root, "prompts=[one]"), pipeline=pipe, log=lines.append)
    assert result.ok and len(result.made) == 2
    assert sum("could not append to" in line and "is not recorded there" in line for line in lines) == 2


def test_the_manifest_survives_a_cut_line_and_says_when_the_disk_cuts_one(tmp_path, monkeypatch):
    from xattn_video.pipelines import generate_plan

    path = tmp_path / "manifest.jsonl"
    generate_plan.append_manifest(path, {"n": 1})
    with open(path, "ab") as f:
        f.write(b'{"n": 2, "cut')  # a writer killed mid-line
    generate_plan.append_manifest(path, {"n": 3})
    assert path.read_text().splitlines() == ['{"n": 1}', '{"n": 2, "cut', '{"n": 3}']  # 3 is whole, on its own
    real_write = os.write
    monkeypatch.setattr(generate_plan.os, "write", lambda fd, data: real_write(fd, data[:5]))  # the disk fills
    with pytest.raises(OSError, match="only 5 of"):
        generate_plan.append_manifest(path, {"n": 4})
