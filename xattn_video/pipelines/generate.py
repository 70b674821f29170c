"""Batch video generation from a YAML config: many prompts and seeds, dense and XAttention side by side.

With no config the embedded default runs: a tiny random HunyuanVideo pipeline on the CPU, a dense and an
XAttention variant. Overrides are OmegaConf dot-lists, e.g.
  xattn-video generate configs/hunyuan_544x960.yaml attention.variants.xattn_t090.threshold=0.85 seeds=[0,1]
  xattn-video generate prompts.vbench_file=samples/vbench_prompts_sample.txt seeds=[0,1,2,3,4]
  torchrun --nproc-per-node 8 -m xattn_video generate configs/hunyuan_720x1280.yaml

Config keys (each has a default; --print-config shows the resolved config, configs/tiny.yaml documents it):
  model      id (diffusers repo id | local folder | tiny), revision, dtype, transformer_dtype, device,
             cpu_offload, vae_tiling
  video      height, width, frames (4k+1), fps, steps, guidance_scale, true_cfg_scale, negative_prompt,
             max_sequence_length
  prompts    list | file (one a line) | vbench_file (names videos {prompt}-{index}.mp4 for VBench)
  seeds, videos_per_prompt
  attention  threshold, stride, block_size, warmup_steps, dense_layers, backend, estimate_fp8, attention_fp8,
             min_len, refresh_every: shared by xattn variants;
             select: the variants to run; variants: {name: {mode: dense|xattn|stock, <shared keys>}}
  output     root, naming (str.format over prompt, slug, prompt_index, seed, k, index), keep_latents, crf
  progress   auto | true | false
  parallel   ulysses (processes per video: Ulysses sequence parallelism under torchrun), balance_heads

Output (one folder per attention variant; the variant folders hold only mp4 files, so VBench reads them
as they are):
  <output.root>/<variant>/<name>.mp4
  <output.root>/meta/<variant>/<name>.json         sidecar: prompt, seed, config, density, times, memory
  <output.root>/meta/<variant>/<name>.latents.pt   with output.keep_latents=true
  <output.root>/manifest.jsonl                      one line per video made or failed, every run
  <output.root>/config.yaml                         the last run's resolved config

Rerunning a config skips the videos already finished (mp4 and sidecar present, same settings); files are
written under a temporary name and renamed, so a killed run leaves no truncated mp4. A video that fails is
reported and the run goes on (exit status 1 at the end). Under `torchrun` or `accelerate launch` every
process takes its own share of the videos (RANK / WORLD_SIZE), one GPU each (LOCAL_RANK); with
parallel.ulysses=P, groups of P processes make each video together (generate_parallel.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import socket
import sys
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import run_figures
from .config_checks import run_config_command
from .generate_config import (
    ConfigError,
    GenerateConfig,
    Variant,
    load_config,
    to_yaml,
)
from .generate_models import (
    TINY_IDS,
    call_kwargs,
    check_family_settings,
    family_of,
    family_of_model,
    latent_channels,
    load_image,
    load_pipeline,
    prepare_call,
    supports_step_callback,
    transformers_of,
)
from .generate_plan import (
    Layout,
    VideoJob,
    append_manifest,
    dist_env,
    job_state,
    plan_jobs,
    read_sidecar,
    resolve_prompts,
    shard,
)
from .preflight import check_backends_on_device, check_device_for_model, check_model_source, check_output_dir
from .safe_io import FileLock, clear_stale_temporaries, describe_owner, is_disk_full, one_line

HELP = "batch video generation from a YAML config (dense and XAttention variants side by side)"
SIDECAR_SCHEMA = 1
VERSION_PACKAGES = ("xattn-video", "torch", "diffusers", "transformers", "accelerate", "triton", "imageio",
                    "imageio-ffmpeg", "omegaconf", "numpy")


# --------------------------------------------------------------------------------------------------- model


def resolve_device(spec: str, local_rank: int, cpu_offload: bool) -> str:
    """The torch device of this process: auto is cuda:LOCAL_RANK with CUDA, else cpu."""
    import torch

    cuda = torch.cuda.is_available()
    if spec == "auto":
        device = f"cuda:{local_rank % max(torch.cuda.device_count(), 1)}" if cuda else "cpu"
    elif spec == "cuda":
        device = f"cuda:{local_rank % max(torch.cuda.device_count(), 1)}" if cuda else "cuda"
    else:
        device = spec
    if device.startswith("cuda") and not cuda:
        raise ConfigError(f"model.device = {spec!r} is not allowed: no CUDA device is visible")
    if cpu_offload and not device.startswith("cuda"):
        raise ConfigError(f"model.cpu_offload = True is not allowed: it needs CUDA, and the device is {device}")
    return device


_STOCK_PROCESSORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pipeline -> what xattn_video.enable returned


def apply_variant(pipe: Any, variant: Variant, steps: int, *, parallel: bool = False,
                  balance_heads: bool = False) -> Any:
    """Put the variant's attention on the pipeline; return what :func:`xattn_video.enable` returned (its
    ``stats`` feed the sidecar), None for ``stock``. The variant before is taken off first.

    ``dense``: the project's attention with every step dense (HunyuanVideo: unmasked attention over the valid
    tokens, the fastest dense baseline, DESIGN.md), with the same statistics as the sparse variants.
    ``stock``: the pipeline's own attention (diffusers' processors and native backend).
    ``parallel``: the transformers run under context parallelism: HunyuanVideo gets the ``xattn`` backend (its
    processor does not run in parallel) and the processors keep the transformer's parallel config;
    ``balance_heads``: XAttention variants assign heads to ranks by measured density.
    """
    import xattn_video

    previous = _ACTIVE.pop(pipe, None)
    if previous is not None:
        previous.detach()
    if family_of(pipe) == "hunyuan":
        _stock_hunyuan_processors(pipe)
    if variant.mode == "stock":
        _restamp_parallel(pipe, parallel)
        return None
    if variant.mode == "dense":
        settings: dict[str, Any] = dict(threshold=1.0, warmup_steps=steps)
    else:
        settings = dict(threshold=variant.threshold, stride=variant.stride, block_size=variant.block_size,
                        warmup_steps=variant.warmup_steps, dense_layers=tuple(variant.dense_layers),
                        backend=variant.backend, estimate_fp8=variant.estimate_fp8,
                        refresh_every=variant.refresh_every)
        if variant.attention_fp8:
            settings["attention_fp8"] = True
    if variant.min_len is not None:  # the xattn backend's (dense variants share attention.min_len)
        settings["min_len"] = variant.min_len
    handle = xattn_video.enable(pipe, integration="backend" if parallel else "auto", **settings)
    _ACTIVE[pipe] = handle
    _restamp_parallel(pipe, parallel)
    if parallel and balance_heads and variant.mode == "xattn":
        from xattn_video.diffusion.head_balance import HeadBalance

        handle.head_balance = HeadBalance()
    return handle


def _restamp_parallel(pipe: Any, parallel: bool) -> None:
    if parallel:
        from xattn_video.diffusion.parallel_plans import restamp_parallel_config

        for transformer in transformers_of(pipe):
            restamp_parallel_config(transformer)


def _stock_hunyuan_processors(pipe: Any) -> None:
    """HunyuanVideo's processor integration: detach any XAttnProcessor and put the stock processors back (the
    ones the transformer came with; an XAttnProcessor set before we came is not stock)."""
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

    import xattn_video

    transformer = pipe.transformer
    current = dict(transformer.attn_processors)
    if transformer not in _STOCK_PROCESSORS:
        _STOCK_PROCESSORS[transformer] = {
            name: HunyuanVideoAttnProcessor2_0() if isinstance(p, xattn_video.XAttnProcessor) else p
            for name, p in current.items()
        }
    for processor in {id(p): p for p in current.values()}.values():
        if isinstance(processor, xattn_video.XAttnProcessor):
            processor.detach()
    transformer.set_attn_processor(dict(_STOCK_PROCESSORS[transformer]))


# ----------------------------------------------------------------------------------------------- one video


class StepClock:
    """Wall time of each denoising step, of the text encoding before the first and the decoding after the last.

    Hooks on every transformer of the pipeline (Wan 2.2 A14B has two): a step starts at the first transformer
    call under a new ``pipe.current_timestep`` (CFG makes two calls a step) and ends when its last call
    returns. On CUDA the hooks synchronise so the times are real. Where the pipeline has a step-end callback,
    the last step's latents are kept for ``output.keep_latents``.
    """

    def __init__(self, pipe: Any, device: str):
        import torch

        self._sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)
        self._pipe = pipe
        self._handles = [handle for t in transformers_of(pipe)
                         for handle in (t.register_forward_pre_hook(self._pre), t.register_forward_hook(self._post))]
        self.start = time.perf_counter()
        self.first_step_start: float | None = None
        self.last_step_end: float | None = None
        self._step_start: float | None = None
        self._call_end: float | None = None
        self._timestep: Any = None
        self.steps: list[float] = []
        self.latents = None

    def _pre(self, module: Any, args: Any) -> None:
        timestep = getattr(self._pipe, "current_timestep", None)
        if self._step_start is not None and timestep is self._timestep:
            return  # another call of the same step
        self._sync()
        now = time.perf_counter()
        self.finish()
        self._timestep, self._step_start = timestep, now
        if self.first_step_start is None:
            self.first_step_start = now

    def _post(self, module: Any, args: Any, output: Any) -> None:
        self._sync()
        self._call_end = time.perf_counter()

    def finish(self) -> None:
        """Close the step in progress (the pipeline has returned, or the next step began)."""
        if self._step_start is not None and self._call_end is not None:
            self.steps.append(self._call_end - self._step_start)
            self.last_step_end = self._call_end
        self._step_start = None

    def on_step_end(self, pipe: Any, i: int, t: Any, kwargs: dict) -> dict:
        self.latents = kwargs.get("latents")
        return {}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def initial_latents(pipe: Any, cfg: GenerateConfig, seed: int, k: int) -> Any:
    """The starting noise of video k of a seed: the k-th of videos_per_prompt noise tensors drawn on the CPU
    from ``seed``; the same as a pipeline call with num_videos_per_prompt and a CPU generator, on any device."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    v = cfg.video
    shape = (
        cfg.videos_per_prompt,
        latent_channels(pipe),
        (v.frames - 1) // pipe.vae_scale_factor_temporal + 1,
        v.height // pipe.vae_scale_factor_spatial,
        v.width // pipe.vae_scale_factor_spatial,
    )
    noise = randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    return noise[k : k + 1].clone()


def _memory_reset(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: str) -> dict:
    """Peak memory of the last video on the GPU (allocated and reserved by torch) and of the process on the
    host (resident set size since it started: Linux reports no per-interval peak)."""
    import torch

    out: dict[str, Any] = {"host_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.startswith("cuda"):
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        out["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return out


def attention_summary(proc: Any) -> dict | None:
    """The processor's statistics of one video, per denoising step (None for the stock processor).

    Per step: mode (dense / sparse / mixed), block density over all layers, estimate and attention times
    (ms, summed over layers); per step and layer: density. ``density`` is over every step and layer;
    ``sparse_density`` over the steps that ran sparse (what the XAttention threshold buys).
    """
    if proc is None:
        return None
    stats = proc.stats
    steps = [step for generation in stats.get("generations", []) for step in generation["steps"]]
    sparse = [s for s in steps if s["mode"] != "dense"]
    kept, total = sum(s["kept_blocks"] for s in sparse), sum(s["total_blocks"] for s in sparse)
    return {
        "settings": stats.get("settings"),
        "density": stats["totals"]["density"] if steps else None,
        "sparse_density": kept / total if total else None,
        "mode_per_step": [s["mode"] for s in steps],
        "density_per_step": [s["density"] for s in steps],
        "blocks_per_step": [[s["kept_blocks"], s["total_blocks"]] for s in steps],
        "estimate_ms_per_step": [s["estimate_ms"] for s in steps],
        "attention_ms_per_step": [s["attention_ms"] for s in steps],
        "density_per_layer": [[round(layer["density"], 5) for layer in s["layers"]] for s in steps],
        "totals": stats.get("totals"),
    }


@dataclass
class Generated:
    """What one pipeline call produced, with its measurements."""

    frames: Any
    latents: Any
    timing: dict
    attention: dict | None
    memory: dict
    parallel: dict | None = None  # parallel.ulysses > 1: degree, group, per-rank times and heads (sidecar)


def generate_video(pipe: Any, proc: Any, job: VideoJob, cfg: GenerateConfig, device: str) -> Generated:
    """Run the pipeline for one job and measure it (frames as float [T, H, W, 3] in [0, 1])."""

    v = cfg.video
    if proc is not None:
        proc.reset_stats()
    _memory_reset(device)
    family = family_of(pipe)
    prepare_call(pipe, family, cfg)
    image = load_image(v.image) if v.image is not None else None
    clock = StepClock(pipe, device)
    try:
        # the pipeline runs under no_grad itself; not inference_mode, whose tensors have no version counter
        # (the step tracker of xattn_video.diffusion.steps reads it)
        kwargs = call_kwargs(pipe, family, cfg, job.prompt, initial_latents(pipe, cfg, job.seed, job.k), image)
        if supports_step_callback(pipe):
            kwargs.update(callback_on_step_end=clock.on_step_end, callback_on_step_end_tensor_inputs=["latents"])
        out = pipe(**kwargs)
        clock._sync()
        clock.finish()
        end = time.perf_counter()
    finally:
        clock.close()
    first = clock.first_step_start or clock.start
    last = clock.last_step_end or end
    timing = {
        "total_s": end - clock.start,
        "text_encode_s": first - clock.start,
        "denoise_s": last - first,
        "decode_s": end - last,
        "step_s": clock.steps,
        "mean_step_s": sum(clock.steps) / len(clock.steps) if clock.steps else None,
    }
    latents = clock.latents.detach().float().cpu() if clock.latents is not None else None
    return Generated(out.frames[0], latents, timing, attention_summary(proc), peak_memory(device))


# ------------------------------------------------------------------------------------------------ sidecars


def package_versions() -> dict:
    """Versions of Python, the packages that shape the result, CUDA and the GPU."""
    from importlib import metadata

    out: dict[str, Any] = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        import torch

        out["cuda"] = torch.version.cuda
        out["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except Exception:  # a broken CUDA set-up must not stop the sidecar
        out["gpu"] = None
    return out


def build_sidecar(job: VideoJob, cfg: GenerateConfig, gen: Generated, layout: Layout, *, device: str,
                  rank: int, world_size: int, versions: dict, write_s: float) -> dict:
    """The JSON sidecar of one video: what it is, how it was made, what it cost."""
    v = cfg.video
    return {
        "schema": SIDECAR_SCHEMA,
        "key": job.key,
        "video": layout.rel(layout.video(job)),
        "latents": layout.rel(layout.latents(job)) if cfg.output.keep_latents else None,
        "variant": job.variant.name,
        "attention": job.variant.settings(),
        "prompt": job.prompt,
        "prompt_index": job.prompt_index,
        "negative_prompt": v.negative_prompt,
        "seed": job.seed,
        "k": job.k,
        "index": job.index,
        "frames": v.frames,
        "height": v.height,
        "width": v.width,
        "fps": v.fps,
        "steps": v.steps,
        "attention_stats": gen.attention,
        "timing": {**gen.timing, "write_s": write_s},
        "peak_memory": gen.memory,
        "device": device,
        "rank": rank,
        "world_size": world_size,
        **({"parallel": gen.parallel} if gen.parallel is not None else {}),
        "host": socket.gethostname(),
        "process": run_figures.process_id(),  # step times compare only within one process
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
        "config": cfg.resolved,
    }


def save_outputs(job: VideoJob, cfg: GenerateConfig, gen: Generated, layout: Layout, **meta: Any) -> dict:
    """Write mp4, latents and sidecar, each atomically, the sidecar last: it marks the video finished."""
    import torch

    from xattn_video.pipelines.video_io import atomic_path, write_json_atomic, write_video

    t0 = time.perf_counter()
    write_video(layout.video(job), gen.frames, cfg.video.fps, crf=cfg.output.crf, tmp_dir=layout.partial)
    if cfg.output.keep_latents:
        if gen.latents is None:
            raise RuntimeError("no latents were captured to keep (the pipeline ran no step?)")
        with atomic_path(layout.latents(job), layout.partial) as tmp:
            torch.save(gen.latents, tmp)
    sidecar = build_sidecar(job, cfg, gen, layout, write_s=time.perf_counter() - t0, **meta)
    write_json_atomic(layout.sidecar(job), sidecar, tmp_dir=layout.partial)
    return sidecar


# -------------------------------------------------------------------------------------------------- report


@dataclass
class VariantTally:
    """One variant's row of the summary, over this process's share."""

    variant: Variant
    planned: int = 0
    made: int = 0
    skipped: int = 0
    failed: int = 0
    video_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)  # every denoising step of every video, pooled
    density: list[float] = field(default_factory=list)
    sparse_density: list[float] = field(default_factory=list)
    sidecars: dict[str, dict] = field(default_factory=dict)  # by video name: pairs variants for the speed-up

    def add(self, sidecar: dict) -> None:
        if sidecar.get("video"):
            self.sidecars[Path(sidecar["video"]).stem] = sidecar
        timing = sidecar.get("timing", {})
        if timing.get("total_s") is not None:
            self.video_s.append(float(timing["total_s"]))
        self.step_s.extend(float(x) for x in timing.get("step_s") or [])
        attention = sidecar.get("attention_stats") or {}
        if attention.get("density") is not None:
            self.density.append(float(attention["density"]))
        if attention.get("sparse_density") is not None:
            self.sparse_density.append(float(attention["sparse_density"]))


@dataclass
class RunResult:
    """What a run did in this process."""

    rank: int
    world_size: int
    tallies: dict[str, VariantTally]
    failures: list[tuple[str, str]]
    made: list[str]
    skipped: list[str]
    run_total: int = 0  # videos of the whole run, all processes
    run_finished: int = 0  # of those, finished on disk when this process ended
    elsewhere: list[str] = field(default_factory=list)  # made meanwhile by another process on the same folder
    stopped: str | None = None  # why the run stopped before its end (a full disk)
    followed: str | None = None  # parallel.ulysses > 1, not a group's leader: whose videos this process helped make

    @property
    def ok(self) -> bool:
        return not self.failures


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summary_table(result: RunResult) -> str:
    """The end-of-run table: per variant, videos made / skipped / failed, median time per video and per
    denoising step (all steps of all videos pooled: the first video's Triton compilation is one outlier
    among many), mean density and sparse-step density, and the step speed-up against the dense baseline as
    :func:`run_figures.step_speedup` defines it (``quality`` reports the same figure from the sidecars)."""
    _median = run_figures.median
    rows = list(result.tallies.values())
    base = next((t for t in rows if t.variant.mode == "dense" and t.step_s), None) or next(
        (t for t in rows if t.variant.mode == "stock" and t.step_s), None
    )
    speedups = {t.variant.name: run_figures.step_speedup([(base.sidecars.get(name), sidecar)
                                                          for name, sidecar in t.sidecars.items()])
                for t in rows if base is not None}

    def fmt(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    header = ["variant", "mode", "planned", "made", "skipped", "failed", "s/video", "s/step", run_figures.DENSITY,
              run_figures.SPARSE_STEP_DENSITY, run_figures.SPEEDUP]
    lines = [header]
    for t in rows:
        step = _median(t.step_s)
        speed = speedups[t.variant.name].value if t.variant.name in speedups else None
        lines.append([t.variant.name, t.variant.mode, str(t.planned), str(t.made), str(t.skipped), str(t.failed),
                      fmt(_median(t.video_s), ".2f"), fmt(step, ".3f"), fmt(_mean(t.density), ".3f"),
                      fmt(_mean(t.sparse_density), ".3f"), fmt(speed, ".2f") + ("x" if speed else "")])
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
            for r in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    who = f" (rank {result.rank} of {result.world_size})" if result.world_size > 1 else ""
    note = (f"summary{who}, over every finished video of this share: median s/video and s/step (robust to the "
            "first video's kernel compilation), mean density")
    if base:
        note += (f"; speed-up is the median step of {base.variant.name} / the median step, over the videos one "
                 "process made both of")
    notes = []
    for t in rows:
        s = speedups.get(t.variant.name)
        if s is not None and s.left_out:
            notes.append(f"{t.variant.name}: speed-up {s.note}")
        elif s is not None and s.pairs and s.pairs != max(len(t.sidecars), len(base.sidecars)):
            notes.append(f"{t.variant.name}: speed-up over the {s.pairs} videos both variants finished")
    if any(s.on_cpu for s in speedups.values()):
        notes.append(f"note: {run_figures.CPU_TIMING_NOTE}")
    whole = f"whole run: {result.run_finished} of {result.run_total} videos finished"
    if result.world_size > 1:
        whole += " (when this process ended; the others may still be at work)"
    return "\n".join([note, *text, *notes, whole])


# ----------------------------------------------------------------------------------------------------- run


class Log:
    """Progress lines that do not break progress bars; prefixed with the rank when there are several."""

    def __init__(self, rank: int, world_size: int, stream: Any = None):
        self.prefix = f"[rank {rank}/{world_size}] " if world_size > 1 else ""
        self.stream = stream if stream is not None else sys.stderr

    def __call__(self, message: str) -> None:
        from tqdm.auto import tqdm

        for line in message.splitlines() or [""]:
            tqdm.write(self.prefix + line, file=self.stream)


def write_block(text: str, *, rank: int, world_size: int, stream: Any = None) -> None:
    """``text`` with every line prefixed by the rank when there are several processes, in ONE write: under
    torchrun the ranks share one output pipe, and line-by-line prints of two summaries run together."""
    stream = stream if stream is not None else sys.stdout
    prefix = f"[rank {rank}/{world_size}] " if world_size > 1 else ""
    data = "".join(f"{prefix}{line}\n" for line in text.splitlines()).encode()
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (a capture in tests, a notebook)
        stream.write(data.decode())
        stream.flush()
        return
    stream.flush()
    while data:  # one write unless the OS takes part of it (a pipe takes up to its buffer at once)
        data = data[os.write(fd, data):]


def _show_progress(setting: str) -> bool:
    return setting == "true" or (setting == "auto" and sys.stderr.isatty())


def run_generate(
    cfg: GenerateConfig,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    pipeline: Any = None,
    log: Callable[[str], None] | None = None,
    dry_run: bool = False,
) -> RunResult:
    """Make this process's share of the config's videos; return what happened.

    ``pipeline`` is an already loaded pipeline (tests, notebooks); otherwise the config's model loads after
    everything else has been checked. ``dry_run`` reports the plan and loads nothing.
    """
    rank, world_size, local_rank = dist_env(rank, world_size)
    log = log or Log(rank, world_size)
    degree = cfg.parallel.ulysses
    if world_size % degree:
        raise ConfigError(f"parallel.ulysses = {degree} is not allowed with {world_size} processes: it must divide "
                          "the number of processes (groups of parallel.ulysses processes make one video each)")
    if degree > 1 and cfg.model.cpu_offload:
        raise ConfigError(f"model.cpu_offload = True is not allowed with parallel.ulysses = {degree}: each process "
                          "keeps the whole transformer on its GPU under sequence parallelism")
    prompts = resolve_prompts(cfg)
    jobs = plan_jobs(cfg, prompts)
    mine = shard(jobs, rank // degree, world_size // degree)  # a group of `degree` ranks shares one share
    layout = Layout(cfg.output.root)
    check_output_dir(layout.root, "output.root")
    tallies = {v.name: VariantTally(v) for v in cfg.variants}
    states = {job: job_state(job, layout, cfg.output.keep_latents) for job in mine}
    todo = [job for job in mine if states[job] != "done"]
    for job in mine:
        tallies[job.variant.name].planned += 1
    hub: dict = {}
    if todo and not dry_run:  # everything the model load and the videos need, checked before any work
        if pipeline is None:
            device = resolve_device(cfg.model.device, local_rank, cfg.model.cpu_offload)
            check_device_for_model(cfg.model.device, device, cfg.model.id)
        else:
            device = str(getattr(pipeline, "_execution_device", "cpu"))
        check_backends_on_device(cfg.variants, device)
        if pipeline is None and cfg.model.id not in TINY_IDS:
            hub = check_model_source(cfg.model.id, cfg.model.revision, log=log)
    n_stale = sum(1 for s in states.values() if s == "stale")
    log(f"{len(prompts)} prompts x {len(cfg.seeds)} seeds x {cfg.videos_per_prompt} videos x "
        f"{len(cfg.variants)} variants = {len(jobs)} videos under {layout.root}; this process: {len(mine)}, "
        f"{len(mine) - len(todo)} already done, {len(todo)} to make"
        + (f" ({n_stale} made with other settings: remade)" if n_stale else ""))
    result = RunResult(rank, world_size, tallies, [], [], [], run_total=len(jobs))
    for job in mine:
        if states[job] == "done":
            tallies[job.variant.name].skipped += 1
            tallies[job.variant.name].add(read_sidecar(layout.sidecar(job)) or {})
            result.skipped.append(job.label)
    if dry_run:
        for job in todo:
            log(f"  would make {job.label}.mp4  ({job.prompt!r}, seed {job.seed})")
        return _count_finished(result, jobs, layout, cfg)
    cleared = clear_stale_temporaries(layout.root)
    if cleared:
        log(f"removed {len(cleared)} temporary files that dead runs left under {layout.root}")
    if rank == 0:
        from xattn_video.pipelines.video_io import write_text_atomic

        try:
            write_text_atomic(layout.config, to_yaml(cfg), tmp_dir=layout.partial)
        except OSError as e:
            raise ConfigError(f"output.root = {cfg.output.root!r}: writing {layout.config.name} failed "
                              f"({one_line(e)})") from None
    group = None
    if degree > 1:
        from .generate_parallel import setup_group

        group = setup_group(degree, rank, world_size, resolve_device(cfg.model.device, local_rank, False))
        if not group.broadcast(bool(todo)):  # the leader's view decides; followers mirror it
            return _count_finished(result, jobs, layout, cfg)
    elif not todo:
        return _count_finished(result, jobs, layout, cfg)

    if pipeline is None:
        check_family_settings(family_of_model(cfg.model), cfg)  # before any weights load
        log(f"loading {cfg.model.id} on {device} ...")
        t0 = time.perf_counter()
        pipeline = load_pipeline(cfg.model, device, cfg.video, hub)
        log(f"loaded in {time.perf_counter() - t0:.1f} s")
    else:
        device = str(getattr(pipeline, "_execution_device", device))
    check_family_settings(family_of(pipeline), cfg)
    if group is not None:
        group.enable(pipeline, transformers_of(pipeline))
        if not group.leader:
            _follow(pipeline, mine, cfg, group, log=log, device=device, rank=rank)
            result.followed = f"rank {rank - group.local} (Ulysses group {group.index}, {degree} processes a video)"
            return _count_finished(result, jobs, layout, cfg)
    _make_all(pipeline, todo, cfg, layout, result, log=log, device=device, group=group)
    return _count_finished(result, jobs, layout, cfg)


def _follow(pipe: Any, mine: list[VideoJob], cfg: GenerateConfig, group: Any, *, log: Callable[[str], None],
            device: str, rank: int) -> None:
    """A follower of a Ulysses group: make each video the leader names with it, write nothing, report back."""
    from .generate_parallel import rank_record

    by_label = {job.label: job for job in mine}
    current, proc = None, None
    while True:
        message = group.broadcast(None)
        if message[0] == "done":
            return
        job, gen = by_label[message[1]], None
        try:
            if job.variant != current:
                proc = apply_variant(pipe, job.variant, cfg.video.steps, parallel=True,
                                     balance_heads=cfg.parallel.balance_heads)
                current = job.variant
            gen = generate_video(pipe, proc, job, cfg, device)
        except Exception as e:  # the leader reports the video as failed
            log(f"FAILED {job.label} on this rank: {type(e).__name__}: {e}")
            current = None
            _free_cuda(device)
        group.gather(rank_record(rank, gen))


def _count_finished(result: RunResult, jobs: list[VideoJob], layout: Layout, cfg: GenerateConfig) -> RunResult:
    """Count the whole run's finished videos (every process's), for the summary's last line."""
    result.run_finished = sum(job_state(job, layout, cfg.output.keep_latents) == "done" for job in jobs)
    return result


def _make_all(pipe: Any, todo: list[VideoJob], cfg: GenerateConfig, layout: Layout, result: RunResult, *,
              log: Callable[[str], None], device: str, group: Any = None) -> None:
    from tqdm.auto import tqdm

    show = _show_progress(cfg.progress)
    versions = package_versions()
    step_bars = show and result.world_size == 1
    bar = tqdm(total=len(todo), desc="videos", unit="video", disable=not show, dynamic_ncols=True,
               position=result.rank if result.world_size > 1 else 0)
    state = _MakeState(pipe, cfg, layout, result, log, device, versions, step_bars, len(todo), group)
    # one lock per video with all its variants, so that its dense and XAttention versions are made (and
    # timed) by the same process, as shard() does for ranks
    units: dict[str, list[tuple[int, VideoJob]]] = {}
    for n, job in enumerate(todo, 1):
        units.setdefault(job.name, []).append((n, job))
    busy: list[tuple[list[tuple[int, VideoJob]], FileLock]] = []
    try:
        for name, unit in units.items():
            lock = FileLock(layout.lock(unit[0][1]), name)
            owner = state.try_lock(lock)
            if owner is not None:  # another generate on this folder is making it: leave it, come back at the end
                if not busy:
                    log(f"another generate ({describe_owner(owner)}) is making videos under {layout.root}: this "
                        "process leaves each video it holds to it, makes the others, and then waits for those")
                busy.append((unit, lock))
                continue
            state.make_all(unit, lock, bar)
            if result.stopped:
                break
        for unit, lock in busy:  # wait for the other process; make the videos here if it did not
            if result.stopped:
                break
            state.try_lock(lock, wait=True)
            state.make_all(unit, lock, bar)
    finally:
        bar.close()
        if group is not None:  # the followers stop waiting
            group.broadcast(("done",))
        with contextlib.suppress(OSError):
            layout.lock(todo[0]).parent.rmdir()  # when empty: no lock is held
    if result.stopped:
        left = len(todo) - len(result.made) - len(result.elsewhere) - sum(t.failed for t in result.tallies.values())
        log(f"stopped: {result.stopped}; {left} videos not attempted (finished ones are kept: free space and "
            "rerun to make the rest)")
    if result.elsewhere:
        log(f"{len(result.elsewhere)} videos were made meanwhile by another process on this folder")


class _MakeState:
    """The loop state of :func:`_make_all`: the processor of the current variant, and how one job is made."""

    def __init__(self, pipe: Any, cfg: GenerateConfig, layout: Layout, result: RunResult,
                 log: Callable[[str], None], device: str, versions: dict, step_bars: bool, total: int,
                 group: Any = None):
        self.pipe, self.cfg, self.layout, self.result, self.log = pipe, cfg, layout, result, log
        self.group = group  # parallel.ulysses > 1: this process leads a group (generate_parallel)
        self.device, self.versions, self.step_bars, self.total = device, versions, step_bars, total
        self.current: Variant | None = None
        self.proc = None
        self.unlocked = False  # the filesystem has no locks: go on without them (said once)

    def try_lock(self, lock: FileLock, wait: bool = False) -> dict | None:
        """None when this process may make the video (lock held, or locks unsupported), else the owner."""
        if self.unlocked:
            return None
        try:
            return lock.acquire(wait=wait)
        except OSError as e:
            self.unlocked = True
            self.log(f"cannot lock files under {self.layout.root} ({one_line(e)}): going on without locks, so two "
                     "generate runs on this folder would both make every video")
            return None

    def make_all(self, unit: list[tuple[int, VideoJob]], lock: FileLock, bar: Any) -> None:
        """Make the variants of one video (its lock held), but none that another process finished meanwhile;
        record each outcome; release the lock."""
        try:
            for n, job in unit:
                if self.result.stopped:
                    return
                if job_state(job, self.layout, self.cfg.output.keep_latents) == "done":
                    self.result.elsewhere.append(job.label)
                    self.result.tallies[job.variant.name].skipped += 1
                    self.log(f"[{n}/{self.total}] {job.label}.mp4 made meanwhile by another process")
                else:
                    self._make(n, job)
                bar.update(1)
        finally:
            lock.release()

    def _make(self, n: int, job: VideoJob) -> None:
        result, layout, log = self.result, self.layout, self.log
        tally = result.tallies[job.variant.name]
        self.pipe.set_progress_bar_config(disable=not self.step_bars, leave=False, desc="steps", dynamic_ncols=True)
        try:
            gen = self._generate(job)
            sidecar = save_outputs(job, self.cfg, gen, layout, device=self.device, rank=result.rank,
                                   world_size=result.world_size, versions=self.versions)
        except Exception as e:  # one failed video must not stop the batch (a full disk does: see below)
            error = one_line(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
            tally.failed += 1
            known = error in {err for _, err in result.failures} or isinstance(e, OSError)
            trace = "" if known else "\n" + traceback.format_exc()
            result.failures.append((job.label, error))
            log(f"[{n}/{self.total}] FAILED {job.label}: {error}{trace}")
            self._manifest(_manifest_record(job, layout, result, "failed", error=error))
            self.current = None  # the processor may be half set: apply it again
            _free_cuda(self.device)
            if is_disk_full(e):
                result.stopped = f"the disk under {layout.root} is full ({error})"
        else:
            tally.made += 1
            tally.add(sidecar)
            result.made.append(job.label)
            density = (gen.attention or {}).get("density")
            log(f"[{n}/{self.total}] {job.label}.mp4  {gen.timing['total_s']:.1f} s"
                + (f"  density {density:.3f}" if density is not None else ""))
            self._manifest(_manifest_record(job, layout, result, "ok", sidecar=sidecar))

    def _generate(self, job: VideoJob) -> Generated:
        """Apply the job's variant and make its video; with a group, the followers make it alongside and report."""
        if self.group is None:
            if job.variant != self.current:
                self.proc = apply_variant(self.pipe, job.variant, self.cfg.video.steps)
                self.current = job.variant
            return generate_video(self.pipe, self.proc, job, self.cfg, self.device)
        from .generate_parallel import combine_rank_stats, rank_record

        self.group.broadcast(("make", job.label))
        gen, error = None, None
        try:
            if job.variant != self.current:
                self.proc = apply_variant(self.pipe, job.variant, self.cfg.video.steps, parallel=True,
                                          balance_heads=self.cfg.parallel.balance_heads)
                self.current = job.variant
            gen = generate_video(self.pipe, self.proc, job, self.cfg, self.device)
        except Exception as e:  # reported after the followers have reported theirs
            error = e
        records = self.group.gather(rank_record(self.result.rank, gen))
        if error is not None:
            raise error
        failed = [r["rank"] for r in records if r.get("failed")]
        if failed:
            raise RuntimeError(f"ranks {failed} of Ulysses group {self.group.index} failed on this video")
        gen.parallel = combine_rank_stats(self.group, gen, records)
        gen.parallel["balance_heads"] = self.cfg.parallel.balance_heads
        balance = getattr(self.proc, "head_balance", None)
        if balance is not None:  # per layer: the ranks' kept blocks at the measured step, heads in order vs assigned
            gen.parallel["head_balance"] = {str(k): v for k, v in balance.summary().items()}
        return gen

    def _manifest(self, record: dict) -> None:
        try:
            append_manifest(self.layout.manifest, record)
        except OSError as e:  # the record is lost, the run is not
            self.log(f"could not append to {self.layout.manifest} ({one_line(e)}): {record['status']} "
                     f"{record['variant']}/{record['name']} is not recorded there")


def _manifest_record(job: VideoJob, layout: Layout, result: RunResult, status: str, *,
                     sidecar: dict | None = None, error: str | None = None) -> dict:
    record = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "status": status,
        "variant": job.variant.name,
        "name": job.name,
        "video": layout.rel(layout.video(job)),
        "sidecar": layout.rel(layout.sidecar(job)),
        "prompt": job.prompt,
        "seed": job.seed,
        "index": job.index,
        "key": job.key,
        "rank": result.rank,
        "world_size": result.world_size,
    }
    if sidecar is not None:
        record["total_s"] = sidecar["timing"]["total_s"]
        record["density"] = (sidecar["attention_stats"] or {}).get("density")
    if error is not None:
        record["error"] = error
    return record


def _free_cuda(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``xattn-video generate``."""
    parser.usage = "%(prog)s [-h] [--print-config] [--dry-run] [--rank N] [--world-size N] [CONFIG.yaml] " \
                   "[key=value ...]"
    parser.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value ...]",
                        help="a YAML config (default: the embedded tiny CPU run), then OmegaConf dot-list "
                             "overrides such as attention.threshold=0.95 seeds=[0,1]")
    parser.set_defaults(_positional_rest="args")  # overrides may also follow the options
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved, validated config and exit (loads no model)")
    parser.add_argument("--dry-run", action="store_true",
                        help="list what this process would make and exit (loads no model)")
    parser.add_argument("--rank", type=int, default=None, metavar="N",
                        help="this process's rank (default: $RANK, as set by torchrun / accelerate launch)")
    parser.add_argument("--world-size", type=int, default=None, metavar="N",
                        help="number of processes sharing the work (default: $WORLD_SIZE, else 1)")


def run(args: argparse.Namespace) -> int:
    """``xattn-video generate``: 0 when every video of this process's share exists, 1 when some failed."""
    result = run_config_command(
        args, load_config, to_yaml,
        lambda cfg: run_generate(cfg, rank=args.rank, world_size=args.world_size, dry_run=args.dry_run),
    )
    if result is None:  # --print-config
        return 0
    if result.followed:
        write_block(f"helped {result.followed} make its videos; it writes them and their summary",
                    rank=result.rank, world_size=result.world_size)
    elif not args.dry_run:
        write_block(summary_table(result), rank=result.rank, world_size=result.world_size)
    if result.failures:
        write_block("\n".join(f"FAILED {label}: {error}" for label, error in result.failures), rank=result.rank,
                    world_size=result.world_size, stream=sys.stderr)
    return 0 if result.ok else 1
