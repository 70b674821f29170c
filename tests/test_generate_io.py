"""Atomic writing of videos and sidecars (xattn_video.pipelines.video_io): a final name only ever holds a whole file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from xattn_video.pipelines import video_io
from xattn_video.pipelines.video_io import (
    atomic_path,
    read_video,
    to_uint8_frames,
    video_info,
    write_json_atomic,
    write_video,
)


def smooth_frames(t=5, h=32, w=48) -> np.ndarray:
    """A moving colour gradient in [0, 1]: compresses well, so decoding must come back close."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = [np.stack([(x + 3 * i) / (w + 3 * t), y / h, np.full_like(x, i / t)], axis=-1) for i in range(t)]
    return np.stack(frames)


def test_mp4_roundtrip(tmp_path):
    frames = smooth_frames()
    path = write_video(tmp_path / "v.mp4", frames, fps=12, crf=10)
    back = read_video(path)
    assert back.shape == (5, 32, 48, 3) and back.dtype == np.uint8
    assert np.abs(back.astype(float) - to_uint8_frames(frames).astype(float)).mean() < 3.0
    info = video_info(path)
    assert info["codec"] == "h264" and info["fps"] == 12 and tuple(info["size"]) == (48, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]  # no temporary file left beside it


class Killed(BaseException):
    """Stands for a kill: not an Exception, so nothing on the way catches it."""


def test_interrupted_write_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    real_write_frame = video_io._write_frame
    written = []

    def dying_write_frame(pipe, frame):  # the third frame never reaches ffmpeg: the process is "killed"
        written.append(1)
        if len(written) % 3 == 0:
            raise Killed()
        real_write_frame(pipe, frame)

    tmp_dir = tmp_path / ".partial"
    target = tmp_path / "out" / "v.mp4"
    monkeypatch.setattr(video_io, "_write_frame", dying_write_frame)
    with pytest.raises(Killed):
        write_video(target, smooth_frames(), fps=8, tmp_dir=tmp_dir)
    assert not target.exists()
    assert list(tmp_dir.iterdir()) == []  # the partial file is gone too

    monkeypatch.setattr(video_io, "_write_frame", real_write_frame)
    write_video(target, smooth_frames(t=5), fps=8, tmp_dir=tmp_dir)
    written.clear()
    monkeypatch.setattr(video_io, "_write_frame", dying_write_frame)
    with pytest.raises(Killed):
        write_video(target, smooth_frames(t=9), fps=8, tmp_dir=tmp_dir)
    assert read_video(target).shape[0] == 5  # the finished file from before is intact


def test_atomic_json_and_path(tmp_path):
    target = tmp_path / "meta" / "a.json"
    write_json_atomic(target, {"prompt": "a cat", "density": [1.0, 0.5]})
    assert json.loads(target.read_text()) == {"prompt": "a cat", "density": [1.0, 0.5]}
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"half": ')
            raise RuntimeError("crash while writing")
    assert json.loads(target.read_text())["prompt"] == "a cat"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]
    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / "never.txt"):
            pass  # nothing written: nothing to rename, and no empty file appears
    assert not (tmp_path / "never.txt").exists()


def test_frame_conversion():
    floats = np.zeros((2, 4, 4, 3), np.float32)
    floats[1] = 1.0
    out = to_uint8_frames(floats)
    assert out.dtype == np.uint8 and out[0].max() == 0 and out[1].min() == 255
    pil = [Image.new("RGB", (4, 2), (10, 20, 30))] * 3
    assert to_uint8_frames(pil).shape == (3, 2, 4, 3)
    assert to_uint8_frames(np.zeros((1, 2, 2, 1), np.uint8)).shape == (1, 2, 2, 3)
    bad = floats.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        to_uint8_frames(bad)
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        to_uint8_frames(np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="even"):
        write_video("unused.mp4", np.zeros((1, 5, 4, 3), np.uint8), fps=8)
