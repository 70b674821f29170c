"""One entry point to the tiny offline video pipelines, one per model family the project supports.

``build_tiny_pipeline(family, seed=, dtype=, device=)`` returns the real diffusers pipeline class of the
family around tiny random models (no download), deterministic for ``seed``:

============  =====================================  ==========================  ===================
family        pipeline                               video (frames x H x W)      video tokens
============  =====================================  ==========================  ===================
hunyuan       HunyuanVideoPipeline                   9 x 128 x 128               3 x 16 x 16 = 768
hunyuan15     HunyuanVideo15Pipeline                 9 x 128 x 192               3 x 8 x 12 = 288
wan21         WanPipeline (Wan 2.1 T2V)              9 x 128 x 192               3 x 8 x 12 = 288
wan22_a14b    WanPipeline, transformer_2, boundary   9 x 128 x 192               3 x 8 x 12 = 288
wan22_ti2v    WanImageToVideoPipeline, expand_ts     9 x 256 x 384 + image       3 x 8 x 12 = 288
============  =====================================  ==========================  ===================

``tiny_call_kwargs(family)`` gives those sizes as pipeline call arguments (with the input image for
``wan22_ti2v``), so ``pipe(prompt, **tiny_call_kwargs(family), generator=...)`` makes a small video in about a
second on a CPU. The token counts hold several 16-token blocks per frame row, so XAttention at
``block_size=16`` has blocks to skip.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["FAMILIES", "TinyFamily", "build_tiny_pipeline", "tiny_call_kwargs", "tiny_image", "to_dtype_quietly"]


@dataclass(frozen=True)
class TinyFamily:
    """A tiny pipeline's builder (``module:function``) and the video size it is meant to make."""

    name: str
    builder: str
    height: int
    width: int
    frames: int
    needs_image: bool = False


FAMILIES: dict[str, TinyFamily] = {
    f.name: f
    for f in (
        TinyFamily("hunyuan", "tiny:build_tiny_hunyuan_pipeline", 128, 128, 9),
        TinyFamily("hunyuan15", "tiny_hunyuan15:build_tiny_hunyuan15_pipeline", 128, 192, 9),
        TinyFamily("wan21", "tiny_wan:build_tiny_wan21_pipeline", 128, 192, 9),
        TinyFamily("wan22_a14b", "tiny_wan:build_tiny_wan22_a14b_pipeline", 128, 192, 9),
        TinyFamily("wan22_ti2v", "tiny_wan:build_tiny_wan22_ti2v_pipeline", 256, 384, 9, needs_image=True),
    )
}


def _family(family: str) -> TinyFamily:
    if family not in FAMILIES:
        raise ValueError(f"family = {family!r} is not allowed: one of {', '.join(FAMILIES)}")
    return FAMILIES[family]


def build_tiny_pipeline(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> Any:
    """The tiny random pipeline of ``family`` (see :data:`FAMILIES`), on ``device`` in ``dtype``."""
    module_name, function = _family(family).builder.split(":")
    build = getattr(importlib.import_module(f"{__package__}.{module_name}"), function)
    if family == "hunyuan":  # the original tiny builder has no device argument
        return build(seed=seed, dtype=dtype).to(device)
    return build(seed=seed, dtype=dtype, device=device)


def tiny_image(height: int, width: int, seed: int = 0) -> Any:
    """A deterministic RGB test image (smooth colour ramps plus seeded noise), as a PIL image."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(seed)
    ramps = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), (x + y) / max(width + height - 2, 1)], -1)
    pixels = np.clip(0.8 * ramps + 0.2 * rng.random((height, width, 3)), 0.0, 1.0)
    return Image.fromarray((pixels * 255).round().astype(np.uint8), mode="RGB")


def tiny_call_kwargs(family: str, steps: int = 2) -> dict:
    """Call arguments for a tiny video of ``family``: height, width, num_frames, num_inference_steps (and the
    input ``image`` for image-to-video families)."""
    f = _family(family)
    kwargs: dict[str, Any] = dict(height=f.height, width=f.width, num_frames=f.frames, num_inference_steps=steps)
    if f.needs_image:
        kwargs["image"] = tiny_image(f.height, f.width)
    return kwargs


def to_dtype_quietly(pipe: Any, dtype: torch.dtype) -> Any:
    """Cast every model of a tiny pipeline to ``dtype`` without diffusers' "keep these modules in float32"
    notice (it is about loading real checkpoints; the tiny models take any dtype)."""
    from diffusers.utils import logging as diffusers_logging

    if dtype == torch.float32:
        return pipe
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return pipe.to(dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)
