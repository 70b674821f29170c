"""``xattn-video videomme`` end to end on the tiny Qwen2-VL and a synthetic Video-MME-format set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from xattn_video.cli import main
from xattn_video.pipelines.answers import extract_choice
from xattn_video.pipelines.videomme_config import load_config
from xattn_video.pipelines.videomme_data import (
    TableError,
    find_video,
    load_questions,
    load_subtitles,
    subtitles_at,
    write_synthetic_videomme,
)

ROOT = Path(__file__).resolve().parents[1]
FAST = ["video.fps=2", "video.max_frames=16", "progress=false"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_synthetic_videomme(tmp_path_factory.mktemp("videomme"), n_videos=3, questions_per_video=2)


def _answers(root: Path, variant: str) -> list[dict]:
    """Complete records (a line cut short by a kill is not one)."""
    out = []
    for line in (root / variant / "answers.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            assert not line.endswith("}"), line
    return out


def _run(*args: str) -> int:
    return main(["videomme", *args])


def test_whole_command_answers_scores_and_reports(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(f"data.questions={dataset}", f"output.root={out}", *FAST) == 0
    printed = capsys.readouterr().out
    assert "| overall |" in printed and "| long |" in printed
    questions, errors = load_questions(dataset)
    assert len(questions) == 6 and not errors
    report = json.loads((out / "report.json").read_text())
    assert report["questions"] == 6 and set(report["variants"]) == {"dense", "xattn"}
    for name in ("dense", "xattn"):
        recs = _answers(out, name)
        assert [r["question_id"] for r in recs] == [q.question_id for q in questions]
        by_id = {q.question_id: q for q in questions}
        for r in recs:  # each record is consistent with an independent re-extraction
            q = by_id[r["question_id"]]
            assert r["status"] == "ok" and r["prefill_ms"] > r["vision_ms"] > 0
            assert r["pred"] == extract_choice(r["response"], q.options)
            assert r["correct"] == (r["pred"] == q.answer)
        s = report["variants"][name]["score"]
        assert s["overall"]["total"] == 6 and s["overall"]["correct"] == sum(r["correct"] for r in recs)
        assert {k: v["total"] for k, v in s["duration"].items()} == {"short": 2, "medium": 2, "long": 2}
        assert sum(v["total"] for v in s["task_type"].values()) == 6
    dense, sparse = _answers(out, "dense"), _answers(out, "xattn")
    assert all(r["density"] is None and not r["xattn_calls"] for r in dense)
    assert all(r["xattn_calls"] == 2 and 0 < r["density"] < 1 for r in sparse)  # 2 layers, long prefills
    assert report["variants"]["xattn"]["prefill_speedup_vs_dense"] > 0
    assert (out / "report.md").read_text().startswith("| accuracy | dense | xattn |")
    assert "threshold" in (out / "config.yaml").read_text()


def test_threshold_one_answers_like_dense_and_resume_skips(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    args = [f"data.questions={dataset}", f"output.root={out}", *FAST, "attention.threshold=1.0", "data.limit=3"]
    assert _run(*args) == 0
    dense, exact = _answers(out, "dense"), _answers(out, "xattn")
    assert [r["response"] for r in dense] == [r["response"] for r in exact]
    assert all(r["density"] == 1.0 for r in exact)
    report = json.loads((out / "report.json").read_text())
    assert report["variants"]["xattn"]["agreement_with_dense"] == 1.0
    # a kill mid-write leaves half a line: the rerun neither breaks on it nor glues its next record to it
    with (out / "xattn" / "answers.jsonl").open("a") as f:
        f.write('{"question_id": "001-1", "respo')
    # rerun: nothing new; another threshold: only the xattn variant runs again
    assert _run(*args) == 0
    assert len(_answers(out, "dense")) == 3 and len(_answers(out, "xattn")) == 3
    assert _run(*args[:-2], "attention.threshold=0.9", "data.limit=3") == 0
    assert len(_answers(out, "dense")) == 3 and len(_answers(out, "xattn")) == 6
    assert json.loads((out / "report.json").read_text())["variants"]["xattn"]["answered"] == 3
    capsys.readouterr()


def test_bad_rows_and_missing_videos_are_recorded_and_the_run_goes_on(dataset, tmp_path, capsys):
    rows = [json.loads(json.dumps(r)) for r in _table_rows(dataset)]
    rows[1]["answer"] = "E"  # not an option
    rows.append({**rows[0], "question_id": "999-1", "videoID": "nowhere"})  # no such video
    table = tmp_path / "questions.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    args = [f"data.questions={table}", f"data.videos={dataset / 'data'}", f"output.root={out}", *FAST,
            "attention.select=[xattn]"]
    assert _run(*args) == 1
    err = capsys.readouterr().err
    assert "FAILED xattn/999-1" in err and "not found" in err and "answer 'E'" in err
    recs = {r["question_id"]: r for r in _answers(out, "xattn")}
    assert recs["999-1"]["status"] == "error" and recs["999-1"]["correct"] is None
    assert recs[rows[1]["question_id"]]["status"] == "error"
    assert sum(r["status"] == "ok" for r in recs.values()) == 5
    report = json.loads((out / "report.json").read_text())
    assert report["variants"]["xattn"]["errors"] == 2 and report["variants"]["xattn"]["answered"] == 5
    # the video appears: a rerun answers that question and repeats nothing else
    shutil.copy(dataset / "data" / "synth000.mp4", dataset / "data" / "nowhere.mp4")
    try:
        assert _run(*args) == 1  # the bad row still fails
        last = {r["question_id"]: r for r in _answers(out, "xattn")}
        assert last["999-1"]["status"] == "ok"
        assert len(_answers(out, "xattn")) == len(recs) + 1
    finally:
        (dataset / "data" / "nowhere.mp4").unlink()
    capsys.readouterr()


def _table_rows(dataset: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(next((dataset / "videomme").glob("*.parquet"))).to_pylist()


def test_malformed_table_is_one_clear_error(dataset, tmp_path, capsys):
    rows = _table_rows(dataset)
    for r in rows:
        del r["task_type"]
    table = tmp_path / "t.json"
    table.write_text(json.dumps(rows))
    assert _run(f"data.questions={table}", f"output.root={tmp_path / 'o'}", *FAST) == 2
    err = capsys.readouterr().err
    assert "data.questions" in err and "task_type" in err and "Traceback" not in err
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 nonsense")
    assert _run(f"data.questions={tmp_path / 'broken.parquet'}", f"output.root={tmp_path / 'o'}") == 2
    assert "cannot be read" in capsys.readouterr().err
    assert _run(f"data.questions={tmp_path / 'none.parquet'}") == 2
    assert "data.questions" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        ("attention.threshold=2", "attention.threshold"),
        ("attention.variants.xattn.stride=3", "attention.variants.xattn.stride"),
        ("video.fps=0", "video.fps"),
        ("model.processor=fast", "model.processor"),
        ("attention.treshold=0.9", "did you mean attention.threshold"),
        ("attention.min_len=8", "attention.min_len"),
        ("attention.estimate_fp8=1", "attention.estimate_fp8"),
    ],
)
def test_bad_config_values_name_the_key(override, message, capsys):
    assert _run(override, "--print-config") == 2
    assert message in capsys.readouterr().err


def test_print_config_dry_run_and_help(dataset, tmp_path, capsys):
    assert _run("--print-config", "attention.threshold=0.95") == 0
    assert "threshold: 0.95" in capsys.readouterr().out
    assert _run(f"data.questions={dataset}", f"output.root={tmp_path}", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "questions: 6" in out and "dense: 6 to answer" in out
    assert not (tmp_path / "report.json").exists()
    with pytest.raises(SystemExit):
        _run("--help")
    assert "attention" in capsys.readouterr().out


def test_paper_config_validates():
    cfg = load_config(ROOT / "configs" / "qwen2vl_7b_videomme.yaml", [f"data.questions={ROOT}"])
    xattn = next(v for v in cfg.variants if v.mode == "xattn")
    assert (xattn.stride, xattn.threshold, xattn.block_size) == (16, 0.9, 128)
    assert cfg.video["fps"] == 1.0 and cfg.model["id"] == "Qwen/Qwen2-VL-7B-Instruct"
    assert [v.name for v in cfg.variants] == ["dense", "xattn"]


def test_table_formats_subtitles_and_paths(dataset, tmp_path):
    ref, _ = load_questions(dataset)
    for fmt in ("csv", "json", "jsonl"):
        other = write_synthetic_videomme(tmp_path / fmt, n_videos=3, questions_per_video=2, fmt=fmt)
        got, errors = load_questions(other / "videomme" / f"test.{fmt}")
        assert got == ref and not errors
    with pytest.raises(TableError, match="does not exist"):
        load_questions(tmp_path / "missing.csv")
    cues = load_subtitles(dataset / "subtitle" / "synth000.srt")
    assert cues[0] == (0.0, 1.5, "line 0 of synth000") and cues[1][0] == 2.0
    assert subtitles_at(cues, [0.5, 1.0, 2.2, 9.0]) == ["line 0 of synth000", "line 1 of synth000"]
    assert find_video(dataset / "data", "synth001").name == "synth001.mp4"
    with pytest.raises(FileNotFoundError, match="synth404"):
        find_video(dataset / "data", "synth404")


def test_subtitles_reach_the_prompt(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(f"data.questions={dataset}", f"data.subtitles={dataset / 'subtitle'}", f"output.root={out}",
                *FAST, "data.limit=1", "attention.select=[dense]") == 0
    with_subs = _answers(out, "dense")[0]
    assert _run(f"data.questions={dataset}", f"output.root={tmp_path / 'plain'}", *FAST, "data.limit=1",
                "attention.select=[dense]") == 0
    plain = _answers(tmp_path / "plain", "dense")[0]
    assert with_subs["subtitle_lines"] == 4 and plain["subtitle_lines"] == 0  # 8 s at 2 fps: 4 cues seen
    assert with_subs["prompt_tokens"] > plain["prompt_tokens"]
    capsys.readouterr()


def test_real_loading_path_on_a_model_folder(dataset, tmp_path, capsys):
    """model.id as a checkpoint folder goes through from_pretrained and the processor loader, as a real model."""
    from xattn_video.testing.tiny_qwen import save_tiny_qwen

    folder = save_tiny_qwen(tmp_path / "tiny-qwen2vl")
    out = tmp_path / "run"
    assert _run(f"model.id={folder}", f"data.questions={dataset}", f"output.root={out}", *FAST, "data.limit=2",
                "attention.threshold=1.0") == 0
    dense, exact = _answers(out, "dense"), _answers(out, "xattn")
    assert [r["response"] for r in dense] == [r["response"] for r in exact]
    assert exact[0]["processor"] in ("builtin", "real") and exact[0]["xattn_calls"] == 2
    # the same weights as the embedded tiny model: the same answers
    assert _run(f"data.questions={dataset}", f"output.root={tmp_path / 'tiny'}", *FAST, "data.limit=2",
                "attention.select=[dense]") == 0
    assert [r["response"] for r in _answers(tmp_path / "tiny", "dense")] == [r["response"] for r in dense]
    capsys.readouterr()


def test_report_speedup_is_the_ratio_of_the_medians_beside_it(tmp_path):
    """The prefill speed-up is the dense median over the variant's median, both as printed, over the questions
    every variant answered in one process: an answer from another process (another run) or an error is left
    out of every median, and the report says how many were left out."""
    from xattn_video.pipelines import videomme

    cfg = load_config(None, [])
    keys = {"dense": "kd", "xattn": "kx"}
    paths = {name: tmp_path / name / "answers.jsonl" for name in keys}
    times = {"dense": [100.0, 200.0, 300.0, 400.0, 500.0], "xattn": [90.0, 100.0, 250.0, 1.0, None]}
    for name, key in keys.items():
        lines = []
        for i, ms in enumerate(times[name]):
            rec = {"question_id": f"q{i}", "key": key, "status": "ok" if ms else "error", "pred": "A",
                   "correct": True if ms else None, "duration": "short", "task_type": "t", "prefill_ms": ms,
                   "llm_prefill_ms": ms and ms / 2, "vision_ms": ms and ms / 2, "density": None,
                   "prompt_tokens": 10, "process": "other:2:x" if (name, i) == ("xattn", 3) else "host:1:a"}
            lines.append(json.dumps(rec))
        paths[name].parent.mkdir(parents=True)
        paths[name].write_text("\n".join(lines) + "\n")
    report, md = videomme.write_report(cfg, tmp_path, keys, paths, [f"q{i}" for i in range(5)], [])
    dense, xattn = report["variants"]["dense"], report["variants"]["xattn"]
    assert report["timed_questions"] == 3 and report["untimed_questions"] == 1
    assert dense["median_prefill_ms"] == 200.0 and xattn["median_prefill_ms"] == 100.0
    assert xattn["prefill_speedup_vs_dense"] == pytest.approx(2.0)  # not the median of per-question ratios (1.2)
    assert xattn["llm_prefill_speedup_vs_dense"] == pytest.approx(2.0)
    row = next(line for line in md.splitlines() if line.startswith("| xattn | 4 |"))
    assert "| 100.0 (50.0) | 2.00 (2.00) |" in row
    assert "over the 3 questions every variant answered in one process" in md and "1 more" in md
