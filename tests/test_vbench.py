"""`xattn-video vbench` without VBench installed: dimension names, the missing-weights listing, the install
hint, modes and prompts, the summary of VBench-format results, and the whole driver path against a small
stand-in `vbench` package written by the test (VBench itself cannot be installed beside this project)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from xattn_video import cli
from xattn_video.pipelines import vbench_eval as vb

FAKE_VBENCH = '''
"""Test stand-in with VBench 0.1.5's interface: VBench(device, full_info_dir, output_path).evaluate(...) writes
<output>/<name>_eval_results.json ({dimension: [score, [{video_path, video_results}]]}) and <name>_full_info.json.
The score is the number of videos, so the test can check which videos reached it."""
import json, os

CALLS = os.path.join(os.path.dirname(__file__), "calls.jsonl")


class VBench:
    def __init__(self, device, full_info_dir, output_path):
        self.device, self.full_info_dir, self.output_path = str(device), full_info_dir, output_path

    def evaluate(self, videos_path, name, prompt_list=[], dimension_list=None, local=False, read_frame=False,
                 mode="vbench_standard", **kwargs):
        videos = sorted(f for f in os.listdir(videos_path) if f.endswith(".mp4"))
        with open(CALLS, "a") as f:
            f.write(json.dumps({"name": name, "dims": dimension_list, "local": local, "mode": mode,
                                "prompts": prompt_list, "device": self.device, "kwargs": kwargs,
                                "cache": os.environ.get("VBENCH_CACHE_DIR"), "videos": videos}) + "\\n")
        info = [{"prompt_en": prompt_list.get(v, v), "dimension": dimension_list,
                 "video_list": [os.path.join(videos_path, v)]} for v in videos]
        with open(os.path.join(self.output_path, name + "_full_info.json"), "w") as f:
            json.dump(info, f)
        results = {d: [float(len(videos)), [{"video_path": os.path.join(videos_path, v), "video_results": 1.0}
                                            for v in videos]] for d in dimension_list}
        with open(os.path.join(self.output_path, name + "_eval_results.json"), "w") as f:
            json.dump(results, f)
'''


@pytest.fixture
def fake_vbench(tmp_path, monkeypatch):
    """A `vbench` package importable by this interpreter's subprocesses (through PYTHONPATH)."""
    root = tmp_path / "site"
    (root / "vbench").mkdir(parents=True)
    (root / "vbench" / "__init__.py").write_text(textwrap.dedent(FAKE_VBENCH))
    suite = [{"prompt_en": "a dog runs", "dimension": ["subject_consistency"]},
             {"prompt_en": "a red car", "dimension": ["color"]}]
    (root / "vbench" / "VBench_full_info.json").write_text(json.dumps(suite))
    monkeypatch.setenv("PYTHONPATH", str(root))
    return root / "vbench"


def make_run(root: Path, names: list[str], prompts: list[str] | None = None) -> Path:
    """A generate run: variant folders of (placeholder) mp4 files and sidecars with each video's prompt."""
    for variant in ("dense", "xattn"):
        for i, name in enumerate(names):
            (root / variant).mkdir(parents=True, exist_ok=True)
            (root / variant / f"{name}.mp4").write_bytes(b"\0" * 16)
            if prompts is not None:
                (root / "meta" / variant).mkdir(parents=True, exist_ok=True)
                (root / "meta" / variant / f"{name}.json").write_text(json.dumps({"prompt": prompts[i]}))
    return root


def fill_cache(cache: Path, dimensions) -> None:
    for dim in dimensions:
        for rel in vb.WEIGHTS[dim]:
            path = cache / rel
            if rel.endswith("/"):
                path.mkdir(parents=True, exist_ok=True)
                (path / "hubconf.py").write_text("# stand-in")
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"weights")


# ---------------------------------------------------------------------------------------------- dimensions


def test_dimensions_groups_order_and_repeats():
    assert vb.parse_dimensions(["quality"]) == list(vb.DIMENSIONS[:7])
    assert vb.parse_dimensions(["imaging_quality,subject_consistency", "subject_consistency"]) == [
        "subject_consistency", "imaging_quality"]
    assert vb.parse_dimensions(["all"]) == list(vb.DIMENSIONS) and len(vb.DIMENSIONS) == 16
    assert set(vb.GROUPS["quality"]) | set(vb.GROUPS["semantic"]) == set(vb.DIMENSIONS)
    assert set(vb.WEIGHTS) == set(vb.DIMENSIONS)


def test_unknown_dimension_is_a_one_line_error(tmp_path, capsys):
    run = make_run(tmp_path / "run", ["a-0"])
    assert cli.main(["vbench", str(run), "--dimensions", "subject_consistancy"]) == 2
    err = capsys.readouterr().err
    assert "--dimensions 'subject_consistancy' is not allowed (did you mean subject_consistency?)" in err
    assert "dynamic_degree" in err and "quality" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["vbench", "--dimensions", "quality", str(run)]) == 2
    assert "is a folder, not a dimension: put the video folders before --dimensions" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- weights


def test_missing_weights_are_listed_with_their_paths(tmp_path, capsys, fake_vbench):
    run = make_run(tmp_path / "run", ["0000_a-dog_seed0_0"])
    cache = tmp_path / "cache"
    fill_cache(cache, ["motion_smoothness"])
    (cache / "clip_model").mkdir(parents=True)
    (cache / "clip_model" / "ViT-L-14.pt").write_bytes(b"")  # an empty file is not a checkpoint
    code = cli.main(["vbench", str(run), "--dimensions", "quality", "--cache-dir", str(cache)])
    err = capsys.readouterr().err
    assert code == 1
    missing = {
        "dino_model/facebookresearch_dino_main/": "subject_consistency",
        "dino_model/dino_vitbase16_pretrain.pth": "subject_consistency",
        "clip_model/ViT-B-32.pt": "background_consistency",
        "raft_model/models/raft-things.pth": "dynamic_degree",
        "clip_model/ViT-L-14.pt": "aesthetic_quality",
        "aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth": "aesthetic_quality",
        "pyiqa_model/musiq_spaq_ckpt-358bb6af.pth": "imaging_quality",
    }
    for rel, dim in missing.items():
        assert f"{cache / rel}" in err and dim in err, rel
    assert "amt-s.pth" not in err  # present
    assert "7 weight paths missing" in err and not (tmp_path / "run" / "vbench").exists()


def test_cache_dir_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("VBENCH_CACHE_DIR", str(tmp_path / "c"))
    assert vb.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("VBENCH_CACHE_DIR")
    assert vb.cache_dir() == Path.home() / ".cache" / "vbench"
    assert vb.missing_weights(["temporal_flickering"], tmp_path / "nowhere") == {}


def test_not_installed_gives_the_install_hint(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "empty"))
    run = make_run(tmp_path / "run", ["a dog runs-0"])
    code = cli.main(["vbench", str(run), "--dimensions", "temporal_flickering", "--cache-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "VBench is not importable by" in err and "--vbench-python" in err
    assert "transformers==4.33.2" in err and "vbench is not installed" in err
    assert cli.main(["vbench", str(run), "--dimensions", "temporal_flickering", "--vbench-python",
                     str(tmp_path / "no-python")]) == 2
    assert "cannot be run" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ modes, prompts


def test_modes_and_prompt_sources(tmp_path):
    full_info = tmp_path / "full_info.json"
    full_info.write_text(json.dumps([{"prompt_en": "a dog runs", "dimension": ["scene"]}]))
    suite = make_run(tmp_path / "suite", ["a dog runs-0", "a dog runs-1"])
    jobs = vb.plan([suite / "xattn"], ["scene"], mode="auto", output_root=None, prompt_file=None, full_info=full_info)
    assert jobs[0].mode == "vbench_standard" and jobs[0].output == suite / "vbench" / "xattn"
    assert jobs[0].coverage == {"scene": 2} and jobs[0].short_prompts == 1  # 2 of the 5 videos VBench expects
    with pytest.raises(vb.VBenchError, match="is for the suite prompts of subject_consistency"):
        vb.plan([suite / "xattn"], ["subject_consistency", "scene"], mode="auto", output_root=None, prompt_file=None,
                full_info=full_info)

    own = make_run(tmp_path / "own", ["0000_cat_seed0_0", "0001_dog_seed0_0"], ["A cat.", "A dog."])
    jobs = vb.plan([own / "dense"], ["subject_consistency"], mode="auto", output_root=tmp_path / "o",
                   prompt_file=None, full_info=full_info)
    assert jobs[0].mode == "custom_input" and jobs[0].output == tmp_path / "o" / "dense"
    assert jobs[0].prompts == {"0000_cat_seed0_0.mp4": "A cat.", "0001_dog_seed0_0.mp4": "A dog."}
    assert "sidecars" in jobs[0].prompts_from

    not_suite = make_run(tmp_path / "ns", ["a cat sleeps-0"])  # VBench-style name, prompt not in the suite
    jobs = vb.plan([not_suite / "dense"], ["subject_consistency"], mode="auto", output_root=None, prompt_file=None,
                   full_info=full_info)
    assert jobs[0].mode == "custom_input" and jobs[0].prompts == {"a cat sleeps-0.mp4": "a cat sleeps"}

    given = tmp_path / "prompts.json"
    given.write_text(json.dumps({"0000_cat_seed0_0.mp4": "cat", "0001_dog_seed0_0.mp4": "dog"}))
    jobs = vb.plan([own / "dense"], ["subject_consistency"], mode="custom", output_root=None, prompt_file=given,
                   full_info=None)
    assert jobs[0].prompts == {"0000_cat_seed0_0.mp4": "cat", "0001_dog_seed0_0.mp4": "dog"}

    with pytest.raises(vb.VBenchError, match="cannot score color, scene"):
        vb.plan([own / "dense"], ["color", "scene"], mode="auto", output_root=None, prompt_file=None, full_info=None)
    with pytest.raises(vb.VBenchError, match=r"--mode standard needs videos named \{prompt\}-\{index\}.mp4"):
        vb.plan([own / "dense"], ["scene"], mode="standard", output_root=None, prompt_file=None, full_info=None)
    given.write_text(json.dumps({"0000_cat_seed0_0.mp4": "cat"}))
    with pytest.raises(vb.VBenchError, match="has no prompt for 0001_dog_seed0_0.mp4"):
        vb.plan([own / "dense"], ["subject_consistency"], mode="custom", output_root=None, prompt_file=given,
                full_info=None)


# ------------------------------------------------------------------------------------------------- summary


def test_summary_of_results_in_vbench_format(tmp_path):
    root = tmp_path / "vbench"
    for variant, scores in {"dense": {"subject_consistency": 0.95, "imaging_quality": 0.61},
                            "xattn": {"subject_consistency": 0.93, "imaging_quality": 0.64}}.items():
        (root / variant).mkdir(parents=True)
        results = {dim: [s, [{"video_path": f"/v/{i}.mp4", "video_results": s} for i in range(5)]]
                   for dim, s in scores.items()}
        (root / variant / "eval_results.json").write_text(json.dumps(results))
    json_path, md_path = vb.write_summary(root)
    table = json.loads(json_path.read_text())
    assert table["xattn"]["imaging_quality"] == {"score": 0.64, "videos": 5}
    md = md_path.read_text()
    assert "| dimension | dense | xattn | xattn - dense |" in md
    assert "| subject_consistency | 0.9500 | 0.9300 | -0.0200 |" in md
    assert "| imaging_quality | 0.6100 | 0.6400 | +0.0300 |" in md
    assert md.index("subject_consistency") < md.index("imaging_quality")  # VBench's order


# ------------------------------------------------------------------------------------------------ the run


def test_end_to_end_through_the_driver_with_resume(tmp_path, capsys, fake_vbench):
    run = make_run(tmp_path / "run", ["0000_cat_seed0_0", "0001_dog_seed0_0"], ["A cat.", "A dog."])
    cache = tmp_path / "cache"
    fill_cache(cache, ["dynamic_degree"])
    args = ["vbench", str(run), "--dimensions", "dynamic_degree,temporal_flickering", "--cache-dir", str(cache),
            "--vbench-python", sys.executable, "--device", "cpu"]
    assert cli.main([*args, "--check"]) == 0
    assert "ready: 2 folders x 2 dimensions" in capsys.readouterr().out
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    calls = [json.loads(line) for line in (fake_vbench / "calls.jsonl").read_text().splitlines()]
    assert [(c["name"], c["dims"]) for c in calls] == [("temporal_flickering", ["temporal_flickering"]),
                                                        ("dynamic_degree", ["dynamic_degree"])] * 2
    assert all(c["local"] is True and c["mode"] == "custom_input" and c["cache"] == str(cache) for c in calls)
    assert all(c["device"] == "cpu" and c["kwargs"] == {"imaging_quality_preprocessing_mode": "longer"}
               for c in calls)
    assert calls[0]["prompts"] == {"0000_cat_seed0_0.mp4": "A cat.", "0001_dog_seed0_0.mp4": "A dog."}
    for variant in ("dense", "xattn"):
        folder = run / "vbench" / variant
        merged = json.loads((folder / "eval_results.json").read_text())
        assert set(merged) == {"dynamic_degree", "temporal_flickering"} and merged["dynamic_degree"][0] == 2.0
        assert (folder / "dynamic_degree_full_info.json").is_file()
    assert "| dynamic_degree | 2.0000 | 2.0000 | +0.0000 |" in out
    assert (run / "vbench" / "summary.md").is_file()
    # a rerun evaluates nothing again; a results file left half written is redone
    (run / "vbench" / "xattn" / "dynamic_degree_eval_results.json").write_text('{"dynamic_deg')
    assert cli.main(args) == 0
    calls = (fake_vbench / "calls.jsonl").read_text().splitlines()
    assert len(calls) == 5 and json.loads(calls[-1])["name"] == "dynamic_degree"


def test_a_failed_vbench_run_is_reported(tmp_path, capsys, fake_vbench):
    (fake_vbench / "__init__.py").write_text("class VBench:\n    def __init__(self, *a):\n        raise RuntimeError("
                                             "'no GPU')\n")
    run = make_run(tmp_path / "run", ["a-0"])
    code = cli.main(["vbench", str(run / "dense"), "--dimensions", "temporal_flickering", "--cache-dir",
                     str(tmp_path), "--vbench-python", sys.executable])
    captured = capsys.readouterr()
    assert code == 1 and "FAILED VBench on" in captured.err and "no results for temporal_flickering" in captured.err
