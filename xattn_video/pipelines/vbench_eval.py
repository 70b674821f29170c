"""VBench on folders of generated videos, with the weights taken from VBench's local cache only.

  xattn-video vbench outputs/run --dimensions quality              # every variant folder of a generate run
  xattn-video vbench outputs/run/dense outputs/run/xattn --dimensions subject_consistency imaging_quality
  xattn-video vbench outputs/run --dimensions all --vbench-python ~/vbench-env/bin/python
  xattn-video vbench outputs/run --dimensions quality --check       # check names, prompts and weights only

Dimensions: VBench's 16 names, or the groups `quality` (subject_consistency, background_consistency,
temporal_flickering, motion_smoothness, dynamic_degree, aesthetic_quality, imaging_quality: VBench's Quality
Score), `semantic` (the other nine) and `all`.

Modes (--mode, default auto): `standard` is VBench's prompt suite, videos named {prompt}-{index}.mp4 as
`generate` names them with prompts.vbench_file; `custom` takes each video's prompt from --prompt-file (VBench's
format: {"file name": "prompt"}), else from the sidecars `generate` writes (<run>/meta/<variant>/<name>.json),
else from the file name as VBench does. Custom prompts cannot be scored on object_class, multiple_objects,
scene, appearance_style, color or spatial_relationship (they need the suite's annotations). auto: standard
when every file name is {prompt}-{index} of a suite prompt, custom otherwise.

Weights: VBench's cache ($VBENCH_CACHE_DIR, default ~/.cache/vbench; --cache-dir). Every file the requested
dimensions read is checked first; when one is missing the command lists each missing path and exits 1, before
loading anything. Nothing is downloaded.

VBench itself: the `vbench` package pins transformers==4.33.2 and numpy<2, which this project's environment
cannot have (transformers >= 5), so it normally runs in an environment of its own: --vbench-python PATH names
that interpreter (default: this one, when it can import vbench).

Output, next to the video folders (<parent>/vbench, or --output):
  <variant>/<dimension>_eval_results.json   VBench's own results ({dimension: [score, per-video results]})
  <variant>/<dimension>_full_info.json      VBench's list of prompts and videos it evaluated
  <variant>/eval_results.json               all dimensions of the variant merged, VBench's format
  summary.json, summary.md                  dimension x variant table of every variant evaluated there
A dimension already evaluated is skipped on a rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HELP = "VBench dimensions on generated video folders (local weights only), with a side-by-side summary"

DIMENSIONS = (
    "subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness", "dynamic_degree",
    "aesthetic_quality", "imaging_quality", "object_class", "multiple_objects", "human_action", "color",
    "spatial_relationship", "scene", "temporal_style", "appearance_style", "overall_consistency",
)
GROUPS = {
    "quality": DIMENSIONS[:7],
    "semantic": DIMENSIONS[7:],
    "all": DIMENSIONS,
}
# Dimensions that need the standard suite's annotations (VBench refuses them in custom_input mode)
STANDARD_ONLY = ("object_class", "multiple_objects", "scene", "appearance_style", "color", "spatial_relationship")

# The files each dimension reads from VBench's cache in local mode (vbench 0.1.5, vbench/utils.py
# init_submodules and the dimension modules), relative to the cache folder; a trailing "/" is a folder.
WEIGHTS: dict[str, tuple[str, ...]] = {
    "subject_consistency": ("dino_model/facebookresearch_dino_main/", "dino_model/dino_vitbase16_pretrain.pth"),
    "background_consistency": ("clip_model/ViT-B-32.pt",),
    "temporal_flickering": (),
    "motion_smoothness": ("amt_model/amt-s.pth",),
    "dynamic_degree": ("raft_model/models/raft-things.pth",),
    "aesthetic_quality": ("clip_model/ViT-L-14.pt", "aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth"),
    "imaging_quality": ("pyiqa_model/musiq_spaq_ckpt-358bb6af.pth",),
    "object_class": ("grit_model/grit_b_densecap_objectdet.pth",),
    "multiple_objects": ("grit_model/grit_b_densecap_objectdet.pth",),
    "human_action": ("umt_model/l16_ptk710_ftk710_ftk400_f16_res224.pth",),
    "color": ("grit_model/grit_b_densecap_objectdet.pth",),
    "spatial_relationship": ("grit_model/grit_b_densecap_objectdet.pth",),
    "scene": ("caption_model/tag2text_swin_14m.pth",),
    "temporal_style": ("ViCLIP/ViClip-InternVid-10M-FLT.pth", "ViCLIP/bpe_simple_vocab_16e6.txt.gz"),
    "appearance_style": ("clip_model/ViT-B-32.pt",),
    "overall_consistency": ("ViCLIP/ViClip-InternVid-10M-FLT.pth", "ViCLIP/bpe_simple_vocab_16e6.txt.gz"),
}
VIDEO_SUFFIXES = (".mp4", ".gif", ".jpg", ".png")  # what VBench's custom mode reads
REPORT_DIRS = ("meta", "quality", "vbench", "attn-report")
INSTALL_HINT = (
    "VBench is not importable by {python}. It cannot share this project's environment (vbench 0.1.5 pins "
    "transformers==4.33.2 and numpy<2; this project needs transformers>=5): make an environment for it, e.g. "
    "`python -m venv ~/vbench-env && ~/vbench-env/bin/pip install torch torchvision vbench` (object_class, "
    "multiple_objects, color and spatial_relationship also need detectron2), then pass "
    "--vbench-python ~/vbench-env/bin/python"
)


class VBenchError(ValueError):
    """A user-fixable problem (printed as one line by the CLI)."""


# ---------------------------------------------------------------------------------------------- dimensions


def parse_dimensions(items: Sequence[str]) -> list[str]:
    """VBench dimension names and groups (space- or comma-separated) in VBench's order, without repeats."""
    names: list[str] = []
    for item in items:
        for part in filter(None, (p.strip() for p in item.split(","))):
            if part in GROUPS:
                names.extend(GROUPS[part])
            elif part in DIMENSIONS:
                names.append(part)
            elif os.path.isdir(part):
                raise VBenchError(f"--dimensions {part!r} is a folder, not a dimension: put the video folders before "
                                  "--dimensions (xattn-video vbench VIDEOS_DIR --dimensions DIM ...)")
            else:
                import difflib

                close = difflib.get_close_matches(part, [*DIMENSIONS, *GROUPS], n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise VBenchError(f"--dimensions {part!r} is not allowed{hint}: one of {', '.join(DIMENSIONS)}, "
                                  f"or a group: {', '.join(GROUPS)}")
    if not names:
        raise VBenchError(f"--dimensions is empty: give VBench dimensions ({', '.join(DIMENSIONS)}) or a group "
                          f"({', '.join(GROUPS)})")
    chosen = set(names)
    return [d for d in DIMENSIONS if d in chosen]


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """VBench's weight cache: ``explicit``, else $VBENCH_CACHE_DIR, else ~/.cache/vbench (as vbench/utils.py)."""
    if explicit is not None:
        return Path(explicit).expanduser()
    env = os.environ.get("VBENCH_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vbench"


def missing_weights(dimensions: Sequence[str], cache: Path) -> dict[str, list[str]]:
    """For each requested dimension, the cache paths it reads that are not there (files must be non-empty)."""
    missing: dict[str, list[str]] = {}
    for dim in dimensions:
        for rel in WEIGHTS[dim]:
            path = cache / rel
            ok = path.is_dir() and any(path.iterdir()) if rel.endswith("/") else path.is_file() and \
                path.stat().st_size > 0
            if not ok:
                missing.setdefault(dim, []).append(str(path) + ("/" if rel.endswith("/") else ""))
    return missing


def missing_report(missing: dict[str, list[str]], cache: Path) -> str:
    """The lines printed when weights are missing: each missing path once, with the dimensions needing it."""
    by_path: dict[str, list[str]] = {}
    for dim, paths in missing.items():
        for p in paths:
            by_path.setdefault(p, []).append(dim)
    lines = [f"VBench weights missing from its cache {cache} (set VBENCH_CACHE_DIR or --cache-dir; nothing is "
             "downloaded):"]
    lines += [f"  {p}    needed by {', '.join(dims)}" for p, dims in by_path.items()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- folders


def _video_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES
                  and not p.name.startswith("."))


def _videos(folder: Path) -> list[Path]:
    """The videos VBench will read: empty (0-byte) files are not videos (see :func:`empty_videos`)."""
    return [p for p in _video_files(folder) if p.stat().st_size > 0]


def empty_videos(folder: Path) -> list[Path]:
    """Video-named files of 0 bytes (a run killed before atomic writing, a failed copy): VBench would fail
    on them, so they are reported and make the folder not ready."""
    return [p for p in _video_files(folder) if p.stat().st_size == 0]


def resolve_folders(paths: Sequence[str]) -> list[Path]:
    """Video folders from the positionals: a folder of videos, or a generate run folder (its variant folders)."""
    folders: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise VBenchError(f"{path} is not a folder")
        if _videos(path):
            folders.append(path)
            continue
        variants = sorted(p for p in path.iterdir() if p.is_dir() and p.name not in REPORT_DIRS
                          and not p.name.startswith(".") and _videos(p))
        if not variants:
            raise VBenchError(f"{path} holds no video ({', '.join(VIDEO_SUFFIXES)}) and no folder of videos")
        folders.extend(variants)
    names = [f.name for f in folders]
    if len(set(names)) != len(names):
        raise VBenchError(f"video folders {[str(f) for f in folders]} share a name: their results would mix")
    return folders


VBENCH_NAME = re.compile(r"^(?P<prompt>.+)-(?P<index>\d+)$")


def standard_names_ok(videos: Sequence[Path], suite_prompts: set[str] | None) -> bool:
    """Whether every video is named {prompt}-{index} with a prompt of VBench's suite (when it is known)."""
    for v in videos:
        m = VBENCH_NAME.match(v.stem)
        if m is None or v.suffix.lower() != ".mp4" or int(m["index"]) > 4:
            return False
        if suite_prompts is not None and m["prompt"] not in suite_prompts:
            return False
    return True


def suite_dimensions(full_info: Path | None) -> dict[str, set[str]] | None:
    """VBench's suite as {prompt: the dimensions it serves}, from VBench_full_info.json; None when unknown."""
    if full_info is None or not full_info.is_file():
        return None
    suite: dict[str, set[str]] = {}
    for d in json.loads(full_info.read_text(encoding="utf-8")):
        suite.setdefault(str(d["prompt_en"]), set()).update(d.get("dimension") or [])
    return suite


def suite_prompts(full_info: Path | None) -> set[str] | None:
    suite = suite_dimensions(full_info)
    return None if suite is None else set(suite)


def standard_coverage(videos: Sequence[Path], suite: dict[str, set[str]], dimensions: Sequence[str]) -> (
    tuple[dict[str, int], int]
):
    """In standard mode: how many of the videos each dimension will score (VBench scores a dimension on the
    suite prompts tagged with it), and how many prompts have fewer than VBench's 5 videos."""
    per_prompt: dict[str, int] = {}
    for v in videos:
        m = VBENCH_NAME.match(v.stem)
        if m is not None:
            per_prompt[m["prompt"]] = per_prompt.get(m["prompt"], 0) + 1
    coverage = {d: sum(n for p, n in per_prompt.items() if d in suite.get(p, ())) for d in dimensions}
    return coverage, sum(1 for n in per_prompt.values() if n < 5)


def custom_prompts(folder: Path, prompt_file: Path | None) -> tuple[dict[str, str], str]:
    """{file name: prompt} for VBench's custom mode and where the prompts came from."""
    videos = _videos(folder)
    if prompt_file is not None:
        try:
            given = json.loads(prompt_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise VBenchError(f"--prompt-file {prompt_file} cannot be read as JSON: {e}") from None
        if not isinstance(given, dict):
            raise VBenchError(f"--prompt-file {prompt_file} must map file names to prompts ({{\"a-0.mp4\": \"a\"}})")
        prompts = {}
        for v in videos:
            prompt = given.get(v.name, given.get(str(v)))
            if not isinstance(prompt, str):
                raise VBenchError(f"--prompt-file {prompt_file} has no prompt for {v.name}")
            prompts[v.name] = prompt
        return prompts, str(prompt_file)
    meta = folder.parent / "meta" / folder.name
    sidecars = {}
    for v in videos:
        try:
            sidecars[v.name] = json.loads((meta / f"{v.stem}.json").read_text(encoding="utf-8"))["prompt"]
        except (OSError, ValueError, KeyError, TypeError):
            break
    if len(sidecars) == len(videos):
        return sidecars, f"generate's sidecars in {meta}"
    prompts = {v.name: (m["prompt"] if (m := VBENCH_NAME.match(v.stem)) else v.stem) for v in videos}
    return prompts, "the file names (VBench's rule: the name without its -<index>)"


# ----------------------------------------------------------------------------------------------- the plan


@dataclass
class FolderJob:
    folder: Path
    output: Path
    mode: str  # vbench_standard | custom_input
    prompts: dict[str, str] = field(default_factory=dict)
    prompts_from: str = ""
    coverage: dict[str, int] | None = None  # standard mode: videos each dimension will score
    short_prompts: int = 0  # standard mode: prompts with fewer than VBench's 5 videos


def plan(folders: Sequence[Path], dimensions: Sequence[str], *, mode: str, output_root: Path | None,
         prompt_file: Path | None, full_info: Path | None) -> list[FolderJob]:
    """Decide each folder's VBench mode and prompts; VBenchError for a mode that cannot score a dimension."""
    jobs = []
    suite = suite_dimensions(full_info)
    known = None if suite is None else set(suite)
    for folder in folders:
        videos = _videos(folder)
        if mode == "standard" or (mode == "auto" and prompt_file is None and standard_names_ok(videos, known)):
            if not standard_names_ok(videos, None):
                bad = next(v.name for v in videos if not standard_names_ok([v], None))
                raise VBenchError(f"--mode standard needs videos named {{prompt}}-{{index}}.mp4 (index 0..4) as "
                                  f"VBench's suite names them; {folder} holds {bad!r}")
            m = "vbench_standard"
            prompts, source = {}, "VBench's prompt suite"
        else:
            m = "custom_input"
            refused = [d for d in dimensions if d in STANDARD_ONLY]
            if refused:
                raise VBenchError(f"{folder} is evaluated with custom prompts, where VBench cannot score "
                                  f"{', '.join(refused)} (they need the standard suite's annotations): drop them, "
                                  "or generate with prompts.vbench_file and --mode standard")
            prompts, source = custom_prompts(folder, prompt_file)
        out = (output_root if output_root is not None else folder.parent / "vbench") / folder.name
        job = FolderJob(folder, out, m, prompts, source)
        if m == "vbench_standard" and suite is not None:
            job.coverage, job.short_prompts = standard_coverage(videos, suite, dimensions)
            empty = [d for d, n in job.coverage.items() if n == 0]
            if empty:
                raise VBenchError(f"no video of {folder} is for the suite prompts of {', '.join(empty)}: VBench "
                                  "scores a dimension on its own prompts (VBench_full_info.json); generate those "
                                  "prompts or drop the dimension")
        jobs.append(job)
    return jobs


# ------------------------------------------------------------------------------------------------- results


def read_results(output: Path, dimensions: Sequence[str]) -> dict[str, list]:
    """VBench's per-dimension results files of one folder merged: {dimension: [score, per-video results]}."""
    merged: dict[str, list] = {}
    for dim in dimensions:
        path = output / f"{dim}_eval_results.json"
        data = _load_results(path)
        if data is not None and dim in data:
            merged[dim] = data[dim]
    return merged


def _load_results(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def score_of(entry: Any) -> float | None:
    """The dimension score of a VBench results entry ([score, per-video results], or a bare number)."""
    value = entry[0] if isinstance(entry, (list, tuple)) and entry else entry
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def count_of(entry: Any) -> int | None:
    if isinstance(entry, (list, tuple)) and len(entry) > 1 and isinstance(entry[1], list):
        return len(entry[1])
    return None


def summarize(root: Path) -> dict:
    """Every ``<root>/<variant>/eval_results.json`` (VBench's format) as {variant: {dimension: {score, videos}}}."""
    table: dict[str, dict] = {}
    for path in sorted(root.glob("*/eval_results.json")):
        data = _load_results(path)
        if data is None:
            continue
        table[path.parent.name] = {dim: {"score": score_of(entry), "videos": count_of(entry)}
                                   for dim, entry in data.items()}
    return table


def summary_markdown(table: dict, baseline: str | None = None) -> str:
    """Dimension x variant Markdown table (VBench's order), with the difference to the baseline variant."""
    variants = list(table)
    dims = [d for d in DIMENSIONS if any(d in table[v] for v in variants)]
    dims += sorted({d for v in variants for d in table[v]} - set(dims))
    base = baseline if baseline in table else ("dense" if "dense" in table else None)
    header = ["dimension", *variants] + [f"{v} - {base}" for v in variants if base and v != base]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for d in dims:
        cells = [d]
        for v in variants:
            s = table[v].get(d, {}).get("score")
            cells.append("-" if s is None else f"{s:.4f}")
        if base:
            b = table[base].get(d, {}).get("score")
            for v in variants:
                if v == base:
                    continue
                s = table[v].get(d, {}).get("score")
                cells.append("-" if s is None or b is None else f"{s - b:+.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    counts = {v: sorted({e.get("videos") for e in table[v].values() if e.get("videos") is not None}) for v in variants}
    lines += ["", "Scores as VBench reports them (higher is better); videos per dimension: "
              + "; ".join(f"{v}: {'/'.join(map(str, c)) or '-'}" for v, c in counts.items()), ""]
    return "\n".join(lines)


def write_summary(root: Path, baseline: str | None = None) -> tuple[Path, Path]:
    from xattn_video.pipelines.video_io import write_json_atomic, write_text_atomic

    table = summarize(root)
    return (write_json_atomic(root / "summary.json", table),
            write_text_atomic(root / "summary.md", summary_markdown(table, baseline)))


# ----------------------------------------------------------------------------------------------------- run


def vbench_location(python: str) -> Path | None:
    """The folder of the ``vbench`` package importable by ``python`` (found without importing it), or None."""
    code = ("import importlib.util as u; s = u.find_spec('vbench'); "
            "print(next(iter(s.submodule_search_locations)) if s and s.submodule_search_locations else '')")
    try:
        done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise VBenchError(f"--vbench-python {python} cannot be run: {e}") from None
    if done.returncode != 0:
        raise VBenchError(f"--vbench-python {python} failed: {done.stderr.strip().splitlines()[-1:]}")
    location = done.stdout.strip()
    return Path(location) if location else None


def run_folder(job: FolderJob, dimensions: Sequence[str], *, python: str, cache: Path, device: str,
               full_info: Path | None, kwargs: dict, log: Callable[[str], None]) -> dict[str, list]:
    """Evaluate one folder with VBench in ``python`` (resuming per dimension); its merged results."""
    from xattn_video.pipelines.video_io import write_json_atomic

    job.output.mkdir(parents=True, exist_ok=True)
    for dim in dimensions:  # a results file VBench left half written is evaluated again
        path = job.output / f"{dim}_eval_results.json"
        if path.exists() and dim not in (_load_results(path) or {}):
            path.unlink()
    prompt_file = None
    if job.mode == "custom_input":
        prompt_file = write_json_atomic(job.output / "prompts.json", job.prompts)
    spec = {
        "cache_dir": str(cache), "device": device, "videos_path": str(job.folder.resolve()),
        "output_path": str(job.output.resolve()), "mode": job.mode, "dimensions": list(dimensions),
        "prompt_file": str(prompt_file.resolve()) if prompt_file else None,
        "full_info": str(full_info) if full_info else None, "kwargs": kwargs,
    }
    job_file = write_json_atomic(job.output / "vbench_job.json", spec)
    driver = Path(__file__).with_name("vbench_driver.py")
    log(f"{job.folder}: VBench {job.mode} ({job.prompts_from}), {len(dimensions)} dimensions -> {job.output}")
    env = dict(os.environ, VBENCH_CACHE_DIR=str(cache))
    done = subprocess.run([python, str(driver), str(job_file)], env=env)
    merged = read_results(job.output, dimensions)
    if merged:
        write_json_atomic(job.output / "eval_results.json", merged)
    missing = [d for d in dimensions if d not in merged]
    if done.returncode != 0 or missing:
        raise VBenchError(f"VBench on {job.folder} exited with status {done.returncode}"
                          + (f"; no results for {', '.join(missing)}" if missing else ""))
    return merged


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``xattn-video vbench``."""
    parser.add_argument("folders", nargs="*", metavar="VIDEOS_DIR",
                        help="folders of videos, or a generate run folder (every variant folder in it)")
    parser.add_argument("--dimensions", nargs="+", required=True, metavar="DIM",
                        help=f"VBench dimensions or groups ({', '.join(GROUPS)}); names: {', '.join(DIMENSIONS)}")
    parser.add_argument("--mode", choices=("auto", "standard", "custom"), default="auto",
                        help="VBench's standard prompt suite or custom prompts (default: auto, from the file names)")
    parser.add_argument("--prompt-file", default=None, metavar="JSON",
                        help='custom mode: {"file name": "prompt"} (default: generate\'s sidecars, else file names)')
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="VBench's weight cache (default: $VBENCH_CACHE_DIR, else ~/.cache/vbench)")
    parser.add_argument("--vbench-python", default=None, metavar="PYTHON",
                        help="interpreter of an environment with vbench installed (default: this one)")
    parser.add_argument("--output", default=None, metavar="DIR",
                        help="results folder (default: <parent of the videos>/vbench)")
    parser.add_argument("--device", default="cuda", help="device VBench runs on (default: cuda)")
    parser.add_argument("--baseline", default=None, metavar="VARIANT",
                        help="variant the summary's differences are taken against (default: dense when present)")
    parser.add_argument("--imaging-quality-preprocessing", default="longer",
                        choices=("longer", "shorter", "shorter_centercrop", "None"),
                        help="VBench's imaging_quality_preprocessing_mode (default: longer, VBench's default)")
    parser.add_argument("--check", action="store_true",
                        help="check dimensions, prompts, weights and the vbench install, then exit (0: ready)")


def run(args: argparse.Namespace) -> int:
    """``xattn-video vbench``: 0 when every folder was evaluated on every dimension; 1 when weights are missing
    or VBench failed; 2 for usage errors."""
    from xattn_video.cli import CommandError

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    try:
        dimensions = parse_dimensions(args.dimensions)
        if not args.folders:
            raise VBenchError("give at least one VIDEOS_DIR, before --dimensions: "
                              "xattn-video vbench runs/720p --dimensions quality")
        folders = resolve_folders(args.folders)
        cache = cache_dir(args.cache_dir)
        missing = missing_weights(dimensions, cache)
        python = args.vbench_python or sys.executable
        location = vbench_location(python)
        full_info = location / "VBench_full_info.json" if location is not None else None
        prompt_file = Path(args.prompt_file) if args.prompt_file else None
        if args.mode == "standard" and prompt_file is not None:
            raise VBenchError("--prompt-file is for custom prompts; it cannot go with --mode standard")
        output_root = Path(args.output) if args.output else None
        jobs = plan(folders, dimensions, mode=args.mode, output_root=output_root, prompt_file=prompt_file,
                    full_info=full_info)
    except VBenchError as e:
        raise CommandError(str(e)) from None
    for job in jobs:
        log(f"{job.folder}: {len(_videos(job.folder))} videos, {job.mode} (prompts: {job.prompts_from}) "
            f"-> {job.output}")
        if job.coverage is not None:
            log("  videos per dimension: " + ", ".join(f"{d} {n}" for d, n in job.coverage.items()))
        if job.short_prompts:
            log(f"  {job.short_prompts} prompts have fewer than the 5 videos VBench's suite expects (generate "
                "with seeds=[0,1,2,3,4] or videos_per_prompt=5); VBench warns about each missing one")
    problems = []
    empty = [p for job in jobs for p in empty_videos(job.folder)]
    if empty:
        log(f"{len(empty)} video files are empty (0 bytes) and not counted: {', '.join(str(p) for p in empty[:5])}"
            + (" ..." if len(empty) > 5 else "") + "; remake or remove them")
        problems.append(f"{len(empty)} empty video files")
    if missing:
        log(missing_report(missing, cache))
        problems.append(f"{sum(len(p) for p in missing.values())} weight paths missing (listed above)")
    if location is None:
        log(INSTALL_HINT.format(python=python))
        problems.append("vbench is not installed for " + python)
    if problems:
        print(f"xattn-video vbench: not ready: {'; '.join(problems)}", file=sys.stderr)
        return 1
    if args.check:
        print(f"ready: {len(jobs)} folders x {len(dimensions)} dimensions; weights in {cache}; vbench at {location}")
        return 0
    kwargs = {"imaging_quality_preprocessing_mode": args.imaging_quality_preprocessing}
    failures = []
    for job in jobs:
        try:
            run_folder(job, dimensions, python=python, cache=cache, device=args.device, full_info=full_info,
                       kwargs=kwargs, log=log)
        except VBenchError as e:
            failures.append(str(e))
            log(f"FAILED {e}")
    roots = sorted({job.output.parent for job in jobs})
    for root in roots:
        json_path, md_path = write_summary(root, args.baseline)
        print(md_path.read_text(encoding="utf-8"))
        print(f"summary: {json_path}, {md_path}")
    return 1 if failures else 0


__all__ = [
    "DIMENSIONS",
    "GROUPS",
    "WEIGHTS",
    "cache_dir",
    "custom_prompts",
    "missing_weights",
    "parse_dimensions",
    "plan",
    "summarize",
    "summary_markdown",
    "write_summary",
]
