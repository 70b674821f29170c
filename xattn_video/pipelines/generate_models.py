"""The model side of ``generate``: which family a pipeline is, how to load it, and how to call it.

A family is read from the pipeline's class and config (``model_index.json`` before loading, ``pipe.config``
after), never from its name:

=============  ============================================================  =================================
family         pipeline                                                      what is particular
=============  ============================================================  =================================
hunyuan        HunyuanVideoPipeline                                          embedded guidance, true CFG
hunyuan15      HunyuanVideo15Pipeline                                        CFG through ``pipe.guider``; no
                                                                             step-end callback
wan21          WanPipeline (one transformer)                                 CFG with a negative prompt
wan22_a14b     WanPipeline with transformer_2 and boundary_ratio             two experts, ``guidance_scale_2``
wan22_ti2v     WanPipeline / WanImageToVideoPipeline, expand_timesteps       optional input image (first frame)
=============  ============================================================  =================================

``model.id: tiny`` is the tiny HunyuanVideo pipeline, ``tiny-<family>`` the tiny pipeline of another family
(:mod:`xattn_video.testing.tiny_pipelines`); anything else loads with ``DiffusionPipeline.from_pretrained``.
Settings a family cannot honour (true CFG outside HunyuanVideo, ``guidance_scale_2`` outside Wan 2.2 A14B, an
input image for a text-only family, ...) are refused with one line before any weights load.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from .generate_config import TINY_MODEL_IDS, ConfigError, GenerateConfig, ModelConfig, VideoConfig
from .safe_io import one_line

FAMILIES = ("hunyuan", "hunyuan15", "wan21", "wan22_a14b", "wan22_ti2v")
FAMILY_NAMES = {
    "hunyuan": "HunyuanVideo",
    "hunyuan15": "HunyuanVideo 1.5",
    "wan21": "Wan 2.1 T2V",
    "wan22_a14b": "Wan 2.2 T2V A14B",
    "wan22_ti2v": "Wan 2.2 TI2V",
}
TINY_IDS = TINY_MODEL_IDS
IMAGE_FAMILIES = ("wan22_ti2v",)
# Pixels per video token along height and width (VAE compression x transformer patch), for the size check.
PIXELS_PER_TOKEN = {"hunyuan": 16, "hunyuan15": 16, "wan21": 16, "wan22_a14b": 16, "wan22_ti2v": 32}
# The pipeline's own text length when video.max_sequence_length is null (HunyuanVideo 1.5's is fixed).
DEFAULT_MAX_SEQUENCE_LENGTH = {"hunyuan": 256, "wan21": 512, "wan22_a14b": 512, "wan22_ti2v": 512}


def classify(class_name: str, config: Mapping[str, Any]) -> str:
    """The family of a pipeline from its class name and config (a ``model_index.json`` or ``pipe.config``)."""
    if class_name == "HunyuanVideoPipeline":
        return "hunyuan"
    if class_name == "HunyuanVideo15Pipeline":
        return "hunyuan15"
    if class_name in ("WanPipeline", "WanImageToVideoPipeline"):
        if config.get("expand_timesteps"):
            return "wan22_ti2v"
        if class_name == "WanPipeline":
            second = config.get("transformer_2")
            has_second = second is not None and not (isinstance(second, (list, tuple)) and second[0] is None)
            if config.get("boundary_ratio") is not None and has_second:
                return "wan22_a14b"
            return "wan21"
    supported = ", ".join(f"{name} ({family})" for family, name in FAMILY_NAMES.items())
    raise ConfigError(f"model.id: pipeline {class_name} is not allowed: generate runs {supported}")


def family_of(pipe: Any) -> str:
    """The family of a loaded pipeline."""
    return classify(type(pipe).__name__, dict(pipe.config))


def family_of_model(model: ModelConfig) -> str:
    """The family of the configured model, read from its ``model_index.json`` (no weights load)."""
    if model.id in TINY_IDS:
        return TINY_IDS[model.id]
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(model.id, revision=model.revision)
    except (OSError, ValueError) as e:  # a missing or broken model_index.json: the same line as a failed load
        raise ConfigError(f"model.id = {model.id!r}: the pipeline could not be loaded: {one_line(e)}") from None
    return classify(index.get("_class_name", "?"), index)


def check_family_settings(family: str, cfg: GenerateConfig) -> None:
    """Refuse, with one line, settings that the family's pipeline would ignore or cannot take."""
    v, name = cfg.video, FAMILY_NAMES[family]
    if v.true_cfg_scale != 1.0 and family != "hunyuan":
        raise ConfigError(f"video.true_cfg_scale = {v.true_cfg_scale} is not allowed for {name}: true CFG is "
                          "HunyuanVideo's; this model's guidance_scale already is classifier-free guidance (1.0)")
    if v.guidance_scale_2 is not None and family != "wan22_a14b":
        raise ConfigError(f"video.guidance_scale_2 = {v.guidance_scale_2} is not allowed for {name}: only Wan 2.2 "
                          "A14B has a second (low-noise) transformer (null)")
    if v.image is not None and family not in IMAGE_FAMILIES:
        raise ConfigError(f"video.image = {v.image!r} is not allowed for {name}: it generates from text only "
                          f"(image input: {', '.join(FAMILY_NAMES[f] for f in IMAGE_FAMILIES)}) (null)")
    if v.max_sequence_length is not None and family == "hunyuan15":
        raise ConfigError(f"video.max_sequence_length = {v.max_sequence_length} is not allowed for {name}: its "
                          "text length is fixed by the pipeline (null)")
    if cfg.output.keep_latents and family == "hunyuan15":
        raise ConfigError(f"output.keep_latents = true is not allowed for {name}: its pipeline has no step-end "
                          "callback to hand over the final latents (false)")
    if family == "hunyuan":
        attention = cfg.resolved.get("attention", {})
        paths = [("attention.min_len", attention.get("min_len"))] + [
            (f"attention.variants.{n}.min_len", (spec or {}).get("min_len"))
            for n, spec in (attention.get("variants") or {}).items()]
        for path, value in paths:
            if value is not None:
                raise ConfigError(f"{path} = {value} is not allowed for {name}: it runs through its own processor, "
                                  "which takes no min_len (null)")
    step = PIXELS_PER_TOKEN[family]
    for key in ("height", "width"):
        if getattr(v, key) % step:
            raise ConfigError(f"video.{key} = {getattr(v, key)} is not allowed for {name}: a multiple of {step} "
                              "(VAE compression x transformer patch)")


# ------------------------------------------------------------------------------------------------- loading


def _torch_dtype(name: str | None, default: Any) -> Any:
    import torch

    return default if name is None else getattr(torch, name)


def _rebuild_as(pipe: Any, cls: type) -> Any:
    """The same components and config under another pipeline class of the family (no copy, no dtype change;
    ``from_pipe`` would cast everything to one dtype)."""
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in pipe.components.items() if k in params}
    config = {k: pipe.config[k] for k in ("boundary_ratio", "expand_timesteps") if k in pipe.config}
    kwargs.update({k: v for k, v in config.items() if k in params})
    return cls(**kwargs)


def load_pipeline(model: ModelConfig, device: str, video: VideoConfig | None = None, hub: dict | None = None) -> Any:
    """Load the configured pipeline (or build a tiny one) in its dtypes, in the class the run needs (TI2V with
    an image: WanImageToVideoPipeline), with the scheduler's shift and the memory options applied. ``hub``:
    extra ``from_pretrained`` arguments from :func:`~xattn_video.pipelines.preflight.check_model_source` (which
    callers run first); a loading error becomes a one-line ConfigError."""
    import torch

    dtype = getattr(torch, model.dtype)
    transformer_dtype = _torch_dtype(model.transformer_dtype, dtype)
    dtypes = {"default": dtype, "transformer": transformer_dtype, "transformer_2": transformer_dtype,
              "vae": _torch_dtype(model.vae_dtype, dtype)}
    if model.id in TINY_IDS:
        from xattn_video.testing.tiny_pipelines import build_tiny_pipeline

        pipe = build_tiny_pipeline(TINY_IDS[model.id], seed=0, dtype=dtype)
        for name in ("transformer", "transformer_2", "vae"):
            module = getattr(pipe, name, None)
            if module is not None and dtypes[name] != dtype:
                module.to(dtypes[name])
    else:
        from diffusers import DiffusionPipeline

        try:
            pipe = DiffusionPipeline.from_pretrained(model.id, torch_dtype=dtypes, revision=model.revision,
                                                     **(hub or {}))
        except (OSError, ValueError) as e:  # diffusers' messages for missing files, bad folders, bad configs
            raise ConfigError(f"model.id = {model.id!r}: the pipeline could not be loaded: {one_line(e)}") from None
    family = family_of(pipe)
    if family == "wan22_ti2v":
        from diffusers import WanImageToVideoPipeline, WanPipeline

        wanted = WanImageToVideoPipeline if video is not None and video.image is not None else WanPipeline
        if type(pipe) is not wanted:
            pipe = _rebuild_as(pipe, wanted)
    if video is not None and video.flow_shift is not None:
        set_flow_shift(pipe, video.flow_shift)
    if model.vae_tiling:
        pipe.vae.enable_tiling()
    if model.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


def set_flow_shift(pipe: Any, shift: float) -> None:
    """Give the pipeline's flow-matching scheduler another timestep shift (same scheduler class and config)."""
    config = pipe.scheduler.config
    key = "flow_shift" if "flow_shift" in config else "shift" if "shift" in config else None
    if key is None:
        raise ConfigError(f"video.flow_shift = {shift} is not allowed: the scheduler {type(pipe.scheduler).__name__} "
                          "has no shift (null)")
    pipe.scheduler = type(pipe.scheduler).from_config(config, **{key: shift})


# ------------------------------------------------------------------------------------------------- calling


def latent_channels(pipe: Any) -> int:
    """Channels of the noise the pipeline denoises (the VAE's latent channels; for HunyuanVideo 1.5 fewer than
    the transformer's input, which also takes the condition latents and mask)."""
    config = pipe.vae.config
    return int(config["z_dim"] if "z_dim" in config else config["latent_channels"])


def load_image(path: str) -> Any:
    """The input image of an image-to-video run, as RGB."""
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def prepare_call(pipe: Any, family: str, cfg: GenerateConfig) -> None:
    """Settings a pipeline takes as state rather than as call arguments (HunyuanVideo 1.5's guider)."""
    if family == "hunyuan15":
        pipe.guider = pipe.guider.new(guidance_scale=cfg.video.guidance_scale)


def call_kwargs(pipe: Any, family: str, cfg: GenerateConfig, prompt: str, latents: Any, image: Any = None) -> dict:
    """The pipeline call arguments of one video, in the family's vocabulary."""
    v = cfg.video
    kwargs: dict[str, Any] = dict(prompt=prompt, negative_prompt=v.negative_prompt, height=v.height, width=v.width,
                                  num_frames=v.frames, num_inference_steps=v.steps, latents=latents,
                                  output_type="np")
    if family == "hunyuan15":
        return kwargs  # guidance: prepare_call
    kwargs["guidance_scale"] = v.guidance_scale
    kwargs["max_sequence_length"] = v.max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH[family]
    if family == "hunyuan":
        kwargs["true_cfg_scale"] = v.true_cfg_scale
    if family == "wan22_a14b" and v.guidance_scale_2 is not None:
        kwargs["guidance_scale_2"] = v.guidance_scale_2
    if image is not None:
        kwargs["image"] = image
    return kwargs


def supports_step_callback(pipe: Any) -> bool:
    """Whether the pipeline's call takes ``callback_on_step_end`` (HunyuanVideo 1.5's does not)."""
    return "callback_on_step_end" in inspect.signature(pipe.__call__).parameters


def transformers_of(pipe: Any) -> list[Any]:
    """The pipeline's denoising transformers, in order (Wan 2.2 A14B has two)."""
    return [t for t in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None)) if t is not None]


__all__ = [
    "FAMILIES",
    "FAMILY_NAMES",
    "TINY_IDS",
    "call_kwargs",
    "check_family_settings",
    "classify",
    "family_of",
    "family_of_model",
    "latent_channels",
    "load_image",
    "load_pipeline",
    "prepare_call",
    "set_flow_shift",
    "supports_step_callback",
    "transformers_of",
]
