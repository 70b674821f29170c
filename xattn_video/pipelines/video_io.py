"""Video and result files written atomically, and mp4 read back.

Why atomic: a batch job is killed at any moment (pre-emption, Ctrl-C, out of memory). Every file is written
under a temporary name, flushed to disk, then renamed over the final name, so a final name always holds a
complete file: resume logic may trust "the file exists" and VBench never reads half an mp4.

mp4 files are H.264 (libx264, yuv420p: plays everywhere), encoded by the ffmpeg that imageio-ffmpeg provides
(or ``$IMAGEIO_FFMPEG_EXE``), run here so that its exit status is checked: imageio's writer ignores it, and a
full disk used to leave an mp4 without its trailer under the final name. Temporary names carry the host and
pid (:func:`xattn_video.pipelines.safe_io.temporary_name`), so a later run can remove those of dead processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, tmp_dir: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on any error (or kill) it is removed.

    The temporary file lives in ``tmp_dir`` (default: beside ``path``; it must be on the same filesystem,
    where a rename is atomic). Its name keeps ``path``'s suffix, which writers such as imageio use to pick a
    format, and carries the host and process id so that concurrent processes never share one.
    """
    from .safe_io import temporary_name

    path = Path(path)
    folder = Path(tmp_dir) if tmp_dir is not None else path.parent
    folder.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a hash instead of the name: long names (VBench prompts) plus a suffix could pass the 255-byte limit
    tag = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    tmp = folder / temporary_name(tag, path.suffix)
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
    18 is visually lossless, which keeps quality metrics about the model rather than the codec). Raises
    :class:`EncoderError` when ffmpeg fails (full disk, ...): then nothing is left under ``path`` or beside it.
    """
    arr = to_uint8_frames(frames)
    height, width = arr.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"H.264 (yuv420p) needs an even height and width, got {height}x{width}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if not 0 <= int(crf) <= 51:
        raise ValueError(f"crf must be in [0, 51], got {crf}")
    with atomic_path(path, tmp_dir) as tmp:
        _encode_h264(tmp, arr, float(fps), int(crf), Path(path))
    return Path(path)


class EncoderError(OSError):
    """ffmpeg did not finish a video; ``errno`` is ENOSPC/EDQUOT/EFBIG when its message says the disk is full."""


def ffmpeg_exe() -> str:
    """The ffmpeg to run: ``$IMAGEIO_FFMPEG_EXE``, else the one imageio-ffmpeg ships or finds."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _write_frame(pipe: Any, frame: np.ndarray) -> None:
    pipe.write(memoryview(frame).cast("B"))


def _encode_h264(out: Path, arr: np.ndarray, fps: float, crf: int, final: Path) -> None:
    """Pipe uint8 RGB frames [T, H, W, 3] into ffmpeg writing ``out`` (the temporary file of ``final``);
    EncoderError unless ffmpeg exits with 0."""
    import re
    from fractions import Fraction

    from .safe_io import DISK_FULL_ERRNOS, DISK_FULL_TEXTS

    height, width = arr.shape[1:3]
    rate = str(Fraction(fps).limit_denominator())
    cmd = [ffmpeg_exe(), "-y", "-nostdin", "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{width}x{height}",
           "-pix_fmt", "rgb24", "-r", rate, "-i", "-", "-an", "-vcodec", "libx264", "-pix_fmt", "yuv420p",
           "-crf", str(crf), "-v", "error", str(out)]
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: ffmpeg can never block on a full pipe
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log)
        try:
            try:
                for frame in arr:
                    _write_frame(proc.stdin, frame)
                proc.stdin.close()
            except BrokenPipeError:  # ffmpeg stopped early: its status and message say why
                pass
            status = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if status == 0:
            return
        log.seek(0)
        lines = [line.strip() for line in log.read().decode(errors="replace").splitlines() if line.strip()]
    why = next((line for line in reversed(lines) if any(t in line for t in DISK_FULL_TEXTS)), None)
    why = re.sub(r"^\[[^\]]*\]\s*", "", why or (lines[-1] if lines else "no message"))  # drop "[out#0/mp4 @ 0x..]"
    code = next((e for e, t in zip(DISK_FULL_ERRNOS, DISK_FULL_TEXTS, strict=True) if t in why), None)
    reason = f"ffmpeg failed writing {final} (exit status {status}): {why}"
    raise EncoderError(code, reason) if code is not None else EncoderError(reason)


class VideoReadError(ValueError):
    """A video file cannot be decoded; the message is one line: the file and ffmpeg's own reasons."""


def _read_error(path: str | os.PathLike, error: Exception) -> VideoReadError:
    """One line from imageio's error, which carries ffmpeg's whole banner: its first line, then the lines
    where ffmpeg says what is wrong ("[in#0 @ 0x..] moov atom not found" -> "moov atom not found")."""
    import re

    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first = lines[0] if lines else type(error).__name__
    causes = list(dict.fromkeys(m.group(1) for line in lines[1:] if (m := re.match(r"^\[[^\]]*\]\s*(.+)$", line))))
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        causes.insert(0, "the file is empty (0 bytes)")
    return VideoReadError(f"{path} cannot be read: {first}" + (f" ({'; '.join(causes[:3])})" if causes else ""))


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Decode an mp4 into uint8 frames [T, H, W, 3]; VideoReadError (one line) when it cannot be decoded."""
    import imageio.v2 as imageio

    try:
        reader = imageio.get_reader(Path(path), format="FFMPEG")
        try:
            frames = [np.asarray(frame) for frame in reader]
        finally:
            reader.close()
    except (OSError, RuntimeError, ValueError) as e:  # imageio raises these with ffmpeg's banner inside
        raise _read_error(path, e) from None
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
    "EncoderError",
    "VideoReadError",
    "atomic_path",
    "ffmpeg_exe",
    "read_video",
    "to_uint8_frames",
    "video_info",
    "write_json_atomic",
    "write_text_atomic",
    "write_video",
]
