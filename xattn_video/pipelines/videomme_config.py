"""Configuration of ``xattn-video videomme``: schema, embedded default, layering and validation.

Layers, later wins: the embedded default (:data:`DEFAULT_YAML`: the tiny random Qwen2-VL on a synthetic
Video-MME-format set, CPU), a YAML file, then ``key=value`` overrides. As for ``generate``, a layer that
defines ``attention.variants`` replaces the variants before it. Every error names the key path, the value
and what is allowed, before any model loads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .config_checks import COMMON_XATTN_KEYS, ConfigError, common_xattn_setting, parse_variants, resolve_layers
from .config_checks import check_int as _int
from .config_checks import check_keys as _check_keys
from .config_checks import check_num as _num
from .config_checks import fail as _fail
from .generate_config import _merge_layer

INSTRUCTION = ("Select the best answer to the following multiple-choice question based on the video. "
               "Respond with only the letter (A, B, C, or D) of the correct option.")

DEFAULT_YAML = f"""\
model:
  id: tiny                  # Qwen2-VL family repo id or local folder (Qwen2-VL, Qwen2.5-VL), or "tiny"
  revision: null
  dtype: float32            # float32 | float16 | bfloat16
  device: auto              # auto (cuda when there is one, else cpu) | cpu | cuda | cuda:N
  processor: auto           # auto (the model's own when torchvision imports, else builtin) | real | builtin
data:
  questions: null           # Video-MME question table (parquet/csv/json/jsonl) or its folder; null: synthetic set
  videos: null              # folder of <videoID>.mp4; null: <questions folder>/data
  subtitles: null           # folder of <videoID>.srt; null: no subtitles
  limit: null               # only the first N questions (after the duration filter)
  durations: null           # e.g. [short, medium]; null: all
video:
  fps: 1.0                  # frames sampled per second of video
  max_frames: 16            # frame cap (the paper's setting: 768)
  min_frames: 4
  min_pixels: null          # per-frame pixel range; null: the processor's
  max_pixels: null
prompt:
  instruction: "{INSTRUCTION}"
  suffix: "The best answer is:"
  system: null              # null: the chat template's default system turn
generation:
  max_new_tokens: 8         # greedy decoding
  warmup: true              # each variant's first question also runs once untimed (kernel compilation)
attention:                  # shared by every xattn variant unless the variant sets its own
  threshold: 0.9
  stride: 4                 # the paper: 16
  block_size: 16            # the kernels' tile is 128; 16 lets the tiny model's prefill span many blocks
  min_len: 64               # prefills shorter than this run dense
  backend: auto             # auto | triton | flex | torch
  vision: dense             # dense | xattn: the vision tower's non-causal attention
  estimate_fp8: false       # score blocks on float8 copies of q/k: ~2x faster estimate on Hopper; auto: on sm89+
  select: null              # run only these variants (list of names); null: all
  variants:                 # name -> settings; one answers.jsonl each
    dense: {{mode: dense}}
    xattn: {{mode: xattn}}
output:
  root: outputs/videomme_tiny
progress: auto              # auto (bars on a terminal only) | true | false
"""

DTYPES = ("float32", "float16", "bfloat16")
PROCESSORS = ("auto", "real", "builtin")
MODES = ("dense", "xattn")
XATTN_KEYS = (*COMMON_XATTN_KEYS, "min_len", "vision")
STRING_KEYS = ("model.id", "model.revision", "data.questions", "data.videos", "data.subtitles", "output.root",
               "prompt.instruction", "prompt.suffix", "prompt.system")
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")


@dataclass(frozen=True)
class Variant:
    """One attention setting: ``dense`` runs transformers' SDPA, ``xattn`` the registered XAttention."""

    name: str
    mode: str
    threshold: float | None = None
    stride: int | None = None
    block_size: int | None = None
    min_len: int | None = None
    backend: str | None = None
    vision: str | None = None
    estimate_fp8: bool | str | None = None

    def settings(self) -> dict:
        return {k: getattr(self, k) for k in ("mode", *XATTN_KEYS)}


@dataclass(frozen=True)
class VideoMMEConfig:
    model: dict
    data: dict
    video: dict
    prompt: dict
    generation: dict
    variants: tuple[Variant, ...]
    output_root: str
    progress: str
    resolved: dict = field(compare=False, repr=False)


def default_config() -> DictConfig:
    return OmegaConf.create(DEFAULT_YAML)




def load_config(config_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> VideoMMEConfig:
    """Merge the embedded default, the YAML file and the overrides, then validate. Loads no model."""
    resolved = resolve_layers(default_config(), config_path, overrides, merge_layer=_merge_layer,
                              string_keys=STRING_KEYS)
    return validate(resolved)


def _opt_path(path: str, value: Any, must: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, value, "a path or null")
    p = Path(value).expanduser()
    if must == "file_or_dir" and not p.exists():
        raise _fail(path, value, "an existing question table file or Video-MME folder")
    if must == "dir" and not p.is_dir():
        raise _fail(path, value, "an existing folder")
    return value


def _model(m: Any) -> dict:
    _check_keys(m, "model", ("id", "revision", "dtype", "device", "processor"))
    if not isinstance(m["id"], str) or not m["id"].strip():
        raise _fail("model.id", m["id"], 'a Qwen2-VL family repo id (org/name), a local folder, or "tiny"')
    if m["id"].startswith(("/", "./", "../", "~")) and not Path(m["id"]).expanduser().is_dir():
        raise _fail("model.id", m["id"], "looks like a local path but is not a folder")
    if m["revision"] is not None and not isinstance(m["revision"], str):
        raise _fail("model.revision", m["revision"], "a string or null")
    if m["dtype"] not in DTYPES:
        raise _fail("model.dtype", m["dtype"], f"one of {', '.join(DTYPES)}")
    if not isinstance(m["device"], str) or not _DEVICE.match(m["device"]):
        raise _fail("model.device", m["device"], "auto, cpu, cuda, cuda:N or mps")
    if m["processor"] not in PROCESSORS:
        raise _fail("model.processor", m["processor"], f"one of {', '.join(PROCESSORS)}")
    return dict(m)


def _data(d: Any) -> dict:
    _check_keys(d, "data", ("questions", "videos", "subtitles", "limit", "durations"))
    out = dict(d)
    out["questions"] = _opt_path("data.questions", d["questions"], "file_or_dir")
    out["videos"] = _opt_path("data.videos", d["videos"], "dir")
    out["subtitles"] = _opt_path("data.subtitles", d["subtitles"], "dir")
    if d["limit"] is not None:
        _int("data.limit", d["limit"], 1, None, "null or an integer >= 1")
    durations = d["durations"]
    if durations is not None:
        if isinstance(durations, str):
            durations = [durations]
        if not isinstance(durations, list) or not durations or any(x not in ("short", "medium", "long")
                                                                  for x in durations):
            raise _fail("data.durations", d["durations"], "null or a list from short, medium, long")
        out["durations"] = list(durations)
    return out


def _video(v: Any) -> dict:
    _check_keys(v, "video", ("fps", "max_frames", "min_frames", "min_pixels", "max_pixels"))
    _num("video.fps", v["fps"], 0.0, "a number > 0 (frames sampled per second of video)", strict=True)
    _int("video.max_frames", v["max_frames"], 2, None, "an integer >= 2 (a temporal patch is 2 frames)")
    _int("video.min_frames", v["min_frames"], 1, v["max_frames"],
         f"an integer in [1, video.max_frames={v['max_frames']}]")
    for key in ("min_pixels", "max_pixels"):
        if v[key] is not None:
            _int(f"video.{key}", v[key], 28 * 28, None, "null or an integer >= 784 (one 28x28 merged patch)")
    if v["min_pixels"] is not None and v["max_pixels"] is not None and v["min_pixels"] > v["max_pixels"]:
        raise _fail("video.min_pixels", v["min_pixels"], f"<= video.max_pixels={v['max_pixels']}")
    return dict(v)


def _prompt(p: Any) -> dict:
    _check_keys(p, "prompt", ("instruction", "suffix", "system"))
    for key in ("instruction", "suffix"):
        if not isinstance(p[key], str):
            raise _fail(f"prompt.{key}", p[key], "a string (may be empty)")
    if p["system"] is not None and not isinstance(p["system"], str):
        raise _fail("prompt.system", p["system"], "a string or null")
    return dict(p)


def _xattn_setting(path: str, key: str, value: Any, block_size: int) -> Any:
    if key == "min_len":
        return _int(path, value, block_size, None, f"an integer >= block_size={block_size}")
    if key == "vision":
        if value not in ("dense", "xattn"):
            raise _fail(path, value, "dense or xattn")
        return value
    return common_xattn_setting(path, key, value, block_size)


def _variants(a: Any) -> tuple[Variant, ...]:
    return parse_variants(a, keys=XATTN_KEYS, setting=_xattn_setting, make=Variant, modes=MODES)


def validate(resolved: dict) -> VideoMMEConfig:
    """Check a merged, resolved mapping and build the typed configuration."""
    top = ("model", "data", "video", "prompt", "generation", "attention", "output", "progress")
    _check_keys(resolved, "", top)
    missing = [k for k in top if k not in resolved]
    if missing:
        raise ConfigError(f"{missing[0]} is missing")
    _check_keys(resolved["generation"], "generation", ("max_new_tokens", "warmup"))
    _int("generation.max_new_tokens", resolved["generation"]["max_new_tokens"], 1, 4096)
    if not isinstance(resolved["generation"]["warmup"], bool):
        raise _fail("generation.warmup", resolved["generation"]["warmup"], "true or false")
    _check_keys(resolved["output"], "output", ("root",))
    root = resolved["output"]["root"]
    if not isinstance(root, str) or not root.strip():
        raise _fail("output.root", root, "a folder path")
    progress = resolved["progress"]
    if progress not in ("auto", True, False):
        raise _fail("progress", progress, "auto, true or false")
    model = _model(resolved["model"])
    data = _data(resolved["data"])
    if data["questions"] is None and model["id"] != "tiny":
        raise _fail("data.questions", None, "a Video-MME question table or folder (the synthetic set is for "
                                            "model.id=tiny only)")
    return VideoMMEConfig(
        model=model, data=data, video=_video(resolved["video"]), prompt=_prompt(resolved["prompt"]),
        generation=dict(resolved["generation"]), variants=_variants(resolved["attention"]), output_root=root,
        progress={True: "true", False: "false"}.get(progress, progress), resolved=resolved,
    )


def to_yaml(cfg: VideoMMEConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(cfg.resolved))


__all__ = ["DEFAULT_YAML", "INSTRUCTION", "ConfigError", "Variant", "VideoMMEConfig", "load_config", "to_yaml"]
