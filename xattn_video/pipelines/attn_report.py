"""Attention report: one generation with XAttention, measured per denoising step, layer and head.

For every sparse attention call dense attention also runs on the same q/k/v (the same valid segment: video
tokens and unpadded text) and the report records, per head, the block density (kept / all blocks) and the
relative error ||out_xattn - out_dense|| / ||out_dense|| (Frobenius norms over tokens and channels, pooled over
the batch and over the calls of a step). Dense steps (warmup) and dense layers are exact: density 1, error 0;
by default XAttention is also run beside them as a probe ("what if this step were sparse"), which shows how
many warmup steps a threshold needs. The generation itself is unchanged by the measurements. HunyuanVideo is
recorded through its XAttention processor (a recording subclass), every other family (Wan 2.1/2.2, HunyuanVideo
1.5, ...) through the ``xattn`` backend's report mode (``XAttnSession.start_probe``), with one definition of the
measurements (:mod:`xattn_video.diffusion.probe`). The backend keeps its ``min_len``: calls shorter than it run
native and are not recorded (a tiny video needs ``attention.min_len=16``, say).

The config is generate's (the same embedded tiny default, YAML file and dotted overrides):
  xattn-video attn-report                                          # tiny default, CPU, a few seconds
  xattn-video attn-report configs/hunyuan_544x960.yaml --variant xattn_t090 attention.variants.xattn_t090.threshold=0.8
  xattn-video attn-report model.id=tiny-wan21 attention.min_len=16 attention.block_size=16 attention.stride=4
The run uses one xattn variant (--variant, default the first), one prompt (--prompt-index) and the first seed.

Output (default <output.root>/attn-report/<variant>):
  attn_report.json         per step: mode, timestep, per layer and head density and relative error (and probe)
  attn_report.md           per step: mode, mean/max over layers and heads
  density_layer_head.png   layer x head density, mean over the sparse steps
  error_layer_head.png     layer x head relative error, mean over the sparse steps
  density_layer_step.png   layer x step density, mean over heads (dense steps: the probe's)
  error_layer_step.png     layer x step relative error, likewise
  error_vs_step.png        relative error per step (mean, min..max over layers and heads; probe on dense steps)
  density_vs_step.png      density per step, likewise
  video.mp4                the generated video
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HELP = "per step, layer and head: XAttention's density and its error against dense attention, with heatmaps"
REPORT_SCHEMA = 1
# HunyuanVideo runs its XAttention processor (the recording subclass below); every other family the xattn backend,
# recorded by its session's report mode (XAttnSession.start_probe)
PROCESSOR_FAMILIES = ("hunyuan",)


# ------------------------------------------------------------------------------------------------ recording


def _report_processor_class():
    """The recording processor, defined on first use so that importing this module stays light."""
    from xattn_video.core.attention import PendingStats, xattn_attention
    from xattn_video.diffusion.hunyuan import XAttnProcessor
    from xattn_video.diffusion.probe import Cell, report_steps

    class ReportProcessor(XAttnProcessor):
        """:class:`XAttnProcessor` that also runs dense attention beside each sparse call and records the
        density and relative error per (generation, step, layer, head); outputs are those of the parent."""

        def __init__(self, *args, probe_dense: bool = True, **kwargs):
            super().__init__(*args, **kwargs)
            self.probe_dense = probe_dense
            self.cells: dict[tuple[int, int, int], Cell] = {}
            self.timesteps: dict[tuple[int, int], float] = {}
            self.layer_kinds: dict[int, str] = {}
            self._current: tuple | None = None

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
            layer = self._layers.get(attn)
            tracker = self._tracker
            position = tracker.position if tracker is not None else None
            self._current = None
            if layer is not None and position is not None:
                dense = position.step < self.warmup_steps or layer[0] in self.dense_layers
                key = (position.generation, position.step, layer[0])
                self._current = (key, dense)
                self.timesteps[key[:2]] = position.timestep
                self.layer_kinds[layer[0]] = layer[1]
                cell = self.cells.setdefault(key, Cell("dense" if dense else "sparse"))
                if dense:
                    cell.mode = "dense"
            try:
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
            finally:
                self._current = None

        def sparse_attention(self, q, k, v, out=None):
            result, stats = super().sparse_attention(q, k, v, out=out)
            if self._current is not None:
                # k/v hold the valid segment; q may also hold the padded text queries after it: measured are
                # the valid queries only, the ones the video depends on
                length = k.shape[2]
                read = stats.resolve() if isinstance(stats, PendingStats) else stats
                reference = self.dense_attention(q[:, :, :length], k, v)
                self.cells[self._current[0]].actual.add(read.density_per_head, result[:, :, :length], reference)
            return result, stats

        def dense_attention(self, q, k, v):
            out = super().dense_attention(q, k, v)
            current = self._current
            if current is not None and current[1] and q.shape[2] >= k.shape[2]:
                length = k.shape[2]  # the valid segment: queries and keys of the same tokens
                cell = self.cells[current[0]]
                ones = q.new_ones(q.shape[0], q.shape[1])
                cell.actual.add(ones, out[:, :, :length], out[:, :, :length])  # exact: density 1, error 0
                if self.probe_dense:
                    probe, stats = xattn_attention(
                        q[:, :, :length],
                        k,
                        v,
                        threshold=self.threshold,
                        stride=self.stride,
                        block_size=self.block_size,
                        backend=self.backend,
                        return_stats=True,
                    )
                    cell.probe.add(stats.density_per_head, probe, out[:, :, :length])
            return out

        def report_steps(self) -> list[dict]:
            """Per (generation, step): mode, timestep and per-layer per-head density and relative error."""
            return report_steps(self.cells, self.timesteps)

    return ReportProcessor


def ReportProcessor(*args, **kwargs):  # noqa: N802 - a factory that reads like the class it builds
    """Build the recording processor (see :func:`_report_processor_class`)."""
    return _report_processor_class()(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- summaries


def _stats(matrix: list[list[float]] | None) -> dict | None:
    values = [x for row in (matrix or []) if row for x in row]
    if not values:
        return None
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def summarize(steps: list[dict]) -> list[dict]:
    """Per step: mean/min/max over layers and heads of density and relative error (and of the probe)."""
    out = []
    for s in steps:
        out.append(
            {
                "step": s["step"],
                "mode": s["mode"],
                "timestep": s["timestep"],
                "density": _stats(s["density"]),
                "rel_error": _stats(s["rel_error"]),
                "probe_density": _stats(s["probe_density"]),
                "probe_rel_error": _stats(s["probe_rel_error"]),
            }
        )
    return out


def _mean_matrix(matrices: list[list[list[float]]]):
    import numpy as np

    arrays = [np.asarray(m, dtype=np.float64) for m in matrices if m and all(row for row in m)]
    return np.mean(arrays, axis=0) if arrays else None


def _fmt(stat: dict | None, key: str, spec: str = ".3f") -> str:
    return "-" if stat is None else format(stat[key], spec)


def markdown(report: dict) -> str:
    """The per-step table as Markdown."""
    v = report["variant"]
    lines = [
        f"# Attention report: {v['name']} (threshold {v['threshold']}, stride {v['stride']}, block {v['block_size']}, "
        f"warmup {v['warmup_steps']})",
        "",
        f"Prompt: {report['prompt']!r}, seed {report['seed']}; {report['num_layers']} layers x {report['num_heads']} "
        f"heads; {report['video']['frames']} frames of {report['video']['width']}x{report['video']['height']}.",
        "",
        "| step | timestep | mode | density mean | density min | rel. error mean | rel. error max | "
        "probe density | probe rel. error |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in report["summary"]:
        t = "-" if s["timestep"] is None else f"{s['timestep']:.1f}"
        lines.append(
            f"| {s['step']} | {t} | {s['mode']} | {_fmt(s['density'], 'mean')} | {_fmt(s['density'], 'min')} | "
            f"{_fmt(s['rel_error'], 'mean', '.4f')} | {_fmt(s['rel_error'], 'max', '.4f')} | "
            f"{_fmt(s['probe_density'], 'mean')} | {_fmt(s['probe_rel_error'], 'mean', '.4f')} |"
        )
    lines += [
        "",
        "Density: kept / all blocks of the valid segment. Relative error: ||out_xattn - out_dense|| / "
        "||out_dense|| per head. Dense steps and layers are exact (1, 0); probe: XAttention run beside a dense "
        "step with the same settings, its output unused.",
        "",
    ]
    return "\n".join(lines)


def layer_step_matrix(steps: list[dict], key: str, probe_key: str):
    """[layers, steps] of ``key`` averaged over heads; dense cells take the probe's value when there is one and
    are NaN (blank) otherwise. None when there is nothing to show."""
    import numpy as np

    if not steps:
        return None
    layers = sorted({layer for s in steps for layer in s["layers"]})
    matrix = np.full((len(layers), len(steps)), np.nan)
    for j, s in enumerate(steps):
        for row, layer in enumerate(s["layers"]):
            if s["layer_modes"][row] != "dense":
                values = s[key][row]
            else:
                values = s[probe_key][row] if s[probe_key] else None
            if values:
                matrix[layers.index(layer), j] = float(np.mean(values))
    return None if np.isnan(matrix).all() else matrix


def write_plots(report: dict, folder: Path) -> list[Path]:
    """The four PNGs of the report."""
    from xattn_video.pipelines import plots

    steps = report["steps"]
    sparse = [s for s in steps if s["mode"] != "dense"]
    paths = []
    source, key_d, key_e, label = sparse, "density", "rel_error", "mean over the sparse steps"
    if not sparse:
        source, key_d, key_e, label = steps, "probe_density", "probe_rel_error", "probe, mean over the dense steps"
    density = _mean_matrix([s[key_d] for s in source])
    error = _mean_matrix([s[key_e] for s in source])
    v = report["variant"]
    title = f"{v['name']}: threshold {v['threshold']}, stride {v['stride']}, block {v['block_size']}"
    if density is not None:
        paths.append(
            plots.heatmap(
                folder / "density_layer_head.png",
                density,
                title=f"block density ({label})\n{title}",
                xlabel="head",
                ylabel="layer",
                colorbar="kept / all blocks",
                vmin=0,
                vmax=1,
            )
        )
    if error is not None:
        paths.append(
            plots.heatmap(
                folder / "error_layer_head.png",
                error,
                title=f"relative error vs dense attention ({label})\n{title}",
                xlabel="head",
                ylabel="layer",
                colorbar="||xattn - dense|| / ||dense||",
                vmin=0,
            )
        )
    for name, key, probe_key, what, vmax in (
        ("density_layer_step.png", "density", "probe_density", "block density", 1),
        ("error_layer_step.png", "rel_error", "probe_rel_error", "relative error", None),
    ):
        matrix = layer_step_matrix(steps, key, probe_key)
        if matrix is not None:
            paths.append(
                plots.heatmap(
                    folder / name,
                    matrix,
                    title=f"{what} per layer and step, mean over heads (dense steps: probe, or blank)\n{title}",
                    xlabel="denoising step",
                    ylabel="layer",
                    colorbar=what,
                    vmin=0,
                    vmax=vmax,
                )
            )
    xs = [s["step"] for s in report["summary"]]
    dense_steps = [s["step"] for s in report["summary"] if s["mode"] == "dense"]
    for name, key, probe_key, ylabel in (
        ("error_vs_step.png", "rel_error", "probe_rel_error", "relative error"),
        ("density_vs_step.png", "density", "probe_density", "block density"),
    ):
        actual = [s[key]["mean"] if s["mode"] != "dense" and s[key] else math.nan for s in report["summary"]]
        probe = [s[probe_key]["mean"] if s["mode"] == "dense" and s[probe_key] else math.nan for s in report["summary"]]
        lo = [(s[key] if s["mode"] != "dense" else s[probe_key] or {}).get("min", math.nan) for s in report["summary"]]
        hi = [(s[key] if s["mode"] != "dense" else s[probe_key] or {}).get("max", math.nan) for s in report["summary"]]
        series = {f"{ylabel}, mean over layers x heads": actual}
        if not all(math.isnan(x) for x in probe):
            series["probe on dense steps (output unused)"] = probe
        shown = [x for x in (*actual, *probe, *lo) if not math.isnan(x)]
        paths.append(
            plots.step_curves(
                folder / name,
                xs,
                series,
                title=f"{ylabel} per denoising step\n{title}",
                ylabel=ylabel,
                band=(lo, hi),
                band_label="min..max over layers x heads",
                logy=key == "rel_error" and bool(shown) and min(shown) > 0,
                shade=dense_steps,
            )
        )
    return paths


# ----------------------------------------------------------------------------------------------------- run


@dataclass
class AttnReport:
    report: dict
    folder: Path
    files: list[Path]


def pick_variant(cfg: Any, name: str | None):
    """The xattn variant to report on: ``name`` or the config's first xattn variant."""
    from .generate_config import ConfigError

    xattn = [v for v in cfg.variants if v.mode == "xattn"]
    if name is not None:
        match = [v for v in cfg.variants if v.name == name]
        if not match:
            raise ConfigError(
                f"--variant {name!r} is not allowed: one of the config's variants {[v.name for v in cfg.variants]}"
            )
        if match[0].mode != "xattn":
            raise ConfigError(
                f"--variant {name!r} is not allowed: it is a {match[0].mode} variant; the report needs "
                f"an xattn one: {[v.name for v in xattn] or 'the config has none'}"
            )
        return match[0]
    if not xattn:
        raise ConfigError(
            f"the config has no xattn variant (variants: {[v.name for v in cfg.variants]}); add one "
            "under attention.variants"
        )
    return xattn[0]


def run_attn_report(
    cfg: Any,
    *,
    variant: str | None = None,
    prompt_index: int = 0,
    output: str | Path | None = None,
    probe_dense: bool = True,
    pipeline: Any = None,
    log: Callable[[str], None] = print,
) -> AttnReport:
    """Run one generation of ``cfg`` (a validated generate config) with the attention recorded (the HunyuanVideo
    processor's recording subclass, or the xattn backend's report mode); write the report. ``pipeline``: an already
    loaded pipeline (tests); else the config's model is loaded."""
    from xattn_video.pipelines.video_io import write_json_atomic, write_text_atomic, write_video

    from . import generate, generate_models, generate_plan
    from .generate_config import ConfigError

    chosen = pick_variant(cfg, variant)
    prompts = generate_plan.resolve_prompts(cfg)
    if not 0 <= prompt_index < len(prompts):
        raise ConfigError(
            f"--prompt-index {prompt_index} is not allowed: the config has {len(prompts)} prompts "
            f"(0..{len(prompts) - 1})"
        )
    jobs = generate_plan.plan_jobs(cfg, prompts)
    job = next(j for j in jobs if j.variant == chosen and j.prompt_index == prompt_index)
    from . import preflight
    from .safe_io import clear_stale_temporaries

    folder = Path(output) if output is not None else Path(cfg.output.root) / "attn-report" / chosen.name
    family = generate_models.family_of(pipeline) if pipeline is not None else generate_models.family_of_model(cfg.model)
    # everything checked before the generation: a report folder that cannot be written fails now, not after it
    preflight.check_output_dir(folder, "--output" if output is not None else "output.root")
    if pipeline is None:
        device = generate.resolve_device(cfg.model.device, 0, cfg.model.cpu_offload)
        preflight.check_device_for_model(cfg.model.device, device, cfg.model.id)
    else:
        device = str(getattr(pipeline, "_execution_device", "cpu"))
    preflight.check_backends_on_device([chosen], device)
    clear_stale_temporaries(folder)
    if pipeline is None:
        hub = {}
        if cfg.model.id not in generate_models.TINY_IDS:
            hub = preflight.check_model_source(cfg.model.id, cfg.model.revision, log=log)
        log(f"loading {cfg.model.id} on {device} ...")
        pipeline = generate.load_pipeline(cfg.model, device, cfg.video, hub)
    log(
        f"{chosen.name}: {job.prompt!r}, seed {job.seed}, {cfg.video.steps} steps "
        f"({chosen.warmup_steps} dense), dense attention beside every sparse call"
    )
    t0 = time.perf_counter()
    if family in PROCESSOR_FAMILIES:
        recorder, gen = _run_with_processor(pipeline, chosen, job, cfg, device, probe_dense)
    else:
        recorder, gen = _run_with_backend(pipeline, chosen, job, cfg, device, probe_dense)
    seconds = time.perf_counter() - t0

    steps = [s for s in recorder.report_steps() if s["generation"] == 0]
    heads = max((len(row) for s in steps for row in s["density"] if row), default=0)
    report = {
        "schema": REPORT_SCHEMA,
        "variant": {"name": chosen.name, **chosen.settings()},
        "prompt": job.prompt,
        "seed": job.seed,
        "device": device,
        "video": {
            "height": cfg.video.height,
            "width": cfg.video.width,
            "frames": cfg.video.frames,
            "steps": cfg.video.steps,
        },
        "integration": "processor" if family in PROCESSOR_FAMILIES else "backend",
        "num_layers": len(recorder.layer_kinds),
        "num_heads": heads,
        "layer_kinds": [recorder.layer_kinds[i] for i in sorted(recorder.layer_kinds)],
        "probe_dense": probe_dense,
        "seconds": seconds,
        "definitions": {
            "density": "kept / all blocks of the valid segment (video + unpadded text), per head, mean over the "
            "batch and the calls of the step",
            "rel_error": "||out_xattn - out_dense||_F / ||out_dense||_F per head over tokens and channels of the "
            "valid segment, pooled over the batch and the calls of the step; dense steps/layers: 0",
            "probe": "on dense steps and layers: XAttention with the same settings run on the same q/k/v, output "
            "unused",
        },
        "summary": summarize(steps),
        "steps": steps,
        "config": cfg.resolved,
    }
    partial = folder / ".partial"
    files = [
        write_json_atomic(folder / "attn_report.json", report, tmp_dir=partial),
        write_text_atomic(folder / "attn_report.md", markdown(report), tmp_dir=partial),
    ]
    files += write_plots(report, folder)
    files.append(write_video(folder / "video.mp4", gen.frames, cfg.video.fps, crf=cfg.output.crf, tmp_dir=partial))
    with contextlib.suppress(OSError):
        partial.rmdir()  # empty once every file is in place
    return AttnReport(report, folder, files)


def _run_with_processor(pipeline, chosen, job, cfg, device: str, probe_dense: bool):
    """HunyuanVideo: the generation with the recording processor in place of the transformer's processors."""
    from . import generate

    proc = ReportProcessor(
        threshold=chosen.threshold,
        stride=chosen.stride,
        block_size=chosen.block_size,
        warmup_steps=chosen.warmup_steps,
        dense_layers=tuple(chosen.dense_layers),
        backend=chosen.backend,
        estimate_fp8="auto" if chosen.estimate_fp8 is None else chosen.estimate_fp8,
        attention_fp8=bool(chosen.attention_fp8),
        refresh_every=chosen.refresh_every or 1,
        probe_dense=probe_dense,
    )
    transformer = pipeline.transformer
    previous = dict(transformer.attn_processors)
    try:
        transformer.set_attn_processor(proc)
        proc.attach(transformer)
        pipeline.set_progress_bar_config(disable=True)
        gen = generate.generate_video(pipeline, proc, job, cfg, device)
    finally:
        proc.detach()
        transformer.set_attn_processor(previous)
    return proc, gen


def _run_with_backend(pipeline, chosen, job, cfg, device: str, probe_dense: bool):
    """Every other family: the variant's xattn backend exactly as generate sets it (min_len included), in report
    mode. A report with nothing recorded because every self-attention call was shorter than min_len is refused
    in one line naming the setting."""
    from . import generate
    from .generate_config import ConfigError

    session = generate.apply_variant(pipeline, chosen, cfg.video.steps)
    probe = session.start_probe(probe_dense)
    try:
        pipeline.set_progress_bar_config(disable=True)
        gen = generate.generate_video(pipeline, session, job, cfg, device)
    finally:
        session.stop_probe()
        session.detach()
    if not probe.cells:
        short = sorted({n for (reason, n) in probe.native_lengths if reason == "short"})
        if short:
            key = "attention.min_len" if chosen.min_len is None else f"attention.variants.{chosen.name}.min_len"
            raise ConfigError(
                f"{key} = {session.min_len} is not allowed here: every self-attention call of this video has "
                f"{', '.join(map(str, short))} tokens, fewer than min_len, so all ran native and there is nothing "
                f"to report; set {key} to at most {short[0]}"
            )
        raise ConfigError(
            "attn-report recorded no self-attention call that XAttention could take (native calls: "
            f"{dict(sorted(probe.native_lengths.items()))}); nothing to report"
        )
    return probe, gen


def summary_lines(report: dict) -> str:
    rows = [["step", "mode", "density", "rel.error mean", "rel.error max", "probe density", "probe error"]]
    for s in report["summary"]:
        rows.append(
            [
                str(s["step"]),
                s["mode"],
                _fmt(s["density"], "mean"),
                _fmt(s["rel_error"], "mean", ".4f"),
                _fmt(s["rel_error"], "max", ".4f"),
                _fmt(s["probe_density"], "mean"),
                _fmt(s["probe_rel_error"], "mean", ".4f"),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    text = [
        "  ".join(c.rjust(w) if i != 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


# ----------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``xattn-video attn-report``."""
    parser.usage = (
        "%(prog)s [-h] [--variant NAME] [--prompt-index N] [--output DIR] [--no-probe] [--print-config] "
        "[CONFIG.yaml] [key=value ...]"
    )
    parser.add_argument(
        "args",
        nargs="*",
        metavar="[CONFIG.yaml] [key=value ...]",
        help="a generate config (default: the embedded tiny CPU run), then dot-list overrides",
    )
    parser.set_defaults(_positional_rest="args")
    parser.add_argument(
        "--variant",
        default=None,
        metavar="NAME",
        help="the xattn variant to measure (default: the config's first xattn variant)",
    )
    parser.add_argument("--prompt-index", type=int, default=0, metavar="N", help="which prompt (default 0)")
    parser.add_argument(
        "--output", default=None, metavar="DIR", help="report folder (default: <output.root>/attn-report/<variant>)"
    )
    parser.add_argument("--no-probe", action="store_true", help="do not run XAttention beside the dense (warmup) steps")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    """``xattn-video attn-report``."""
    from .config_checks import run_config_command
    from .generate_config import load_config, to_yaml

    result = run_config_command(
        args,
        load_config,
        to_yaml,
        lambda cfg: run_attn_report(
            cfg,
            variant=args.variant,
            prompt_index=args.prompt_index,
            output=args.output,
            probe_dense=not args.no_probe,
            log=lambda m: print(m, file=sys.stderr),
        ),
    )
    if result is None:  # --print-config
        return 0
    print(summary_lines(result.report))
    print(f"report: {result.folder} ({', '.join(p.name for p in result.files)})")
    return 0


__all__ = ["AttnReport", "ReportProcessor", "markdown", "run_attn_report", "summarize", "write_plots"]
