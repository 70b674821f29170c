"""Video-MME as it is distributed: the question table, the folder of videos, the subtitles.

The dataset (lmms-lab/Video-MME) ships ``videomme/test-00000-of-00001.parquet`` (2,700 questions; columns
video_id, duration (short/medium/long), domain, sub_category, url, videoID, question_id, task_type,
question, options (a list of "A. ..." strings), answer (a letter)), the videos as ``data/<videoID>.mp4``
and the subtitles as ``subtitle/<videoID>.srt``. :func:`load_questions` reads that table, or the same
columns as CSV (options as a JSON list or one per line), JSON (a list of rows) or JSONL.

A table that cannot be read or lacks a required column is a :class:`TableError` (the run cannot start);
a bad row (a JSONL line that is not a JSON object, an empty question, unusable options, an answer that is not one
of the option letters, a repeated question id) becomes a :class:`RowError` that the run records and goes past.
A subtitle file that cannot be read or holds no SRT cue is a :class:`SubtitleError` (the question goes on
without subtitles, and its record says why).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .answers import parse_options

__all__ = [
    "Question",
    "RowError",
    "SubtitleError",
    "TableError",
    "find_video",
    "load_questions",
    "load_subtitles",
    "subtitles_at",
    "write_synthetic_videomme",
]

REQUIRED = ("videoID", "question_id", "duration", "task_type", "question", "options", "answer")
OPTIONAL = ("video_id", "domain", "sub_category", "url")
DURATIONS = ("short", "medium", "long")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")
TABLE_SUFFIXES = (".parquet", ".csv", ".json", ".jsonl")


class TableError(ValueError):
    """The question table as a whole is unusable (missing, unreadable, a required column absent)."""


class SubtitleError(ValueError):
    """A subtitle file cannot be read, or holds no SRT cue."""


@dataclass(frozen=True)
class _BadLine:
    """A JSONL line that is not a JSON object: kept in place so that it becomes a RowError."""

    where: str
    error: str


@dataclass(frozen=True)
class Question:
    question_id: str
    video: str  # videoID: the file name stem
    duration: str
    task_type: str
    question: str
    options: tuple[tuple[str, str], ...]
    answer: str
    domain: str = ""
    sub_category: str = ""
    row: int = 0

    @property
    def letters(self) -> list[str]:
        return [letter for letter, _ in self.options]

    def fields(self) -> dict:
        return {"question_id": self.question_id, "video": self.video, "duration": self.duration,
                "task_type": self.task_type, "domain": self.domain, "sub_category": self.sub_category,
                "answer": self.answer}


@dataclass(frozen=True)
class RowError:
    question_id: str
    row: int
    error: str
    fields: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ tables


def _table_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        for pattern in ("videomme/*.parquet", "*.parquet", "videomme/*.jsonl", "*.jsonl", "*.json", "*.csv"):
            found = sorted(path.glob(pattern))
            if found:
                return found
        raise TableError(f"{str(path)!r} is a folder without a question table (videomme/*.parquet, *.parquet, "
                         "*.jsonl, *.json or *.csv)")
    raise TableError(f"question table {str(path)!r} does not exist")


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise TableError("reading parquet needs pyarrow: pip install 'xattn-video[videomme]'") from None
            return pq.read_table(path).to_pylist()
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        if suffix == ".jsonl":
            return [_jsonl_row(path, n, line) for n, line in
                    enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise TableError(f"{str(path)!r}: a JSON question table must be a list of rows")
            return data
    except TableError:
        raise
    except Exception as e:  # pyarrow, csv and json raise many types for a corrupt file
        raise TableError(f"question table {str(path)!r} cannot be read: {type(e).__name__}: {e}") from None
    raise TableError(f"question table {str(path)!r}: unknown format {suffix!r}; use one of {list(TABLE_SUFFIXES)}")


def _jsonl_row(path: Path, number: int, line: str) -> dict | _BadLine:
    try:
        row = json.loads(line)
    except ValueError as e:
        return _BadLine(f"{path.name} line {number}", f"not valid JSON ({e})")
    return row if isinstance(row, dict) else _BadLine(f"{path.name} line {number}", "not a JSON object")


def _options(value: Any) -> list[str]:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = json.loads(text)
        else:
            value = [line for line in text.splitlines() if line.strip()]
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"options must be a list of strings, got {type(value).__name__}")
    return [str(v) for v in value]


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def load_questions(path: str | os.PathLike) -> tuple[list[Question], list[RowError]]:
    """The questions of a Video-MME table (file or folder) in table order, and the rows that are unusable."""
    files = _table_files(Path(path).expanduser())
    rows: list[dict] = []
    for f in files:
        rows.extend(_read_rows(f))
    bad_lines = [(i, r) for i, r in enumerate(rows) if isinstance(r, _BadLine)]
    rows_read = len(rows)
    rows = [r for r in rows if not isinstance(r, _BadLine)]
    if not rows:
        raise TableError(f"question table {str(path)!r} holds no rows"
                         + (f" ({bad_lines[0][1].where}: {bad_lines[0][1].error})" if bad_lines else ""))
    if not all(isinstance(r, dict) for r in rows):
        raise TableError(f"question table {str(path)!r}: every row must be a mapping of column -> value")
    columns = set().union(*(r.keys() for r in rows))
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise TableError(f"question table {str(path)!r} lacks column(s) {missing}; Video-MME's columns are "
                         f"{list(REQUIRED) + list(OPTIONAL)}")
    questions: list[Question] = []
    errors = [RowError(f"row-{i}", i, f"row {i} ({bad.where}): {bad.error}") for i, bad in bad_lines]
    seen: set[str] = set()
    # the good rows keep their place in the table: row numbers count the bad lines too
    good_positions = [i for i in range(rows_read) if i not in {j for j, _ in bad_lines}]
    for i, row in zip(good_positions, rows, strict=True):
        qid = _text(row.get("question_id")) or f"row-{i}"
        info = {k: _text(row.get(k)) for k in ("videoID", "duration", "task_type", "domain")}
        try:
            if qid in seen:
                raise ValueError(f"question_id {qid!r} repeats an earlier row")
            video = _text(row.get("videoID"))
            if not video or "/" in video or video.startswith("."):
                raise ValueError(f"videoID {video!r} is not a file name stem")
            duration = _text(row.get("duration")).lower()
            if duration not in DURATIONS:
                raise ValueError(f"duration {duration!r} is not one of {list(DURATIONS)}")
            question = _text(row.get("question"))
            if not question:
                raise ValueError("the question is empty")
            options = parse_options(_options(row.get("options")))
            answer = _text(row.get("answer")).upper()
            letters = [letter for letter, _ in options]
            if answer not in letters:
                raise ValueError(f"answer {answer!r} is not one of the option letters {letters}")
            questions.append(Question(
                question_id=qid, video=video, duration=duration, task_type=_text(row.get("task_type")) or "unknown",
                question=question, options=tuple(options), answer=answer, domain=_text(row.get("domain")),
                sub_category=_text(row.get("sub_category")), row=i,
            ))
        except (ValueError, TypeError) as e:
            errors.append(RowError(qid, i, f"row {i}: {e}", info))
        seen.add(qid)
    return questions, errors


def find_video(videos_dir: str | os.PathLike, video: str) -> Path:
    """``<videos_dir>/<videoID>.mp4`` (or .mkv, .webm, .avi, .mov); FileNotFoundError naming the first."""
    folder = Path(videos_dir)
    for suffix in VIDEO_SUFFIXES:
        candidate = folder / f"{video}{suffix}"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"video {video!r} not found: no {folder / (video + '.mp4')} (nor .mkv/.webm/.avi/.mov)")


# ------------------------------------------------------------------------------------------------ subtitles

_SRT_TIME = re.compile(r"(\d+):(\d+):(\d+)[,.](\d+)\s*-->\s*(\d+):(\d+):(\d+)[,.](\d+)")


def load_subtitles(path: str | os.PathLike) -> list[tuple[float, float, str]]:
    """An .srt file as (start s, end s, text) cues in file order; markup tags dropped."""
    cues = []
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SubtitleError(f"subtitle file {path} cannot be read ({e.strerror or e})") from None
    text = data.decode("utf-8-sig", errors="replace").replace("\r\n", "\n")
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.strip().splitlines() if line.strip()]
        for j, line in enumerate(lines):
            m = _SRT_TIME.search(line)
            if m:
                g = [int(x) for x in m.groups()]
                start = g[0] * 3600 + g[1] * 60 + g[2] + g[3] / 1000
                end = g[4] * 3600 + g[5] * 60 + g[6] + g[7] / 1000
                body = re.sub(r"<[^>]+>|\{[^}]+\}", "", " ".join(lines[j + 1:])).strip()
                if body:
                    cues.append((start, end, body))
                break
    if not cues and text.strip():
        raise SubtitleError(f"subtitle file {path} holds no SRT cue (\"00:00:01,000 --> 00:00:02,000\" then text)")
    return cues


def subtitles_at(cues: list[tuple[float, float, str]], times: list[float]) -> list[str]:
    """The subtitle lines shown at the sampled frame times, each once, in order (Video-MME's 'with
    subtitles' setting gives the model the subtitles of the frames it sees)."""
    lines: list[str] = []
    for t in times:
        for start, end, body in cues:
            if start <= t <= end and body not in lines:
                lines.append(body)
    return lines


# ------------------------------------------------------------------------------------------------ synthetic


def write_synthetic_videomme(folder: str | os.PathLike, *, n_videos: int = 3, questions_per_video: int = 2,
                             seconds: float = 8.0, fps: int = 4, size: int = 112, seed: int = 0,
                             fmt: str = "parquet") -> Path:
    """A small set in Video-MME's layout for tests and the tiny default: ``videomme/test.<fmt>``,
    ``data/<videoID>.mp4`` (moving coloured squares) and ``subtitle/<videoID>.srt``. Returns the folder.

    Durations cycle short, medium, long and task types cycle over three names, so every category is filled.
    """
    import numpy as np

    from xattn_video.pipelines.video_io import atomic_path, write_text_atomic, write_video

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    tasks = ("Object Recognition", "Action Reasoning", "Counting Problem")
    rows = []
    for v in range(n_videos):
        video = f"synth{v:03d}"
        frames = np.zeros((int(seconds * fps), size, size, 3), dtype=np.uint8)
        colour = rng.integers(64, 256, 3, dtype=np.uint8)
        for t in range(frames.shape[0]):
            frames[t] = rng.integers(0, 40, 3, dtype=np.uint8)
            x = (t * 5 + 7 * v) % (size - 24)
            frames[t, 20:44, x:x + 24] = colour
        write_video(folder / "data" / f"{video}.mp4", frames, fps=fps)
        srt = "".join(f"{i + 1}\n00:00:{2 * i:02d},000 --> 00:00:{2 * i + 1:02d},500\nline {i} of {video}\n\n"
                      for i in range(int(seconds // 2)))
        write_text_atomic(folder / "subtitle" / f"{video}.srt", srt, tmp_dir=folder / ".partial")
        for q in range(questions_per_video):
            answer = "ABCD"[int(rng.integers(0, 4))]
            rows.append({
                "video_id": f"{v + 1:03d}", "duration": DURATIONS[v % 3], "domain": "Synthetic",
                "sub_category": "Squares", "url": "", "videoID": video,
                "question_id": f"{v + 1:03d}-{q + 1}", "task_type": tasks[(v + q) % 3],
                "question": f"What colour is square number {q}?",
                "options": [f"{letter}. colour {k}" for k, letter in enumerate("ABCD")], "answer": answer,
            })
    if fmt not in ("parquet", "jsonl", "json", "csv"):
        raise ValueError(f"fmt must be one of parquet, jsonl, json, csv; got {fmt!r}")
    # the table last and atomically: a set whose table is there is whole (the tiny default reuses it)
    with atomic_path(folder / "videomme" / f"test.{fmt}", tmp_dir=folder / ".partial") as table:
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), table)
        elif fmt == "jsonl":
            table.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        elif fmt == "json":
            table.write_text(json.dumps(rows, indent=1), encoding="utf-8")
        else:
            with table.open("w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                for r in rows:
                    writer.writerow({**r, "options": json.dumps(r["options"])})
    with contextlib.suppress(OSError):
        (folder / ".partial").rmdir()
    return folder
