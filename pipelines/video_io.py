"""Video and result files written atomically, and mp4 read back.

Why atomic: a batch job is killed at any moment (pre-emption, Ctrl-C, out of memory). Every file is written
under a temporary name, flushed to disk, then renamed over the final name, so a final name always holds a
complete file: resume logic may trust "the file exists" and VBench never reads half an mp4.

mp4 files are H.264 (libx264, yuv420p: plays everywhere) through imageio with imageio-ffmpeg.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, tmp_dir: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on any error (or kill) it is removed.

    The temporary file lives in ``tmp_dir`` (default: beside ``path``; it must be on the same filesystem,
    where a rename is atomic). Its name keeps ``path``'s suffix, which writers such as imageio use to pick a
    format, and carries the process id so that concurrent processes never share one.
    """
    path = Path(path)
    folder = Path(tmp_dir) if tmp_dir is not None else path.parent
    folder.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a hash instead of the name: long names (VBench prompts) plus a suffix could pass the 255-byte limit
    tag = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    tmp = folder / f".{tag}.{os.getpid()}.tmp{path.suffix}"
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to the temporary file {tmp} for {path}")
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str, tmp_dir: str | os.PathLike | None = None) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path, tmp_dir) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any, tmp_dir: str | os.PathLike | None = None) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n", tmp_dir)


def to_uint8_frames(frames: Any) -> np.ndarray:
    """Frames as a uint8 array [T, H, W, 3].

    Accepts what diffusers' video pipelines return: a float array/tensor [T, H, W, C] in [0, 1]
    (``output_type="np"``), a uint8 array, or a list of PIL images. One-channel frames become grey RGB.
    """
    if isinstance(frames, Sequence) and not isinstance(frames, np.ndarray) and len(frames) and hasattr(
        frames[0], "convert"
    ):
        frames = np.stack([np.asarray(f.convert("RGB")) for f in frames])
    if hasattr(frames, "detach"):  # a torch tensor, without importing torch here
        frames = frames.detach().float().cpu().numpy()
    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"frames must be [T, H, W, 3] (or [T, H, W, 1]), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError("frames must hold at least one frame")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"frames must be uint8 or float in [0, 1], got dtype {arr.dtype}")
        if not np.isfinite(arr).all():
            raise ValueError("frames hold NaN or Inf (did the generation diverge?)")
        arr = (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr)


def write_video(
    path: str | os.PathLike,
    frames: Any,
    fps: float,
    *,
    crf: int = 18,
    tmp_dir: str | os.PathLike | None = None,
) -> Path:
    """Write frames as an H.264 mp4 at ``fps``, atomically; return the path.

    Height and width must be even (yuv420p). ``crf`` is x264's constant rate factor (0 lossless .. 51 worst;
    18 is visually lossless, which keeps quality metrics about the model rather than the codec).
    """
    import imageio.v2 as imageio

    arr = to_uint8_frames(frames)
    height, width = arr.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"H.264 (yuv420p) needs an even height and width, got {height}x{width}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if not 0 <= int(crf) <= 51:
        raise ValueError(f"crf must be in [0, 51], got {crf}")
    with atomic_path(path, tmp_dir) as tmp:
        writer = imageio.get_writer(
            tmp,
            format="FFMPEG",
            fps=float(fps),
            codec="libx264",
            pixelformat="yuv420p",
            quality=None,
            output_params=["-crf", str(int(crf))],
            macro_block_size=2,
            ffmpeg_log_level="error",
        )
        try:
            for frame in arr:
                writer.append_data(frame)
        finally:
            writer.close()
    return Path(path)


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Decode an mp4 into uint8 frames [T, H, W, 3]."""
    import imageio.v2 as imageio

    reader = imageio.get_reader(Path(path), format="FFMPEG")
    try:
        frames = [np.asarray(frame) for frame in reader]
    finally:
        reader.close()
    if not frames:
        raise ValueError(f"{path}: no frames could be decoded")
    return np.stack(frames)


def video_info(path: str | os.PathLike) -> dict:
    """Container metadata of a video file: fps, codec, size (width, height), duration in seconds."""
    import imageio.v2 as imageio

    reader = imageio.get_reader(Path(path), format="FFMPEG")
    try:
        meta = reader.get_meta_data()
    finally:
        reader.close()
    return {k: meta.get(k) for k in ("fps", "codec", "size", "duration", "pix_fmt")}


__all__ = [
    "atomic_path",
    "read_video",
    "to_uint8_frames",
    "video_info",
    "write_json_atomic",
    "write_text_atomic",
    "write_video",
]
