"""``xattn_video.enable(pipe, **settings)``: XAttention on a supported diffusers video pipeline.

HunyuanVideo keeps its dedicated processor by default (``integration="processor"``: 1.28-1.37x faster than stock
diffusers on dense steps alone, see the README); every other supported model, and HunyuanVideo with
``integration="backend"``, gets the ``xattn`` attention backend with the step hooks (:mod:`.backend`). On
HunyuanVideo 720p the two integrations measured equally fast (the backend 0.8-1.0% shorter a step on an H100, within
the run-to-run spread; docs/benchmarks.md).

Supported: pipelines whose transformer's attention processors call diffusers' ``dispatch_attention_fn``. CogVideoX
and Mochi call ``F.scaled_dot_product_attention`` directly, so no backend reaches them: they, and any pipeline
not listed, are refused with one line.
"""

from __future__ import annotations

import torch

__all__ = ["SUPPORTED_PIPELINES", "SUPPORTED_TRANSFORMERS", "enable"]

SUPPORTED_PIPELINES = (
    "HunyuanVideoPipeline",
    "HunyuanVideo15Pipeline",
    "HunyuanVideo15ImageToVideoPipeline",
    "WanPipeline",
    "WanImageToVideoPipeline",
    "WanVideoToVideoPipeline",
    "SkyReelsV2Pipeline",
    "SkyReelsV2ImageToVideoPipeline",
    "LTXPipeline",
    "LTXImageToVideoPipeline",
)
SUPPORTED_TRANSFORMERS = (
    "HunyuanVideoTransformer3DModel",
    "HunyuanVideo15Transformer3DModel",
    "WanTransformer3DModel",
    "SkyReelsV2Transformer3DModel",
    "LTXVideoTransformer3DModel",
)
INTEGRATIONS = ("auto", "processor", "backend")
_BACKEND_ONLY = ("warmup_fraction", "min_len", "select_backend")


def _names(obj) -> set[str]:
    return {cls.__name__ for cls in type(obj).__mro__}


def _unsupported(what: str) -> TypeError:
    return TypeError(
        f"xattn_video.enable expects a supported diffusers pipeline or its transformer, got {what}; supported "
        f"pipelines: {', '.join(SUPPORTED_PIPELINES)}"
    )


def resolve(pipe_or_transformer) -> tuple[object | None, list[torch.nn.Module]]:
    """(pipeline or None, its transformers in order: transformer then transformer_2 when present)."""
    if isinstance(pipe_or_transformer, torch.nn.Module):
        if not _names(pipe_or_transformer) & set(SUPPORTED_TRANSFORMERS):
            raise _unsupported(type(pipe_or_transformer).__name__)
        return None, [pipe_or_transformer]
    if not _names(pipe_or_transformer) & set(SUPPORTED_PIPELINES):
        raise _unsupported(type(pipe_or_transformer).__name__)
    transformers = [
        t for t in (getattr(pipe_or_transformer, n, None) for n in ("transformer", "transformer_2")) if t is not None
    ]
    for transformer in transformers:
        if not _names(transformer) & set(SUPPORTED_TRANSFORMERS):
            raise _unsupported(f"{type(pipe_or_transformer).__name__} with a {type(transformer).__name__}")
    if not transformers:
        raise ValueError(f"{type(pipe_or_transformer).__name__} has no transformer to enable XAttention on")
    return pipe_or_transformer, transformers


def enable(pipe_or_transformer, *, integration: str = "auto", **settings):
    """Put XAttention on a supported pipeline (or transformer); returns an object with ``stats``,
    ``save_stats(path)``, ``reset_stats()`` and ``settings()``.

    ``integration``: "auto" (HunyuanVideo: its processor; others: the backend), "processor" (HunyuanVideo
    only) or "backend". ``settings``: threshold, stride, block_size, warmup_steps, dense_layers, backend,
    estimate_fp8, token_order, tile, refresh_every (estimate the kept blocks every k sparse steps, reuse them in
    between); with the backend also warmup_fraction, min_len and select_backend (default True: the
    transformers' attention processors dispatch to ``xattn``; False leaves that to ``with
    attention_backend("xattn"):``). Calling it again replaces the earlier set-up on those transformers.
    """
    if integration not in INTEGRATIONS:
        raise ValueError(f"integration must be one of {list(INTEGRATIONS)}, got {integration!r}")
    pipe, transformers = resolve(pipe_or_transformer)
    is_hunyuan = "HunyuanVideoTransformer3DModel" in _names(transformers[0])
    if integration == "auto":
        integration = "processor" if is_hunyuan else "backend"
    if integration == "processor":
        if not is_hunyuan:
            raise ValueError(
                f"integration='processor' is for HunyuanVideo only; {type(transformers[0]).__name__} uses "
                "integration='backend'"
            )
        extra = sorted(set(settings) & set(_BACKEND_ONLY))
        if extra:
            raise ValueError(f"{', '.join(extra)}: only with integration='backend' for HunyuanVideo")
        from .hunyuan import enable as enable_processor

        _detach_backend(transformers)
        return enable_processor(transformers[0], **settings)
    from ._diffusers_private import check_diffusers_version

    check_diffusers_version()
    from .backend import enable_backend

    _detach_processor(transformers)
    return enable_backend(transformers, getattr(pipe, "scheduler", None), **settings)


def _detach_backend(transformers) -> None:
    """A transformer that had the backend gets its processors' earlier backend back and loses the step hook."""
    from .backend import _hook_of

    for transformer in transformers:
        hook = _hook_of(transformer)
        if hook is not None:
            hook.session.detach()


def _detach_processor(transformers) -> None:
    """A HunyuanVideo transformer that had the processor gets diffusers' stock processors back first."""
    from .hunyuan import XAttnProcessor

    for transformer in transformers:
        processors = getattr(transformer, "attn_processors", {})
        if any(isinstance(p, XAttnProcessor) for p in processors.values()):
            from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

            for proc in processors.values():
                if isinstance(proc, XAttnProcessor):
                    proc.detach()
            for block in list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks):
                block.attn.set_processor(HunyuanVideoAttnProcessor2_0())
            for module in transformer.modules():  # the token refiner's attention: stock default
                if getattr(module, "processor", None) is not None and isinstance(module.processor, XAttnProcessor):
                    module.set_processor(module.processor._stock_processor(module))
