"""Qwen2-VL video inputs: frame sampling, and a processor that runs without torchvision.

Qwen2-VL's video processor in transformers 5 needs torchvision, which does not install beside every torch
build (PyPI's torchvision cannot be imported beside torch 2.13 CPU). This module gives the same model inputs
without it:

- :func:`sample_frame_indices` / :func:`read_frames`: frames at ``fps`` frames per second of video, at most
  ``max_frames`` (and at least ``min_frames``), a multiple of the temporal patch, spread evenly over the whole
  video (the rule of the Qwen2-VL reference utilities: n = round(duration x fps), clamped, rounded down to a
  multiple of 2; indices spread evenly from the first frame to the last, rounded half up). ffmpeg decodes
  each video once and hands over the kept frames only.
- :func:`patchify_video`: what Qwen2-VL's video processor does: each frame resized (bicubic) to the
  ``smart_resize`` size (sides multiples of patch x merge, pixel count within [min_pixels, max_pixels],
  aspect kept), rescaled to [0, 1], normalised with the CLIP mean and std; frames padded to a multiple of the
  temporal patch by repeating the last; cut into patches ordered (t, h-block, w-block, h-in-merge,
  w-in-merge) with features (channel, t-in-patch, y, x): ``pixel_values_videos`` [patches, 3 x 2 x 14 x 14]
  and ``video_grid_thw`` [1, 3].
- :class:`BuiltinQwenProcessor`: a tokenizer with Qwen2-VL's chat template plus :func:`patchify_video`; it
  expands ``<|video_pad|>`` to one token per merged patch and marks video tokens in ``mm_token_type_ids``
  (2), as ``Qwen2VLProcessor`` does.
- :class:`RealQwenProcessor`: the model's own ``AutoProcessor`` (needs torchvision), same call.

The builtin path resizes with torch's antialiased uint8 bicubic interpolation, the very kernel torchvision's
resize runs on CPU for the real video processor, and normalises in the same float32 operations: where
torchvision imports, tests check both processors give equal tensors and tokens. Real-model runs use the real
processor whenever torchvision imports.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "BuiltinQwenProcessor",
    "QwenVideoGeometry",
    "RealQwenProcessor",
    "load_qwen_processor",
    "patchify_video",
    "read_frames",
    "sample_frame_indices",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIDEO_TOKEN = "<|video_pad|>"
BUILTIN_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
IMAGE_TOKEN = "<|image_pad|>"


# ------------------------------------------------------------------------------------------------ frames


def sample_frame_indices(total_frames: int, video_fps: float, *, fps: float, max_frames: int,
                         min_frames: int = 4, factor: int = 2) -> list[int]:
    """Indices of the frames to keep: about ``fps`` a second, within [min_frames, max_frames] (and the video's
    frame count), a multiple of ``factor``, spread evenly from the first frame to the last (index i of n is
    floor(i x (total - 1) / (n - 1) + 0.5))."""
    if total_frames < 1:
        raise ValueError(f"the video holds no frame (total_frames={total_frames})")
    if not video_fps > 0 or not fps > 0:
        raise ValueError(f"fps must be > 0, got video fps {video_fps} and sampling fps {fps}")
    if max_frames < factor:
        raise ValueError(f"max_frames must be >= {factor} (the temporal patch), got {max_frames}")
    n = round(total_frames / video_fps * fps)
    n = min(max(n, min_frames), max_frames, max(total_frames, factor))
    n = max(factor, n // factor * factor)
    step = (total_frames - 1) / (n - 1)
    return [int(math.floor(i * step + 0.5)) for i in range(n)]


def _ffmpeg_sync_args() -> list[str]:
    """Keep every selected frame once: ``-fps_mode passthrough`` (ffmpeg >= 5.1), ``-vsync 0`` before."""
    import imageio_ffmpeg

    m = re.search(r"(\d+)\.(\d+)", imageio_ffmpeg.get_ffmpeg_version())
    if m and (int(m.group(1)), int(m.group(2))) >= (5, 1):
        return ["-fps_mode", "passthrough"]
    return ["-vsync", "0"]


def read_frames(path: str | os.PathLike, *, fps: float, max_frames: int, min_frames: int = 4,
                factor: int = 2) -> tuple[np.ndarray, dict]:
    """Decode the sampled frames of a video: uint8 [T, H, W, 3] and info (video fps, frame count, duration,
    the kept indices and their times in seconds, the sampling rate obtained: kept / total x video fps).

    ffmpeg decodes the stream once and hands over only the kept frames (a ``select`` filter on the frame
    number that encodes :func:`sample_frame_indices`' rule), so an hour of video costs one decode, not an
    hour of RGB frames through a pipe. The frame count comes from the container (duration x fps); when the
    stream ends early, the last frame obtained stands in for the missing ones (``info["missing"]`` counts
    them). Raises FileNotFoundError for a missing file, ValueError for one ffmpeg cannot decode.
    """
    import imageio_ffmpeg

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video {str(path)!r} does not exist")
    try:
        probe = imageio_ffmpeg.read_frames(str(path))
        meta = next(probe)
        probe.close()
    except Exception as e:  # imageio-ffmpeg raises RuntimeError / OSError / StopIteration on bad files
        raise ValueError(f"video {str(path)!r} cannot be opened: {type(e).__name__}: {e}") from None
    video_fps, duration = float(meta.get("fps") or 0.0), float(meta.get("duration") or 0.0)
    if not video_fps > 0 or not duration > 0:
        raise ValueError(f"video {str(path)!r} has no usable fps/duration (fps={video_fps}, duration={duration})")
    total = max(1, round(duration * video_fps))
    indices = sample_frame_indices(total, video_fps, fps=fps, max_frames=max_frames, min_frames=min_frames,
                                   factor=factor)
    width, height = meta["size"]
    if len(indices) > 1:
        step = repr((total - 1) / (len(indices) - 1))
        select = f"select='eq(n\\,floor(floor(n/{step}+0.5)*{step}+0.5))'"
    else:
        select = "select='eq(n\\,0)'"
    frames = []
    try:
        reader = imageio_ffmpeg.read_frames(str(path), output_params=["-vf", select, *_ffmpeg_sync_args()])
        next(reader)
        for raw in reader:
            frames.append(np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3))
            if len(frames) == len(indices):
                break
        reader.close()
    except Exception as e:
        raise ValueError(f"video {str(path)!r} cannot be decoded: {type(e).__name__}: {e}") from None
    if not frames:
        raise ValueError(f"video {str(path)!r}: no frame could be decoded")
    missing = len(indices) - len(frames)
    frames.extend([frames[-1]] * missing)
    info = {
        "video_fps": video_fps,
        "duration_s": duration,
        "total_frames": total,
        "indices": indices,
        "times_s": [i / video_fps for i in indices],
        "sampled_fps": len(indices) / total * video_fps,  # as Qwen's reference and transformers' VideoMetadata
        "missing": missing,
    }
    return np.ascontiguousarray(np.stack(frames)), info


# ------------------------------------------------------------------------------------------------ pixels


@dataclass(frozen=True)
class QwenVideoGeometry:
    """How Qwen2-VL cuts a video into patches (its video processor's settings; defaults: Qwen2-VL-7B's)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def frame_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) each frame is resized to."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        return smart_resize(height, width, factor=self.factor, min_pixels=self.min_pixels,
                            max_pixels=self.max_pixels)

    def tokens(self, grid_thw: Sequence[int]) -> int:
        """LLM tokens of a video of this grid (one per merge x merge patches)."""
        t, h, w = (int(x) for x in grid_thw)
        return t * h * w // self.merge_size**2


def patchify_video(frames: np.ndarray, geometry: QwenVideoGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """``pixel_values_videos`` float32 [patches, C x tp x p x p] and ``video_grid_thw`` int64 [1, 3] of one video
    given as uint8 frames [T, H, W, 3] (see the module docstring for the exact layout)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] == 0:
        raise ValueError(f"frames must be uint8 [T, H, W, 3] with T >= 1, got {frames.dtype} {frames.shape}")
    height, width = geometry.frame_size(frames.shape[1], frames.shape[2])
    # transformers' fused rescale + normalise, in its float32 operations: (x - mean / (1/255)) / (std / (1/255))
    mean = (torch.tensor(geometry.image_mean) * (1.0 / (1 / 255))).view(-1, 1, 1)
    std = (torch.tensor(geometry.image_std) * (1.0 / (1 / 255))).view(-1, 1, 1)
    video = np.empty((frames.shape[0], 3, height, width), dtype=np.float32)
    for start in range(0, frames.shape[0], 32):  # a few frames at a time: an hour of frames is not copied whole
        chunk = torch.from_numpy(np.ascontiguousarray(frames[start:start + 32])).permute(0, 3, 1, 2).contiguous()
        if (height, width) != tuple(chunk.shape[-2:]):
            # the kernel torchvision's resize runs for uint8 bicubic on CPU (antialiased, fixed point, horizontal
            # pass first). PIL's bicubic rounds its weights otherwise (+-1 level) and, when one side grows and the
            # other shrinks, runs the shrinking pass first (up to ~25 levels apart on noise)
            chunk = torch.nn.functional.interpolate(chunk, size=(height, width), mode="bicubic",
                                                    align_corners=False, antialias=True)
        video[start:start + 32] = chunk.to(torch.float32).sub_(mean).div_(std).numpy()
    tp, p, m = geometry.temporal_patch_size, geometry.patch_size, geometry.merge_size
    if pad := -video.shape[0] % tp:
        video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)])
    t, c = video.shape[0] // tp, video.shape[1]
    gh, gw = height // p, width // p
    blocks = video.reshape(t, tp, c, gh // m, m, p, gw // m, m, p)
    # -> (t, h-block, w-block, h-in-merge, w-in-merge, channel, t-in-patch, y, x)
    blocks = blocks.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values = np.ascontiguousarray(blocks.reshape(t * gh * gw, c * tp * p * p))
    return torch.from_numpy(pixel_values), torch.tensor([[t, gh, gw]], dtype=torch.int64)


# ------------------------------------------------------------------------------------------------ processors


def video_messages(text: str, system: str | None = None) -> list[dict]:
    """A one-turn chat: the video first, then the text (Qwen2-VL's usual order)."""
    messages: list[dict] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]})
    return messages


class BuiltinQwenProcessor:
    """Chat prompt plus video to Qwen2-VL model inputs, with this module's :func:`patchify_video`."""

    kind = "builtin"

    def __init__(self, tokenizer: Any, geometry: QwenVideoGeometry, *, seconds_per_grid: bool = False):
        self.tokenizer = tokenizer
        self.geometry = geometry
        self.seconds_per_grid = seconds_per_grid  # Qwen2.5-VL: time between temporal patches, for its M-RoPE
        self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def chat_prompt(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def __call__(self, prompt: str, frames: np.ndarray, info: dict | None = None) -> dict[str, torch.Tensor]:
        """Model inputs of one prompt holding one ``<|video_pad|>`` and its frames; ``info`` is
        :func:`read_frames`' (its sampled_fps gives Qwen2.5-VL's ``second_per_grid_ts``)."""
        if prompt.count(VIDEO_TOKEN) != 1:
            raise ValueError(f"the prompt must hold exactly one {VIDEO_TOKEN}, found {prompt.count(VIDEO_TOKEN)}")
        pixel_values, grid = patchify_video(frames, self.geometry)
        text = prompt.replace(VIDEO_TOKEN, VIDEO_TOKEN * self.geometry.tokens(grid[0]))
        input_ids = torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]], dtype=torch.long)
        types = torch.zeros_like(input_ids)  # int64, as Qwen2VLProcessor returns it
        types[input_ids == self.image_token_id] = 1
        types[input_ids == self.video_token_id] = 2
        out = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "mm_token_type_ids": types,
            "pixel_values_videos": pixel_values,
            "video_grid_thw": grid,
        }
        if self.seconds_per_grid:
            if not info or not info.get("sampled_fps"):
                raise ValueError("Qwen2.5-VL inputs need the sampling rate: pass read_frames' info")
            out["second_per_grid_ts"] = torch.tensor([self.geometry.temporal_patch_size / info["sampled_fps"]])
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


class RealQwenProcessor:
    """The model's own processor (``AutoProcessor``; its video processor needs torchvision), same call.

    Frames are sampled by :func:`read_frames` and handed over as they are (``do_sample_frames=False``);
    ``size`` overrides the processor's pixel range when given.
    """

    kind = "real"

    def __init__(self, processor: Any, size: dict | None = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.size = size

    def chat_prompt(self, messages: list[dict]) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def __call__(self, prompt: str, frames: np.ndarray, info: dict | None = None) -> dict[str, torch.Tensor]:
        from transformers.video_utils import VideoMetadata

        videos_kwargs: dict[str, Any] = {"do_sample_frames": False}
        if self.size:
            videos_kwargs["size"] = self.size
        valid = getattr(getattr(self.processor.video_processor, "valid_kwargs", None), "__annotations__", {})
        if "cap_pixels_per_frame" in valid:  # transformers 5.2x: keep the per-frame range, as the builtin path
            videos_kwargs["cap_pixels_per_frame"] = False
        if info:  # the frames' real rate: Qwen2.5-VL's temporal M-RoPE spacing comes from it
            videos_kwargs["video_metadata"] = [VideoMetadata(
                total_num_frames=info["total_frames"], fps=info["video_fps"], duration=info["duration_s"],
                frames_indices=list(info["indices"]), height=frames.shape[1], width=frames.shape[2])]
        batch = self.processor(text=[prompt], videos=[frames], return_tensors="pt", videos_kwargs=videos_kwargs)
        return {k: v for k, v in batch.items() if k != "video_metadata"}

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _geometry_from_files(model_id: str, revision: str | None, min_pixels: int | None,
                         max_pixels: int | None) -> QwenVideoGeometry:
    """The video geometry a model folder or repo declares (video_preprocessor_config.json, else
    preprocessor_config.json), with the given pixel range on top."""
    import json

    from transformers.utils import cached_file

    found: dict = {}
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        path = cached_file(model_id, name, revision=revision, _raise_exceptions_for_missing_entries=False)
        if path:
            found.update(json.loads(Path(path).read_text(encoding="utf-8")))
    size = found.get("size") or {}
    kw = {k: found[k] for k in ("patch_size", "temporal_patch_size", "merge_size") if k in found}
    lo = min_pixels or found.get("min_pixels") or size.get("shortest_edge")
    hi = max_pixels or found.get("max_pixels") or size.get("longest_edge")
    if lo:
        kw["min_pixels"] = int(lo)
    if hi:
        kw["max_pixels"] = int(hi)
    for key, default in (("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)):
        kw[key] = tuple(found.get(key, default))
    return QwenVideoGeometry(**kw)


def torchvision_usable() -> bool:
    """Whether torchvision imports here (transformers' Qwen2-VL video processor needs it)."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # a broken install raises RuntimeError, not only ImportError
        return False
    return True


def load_qwen_processor(model_id: str, *, mode: str = "auto", revision: str | None = None,
                        min_pixels: int | None = None, max_pixels: int | None = None) -> Any:
    """The processor of a real Qwen2-VL family checkpoint.

    mode: ``real`` (the model's AutoProcessor; needs torchvision), ``builtin`` (its tokenizer and chat
    template plus :func:`patchify_video` with the geometry its config files declare), ``auto`` (real when
    torchvision imports, else builtin; the choice is reported by the caller through ``.kind``).
    """
    if mode not in ("auto", "real", "builtin"):
        raise ValueError(f"processor mode must be one of ['auto', 'real', 'builtin'], got {mode!r}")
    if mode == "real" or (mode == "auto" and torchvision_usable()):
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(model_id, revision=revision)
        size = None
        if min_pixels or max_pixels:
            current = dict(getattr(processor.video_processor, "size", {}) or {})
            size = {"shortest_edge": min_pixels or current.get("shortest_edge"),
                    "longest_edge": max_pixels or current.get("longest_edge")}
        return RealQwenProcessor(processor, size)
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_id, revision=revision)
    model_type = AutoConfig.from_pretrained(model_id, revision=revision).model_type
    if model_type not in BUILTIN_MODEL_TYPES:
        raise ValueError(f"the builtin processor knows the video inputs of {list(BUILTIN_MODEL_TYPES)}, not "
                         f"{model_type!r}: use the model's own processor (mode 'real', needs torchvision)")
    return BuiltinQwenProcessor(tokenizer, _geometry_from_files(model_id, revision, min_pixels, max_pixels),
                                seconds_per_grid=model_type == "qwen2_5_vl")

