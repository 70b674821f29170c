"""Fidelity of generated videos against a dense-attention reference: PSNR, SSIM and LPIPS, per frame and per video.

Videos are paired by file name (stem), so the folders `xattn-video generate` writes compare as they are,
VBench naming ({prompt}-{index}.mp4) included:
  xattn-video quality outputs/tiny/dense outputs/tiny/xattn           # REFERENCE_DIR CANDIDATE_DIR...
  xattn-video quality outputs/tiny                                     # a run folder: every variant vs dense
  xattn-video quality outputs/tiny --reference dense-bf16 --device cuda

Metrics (xattn_video.pipelines.metrics): PSNR in dB (identical frames give inf; a video's PSNR uses its MSE averaged
over frames), SSIM (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, per RGB channel, averaged), LPIPS v0.1 AlexNet.
LPIPS needs two weight files on this machine: torchvision's alexnet-owt-7be5be79.pth in torch.hub's cache
($TORCH_HOME/hub/checkpoints, default ~/.cache/torch/hub/checkpoints) and LPIPS's alex.pth (from an installed
`lpips` package, `pip install --no-deps lpips`, or --lpips-weights). Nothing is downloaded: when a file is
missing the command says which and where it looked, reports PSNR and SSIM, and LPIPS is null in the report.

Output (default <parent of the candidates>/quality, or <run>/quality):
  quality.json                        per candidate, per video: frames, size, PSNR/SSIM/LPIPS per frame and mean
  quality.md                          the same as Markdown tables (means first)
  plots/<candidate>/psnr_per_frame.png    per-frame PSNR of every video of the candidate
  plots/<candidate>/<video>.png           frames side by side: reference, candidate, |difference|
  pairs/<candidate>/<video>.json          one finished pair: a rerun reuses it while both files are unchanged

Names present on one side only are an error (--only-common compares the names both sides have and lists the
rest). A pair that cannot be compared (unreadable file, different frame count or resolution) is reported and
the others go on; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import run_figures

HELP = "PSNR / SSIM / LPIPS of videos against a dense-attention reference, per frame and per video, with plots"
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".gif")
METRICS_VERSION = 1  # part of each cached pair's key: bump when a metric's definition changes
REPORT_DIRS = ("meta", "quality", "vbench", "attn-report")  # folders of a run that are not variants


class QualityError(ValueError):
    """A user-fixable problem with the inputs (printed as one line by the CLI)."""


# ------------------------------------------------------------------------------------------------- pairing


def list_videos(folder: Path) -> dict[str, Path]:
    """The video files directly in ``folder`` by stem. Raises QualityError for a missing folder, no video,
    or two files of one stem (e.g. a.mp4 and a.gif), which would make the pairing ambiguous."""
    if not folder.is_dir():
        raise QualityError(f"{folder} is not a folder")
    videos: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in VIDEO_SUFFIXES and path.is_file() and not path.name.startswith("."):
            if path.stem in videos:
                raise QualityError(f"{folder} holds two videos named {path.stem!r} ({videos[path.stem].name} and "
                                   f"{path.name}): pairing by name is ambiguous")
            videos[path.stem] = path
    if not videos:
        raise QualityError(f"{folder} holds no video ({', '.join(VIDEO_SUFFIXES)})")
    return videos


@dataclass
class Pairing:
    """One candidate folder against the reference: the names both have, and those only one side has."""

    name: str
    folder: Path
    common: list[str]
    only_reference: list[str]
    only_candidate: list[str]
    videos: dict[str, Path] = field(default_factory=dict)  # the candidate's files by name


def pair_folders(reference: dict[str, Path], candidate_folder: Path, name: str, *, only_common: bool) -> Pairing:
    """Pair a candidate folder's videos with the reference's by name; QualityError on unmatched names unless
    ``only_common``."""
    cand = list_videos(candidate_folder)
    common = sorted(set(reference) & set(cand))
    only_ref = sorted(set(reference) - set(cand))
    only_cand = sorted(set(cand) - set(reference))
    if not common:
        raise QualityError(f"{candidate_folder} and the reference share no video name (reference: "
                           f"{_names(list(reference))}; candidate: {_names(list(cand))})")
    if (only_ref or only_cand) and not only_common:
        parts = []
        if only_ref:
            parts.append(f"{len(only_ref)} only in the reference: {_names(only_ref)}")
        if only_cand:
            parts.append(f"{len(only_cand)} only in {candidate_folder}: {_names(only_cand)}")
        raise QualityError(f"unmatched video names ({'; '.join(parts)}); pass --only-common to compare the "
                           f"{len(common)} names both have")
    return Pairing(name, candidate_folder, common, only_ref, only_cand, cand)


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def resolve_folders(paths: Sequence[str], reference_name: str | None) -> tuple[Path, list[tuple[str, Path]], Path]:
    """(reference folder, [(candidate name, folder)], default output folder) from the command's positionals.

    One path: a run folder of `generate` (variant folders inside): the reference is ``reference_name``
    (default ``dense``), the candidates every other folder holding videos. Two or more: the reference then
    the candidates, each a folder of videos; a candidate is named after its folder (its parent's name is
    added when two candidate folders share a name).
    """
    if not paths:
        raise QualityError("give REFERENCE_DIR CANDIDATE_DIR [CANDIDATE_DIR ...], or one run folder")
    if len(paths) == 1:
        run = Path(paths[0])
        if not run.is_dir():
            raise QualityError(f"{run} is not a folder")
        variants = sorted(p for p in run.iterdir() if p.is_dir() and p.name not in REPORT_DIRS
                          and not p.name.startswith(".") and any(s.suffix.lower() in VIDEO_SUFFIXES
                                                                  for s in p.iterdir()))
        names = [p.name for p in variants]
        ref_name = reference_name or "dense"
        if ref_name not in names:
            raise QualityError(f"--reference {ref_name!r} is not a variant folder of {run}: the folders with videos "
                               f"are {names or 'none'}; pass --reference NAME, or REFERENCE_DIR CANDIDATE_DIR")
        candidates = [(p.name, p) for p in variants if p.name != ref_name]
        if not candidates:
            raise QualityError(f"{run} holds no variant besides the reference {ref_name!r} to compare")
        return run / ref_name, candidates, run / "quality"
    if reference_name is not None:
        raise QualityError("--reference names a variant of a run folder; with REFERENCE_DIR CANDIDATE_DIR it is "
                           "the first folder")
    reference = Path(paths[0])
    folders = [Path(p) for p in paths[1:]]
    for folder in folders:
        if folder.resolve() == reference.resolve():
            raise QualityError(f"{folder} is the reference folder itself")
    base = [f.name or str(f) for f in folders]
    names = [f"{f.parent.name}-{f.name}" if base.count(f.name) > 1 else f.name for f in folders]
    if len(set(names)) != len(names):
        raise QualityError(f"candidate folders {[str(f) for f in folders]} cannot be told apart by name")
    return reference, list(zip(names, folders, strict=True)), folders[0].parent / "quality"


# ----------------------------------------------------------------------------------------------- one pair


def _json_number(x: float | None) -> float | str | None:
    """JSON has no infinity: infinite PSNR (identical frames) is written as the string "inf"."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return float(x)


def _from_json_number(x: Any) -> float | None:
    if x is None:
        return None
    return float(x)  # float("inf") parses "inf"


def _file_key(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def pair_key(ref: Path, cand: Path, lpips_id: str | None) -> str:
    """Fingerprint of what a pair's result depends on: both files (path, size, mtime), LPIPS, METRICS_VERSION."""
    payload = {"ref": _file_key(ref), "cand": _file_key(cand), "lpips": lpips_id, "version": METRICS_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def strip_frames(n_frames: int, count: int) -> list[int]:
    """``count`` frame indices spread evenly from the first to the last frame."""
    if n_frames <= count:
        return list(range(n_frames))
    return sorted({round(i * (n_frames - 1) / (count - 1)) for i in range(count)}) if count > 1 else [0]


def compare_frames(ref, cand, *, device: str, lpips_model: Any = None) -> dict:
    """Metrics of one pair of decoded videos (uint8 [T, H, W, 3]): per frame and per video.

    Raises QualityError when the frame counts or resolutions differ."""
    import numpy as np

    from xattn_video.pipelines import metrics

    if ref.shape[0] != cand.shape[0]:
        raise QualityError(f"frame counts differ: reference {ref.shape[0]}, candidate {cand.shape[0]}")
    if ref.shape[1:3] != cand.shape[1:3]:
        raise QualityError(f"resolutions differ: reference {ref.shape[2]}x{ref.shape[1]}, candidate "
                           f"{cand.shape[2]}x{cand.shape[1]} (width x height)")
    mse = metrics.mse_per_frame(ref, cand, device=device)
    psnr = metrics.psnr_from_mse(mse)
    ssim = metrics.ssim_per_frame(ref, cand, device=device)
    lp = lpips_model.per_frame(ref, cand) if lpips_model is not None else None
    return {
        "frames": int(ref.shape[0]),
        "height": int(ref.shape[1]),
        "width": int(ref.shape[2]),
        "psnr": _json_number(metrics.video_psnr(mse)),
        "ssim": float(np.mean(ssim)),
        "lpips": float(np.mean(lp)) if lp is not None else None,
        "mse_per_frame": [float(x) for x in mse],
        "psnr_per_frame": [_json_number(float(x)) for x in psnr],
        "ssim_per_frame": [float(x) for x in ssim],
        "lpips_per_frame": [float(x) for x in lp] if lp is not None else None,
    }


# ------------------------------------------------------------------------------------------------- the run


@dataclass
class QualityOptions:
    device: str = "cpu"
    only_common: bool = False
    lpips: bool = True
    lpips_weights: str | None = None
    alexnet_weights: str | None = None
    plots: bool = True
    strip_frames: int = 4
    progress: bool = False


@dataclass
class QualityResult:
    report: dict
    failures: list[tuple[str, str]] = field(default_factory=list)
    json_path: Path | None = None
    md_path: Path | None = None
    plots: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def load_lpips(opts: QualityOptions, log: Callable[[str], None]) -> tuple[Any, dict]:
    """The LPIPS model on ``opts.device`` (or None) and the report's ``lpips`` entry. A weight file the user
    named explicitly that does not exist is an error; weights missing from the default places are a note."""
    from xattn_video.pipelines import metrics

    if not opts.lpips:
        return None, {"available": False, "reason": "disabled with --no-lpips"}
    found = metrics.find_lpips_weights(opts.lpips_weights, opts.alexnet_weights)
    for given, path in ((opts.lpips_weights, found.linear), (opts.alexnet_weights, found.alexnet)):
        if given is not None and path is None:
            raise QualityError(f"LPIPS weight file {given} does not exist")
    if not found.available:
        reason = found.missing_message()
        log(f"LPIPS unavailable, reporting PSNR and SSIM only: {reason}")
        return None, {"available": False, "reason": reason}
    try:
        model = metrics.LPIPS.from_files(found.alexnet, found.linear).to(opts.device)
    except metrics.LpipsUnavailable as e:
        raise QualityError(str(e)) from None
    entry = {"available": True, "version": "0.1", "backbone": "alex", "alexnet_weights": str(found.alexnet),
             "linear_weights": str(found.linear)}
    return model, entry


def run_quality(
    reference: Path,
    candidates: list[tuple[str, Path]],
    output: Path,
    opts: QualityOptions,
    *,
    log: Callable[[str], None] = print,
) -> QualityResult:
    """Compare every candidate folder with the reference folder; write quality.json, quality.md and plots."""
    from tqdm.auto import tqdm

    from xattn_video.pipelines.video_io import read_video, write_json_atomic, write_text_atomic

    from .preflight import check_output_dir
    from .safe_io import clear_stale_temporaries, one_line

    try:  # before any pair is read: a report folder that cannot be written fails now, in one line
        check_output_dir(output, "--output")
    except ValueError as e:
        raise QualityError(str(e)) from None
    clear_stale_temporaries(output)
    ref_videos = list_videos(reference)
    pairings = [pair_folders(ref_videos, folder, name, only_common=opts.only_common) for name, folder in candidates]
    for p in pairings:
        if p.only_reference or p.only_candidate:
            log(f"{p.name}: comparing the {len(p.common)} common names; {len(p.only_reference)} only in the "
                f"reference, {len(p.only_candidate)} only in the candidate (listed in the report)")
    lpips_model, lpips_entry = load_lpips(opts, log)
    lpips_id = lpips_entry.get("linear_weights") if lpips_model is not None else None
    output.mkdir(parents=True, exist_ok=True)
    partial = output / ".partial"

    names = sorted({n for p in pairings for n in p.common})
    per_candidate: dict[str, dict[str, dict]] = {p.name: {} for p in pairings}
    failures: list[tuple[str, str]] = []
    plots: list[Path] = []
    total = sum(len(p.common) for p in pairings)
    bar = tqdm(total=total, desc="pairs", unit="pair", disable=not opts.progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for name in names:
            ref_frames = None
            ref_error = None
            for p in pairings:
                if name not in p.common:
                    continue
                cand_path = p.videos[name]
                label = f"{p.name}/{name}"
                cache = output / "pairs" / p.name / f"{name}.json"
                strip = output / "plots" / p.name / f"{name}.png"
                try:
                    key = pair_key(ref_videos[name], cand_path, lpips_id)
                    cached = _read_cache(cache, key)
                    info = {"generation": generation_info(p.folder, name),
                            "reference_generation": generation_info(reference, name)}
                    if cached is not None and (not opts.plots or opts.strip_frames == 0 or strip.is_file()):
                        per_candidate[p.name][name] = {**cached, **info}
                        bar.update(1)
                        continue
                    if ref_frames is None and ref_error is None:
                        try:
                            ref_frames = read_video(ref_videos[name])
                        except Exception as e:
                            ref_error = f"reference {one_line(e)}"
                    if ref_error is not None:
                        raise QualityError(ref_error)
                    try:
                        cand_frames = read_video(cand_path)
                    except Exception as e:
                        raise QualityError(one_line(e)) from None
                    result = cached or compare_frames(ref_frames, cand_frames, device=opts.device,
                                                      lpips_model=lpips_model)
                    result = {"reference": str(ref_videos[name]), "candidate": str(cand_path), **result, "key": key}
                    if opts.plots and opts.strip_frames > 0:
                        from xattn_video.pipelines import plots as plotting

                        plots.append(plotting.frame_strip(
                            strip, ref_frames, cand_frames, strip_frames(ref_frames.shape[0], opts.strip_frames),
                            title=f"{name}: PSNR {_fmt(_from_json_number(result['psnr']), '.2f')} dB, "
                                  f"SSIM {result['ssim']:.4f}",
                            labels=("reference", p.name)))
                    write_json_atomic(cache, result, tmp_dir=partial)
                    per_candidate[p.name][name] = {**result, **info}
                except QualityError as e:
                    per_candidate[p.name][name] = {"reference": str(ref_videos[name]), "candidate": str(cand_path),
                                                   "error": str(e)}
                    failures.append((label, str(e)))
                    log(f"FAILED {label}: {e}")
                bar.update(1)
    finally:
        bar.close()

    report = build_report(reference, pairings, per_candidate, lpips_entry, opts, time.perf_counter() - t0)
    json_path = write_json_atomic(output / "quality.json", report, tmp_dir=partial)
    md_path = write_text_atomic(output / "quality.md", markdown_report(report), tmp_dir=partial)
    if opts.plots:
        from xattn_video.pipelines import plots as plotting

        for p in pairings:
            curves = {name: [_from_json_number(x) for x in r["psnr_per_frame"]]
                      for name, r in per_candidate[p.name].items() if "error" not in r}
            if curves:
                plots.append(plotting.psnr_curves(output / "plots" / p.name / "psnr_per_frame.png", curves,
                                                  title=f"per-frame PSNR of {p.name} against {reference.name}"))
        means = mean_psnr_curves(per_candidate)
        if means:
            plots.append(plotting.psnr_curves(output / "plots" / "psnr_per_frame_candidates.png", means,
                                              title=f"per-frame PSNR against {reference.name}, mean over videos",
                                              mean_label=None))
    with contextlib.suppress(OSError):
        partial.rmdir()  # empty once every file is in place
    return QualityResult(report, failures, json_path, md_path, plots)


def mean_psnr_curves(per_candidate: dict[str, dict[str, dict]]) -> dict[str, list[float]]:
    """Per candidate, the per-frame PSNR averaged over its videos (those of the most common frame count);
    infinite frames count as :data:`xattn_video.pipelines.plots.PSNR_CAP_DB`, as drawn."""
    from collections import Counter

    from xattn_video.pipelines.plots import PSNR_CAP_DB

    out = {}
    for name, videos in per_candidate.items():
        curves = [[min(_from_json_number(x), PSNR_CAP_DB) for x in r["psnr_per_frame"]]
                  for r in videos.values() if "error" not in r]
        if not curves:
            continue
        length = Counter(len(c) for c in curves).most_common(1)[0][0]
        same = [c for c in curves if len(c) == length]
        out[name] = [sum(col) / len(same) for col in zip(*same, strict=True)]
    return out


def _read_cache(path: Path, key: str) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("key") == key and "error" not in data else None


def generation_info(folder: Path, name: str) -> dict | None:
    """What `generate` recorded about a video in its sidecar (<run>/meta/<variant>/<name>.json): attention
    settings, density and sparse-step density, the denoising step times and the process and device that
    measured them (:mod:`xattn_video.pipelines.run_figures`). None when the video has no sidecar (a folder not
    made by `generate`)."""
    try:
        data = json.loads((folder.parent / "meta" / folder.name / f"{name}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    stats = data.get("attention_stats") or {}
    timing = data.get("timing") or {}
    return {"attention": data.get("attention"), "density": stats.get("density"),
            "sparse_density": stats.get("sparse_density"), "mean_step_s": timing.get("mean_step_s"),
            "timing": {"step_s": timing.get("step_s")}, "process": data.get("process"), "device": data.get("device")}


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def build_report(reference: Path, pairings: list[Pairing], per_candidate: dict, lpips_entry: dict,
                 opts: QualityOptions, seconds: float) -> dict:
    """The JSON report: settings, LPIPS availability, and per candidate its means and videos."""
    candidates = {}
    for p in pairings:
        videos = per_candidate[p.name]
        ok = [r for r in videos.values() if "error" not in r]
        psnrs = [_from_json_number(r["psnr"]) for r in ok]
        gen = [r.get("generation") or {} for r in ok]
        speed = run_figures.step_speedup([(r.get("reference_generation"), r.get("generation")) for r in ok])
        candidates[p.name] = {
            "folder": str(p.folder),
            "generation": {  # from generate's sidecars, when the folders come from it; as generate defines them
                "density": _mean([g.get("density") for g in gen]),
                "sparse_density": _mean([g.get("sparse_density") for g in gen]),
                "median_step_s": speed.candidate_step_s,
                "reference_median_step_s": speed.reference_step_s,
                "step_speedup": speed.value,
                "step_speedup_pairs": speed.pairs,
                "step_speedup_note": speed.note,
                "timed_on_cpu": speed.on_cpu,
            },
            "compared": len(ok),
            "failed": len(videos) - len(ok),
            "only_in_reference": p.only_reference,
            "only_in_candidate": p.only_candidate,
            "mean": {
                "psnr": _json_number(sum(psnrs) / len(psnrs)) if psnrs else None,
                "ssim": _mean([r["ssim"] for r in ok]),
                "lpips": _mean([r["lpips"] for r in ok]) if lpips_entry.get("available") else None,
            },
            "videos": videos,
        }
    return {
        "reference": str(reference),
        "metrics": {
            "psnr": "dB on 0..255; per frame over pixels and RGB; a video's PSNR from its MSE averaged over frames; "
                    "the mean is over videos; \"inf\" means identical",
            "ssim": "Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, per RGB channel then averaged, valid positions",
            "lpips": "v0.1, AlexNet backbone, inputs in [-1, 1]; lower is closer",
        },
        "lpips": lpips_entry,
        "device": opts.device,
        "seconds": seconds,
        "candidates": candidates,
    }


def _fmt(x: float | None, spec: str) -> str:
    if x is None:
        return "n/a"
    if math.isinf(x):
        return "inf"
    return format(x, spec)


def markdown_report(report: dict) -> str:
    """Markdown: a table of means per candidate, then one table of videos per candidate."""
    lp = report["lpips"]
    lines = [f"# Quality against `{report['reference']}`", ""]
    if not lp.get("available"):
        lines += [f"LPIPS: not available ({lp.get('reason')}).", ""]
    lines += [f"| candidate | videos | failed | {run_figures.DENSITY} | {run_figures.SPARSE_STEP_DENSITY} | step "
              f"{run_figures.SPEEDUP} | PSNR (dB) | SSIM | LPIPS |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, c in report["candidates"].items():
        m, g = c["mean"], c["generation"]
        speed = _fmt(g["step_speedup"], ".2f") + ("x" if g["step_speedup"] else "")
        lines.append(f"| {name} | {c['compared']} | {c['failed']} | {_fmt(g['density'], '.3f')} | "
                     f"{_fmt(g['sparse_density'], '.3f')} | {speed} | "
                     f"{_fmt(_from_json_number(m['psnr']), '.2f')} | {_fmt(m['ssim'], '.4f')} | "
                     f"{_fmt(m['lpips'], '.4f')} |")
    notes = speed_notes(report)
    if notes:
        lines += ["", *(f"- {line}" for line in notes)]
    for name, c in report["candidates"].items():
        lines += ["", f"## {name}", "", f"| video | frames | size | {run_figures.SPARSE_STEP_DENSITY} | PSNR (dB) | "
                  "min frame PSNR | SSIM | LPIPS |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for video, r in c["videos"].items():
            if "error" in r:
                lines.append(f"| {video} | | | | error: {r['error']} | | | |")
                continue
            frame_psnr = [_from_json_number(x) for x in r["psnr_per_frame"]]
            density = (r.get("generation") or {}).get("sparse_density")
            lines.append(f"| {video} | {r['frames']} | {r['width']}x{r['height']} | {_fmt(density, '.3f')} | "
                         f"{_fmt(_from_json_number(r['psnr']), '.2f')} | {_fmt(min(frame_psnr), '.2f')} | "
                         f"{r['ssim']:.4f} | {_fmt(r['lpips'], '.4f')} |")
        for side, names in (("reference", c["only_in_reference"]), ("candidate", c["only_in_candidate"])):
            if names:
                lines += ["", f"Only in the {side} (not compared): {', '.join(names)}"]
    lines += ["", "Metrics: " + "; ".join(f"{k}: {v}" for k, v in report["metrics"].items()), ""]
    return "\n".join(lines)


def speed_notes(report: dict) -> list[str]:
    """Why a candidate's step speed-up is missing or partial, and the CPU caveat (run_figures)."""
    notes = [f"{name}: step speed-up {c['generation']['step_speedup_note']}"
             for name, c in report["candidates"].items() if c["generation"].get("step_speedup_note")
             and c["generation"]["step_speedup_note"] != "no step times to compare"]
    if any(c["generation"].get("timed_on_cpu") for c in report["candidates"].values()):
        notes.append(f"note: {run_figures.CPU_TIMING_NOTE}")
    return notes


def summary_table(report: dict) -> str:
    """The lines printed at the end of a run."""
    header = ["candidate", "videos", "failed", run_figures.DENSITY, run_figures.SPARSE_STEP_DENSITY,
              run_figures.SPEEDUP, "PSNR dB", "SSIM", "LPIPS"]
    rows = [header]
    for name, c in report["candidates"].items():
        m, g = c["mean"], c["generation"]
        speed = _fmt(g["step_speedup"], ".2f") + ("x" if g["step_speedup"] else "")
        rows.append([name, str(c["compared"]), str(c["failed"]), _fmt(g["density"], ".3f"),
                     _fmt(g["sparse_density"], ".3f"), speed, _fmt(_from_json_number(m["psnr"]), ".2f"),
                     _fmt(m["ssim"], ".4f"), _fmt(m["lpips"], ".4f")])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
            for r in rows]
    text.insert(1, "  ".join("-" * w for w in widths))
    note = ("means over videos; density, sparse-step density and speed-up (median step of the reference / median "
            "step, videos one process made both of) from generate's sidecars, as generate reports them")
    return "\n".join([f"against {report['reference']} ({note})", *text, *speed_notes(report)])


# ----------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``xattn-video quality``."""
    parser.add_argument("folders", nargs="+", metavar="FOLDER",
                        help="REFERENCE_DIR CANDIDATE_DIR [CANDIDATE_DIR ...], or one run folder of `generate`")
    parser.add_argument("--reference", default=None, metavar="NAME",
                        help="with a run folder: the reference variant (default: dense)")
    parser.add_argument("--output", default=None, metavar="DIR",
                        help="report folder (default: <parent of the candidates>/quality, or <run>/quality)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    parser.add_argument("--only-common", action="store_true",
                        help="compare the names both folders have instead of failing on unmatched names")
    parser.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    parser.add_argument("--lpips-weights", default=None, metavar="PATH", help="LPIPS v0.1 alex.pth")
    parser.add_argument("--alexnet-weights", default=None, metavar="PATH",
                        help="torchvision's alexnet-owt-7be5be79.pth (default: torch.hub's checkpoint cache)")
    parser.add_argument("--strip-frames", type=int, default=4, metavar="N",
                        help="frames per side-by-side strip (0: no strips)")
    parser.add_argument("--no-plots", action="store_true", help="write JSON and Markdown only")
    parser.add_argument("--progress", choices=("auto", "true", "false"), default="auto",
                        help="progress bar (auto: on a terminal only)")


def resolve_device(spec: str) -> str:
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu" or (spec.startswith("cuda") and (spec == "cuda" or spec[5:].isdigit() and spec[4] == ":")):
        if spec.startswith("cuda") and not torch.cuda.is_available():
            raise QualityError(f"--device {spec} is not allowed: no CUDA device is visible")
        return spec
    raise QualityError(f"--device {spec!r} is not allowed: auto, cpu, cuda or cuda:N")


def run(args: argparse.Namespace) -> int:
    """``xattn-video quality``: 0 when every pair was compared, 1 when some failed."""
    from xattn_video.cli import CommandError

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    try:
        if args.strip_frames < 0:
            raise QualityError(f"--strip-frames {args.strip_frames} is not allowed: 0 or more")
        reference, candidates, default_out = resolve_folders(args.folders, args.reference)
        opts = QualityOptions(
            device=resolve_device(args.device),
            only_common=args.only_common,
            lpips=not args.no_lpips,
            lpips_weights=args.lpips_weights,
            alexnet_weights=args.alexnet_weights,
            plots=not args.no_plots,
            strip_frames=args.strip_frames,
            progress=args.progress == "true" or (args.progress == "auto" and sys.stderr.isatty()),
        )
        output = Path(args.output) if args.output else default_out
        result = run_quality(reference, candidates, output, opts, log=log)
    except QualityError as e:
        raise CommandError(str(e)) from None
    print(summary_table(result.report))
    print(f"report: {result.json_path}, {result.md_path}" + (f"; plots under {output / 'plots'}" if opts.plots
                                                            else ""))
    if result.failures:  # each was said once as it happened
        print(f"{len(result.failures)} pairs failed (listed above and in {result.json_path})", file=sys.stderr)
    return 0 if result.ok else 1


__all__ = [
    "QualityError",
    "QualityOptions",
    "compare_frames",
    "list_videos",
    "markdown_report",
    "pair_folders",
    "resolve_folders",
    "run_quality",
]
