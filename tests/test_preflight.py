"""One line, not a traceback: what every job checks before any work (xattn_video.pipelines.preflight) and how
it says what is wrong with models, output folders, input files and devices.

Each case runs the real command and asserts that stderr holds exactly one line that names the setting, and
that no work started (no model load, no generation, nothing written).
"""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from xattn_video import cli
from xattn_video.pipelines import generate, preflight
from xattn_video.pipelines.preflight import check_model_source, check_output_dir
from xattn_video.pipelines.video_io import write_video
from xattn_video.pipelines.videomme_data import SubtitleError, load_questions, load_subtitles, write_synthetic_videomme

SMALL = ["video.height=64", "video.width=64", "video.frames=5", "video.steps=2", "attention.block_size=16",
         "attention.stride=4", "attention.warmup_steps=1", "progress=false"]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a job gets as far as loading a model or making a video."""

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the checks failed")

    monkeypatch.setattr(generate, "load_pipeline", refuse)
    monkeypatch.setattr(generate, "generate_video", refuse)


def one_error_line(capsys, command: str) -> str:
    """The one error line of stderr; progress lines before it ("loading ...") are allowed, a traceback is not."""
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if line.startswith(f"xattn-video {command}: error: ")]
    assert len(errors) == 1 and errors[0] == err[-1], err
    assert not any("Traceback" in line or line.startswith("  File ") for line in err), err
    return errors[0]


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    return path


# -------------------------------------------------------------------------------------------- output paths


def test_output_folder_checks(tmp_path, a_file):
    assert check_output_dir(tmp_path / "new" / "deeper", "output.root") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checked, not created
    assert not list(tmp_path.glob(".xattn-write-probe*"))  # the probe is gone
    with pytest.raises(ValueError, match=r"output.root = '.*a-file' is not allowed: it is a file, not a folder"):
        check_output_dir(a_file, "output.root")
    with pytest.raises(ValueError, match=r"it cannot be created: '.*a-file' is a file, not a folder"):
        check_output_dir(a_file / "sub" / "dir", "output.root")
    # a folder where files cannot be created (as root, chmod does not stop writes: /proc and /sys do)
    with pytest.raises(ValueError, match=r"output.root = '/proc/xattn-out/run' is not allowed: it cannot be "
                                         r"created in '/proc' \("):
        check_output_dir("/proc/xattn-out/run", "output.root")


def test_unwritable_folder_found_by_the_probe(tmp_path, monkeypatch):
    real_open = preflight.os.open

    def read_only(path, flags, *args):
        if ".xattn-write-probe" in str(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(preflight.os, "open", read_only)
    with pytest.raises(ValueError, match=r"'.*' is not allowed: it cannot be written \(Read-only file system\)"):
        check_output_dir(tmp_path, "output.root")


def test_generate_checks_its_output_root_first(a_file, capsys, no_model_load):
    assert cli.main(["generate", *SMALL, f"output.root={a_file}/run"]) == 2
    line = one_error_line(capsys, "generate")
    assert f"output.root = '{a_file}/run' is not allowed: it cannot be created: '{a_file}' is a file" in line


def test_attn_report_checks_its_folder_before_generating(tmp_path, a_file, capsys, monkeypatch, no_model_load):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["attn-report", *SMALL, "--output", f"{a_file}/report"]) == 2
    assert "--output = " in one_error_line(capsys, "attn-report")
    assert cli.main(["attn-report", *SMALL, f"output.root={a_file}"]) == 2
    assert "output.root = " in one_error_line(capsys, "attn-report")


def test_quality_checks_its_output_first(tmp_path, a_file, capsys):
    clip = np.zeros((3, 16, 16, 3), np.uint8)
    for variant in ("dense", "xattn"):
        write_video(tmp_path / "run" / variant / "a.mp4", clip, fps=4)
    assert cli.main(["quality", str(tmp_path / "run"), "--no-lpips", "--output", f"{a_file}/q"]) == 2
    assert "--output = " in one_error_line(capsys, "quality")


def test_videomme_checks_its_output_root_first(a_file, capsys):
    assert cli.main(["videomme", f"output.root={a_file}/vm", "progress=false"]) == 2
    assert "output.root = " in one_error_line(capsys, "videomme")


# -------------------------------------------------------------------------------------------------- models


@pytest.fixture
def no_hub(monkeypatch):
    """The hub as this machine sees it: unreachable (the probe's HTTP call fails at once)."""
    from huggingface_hub import HfApi

    calls = []

    def unreachable(self, repo_id, **kwargs):
        calls.append(repo_id)
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "model_info", unreachable)
    return calls


def test_model_sources_in_one_line(tmp_path, a_file, capsys, monkeypatch, no_model_load, no_hub):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    cases = {
        str(empty): "the folder has no model_index.json, so it is not a diffusers pipeline folder",
        str(tmp_path / "missing"): "looks like a local path but is not a folder",
        str(a_file): "looks like a local path but is not a folder",
        "not/a/hub-id": "no such folder (relative paths start at",
        "org/no-such-model": "the Hugging Face hub cannot be reached (ConnectionError: [Errno -2] Name or service "
                             "not known) and the model is not in the cache",
    }
    for model_id, expected in cases.items():
        assert cli.main(["generate", *SMALL, f"model.id={model_id}", "model.device=cpu",
                         f"output.root={tmp_path / 'run'}"]) == 2
        line = one_error_line(capsys, "generate")
        assert f"model.id = '{model_id}' is not allowed: {expected}" in line
    assert "HF_HUB_OFFLINE=1" in line and "model.id=/path/to/model" in line
    assert no_hub == ["org/no-such-model"]  # local paths never asked the hub
    assert not (tmp_path / "run").exists()


def test_offline_mode_never_asks_the_hub(tmp_path, monkeypatch, no_hub):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(ValueError, match=r"HF_HUB_OFFLINE is set and model_index.json of org/model \(revision "
                                         r"main\) is not in the cache .*hub-cache"):
        check_model_source("org/model", None)
    # a cached snapshot (the layout huggingface_hub writes) is used, offline, without asking
    snapshot = tmp_path / "hub-cache" / "models--org--model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    assert check_model_source("org/model", None) == {"local_files_only": True}
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    said: list[str] = []
    assert check_model_source("org/model", None, log=said.append) == {"local_files_only": True}  # hub down
    assert len(said) == 1 and "cannot be reached" in said[0] and "from the cache" in said[0]
    assert no_hub == ["org/model"]  # asked once, when online


def test_a_real_model_does_not_load_onto_the_cpu_unasked(tmp_path, capsys, monkeypatch, no_model_load, no_hub):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["generate", *SMALL, "model.id=hunyuanvideo-community/HunyuanVideo",
                     f"output.root={tmp_path / 'run'}"]) == 2
    line = one_error_line(capsys, "generate")
    assert "model.device = 'auto' is not allowed here: no CUDA device is visible" in line
    assert "set model.device=cpu to run it there anyway" in line
    assert no_hub == []  # said before anything else, the hub included
    big = tmp_path / "big-model"
    (big / "transformer").mkdir(parents=True)
    with open(big / "transformer" / "weights.safetensors", "wb") as f:
        f.truncate(3 << 30)  # sparse: 3 GiB of "weights" on no disk
    (big / "model_index.json").write_text("{}")
    assert cli.main(["generate", *SMALL, f"model.id={big}", f"output.root={tmp_path / 'run'}"]) == 2
    assert "is 3.0 GiB of weights" in one_error_line(capsys, "generate")


def test_triton_without_cuda_fails_at_the_start(tmp_path, capsys, monkeypatch, no_model_load):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert cli.main(["generate", *SMALL, "attention.backend=triton", f"output.root={tmp_path / 'run'}"]) == 2
    line = one_error_line(capsys, "generate")
    assert "attention.backend = 'triton' (variant xattn) is not allowed on cpu: the triton backend needs a CUDA " \
           "device" in line
    assert not (tmp_path / "run").exists()
    # attn-report too, before its generation
    assert cli.main(["attn-report", *SMALL, "attention.backend=triton", f"output.root={tmp_path / 'run'}"]) == 2
    assert "attention.backend = 'triton'" in one_error_line(capsys, "attn-report")


def test_a_loading_error_is_one_line(tmp_path, capsys, monkeypatch):
    """A folder that passes the checks but does not load (a broken model_index.json): diffusers' error, one
    line."""
    folder = tmp_path / "broken-model"
    folder.mkdir()
    (folder / "model_index.json").write_text("{not json")
    monkeypatch.setattr(generate, "generate_video", lambda *a: pytest.fail("no video without a model"))
    assert cli.main(["generate", *SMALL, f"model.id={folder}", "model.device=cpu",
                     f"output.root={tmp_path / 'run'}"]) == 2
    line = one_error_line(capsys, "generate")
    assert f"model.id = '{folder}': the pipeline could not be loaded: " in line


# ------------------------------------------------------------------------------------------------- inputs


def test_a_prompt_file_that_is_not_utf8(tmp_path, capsys, no_model_load):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a cat\nun caf\u00e9 au lait\n".encode("latin-1"))
    assert cli.main(["generate", *SMALL, f"prompts.file={prompts}", f"output.root={tmp_path / 'run'}"]) == 2
    line = one_error_line(capsys, "generate")
    assert f"prompts.file = '{prompts}' is not allowed: it is not UTF-8 text (byte 0xe9 on line 2)" in line


def test_videomme_goes_past_a_malformed_line_and_says_when_subtitles_are_unreadable(tmp_path, capsys):
    data = write_synthetic_videomme(tmp_path / "vm", n_videos=2, questions_per_video=1, fmt="jsonl")
    table = next((data / "videomme").glob("*.jsonl"))
    lines = table.read_text().splitlines()
    table.write_text("\n".join([lines[0], '{"question_id": "cut short", "videoID": ', lines[1]]) + "\n")
    questions, errors = load_questions(table)
    assert [q.question_id for q in questions] == [json.loads(lines[0])["question_id"],
                                                  json.loads(lines[1])["question_id"]]
    assert [(e.row, e.question_id) for e in errors] == [(1, "row-1")]
    assert errors[0].error.startswith(f"row 1 ({table.name} line 2): not valid JSON (")
    # an unreadable subtitle file: binary junk where the .srt of the first video should be
    srt = data / "subtitle" / "synth000.srt"
    srt.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(SubtitleError, match="holds no SRT cue"):
        load_subtitles(srt)
    out = tmp_path / "run"
    code = cli.main(["videomme", f"data.questions={data}", f"data.subtitles={data / 'subtitle'}",
                     f"output.root={out}", "attention.select=[dense]", "video.fps=2", "video.max_frames=8",
                     "progress=false"])
    captured = capsys.readouterr()
    assert code == 1  # the malformed row is a failure of the run, recorded, and the others were answered
    records = [json.loads(line) for line in (out / "dense" / "answers.jsonl").read_text().splitlines()]
    by_status = {r["question_id"]: r for r in records}
    assert by_status["row-1"]["status"] == "error" and "not valid JSON" in by_status["row-1"]["error"]
    answered = [r for r in records if r["status"] == "ok"]
    assert len(answered) == 2
    first = next(r for r in answered if r["video"] == "synth000")
    second = next(r for r in answered if r["video"] == "synth001")
    assert first["subtitle_lines"] == 0 and "holds no SRT cue" in first["subtitle_error"]
    assert second["subtitle_lines"] > 0 and "subtitle_error" not in second
    assert sum("no subtitles: subtitle file" in line for line in captured.err.splitlines()) == 1


def test_vbench_check_does_not_count_an_empty_mp4(tmp_path, capsys):
    from xattn_video.pipelines import vbench_eval as vb

    folder = tmp_path / "videos"
    clip = np.zeros((3, 16, 16, 3), np.uint8)
    write_video(folder / "a cat-0.mp4", clip, fps=4)
    (folder / "a cat-1.mp4").write_bytes(b"")
    assert [p.name for p in vb._videos(folder)] == ["a cat-0.mp4"]
    cache = tmp_path / "cache"
    for rel in vb.WEIGHTS["temporal_flickering"]:
        (cache / rel).parent.mkdir(parents=True, exist_ok=True)
    code = cli.main(["vbench", str(folder), "--dimensions", "temporal_flickering", "--cache-dir", str(cache),
                     "--vbench-python", sys.executable, "--check"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"{folder}: 1 videos" in err
    assert f"1 video files are empty (0 bytes) and not counted: {folder / 'a cat-1.mp4'}" in err
    assert "not ready: 1 empty video files" in err


def test_a_failed_quality_pair_is_one_line_said_once(tmp_path, capsys):
    clip = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    for variant in ("dense", "xattn"):
        write_video(tmp_path / "run" / variant / "good.mp4", clip, fps=4)
        write_video(tmp_path / "run" / variant / "bad.mp4", clip, fps=4)
    broken = tmp_path / "run" / "xattn" / "bad.mp4"
    broken.write_bytes(broken.read_bytes()[:300])  # cut short: no index
    assert cli.main(["quality", str(tmp_path / "run"), "--no-lpips", "--no-plots", "--progress", "false"]) == 1
    captured = capsys.readouterr()
    failed = [line for line in (captured.err + captured.out).splitlines() if "xattn/bad" in line]
    assert len(failed) == 1, failed
    assert failed[0].startswith(f"FAILED xattn/bad: VideoReadError: {broken} cannot be read: ")
    assert "ffmpeg version" not in captured.err + captured.out
    report = json.loads((tmp_path / "run" / "quality" / "quality.json").read_text())
    assert "\n" not in report["candidates"]["xattn"]["videos"]["bad"]["error"]



@pytest.mark.parametrize("error, expected", [
    ("RepositoryNotFoundError", "the hub has no repo org/typo (or it is private: log in with `hf auth login`)"),
    ("RevisionNotFoundError", "the hub has no revision 'v9' of org/typo (model.revision)"),
])
def test_a_model_the_hub_does_not_have(monkeypatch, error, expected):
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hub_errors

    def answer(self, repo_id, **kwargs):
        cls = getattr(hub_errors, error)
        err = cls.__new__(cls)  # as the hub's 404 makes it (its constructor wants a live HTTP response)
        Exception.__init__(err, "404 Client Error")
        raise err

    monkeypatch.setattr(HfApi, "model_info", answer)
    with pytest.raises(ValueError) as info:
        check_model_source("org/typo", "v9")
    assert str(info.value) == f"model.id = 'org/typo' is not allowed: {expected}" + (
        "; a local folder must exist on disk" if error == "RepositoryNotFoundError" else "")
