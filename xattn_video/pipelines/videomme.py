"""Video-MME with a Qwen2-VL family model: dense and XAttention prefill side by side, scored by category.

With no config the embedded default runs: a tiny random Qwen2-VL on a synthetic Video-MME-format set that
it writes under output.root/synthetic, on the CPU. The paper's setting (Qwen2-VL-7B, 1 frame a second
for up to an hour of video, stride 16, threshold 0.9) is configs/qwen2vl_7b_videomme.yaml:
  xattn-video videomme configs/qwen2vl_7b_videomme.yaml data.questions=/data/Video-MME
  xattn-video videomme configs/qwen2vl_7b_videomme.yaml attention.threshold=0.95 data.durations=[long]
  xattn-video videomme data.limit=2 --dry-run

Config keys (each has a default; --print-config shows the resolved config):
  model       id (repo id | local folder | tiny), revision, dtype, device, processor (auto | real | builtin)
  data        questions (Video-MME's parquet, or csv/json/jsonl with its columns, or its folder), videos
              (folder of <videoID>.mp4; default <dataset>/data), subtitles (folder of <videoID>.srt), limit,
              durations
  video       fps, max_frames, min_frames: frame sampling; min_pixels, max_pixels: per-frame pixel range
  prompt      instruction, suffix, system: the multiple-choice prompt (Video-MME's standard instruction)
  generation  max_new_tokens (greedy decoding), warmup (each variant's first question runs once untimed:
              kernel compilation stays out of the prefill times)
  attention   threshold, stride, block_size, min_len, backend, vision, estimate_fp8: shared by xattn variants;
              select; variants: {name: {mode: dense|xattn, <shared keys>}}
  output      root
  progress    auto | true | false

Per question: frames are sampled once, the chat prompt is built (subtitles of the sampled frames first
when data.subtitles is set; then the instruction, the question, the options, the suffix), and every
variant decodes greedily on the same inputs; the same model serves all variants (its attention
implementation is switched between sdpa and xattn). The option letter is read from the response.

Output:
  <root>/<variant>/answers.jsonl   one line per answer as it comes: response, letter, correct, prefill time,
                                   vision tower time, block density, dense-call reasons, tokens, frames
  <root>/report.json, report.md    accuracy overall / by duration / by task type per variant, density,
                                   prefill times and the speed-up against the dense variant
  <root>/config.yaml               the last run's resolved config

Rerunning skips the questions each variant already answered with the same settings; questions that failed
(missing video, malformed row) are recorded as errors, the run goes on, and a rerun tries them again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import run_figures
from .answers import extract_choice, score
from .videomme_config import ConfigError, Variant, VideoMMEConfig, load_config, to_yaml

HELP = "Video-MME evaluation of a Qwen2-VL family model, dense and XAttention prefill side by side"
SCHEMA = 1
CATEGORIES = ("duration", "task_type")


# ------------------------------------------------------------------------------------------------ records


def read_answers(path: Path) -> list[dict]:
    """The records of an answers.jsonl; a line cut short by a kill is skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "question_id" in rec:
            out.append(rec)
    return out


def latest(records: Sequence[dict], key: str) -> dict[str, dict]:
    """The last record of each question made with settings ``key``."""
    out: dict[str, dict] = {}
    for rec in records:
        if rec.get("key") == key:
            out[rec["question_id"]] = rec
    return out


def variant_key(cfg: VideoMMEConfig, variant: Variant) -> str:
    """A fingerprint of every setting that shapes a variant's answers (resume and the report use it)."""
    shape = {"schema": SCHEMA, "model": {k: cfg.model[k] for k in ("id", "revision", "dtype", "processor")},
             "video": cfg.video, "prompt": cfg.prompt, "max_new_tokens": cfg.generation["max_new_tokens"],
             "subtitles": cfg.data["subtitles"] is not None, "attention": variant.settings()}
    return hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:20]


# ------------------------------------------------------------------------------------------------ prompts


def build_question_text(question: Any, prompt: dict, subtitles: Sequence[str] = ()) -> str:
    """The user turn's text: subtitles (when given), instruction, question, one option a line, suffix."""
    parts = []
    if subtitles:
        parts.append("This video's subtitles are listed below:\n" + "\n".join(subtitles))
    if prompt["instruction"]:
        parts.append(prompt["instruction"])
    parts.append(question.question)
    parts.extend(f"{letter}. {text}" for letter, text in question.options)
    if prompt["suffix"]:
        parts.append(prompt["suffix"])
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------ model


def resolve_device(spec: str) -> str:
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device = {spec!r} is not allowed: no CUDA device is visible")
    return spec


def load_model_and_processor(cfg: VideoMMEConfig, device: str) -> tuple[Any, Any]:
    """The model (sdpa to start with; variants switch it) and its processor."""
    import torch

    from xattn_video.llm import transformers_attention as xta

    xta.register()
    dtype = getattr(torch, cfg.model["dtype"])
    lo, hi = cfg.video["min_pixels"], cfg.video["max_pixels"]
    if cfg.model["id"] == "tiny":
        from dataclasses import replace

        from xattn_video.testing.tiny_qwen import TINY_GEOMETRY, build_tiny_qwen2vl, build_tiny_qwen_processor

        if cfg.model["processor"] == "real":
            raise ConfigError("model.processor = 'real' is not allowed with model.id = tiny: the tiny model has "
                              "only the builtin processor")
        geometry = replace(TINY_GEOMETRY, **{k: v for k, v in (("min_pixels", lo), ("max_pixels", hi)) if v})
        model = build_tiny_qwen2vl(0, dtype=dtype)
        processor = build_tiny_qwen_processor(geometry)
    else:
        from transformers import AutoModelForImageTextToText

        from xattn_video.llm.qwen_inputs import load_qwen_processor

        model = AutoModelForImageTextToText.from_pretrained(
            cfg.model["id"], revision=cfg.model["revision"], dtype=dtype, attn_implementation="sdpa",
            device_map=device)  # weights go straight to the device
        processor = load_qwen_processor(cfg.model["id"], mode=cfg.model["processor"], revision=cfg.model["revision"],
                                        min_pixels=lo, max_pixels=hi)
    return model.to(device).eval(), processor


def apply_variant(model: Any, variant: Variant) -> None:
    """Switch the model to the variant's attention: transformers' sdpa, or xattn with its settings."""
    from xattn_video.llm import transformers_attention as xta

    if variant.mode == "dense":
        model.set_attn_implementation("sdpa")
        return
    xta.configure(threshold=variant.threshold, stride=variant.stride, block_size=variant.block_size,
                  min_len=variant.min_len, backend=variant.backend, vision=variant.vision,
                  estimate_fp8=variant.estimate_fp8)
    model.set_attn_implementation(xta.NAME)


def answer_question(model: Any, processor: Any, inputs: dict, max_new_tokens: int) -> dict:
    """Greedy decoding of one prepared input; the response and what the attention did."""
    import torch

    from xattn_video.llm import transformers_attention as xta

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    batch = {k: (v.to(device, dtype) if k.startswith("pixel_values") else v.to(device)) for k, v in inputs.items()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with torch.inference_mode(), xta.collect_stats() as stats, xta.time_prefill(model) as timing:
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             temperature=None, top_p=None, top_k=None)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    generate_ms = (time.perf_counter() - start) * 1e3
    new_tokens = out[0, batch["input_ids"].shape[1]:].tolist()
    return {
        "response": processor.decode(new_tokens),
        "new_tokens": len(new_tokens),
        "prefill_ms": timing.prefill_ms,
        "vision_ms": timing.vision_ms,
        "llm_prefill_ms": (timing.prefill_ms - timing.vision_ms
                           if timing.prefill_ms is not None and timing.vision_ms is not None else timing.prefill_ms),
        "generate_ms": generate_ms,
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        **{k: v for k, v in stats.to_dict().items()},
    }


# ------------------------------------------------------------------------------------------------ the run


@dataclass
class RunResult:
    root: Path
    variants: tuple[Variant, ...]
    answered: dict = field(default_factory=dict)  # variant -> answered this run
    skipped: dict = field(default_factory=dict)
    failed: dict = field(default_factory=dict)
    report: dict | None = None
    markdown: str = ""
    dry_run_lines: list = field(default_factory=list)
    processor: str | None = None  # "real" or "builtin", when a model was loaded

    @property
    def ok(self) -> bool:
        return not any(self.failed.values())


def _dataset_paths(cfg: VideoMMEConfig, root: Path) -> tuple[Path, Path, Path | None]:
    """(question table or folder, videos folder, subtitles folder or None)."""
    if cfg.data["questions"] is None:
        from .videomme_data import write_synthetic_videomme

        synthetic = root / "synthetic"
        if not list((synthetic / "videomme").glob("test.*")):  # written last: a set without it is not whole
            import importlib.util

            # Video-MME's own format when pyarrow is there (the videomme extra); the same rows as JSONL if not
            write_synthetic_videomme(synthetic, fmt="parquet" if importlib.util.find_spec("pyarrow") else "jsonl")
        questions = synthetic
    else:
        questions = Path(cfg.data["questions"]).expanduser()
    if cfg.data["videos"] is not None:
        videos = Path(cfg.data["videos"]).expanduser()
    else:
        base = questions if questions.is_dir() else questions.parent
        videos = base / "data" if (base / "data").is_dir() or base.name != "videomme" else base.parent / "data"
    subtitles = Path(cfg.data["subtitles"]).expanduser() if cfg.data["subtitles"] else None
    return questions, videos, subtitles


def _show_progress(setting: str) -> bool:
    return setting == "true" or (setting == "auto" and sys.stderr.isatty())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_videomme(cfg: VideoMMEConfig, *, dry_run: bool = False) -> RunResult:
    """Answer every question not yet answered by every variant, append the answers, write the report."""
    from . import preflight
    from .generate_plan import append_manifest
    from .safe_io import clear_stale_temporaries, one_line
    from .videomme_data import SubtitleError, TableError, find_video, load_questions, load_subtitles, subtitles_at

    root = Path(cfg.output_root).expanduser()
    preflight.check_output_dir(root, "output.root")  # before the synthetic set or any answer is written
    result = RunResult(root=root, variants=cfg.variants)
    questions_path, videos_dir, subtitles_dir = _dataset_paths(cfg, root)
    try:
        questions, row_errors = load_questions(questions_path)
    except TableError as e:
        raise ConfigError(f"data.questions: {e}") from None
    if cfg.data["durations"]:
        questions = [q for q in questions if q.duration in cfg.data["durations"]]
        row_errors = [e for e in row_errors if e.fields.get("duration") in cfg.data["durations"]]
    if cfg.data["limit"]:
        questions = questions[: cfg.data["limit"]]
    keys = {v.name: variant_key(cfg, v) for v in cfg.variants}
    paths = {v.name: root / v.name / "answers.jsonl" for v in cfg.variants}
    done = {v.name: {qid for qid, r in latest(read_answers(paths[v.name]), keys[v.name]).items()
                     if r.get("status") == "ok"} for v in cfg.variants}
    todo = [q for q in questions if any(q.question_id not in done[v.name] for v in cfg.variants)]
    for v in cfg.variants:
        result.skipped[v.name] = sum(q.question_id in done[v.name] for q in questions)
        result.answered[v.name] = 0
        result.failed[v.name] = []
    device = None
    if todo and not dry_run:  # the device, the backends and the model, checked before anything is written or loaded
        device = resolve_device(cfg.model["device"])
        preflight.check_device_for_model(cfg.model["device"], device, cfg.model["id"])
        preflight.check_backends_on_device(cfg.variants, device)
        if cfg.model["id"] != "tiny":
            preflight.check_model_source(cfg.model["id"], cfg.model["revision"], index_file="config.json",
                                         what="a transformers model folder",
                                         log=lambda m: print(m, file=sys.stderr))
    if dry_run:
        result.dry_run_lines = [
            f"questions: {len(questions)} from {questions_path} (+{len(row_errors)} unusable rows); "
            f"videos: {videos_dir}; subtitles: {subtitles_dir}",
            *[f"  {v.name}: {len(questions) - result.skipped[v.name]} to answer, {result.skipped[v.name]} done "
              f"({v.settings()})" for v in cfg.variants],
        ]
        return result

    root.mkdir(parents=True, exist_ok=True)
    clear_stale_temporaries(root)
    from xattn_video.pipelines.video_io import write_text_atomic

    write_text_atomic(root / "config.yaml", to_yaml(cfg))
    for path in paths.values():  # a line cut short by a kill must not swallow the next record
        if path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            with path.open("ab") as f:
                f.write(b"\n")

    def record(variant: Variant, fields: dict, **extra: Any) -> dict:
        rec = {**fields, "variant": variant.name, "key": keys[variant.name], "time": _now(),
               "process": run_figures.process_id(), **extra}  # prefill times compare only within one process
        append_manifest(paths[variant.name], rec)
        return rec

    # unusable rows: one error record per variant (not repeated while the table does not change)
    for v in cfg.variants:
        last = latest(read_answers(paths[v.name]), keys[v.name])
        for err in row_errors:
            if last.get(err.question_id, {}).get("error") != err.error:
                record(v, {"question_id": err.question_id, **err.fields}, status="error", correct=None,
                       error=err.error)
            result.failed[v.name].append((err.question_id, err.error))

    if todo:
        from tqdm.auto import tqdm

        from xattn_video.llm.qwen_inputs import read_frames, video_messages

        try:
            model, processor = load_model_and_processor(cfg, device)
        except (OSError, ValueError) as e:  # missing files, a folder that is not this kind of model
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"model.id = {cfg.model['id']!r}: the model could not be loaded: {one_line(e)}") from None
        result.processor = processor.kind
        bar = tqdm(total=len(todo), desc="questions", unit="q", disable=not _show_progress(cfg.progress),
                   dynamic_ncols=True)
        cached = None  # (video path, frames, info) of the last video read
        warmed: set[str] = set()
        said_subtitles: set[str] = set()
        for position, q in enumerate(todo):
            pending = [v for v in cfg.variants if q.question_id not in done[v.name]]
            try:
                video_path = find_video(videos_dir, q.video)
                if cached is None or cached[0] != video_path:  # Video-MME asks 3 questions a video, in a row
                    cached = (video_path, *read_frames(video_path, fps=cfg.video["fps"],
                                                       max_frames=cfg.video["max_frames"],
                                                       min_frames=cfg.video["min_frames"]))
                _, frames, info = cached
                subs: list[str] = []
                subtitle_note = None
                if subtitles_dir is not None:
                    srt = subtitles_dir / f"{q.video}.srt"
                    try:
                        subs = subtitles_at(load_subtitles(srt), info["times_s"]) if srt.is_file() else []
                    except SubtitleError as e:  # the question goes on without subtitles, and says so
                        subtitle_note = str(e)
                        if q.video not in said_subtitles:
                            said_subtitles.add(q.video)
                            print(f"{q.question_id}: no subtitles: {e}", file=sys.stderr)
                text = build_question_text(q, cfg.prompt, subs)
                prompt = processor.chat_prompt(video_messages(text, cfg.prompt["system"]))
                inputs = processor(prompt, frames, info)
            except Exception as e:  # a missing or broken video fails this question only
                error = f"{type(e).__name__}: {e}"
                for v in pending:
                    record(v, q.fields(), status="error", correct=None, error=error)
                    result.failed[v.name].append((q.question_id, error))
                bar.update(1)
                continue
            grid = inputs["video_grid_thw"][0].tolist()
            common = {**q.fields(), "frames": len(info["indices"]), "frames_missing": info["missing"],
                      "sampled_fps": info["sampled_fps"],
                      "video_grid_thw": grid, "prompt_tokens": int(inputs["input_ids"].shape[1]),
                      "subtitle_lines": len(subs), "processor": processor.kind}
            if subtitle_note is not None:
                common["subtitle_error"] = subtitle_note
            # alternate the variants' order question by question, so neither always runs on a cold cache
            for v in (pending if position % 2 == 0 else pending[::-1]):
                try:
                    apply_variant(model, v)
                    if cfg.generation["warmup"] and v.name not in warmed:
                        answer_question(model, processor, inputs, 1)
                        warmed.add(v.name)
                    out = answer_question(model, processor, inputs, cfg.generation["max_new_tokens"])
                except Exception as e:  # e.g. out of memory on one long video: record it, go on
                    error = f"{type(e).__name__}: {e}"
                    record(v, common, status="error", correct=None, error=error,
                           traceback=traceback.format_exc(limit=3))
                    result.failed[v.name].append((q.question_id, error))
                    continue
                pred = extract_choice(out["response"], q.options)
                record(v, common, status="ok", pred=pred, correct=pred == q.answer, **out)
                result.answered[v.name] += 1
            bar.update(1)
        bar.close()
    result.report, result.markdown = write_report(cfg, root, keys, paths, [q.question_id for q in questions],
                                                  [e.question_id for e in row_errors])
    return result


# ------------------------------------------------------------------------------------------------ report


_median = run_figures.median


def timed_questions(per_variant: dict[str, dict[str, dict]]) -> tuple[list[str], int]:
    """The questions whose prefill times the report compares: every variant answered them (status ok) in one
    process (another run may have used another GPU, or none). Returns them and how many every variant
    answered but different processes timed."""
    answered = [{q for q, r in recs.items() if r.get("status") == "ok"} for recs in per_variant.values()]
    common = sorted(set.intersection(*answered)) if answered else []
    timed = [q for q in common if len({recs[q].get("process") for recs in per_variant.values()} - {None}) == 1
             and all(recs[q].get("process") for recs in per_variant.values())]
    return timed, len(common) - len(timed)


def _fmt(x: float | None, spec: str = ".1f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def write_report(cfg: VideoMMEConfig, root: Path, keys: dict, paths: dict, question_ids: list[str],
                 bad_rows: list[str]) -> tuple[dict, str]:
    """report.json and report.md from the answers files (the current settings' last record per question)."""
    from xattn_video.pipelines.video_io import write_json_atomic, write_text_atomic

    wanted = set(question_ids) | set(bad_rows)
    per_variant = {v.name: {qid: r for qid, r in latest(read_answers(paths[v.name]), keys[v.name]).items()
                            if qid in wanted} for v in cfg.variants}
    dense = next((v.name for v in cfg.variants if v.mode == "dense"), None)
    timed, untimed = timed_questions(per_variant)
    variants = {}
    for v in cfg.variants:
        recs = list(per_variant[v.name].values())
        ok = [r for r in recs if r.get("status") == "ok"]
        entry = {
            "settings": v.settings(),
            "key": keys[v.name],
            "score": score(recs, CATEGORIES),
            "answered": len(ok),
            "errors": len(recs) - len(ok),
            "unparsed": sum(r.get("pred") is None for r in ok),
            # over the timed questions (every variant's, one process), so that the speed-ups are their ratios
            "median_prefill_ms": _median([per_variant[v.name][q].get("prefill_ms") for q in timed]),
            "median_llm_prefill_ms": _median([per_variant[v.name][q].get("llm_prefill_ms") for q in timed]),
            "median_vision_ms": _median([per_variant[v.name][q].get("vision_ms") for q in timed]),
            "mean_density": (statistics.fmean(d) if (d := [r["density"] for r in ok if r.get("density") is not None])
                             else None),
            "prompt_tokens_median": _median([r.get("prompt_tokens") for r in ok]),
            "by_duration": {
                d: {"questions": len(rs),
                    "mean_density": statistics.fmean(ds) if (ds := [r["density"] for r in rs
                                                                    if r.get("density") is not None]) else None,
                    "median_prompt_tokens": _median([r.get("prompt_tokens") for r in rs]),
                    "median_llm_prefill_ms": _median([r.get("llm_prefill_ms") for r in rs])}
                for d in ("short", "medium", "long") if (rs := [r for r in ok if r.get("duration") == d])
            },
        }
        if dense is not None and v.name != dense:
            base = per_variant[dense]
            pairs = [(base[q], r) for q, r in per_variant[v.name].items()
                     if r.get("status") == "ok" and base.get(q, {}).get("status") == "ok"]
            entry["agreement_with_dense"] = (sum(b.get("pred") == r.get("pred") for b, r in pairs) / len(pairs)
                                             if pairs else None)
            entry["paired_questions"] = len(pairs)
        variants[v.name] = entry
    for name, entry in variants.items():
        if dense is not None and name != dense:
            for key in ("prefill_ms", "llm_prefill_ms"):  # the ratio of the medians printed beside it
                entry[f"{key.removesuffix('_ms')}_speedup_vs_dense"] = run_figures.speedup(
                    variants[dense][f"median_{key}"], entry[f"median_{key}"])
    report = {"schema": SCHEMA, "created": _now(), "questions": len(question_ids), "unusable_rows": len(bad_rows),
              "dense_variant": dense, "timed_questions": len(timed), "untimed_questions": untimed,
              "variants": variants, "config": cfg.resolved}
    md = markdown_report(report)
    write_json_atomic(root / "report.json", report)
    write_text_atomic(root / "report.md", md)
    return report, md


def markdown_report(report: dict) -> str:
    """Two tables: accuracy (correct / total) by category per variant; then density, prefill and agreement."""
    names = list(report["variants"])
    scores = {n: report["variants"][n]["score"] for n in names}

    def cell(t: dict | None) -> str:
        if not t or not t["total"]:
            return "-"
        return f"{100 * t['accuracy']:.1f}% ({t['correct']}/{t['total']})"

    lines = ["| accuracy | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines.append("| overall | " + " | ".join(cell(scores[n]["overall"]) for n in names) + " |")
    for field_name, order in (("duration", ("short", "medium", "long")), ("task_type", ())):
        values = list(order) + sorted({k for n in names for k in scores[n][field_name]} - set(order))
        for value in values:
            if any(value in scores[n][field_name] for n in names):
                label = value if field_name == "duration" else f"task: {value}"
                lines.append(f"| {label} | " + " | ".join(cell(scores[n][field_name].get(value)) for n in names)
                             + " |")
    lines += ["", "| variant | answered | errors | unparsed | mean density | median prefill ms (LLM part) | "
                  f"prefill {run_figures.SPEEDUP} vs dense, x (LLM part) | agreement with dense, % |",
              "|---|---|---|---|---|---|---|---|"]
    for n in names:
        v = report["variants"][n]
        speed = (f"{_fmt(v.get('prefill_speedup_vs_dense'), '.2f')} "
                 f"({_fmt(v.get('llm_prefill_speedup_vs_dense'), '.2f')})")
        agree = v.get("agreement_with_dense")
        lines.append(f"| {n} | {v['answered']} | {v['errors']} | {v['unparsed']} | {_fmt(v['mean_density'], '.3f')} | "
                     f"{_fmt(v['median_prefill_ms'])} ({_fmt(v['median_llm_prefill_ms'])}) | {speed} | "
                     f"{_fmt(None if agree is None else 100 * agree, '.1f')} |")
    timed, untimed = report.get("timed_questions"), report.get("untimed_questions")
    if timed is not None:
        lines += ["", f"Prefill medians over the {timed} questions every variant answered in one process; the "
                      "speed-up is the dense median over the variant's."
                  + (f" {untimed} more were answered by different processes (another run): their times are not "
                     "comparable and are left out." if untimed else "")]
    lines += ["", "| variant | duration | questions | median prompt tokens | mean density | median LLM prefill ms |",
              "|---|---|---|---|---|---|"]
    for n in names:
        for d, e in report["variants"][n]["by_duration"].items():
            lines.append(f"| {n} | {d} | {e['questions']} | {_fmt(e['median_prompt_tokens'], '.0f')} | "
                         f"{_fmt(e['mean_density'], '.3f')} | {_fmt(e['median_llm_prefill_ms'])} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``xattn-video videomme``."""
    parser.usage = "%(prog)s [-h] [--print-config] [--dry-run] [CONFIG.yaml] [key=value ...]"
    parser.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value ...]",
                        help="a YAML config (default: the embedded tiny CPU run), then OmegaConf dot-list "
                             "overrides such as attention.threshold=0.95 data.limit=10")
    parser.set_defaults(_positional_rest="args")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved, validated config and exit (loads no model)")
    parser.add_argument("--dry-run", action="store_true",
                        help="read the question table, list what would run and exit (loads no model)")


def run(args: argparse.Namespace) -> int:
    """``xattn-video videomme``: 0 when every question got an answer from every variant, 1 when some failed."""
    from .config_checks import run_config_command

    result = run_config_command(args, load_config, to_yaml, lambda cfg: run_videomme(cfg, dry_run=args.dry_run))
    if result is None:  # --print-config
        return 0
    if args.dry_run:
        print("\n".join(result.dry_run_lines))
        return 0
    print(result.markdown, end="")
    print(f"answers: {result.root}/<variant>/answers.jsonl; report: {result.root / 'report.md'}")
    for name, failures in result.failed.items():
        for qid, error in failures[:20]:
            print(f"FAILED {name}/{qid}: {error}", file=sys.stderr)
        if len(failures) > 20:
            print(f"FAILED {name}: {len(failures) - 20} more (see answers.jsonl)", file=sys.stderr)
    return 0 if result.ok else 1
