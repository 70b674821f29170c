"""Configuration of ``xattn-video generate``: schema, embedded default, layering and validation.

Everything is checked here, before any model loads, so that a typo costs a second rather than a model load.
Every error names the key path, the bad value and what is allowed.

Layers, later wins: the embedded default (:data:`DEFAULT_YAML`, the tiny CPU run), then a YAML file, then
``key=value`` dot-list overrides. A YAML file that defines ``attention.variants`` replaces the default
variants instead of adding to them (otherwise the tiny variants would leak into every config); so does an
override of ``attention.variants`` as a whole.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config_checks import COMMON_XATTN_KEYS, ConfigError, common_xattn_setting, parse_variants, resolve_layers
from .config_checks import check_bool as _bool
from .config_checks import check_int as _int
from .config_checks import check_keys as _check_keys
from .config_checks import check_num as _num
from .config_checks import check_opt_str as _opt_str
from .config_checks import fail as _fail

# The embedded default: what `xattn-video generate` runs with no arguments. configs/tiny.yaml is the same
# configuration as a file to copy from (a test keeps the two equal).
DEFAULT_YAML = """\
model:
  id: tiny                  # diffusers repo id or local folder of a supported pipeline (HunyuanVideo,
                            # HunyuanVideo 1.5, Wan 2.1, Wan 2.2 A14B / TI2V), "tiny" (HunyuanVideo) or
                            # tiny-<family>: tiny-hunyuan15, tiny-wan21, tiny-wan22_a14b, tiny-wan22_ti2v
  revision: null            # hub revision (branch, tag or commit) for a repo id
  dtype: float32            # float32 | float16 | bfloat16: the whole pipeline
  transformer_dtype: null   # the transformer(s) alone (null: dtype)
  vae_dtype: null           # the VAE alone (null: dtype; Wan decodes best in float32)
  device: auto              # auto (cuda:LOCAL_RANK when CUDA is there, else cpu) | cpu | cuda | cuda:N
  cpu_offload: false        # diffusers' enable_model_cpu_offload (needs CUDA)
  vae_tiling: false         # decode the video in tiles: needed for 720p x 129 frames on one GPU
video:
  height: 128               # multiple of 16
  width: 128                # multiple of 16
  frames: 9                 # 4k + 1 (the VAE compresses time by 4)
  fps: 8                    # frame rate written into the mp4
  steps: 4                  # denoising steps
  guidance_scale: 6.0       # HunyuanVideo: embedded (distilled) guidance; Wan, HunyuanVideo 1.5: classifier-free
                            # guidance (> 1 also runs the negative prompt)
  guidance_scale_2: null    # Wan 2.2 A14B: CFG of the low-noise transformer (null: guidance_scale)
  true_cfg_scale: 1.0       # HunyuanVideo: > 1 runs true classifier-free guidance (needs video.negative_prompt)
  negative_prompt: null
  max_sequence_length: null # text tokens (null: the pipeline's, HunyuanVideo 256, Wan 512; HunyuanVideo 1.5: fixed)
  flow_shift: null          # the flow-matching scheduler's timestep shift (null: the pipeline's scheduler config)
  image: null               # image-to-video (Wan 2.2 TI2V): the first frame, an image file; null: text-to-video
prompts:                    # one source: vbench_file, else file, else list
  list:
    - A cat walks on the grass, realistic style.
    - A panda playing a guitar by a lake at sunset.
  file: null                # text file, one prompt a line (blank lines and lines starting with # skipped)
  vbench_file: null         # VBench prompt file (.txt, one a line, or VBench_full_info.json): VBench naming
seeds: [0]                  # one generation per seed (and per video of videos_per_prompt)
videos_per_prompt: 1
attention:                  # shared by every xattn variant unless the variant sets its own
  threshold: 0.9            # (0, 1]: attention mass the kept blocks must cover
  stride: 8                 # antidiagonal stride: power of two dividing block_size
  block_size: 128           # power of two, 16..256
  warmup_steps: 1           # first denoising steps run dense
  dense_layers: []          # transformer block indices that always run dense
  backend: auto             # auto | fa4 | triton | flex | torch (auto: fa4 where FlashAttention-4 runs, else triton)
  estimate_fp8: auto        # score blocks on float8 copies of q/k (~2x faster estimate on Hopper): auto = on GPUs
                            # with float8 tensor cores (sm89+); true | false
  attention_fp8: false      # float8 attention over the kept blocks (Triton kernel; approximate; backend auto|triton)
  refresh_every: 1          # estimate kept blocks at one sparse step, reuse them for the next refresh_every - 1
  min_len: null             # xattn backend (every family but HunyuanVideo): self-attention shorter than this runs
                            # native (null: the backend's default, 12288 tokens)
  select: null              # run only these variants (list of names); null: all
  variants:                 # name -> settings; one output folder each
    dense: {mode: dense}
    xattn: {mode: xattn}
output:
  root: outputs/tiny        # <root>/<variant>/<name>.mp4, <root>/meta/<variant>/<name>.json
  naming: null              # null: "{prompt_index:04d}_{slug}_seed{seed}_{k}" (vbench_file: "vbench")
  keep_latents: false       # also save the final latents (<root>/meta/<variant>/<name>.latents.pt)
  crf: 18                   # H.264 constant rate factor: 0 lossless .. 51 worst
progress: auto              # auto (bars on a terminal only) | true | false
parallel:
  ulysses: 1                # > 1: groups of this many processes make each video together (Ulysses sequence
                            # parallelism; torchrun --nproc-per-node N, N a multiple of it)
  balance_heads: false      # with ulysses > 1: assign heads to processes by the density measured at each layer's
                            # first sparse step (ranks wait for the densest head set)
"""

DTYPES = ("float32", "float16", "bfloat16")
# model.id values that build a tiny random pipeline offline (xattn_video.testing.tiny_pipelines) -> its family
TINY_MODEL_IDS = {"tiny": "hunyuan", "tiny-hunyuan": "hunyuan", "tiny-hunyuan15": "hunyuan15", "tiny-wan21": "wan21",
                  "tiny-wan22_a14b": "wan22_a14b", "tiny-wan22_ti2v": "wan22_ti2v"}
MODES = ("dense", "xattn", "stock")
XATTN_KEYS = (*COMMON_XATTN_KEYS, "warmup_steps", "dense_layers", "min_len", "attention_fp8", "refresh_every")
DEFAULT_NAMING = "{prompt_index:04d}_{slug}_seed{seed}_{k}"
VBENCH_NAMING = "{prompt}-{index}"
NAMING_FIELDS = ("prompt", "slug", "prompt_index", "seed", "k", "index")
# folders of a run that are not variants: generate's sidecars and manifest, the quality/VBench/report outputs
RESERVED_VARIANT_NAMES = ("meta", "manifest", "quality", "vbench", "attn-report")
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")
STRING_KEYS = ("model.id", "model.revision", "video.negative_prompt", "video.image", "prompts.file",
               "prompts.vbench_file", "output.root", "output.naming")
MAX_NAME_BYTES = 240  # file names: leaves room for ".latents.pt" under the usual 255-byte limit


# ----------------------------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class ModelConfig:
    id: str
    revision: str | None
    dtype: str
    transformer_dtype: str | None
    vae_dtype: str | None
    device: str
    cpu_offload: bool
    vae_tiling: bool


@dataclass(frozen=True)
class VideoConfig:
    height: int
    width: int
    frames: int
    fps: float
    steps: int
    guidance_scale: float
    guidance_scale_2: float | None
    true_cfg_scale: float
    negative_prompt: str | None
    max_sequence_length: int | None
    flow_shift: float | None
    image: str | None


@dataclass(frozen=True)
class PromptsConfig:
    list: tuple[str, ...]
    file: str | None
    vbench_file: str | None


@dataclass(frozen=True)
class Variant:
    """One attention setting; produces one output folder named after it."""

    name: str
    mode: str  # dense: the project's processor, every step dense; xattn; stock: diffusers' own processor
    threshold: float | None = None
    stride: int | None = None
    block_size: int | None = None
    warmup_steps: int | None = None
    dense_layers: tuple[int, ...] = ()
    backend: str | None = None
    estimate_fp8: bool | str | None = None
    min_len: int | None = None  # xattn backend only; None: its default
    attention_fp8: bool | None = None
    refresh_every: int | None = None  # None (dense, stock) or 1: estimate at every sparse step

    def settings(self) -> dict:
        """The settings that shape the video (no name): part of each video's fingerprint."""
        d = asdict(self)
        d.pop("name")
        if d["min_len"] is None:  # added later: unset, it leaves the fingerprints of earlier videos as they were
            d.pop("min_len")
        if d["refresh_every"] in (None, 1):  # added later: the default leaves earlier fingerprints as they were
            d.pop("refresh_every")
        d["dense_layers"] = list(self.dense_layers)
        return d


@dataclass(frozen=True)
class OutputConfig:
    root: str
    naming: str  # a str.format template over NAMING_FIELDS (already resolved from null / "vbench")
    keep_latents: bool
    crf: int


@dataclass(frozen=True)
class ParallelSettings:
    ulysses: int  # processes per video (1: one each, as without parallelism)
    balance_heads: bool  # assign heads to ranks by measured density (xattn_video.diffusion.head_balance)


@dataclass(frozen=True)
class GenerateConfig:
    """A validated configuration; ``resolved`` is the merged mapping (what sidecars and config.yaml record)."""

    model: ModelConfig
    video: VideoConfig
    prompts: PromptsConfig
    seeds: tuple[int, ...]
    videos_per_prompt: int
    variants: tuple[Variant, ...]
    output: OutputConfig
    progress: str
    parallel: ParallelSettings
    resolved: dict = field(compare=False, repr=False)

    @property
    def vbench(self) -> bool:
        return self.output.naming == VBENCH_NAMING


# ------------------------------------------------------------------------------------------------- layering


def default_config() -> DictConfig:
    """The embedded default as an OmegaConf mapping."""
    return OmegaConf.create(DEFAULT_YAML)


def _normalize_layer(layer: dict) -> dict:
    """Shorthands a user may write: ``prompts: [..]`` for ``prompts.list``, ``seeds: 3`` for ``seeds: [3]``."""
    if isinstance(layer.get("prompts"), (list, tuple)):
        layer["prompts"] = {"list": list(layer["prompts"])}
    if isinstance(layer.get("prompts"), str):
        layer["prompts"] = {"file": layer["prompts"]}
    if isinstance(layer.get("seeds"), int) and not isinstance(layer.get("seeds"), bool):
        layer["seeds"] = [layer["seeds"]]
    return layer


def _merge_layer(base: DictConfig, layer: dict, where: str) -> DictConfig:
    layer = _normalize_layer(layer)
    attention = layer.get("attention")
    if isinstance(attention, dict) and "variants" in attention:
        # A layer that names its variants names all of them.
        emptied = OmegaConf.to_container(base, resolve=False)
        emptied["attention"]["variants"] = {}
        base = OmegaConf.create(emptied)
    try:
        return OmegaConf.merge(base, OmegaConf.create(layer))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: cannot merge: {e}".splitlines()[0]) from None




def load_config(config_path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> (
    GenerateConfig
):
    """Merge the embedded default, the YAML file and the overrides, then validate. Loads no model."""
    resolved = resolve_layers(default_config(), config_path, overrides, merge_layer=_merge_layer,
                              string_keys=STRING_KEYS, normalize=_normalize_layer)
    return validate(resolved)


# ----------------------------------------------------------------------------------------------- validation


def _model(m: Any) -> ModelConfig:
    _check_keys(m, "model", ("id", "revision", "dtype", "transformer_dtype", "vae_dtype", "device", "cpu_offload",
                             "vae_tiling"))
    model_id = m["id"]
    if not isinstance(model_id, str) or not model_id.strip():
        raise _fail("model.id", model_id, 'a diffusers repo id (org/name), a local folder, "tiny" or tiny-<family>')
    if model_id.startswith("tiny-") and model_id not in TINY_MODEL_IDS:
        raise _fail("model.id", model_id, f"one of the tiny models {', '.join(TINY_MODEL_IDS)}, or a repo id / folder")
    if model_id.startswith(("/", "./", "../", "~")) and not Path(model_id).expanduser().is_dir():
        raise _fail("model.id", model_id, "looks like a local path but is not a folder")
    for key in ("dtype", "transformer_dtype", "vae_dtype"):
        value = m[key]
        if not (value in DTYPES or (key != "dtype" and value is None)):
            extra = " or null (same as model.dtype)" if key != "dtype" else ""
            raise _fail(f"model.{key}", value, f"one of {', '.join(DTYPES)}{extra}")
    device = m["device"]
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise _fail("model.device", device, "auto, cpu, cuda, cuda:N or mps")
    cpu_offload = _bool("model.cpu_offload", m["cpu_offload"])
    if cpu_offload and device in ("cpu", "mps"):
        raise _fail("model.cpu_offload", cpu_offload, f"true needs a CUDA device, and model.device is {device!r}")
    return ModelConfig(
        id=model_id,
        revision=_opt_str("model.revision", m["revision"]),
        dtype=m["dtype"],
        transformer_dtype=m["transformer_dtype"],
        vae_dtype=m["vae_dtype"],
        device=device,
        cpu_offload=cpu_offload,
        vae_tiling=_bool("model.vae_tiling", m["vae_tiling"]),
    )


def _video(v: Any) -> VideoConfig:
    keys = ("height", "width", "frames", "fps", "steps", "guidance_scale", "guidance_scale_2", "true_cfg_scale",
            "negative_prompt", "max_sequence_length", "flow_shift", "image")
    _check_keys(v, "video", keys)
    for key in ("height", "width"):
        value = v[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value % 16:
            raise _fail(f"video.{key}", value, "a multiple of 16, at least 16 (VAE x8, patch x2; Wan 2.2 TI2V: of 32)")
    frames = v["frames"]
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1 or (frames - 1) % 4:
        raise _fail("video.frames", frames, "4k + 1 frames (1, 5, 9, ..., 129): the VAE compresses time by 4")
    true_cfg = _num("video.true_cfg_scale", v["true_cfg_scale"], 1.0, "a number >= 1 (> 1 runs true CFG)")
    negative = _opt_str("video.negative_prompt", v["negative_prompt"])
    if true_cfg > 1.0 and negative is None:
        raise _fail(
            "video.true_cfg_scale", v["true_cfg_scale"],
            "> 1 needs video.negative_prompt (a string, may be empty): without it diffusers skips true CFG",
        )
    image = _opt_str("video.image", v["image"], "a path to an image file, or null")
    if image is not None and not Path(image).expanduser().is_file():
        raise _fail("video.image", image, f"an existing image file (relative paths start at {os.getcwd()})")
    length = v["max_sequence_length"]
    return VideoConfig(
        height=v["height"],
        width=v["width"],
        frames=frames,
        fps=_num("video.fps", v["fps"], 0.0, "a number > 0", strict=True),
        steps=_int("video.steps", v["steps"], 1, 1000),
        guidance_scale=_num("video.guidance_scale", v["guidance_scale"], 0.0, "a number >= 0"),
        guidance_scale_2=None if v["guidance_scale_2"] is None else _num(
            "video.guidance_scale_2", v["guidance_scale_2"], 0.0, "a number >= 0, or null (same as guidance_scale)"),
        true_cfg_scale=true_cfg,
        negative_prompt=negative,
        max_sequence_length=None if length is None else _int(
            "video.max_sequence_length", length, 1, 4096, "an integer in [1, 4096], or null (the pipeline's)"),
        flow_shift=None if v["flow_shift"] is None else _num(
            "video.flow_shift", v["flow_shift"], 0.0, "a number > 0, or null (the scheduler's own)", strict=True),
        image=image,
    )


def _prompts(p: Any) -> PromptsConfig:
    _check_keys(p, "prompts", ("list", "file", "vbench_file"))
    items = p["list"]
    if items is None:
        items = []
    if not isinstance(items, list):
        raise _fail("prompts.list", items, "a list of prompts")
    for i, prompt in enumerate(items):
        if not isinstance(prompt, str) or not prompt.strip():
            raise _fail(f"prompts.list[{i}]", prompt, "a non-empty string")
    for key in ("file", "vbench_file"):
        value = _opt_str(f"prompts.{key}", p[key], "a path to a prompt file, or null")
        if value is not None and not Path(value).expanduser().is_file():
            raise _fail(f"prompts.{key}", value, f"an existing file (relative paths start at {os.getcwd()})")
    if p["file"] is not None and p["vbench_file"] is not None:
        raise _fail("prompts.file", p["file"], "null when prompts.vbench_file is set (one prompt file at a time)")
    if not items and p["file"] is None and p["vbench_file"] is None:
        raise _fail("prompts.list", items, "at least one prompt, or set prompts.file or prompts.vbench_file")
    return PromptsConfig(list=tuple(items), file=p["file"], vbench_file=p["vbench_file"])


def _seeds(seeds: Any) -> tuple[int, ...]:
    if not isinstance(seeds, list) or not seeds:
        raise _fail("seeds", seeds, "a non-empty list of integers, e.g. [0, 1, 2]")
    for i, s in enumerate(seeds):
        _int(f"seeds[{i}]", s, 0, 2**63 - 1, "an integer in [0, 2**63)")
    if len(set(seeds)) != len(seeds):
        raise _fail("seeds", seeds, "distinct seeds (a repeated seed would make the same video twice)")
    return tuple(seeds)


def _dense_layers(path: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, tuple):  # a shared setting already checked, inherited by a variant
        value = list(value)
    if not isinstance(value, list):
        raise _fail(path, value, "a list of transformer block indices (>= 0), e.g. [0, 1]")
    for i, layer in enumerate(value):
        _int(f"{path}[{i}]", layer, 0, None, "a transformer block index >= 0")
    return tuple(sorted(set(value)))


def _xattn_setting(path: str, key: str, value: Any, block_size: int) -> Any:
    """One XAttention parameter, checked by the same functions XAttnConfig uses, with the key path in front."""
    if key == "warmup_steps":
        return _int(path, value, 0, None, "an integer >= 0 (the first denoising steps run dense)")
    if key == "dense_layers":
        return _dense_layers(path, value)
    if key == "min_len":
        return None if value is None else _int(path, value, 1, None, "an integer >= 1 (tokens), or null")
    if key == "attention_fp8":
        return _bool(path, value)
    if key == "refresh_every":
        return _int(path, value, 1, None, "an integer >= 1 (estimate every k sparse steps; 1: every step)")
    return common_xattn_setting(path, key, value, block_size)


def _variants(a: Any) -> tuple[Variant, ...]:
    variants = parse_variants(a, keys=XATTN_KEYS, setting=_xattn_setting, make=Variant, modes=MODES,
                              reserved=RESERVED_VARIANT_NAMES)
    # the dense baseline goes through the same integration as the xattn variants: it shares their min_len
    min_len = _xattn_setting("attention.min_len", "min_len", a["min_len"], 128)
    return tuple(replace(v, min_len=min_len) if v.mode == "dense" else v for v in variants)


def _output(o: Any, vbench: bool) -> OutputConfig:
    _check_keys(o, "output", ("root", "naming", "keep_latents", "crf"))
    root = o["root"]
    if not isinstance(root, str) or not root.strip():
        raise _fail("output.root", root, "a folder path")
    naming = o["naming"]
    if naming is None:
        naming = VBENCH_NAMING if vbench else DEFAULT_NAMING
    elif naming == "vbench":
        naming = VBENCH_NAMING
    if not isinstance(naming, str):
        raise _fail("output.naming", naming, f'null, "vbench" or a template over {{{"}, {".join(NAMING_FIELDS)}}}')
    if vbench and naming != VBENCH_NAMING:
        raise _fail("output.naming", o["naming"], 'null or "vbench" with prompts.vbench_file (VBench reads '
                                                  '{prompt}-{index}.mp4)')
    try:
        sample = naming.format(prompt="p", slug="p", prompt_index=0, seed=0, k=0, index=0)
    except (KeyError, IndexError, ValueError) as e:
        raise _fail("output.naming", naming, f"a str.format template over the fields {', '.join(NAMING_FIELDS)} "
                                             f"({type(e).__name__}: {e})") from None
    if "/" in sample or "\\" in sample or not sample.strip() or sample.startswith("."):
        raise _fail("output.naming", naming, "a file name template: no slashes, not starting with a dot")
    return OutputConfig(
        root=root,
        naming=naming,
        keep_latents=_bool("output.keep_latents", o["keep_latents"]),
        crf=_int("output.crf", o["crf"], 0, 51, "an H.264 CRF in [0, 51] (0 lossless, 18 visually lossless)"),
    )


def _parallel(p: Any) -> ParallelSettings:
    _check_keys(p, "parallel", ("ulysses", "balance_heads"))
    return ParallelSettings(
        ulysses=_int("parallel.ulysses", p["ulysses"], 1, 1024),
        balance_heads=_bool("parallel.balance_heads", p["balance_heads"]),
    )


def validate(resolved: dict) -> GenerateConfig:
    """Check a merged, resolved mapping and build the typed configuration."""
    top = ("model", "video", "prompts", "seeds", "videos_per_prompt", "attention", "output", "progress", "parallel")
    _check_keys(resolved, "", top)
    missing = [k for k in top if k not in resolved]
    if missing:
        raise ConfigError(f"{missing[0]} is missing")
    model = _model(resolved["model"])
    video = _video(resolved["video"])
    prompts = _prompts(resolved["prompts"])
    progress = resolved["progress"]
    if progress not in ("auto", True, False):
        raise _fail("progress", progress, "auto, true or false")
    return GenerateConfig(
        model=model,
        video=video,
        prompts=prompts,
        seeds=_seeds(resolved["seeds"]),
        videos_per_prompt=_int("videos_per_prompt", resolved["videos_per_prompt"], 1, 1000),
        variants=_variants(resolved["attention"]),
        output=_output(resolved["output"], vbench=prompts.vbench_file is not None),
        progress={True: "true", False: "false"}.get(progress, progress),
        parallel=_parallel(resolved["parallel"]),
        resolved=resolved,
    )


def to_yaml(cfg: GenerateConfig) -> str:
    """The resolved configuration as YAML (what ``--print-config`` shows and the run saves)."""
    return OmegaConf.to_yaml(OmegaConf.create(cfg.resolved))


__all__ = [
    "DEFAULT_YAML",
    "TINY_MODEL_IDS",
    "ConfigError",
    "GenerateConfig",
    "ModelConfig",
    "OutputConfig",
    "PromptsConfig",
    "Variant",
    "VideoConfig",
    "default_config",
    "load_config",
    "to_yaml",
    "validate",
]
