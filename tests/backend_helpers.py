"""Shared set-up of the ``xattn`` backend tests: tiny pipelines, their stock outputs, and a clean slate."""

from __future__ import annotations

import functools

import torch

from xattn_video.diffusion.step_hooks import unregister
from xattn_video.testing.tiny_pipelines import build_tiny_pipeline, tiny_call_kwargs

FAMILIES = ("wan21", "wan22_a14b", "wan22_ti2v", "hunyuan15")
PROMPT = "a cat walks on the grass"
# small blocks and a low min_len so the tiny pipelines' 288 video tokens (18 blocks of 16) really go sparse
SPARSE = dict(stride=4, block_size=16, min_len=16)
LOW_THRESHOLD = 0.3  # random tiny weights give flat attention: a low threshold makes sparse steps clearly sparse


@functools.cache
def pipeline(family: str):
    return build_tiny_pipeline(family, seed=0)


def generate(pipe, family: str, steps: int = 3, seed: int = 0, **kw) -> torch.Tensor:
    out = pipe(
        prompt=PROMPT,
        **tiny_call_kwargs(family, steps=steps),
        output_type="latent",
        generator=torch.Generator().manual_seed(seed),
        **kw,
    )
    return out.frames


def clean(pipe) -> None:
    """Take XAttention off a pipeline: no step hook, processors back on diffusers' default backend."""
    for name in ("transformer", "transformer_2"):
        transformer = getattr(pipe, name, None)
        if transformer is None:
            continue
        unregister(transformer)
        for module in transformer.modules():
            processor = getattr(module, "processor", None)
            if processor is not None and hasattr(processor, "_attention_backend"):
                processor._attention_backend = None


@functools.cache
def stock(family: str, steps: int = 3) -> torch.Tensor:
    pipe = pipeline(family)
    clean(pipe)
    return generate(pipe, family, steps)


def step_rows(stats: dict) -> list[tuple]:
    """(generation, step, mode, density) of every recorded step."""
    return [(g["generation"], s["step"], s["mode"], s["density"]) for g in stats["generations"] for s in g["steps"]]
