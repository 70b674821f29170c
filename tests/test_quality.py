"""`xattn-video quality` end to end on small mp4 files the tests write: pairing, metrics against independent
references on the decoded frames, LPIPS present and absent, plots, resume, and the error paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from xattn_video import cli
from xattn_video.pipelines import metrics, quality
from xattn_video.pipelines.video_io import read_video, write_video

skimage_metrics = pytest.importorskip("skimage.metrics")

NAMES = ("0000_a-cat_seed0_0", "A panda playing a guitar-0")  # generate's default naming and VBench's


def clip(seed: int, frames: int = 5, size: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    out = [np.clip(np.stack([128 + 90 * np.sin(xx / 6 + t + seed), 128 + 90 * np.cos(yy / 5 - t),
                             np.full_like(xx, 40.0 * seed % 255)], -1) + rng.normal(0, 6, (size, size, 3)), 0, 255)
           for t in range(frames)]
    return np.stack(out).round().astype(np.uint8)


def noisy(video: np.ndarray, seed: int, sigma: float = 10.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(video + rng.normal(0, sigma, video.shape), 0, 255).round().astype(np.uint8)


@pytest.fixture
def no_lpips(monkeypatch, tmp_path):
    """LPIPS weights absent, whatever this machine has cached."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no_torch_home"))
    monkeypatch.setattr(metrics, "_lpips_package_weights", lambda: (None, "the lpips package (not installed)"))


def make_run(root: Path, names=NAMES, *, variants=("dense", "xattn")) -> Path:
    """A folder laid out as `generate` writes it: one folder of mp4 per variant, sidecars under meta/."""
    for i, name in enumerate(names):
        ref = clip(i)
        write_video(root / variants[0] / f"{name}.mp4", ref, fps=8, crf=10)
        for j, variant in enumerate(variants[1:], 1):
            write_video(root / variant / f"{name}.mp4", noisy(ref, 10 * i + j), fps=8, crf=10)
        (root / "meta" / variants[0]).mkdir(parents=True, exist_ok=True)
        (root / "meta" / variants[0] / f"{name}.json").write_text("{}")
    return root


def test_metrics_of_each_pair_equal_independent_computations(tmp_path, no_lpips, capsys):
    run = make_run(tmp_path / "run")
    out = tmp_path / "report"
    assert cli.main(["quality", str(run / "dense"), str(run / "xattn"), "--output", str(out)]) == 0
    captured = capsys.readouterr()
    assert "LPIPS unavailable" in captured.err and metrics.ALEXNET_FILE in captured.err
    report = json.loads((out / "quality.json").read_text())
    cand = report["candidates"]["xattn"]
    assert cand["compared"] == 2 and cand["failed"] == 0 and report["lpips"]["available"] is False
    psnrs, ssims = [], []
    for name in NAMES:
        r = cand["videos"][name]
        ref, got = read_video(run / "dense" / f"{name}.mp4"), read_video(run / "xattn" / f"{name}.mp4")
        mse = ((ref.astype(np.float64) - got.astype(np.float64)) ** 2).reshape(len(ref), -1).mean(1)
        np.testing.assert_allclose(r["psnr_per_frame"], 10 * np.log10(255**2 / mse), rtol=1e-10)
        assert r["psnr"] == pytest.approx(10 * np.log10(255**2 / mse.mean()), rel=1e-10)
        want_ssim = [skimage_metrics.structural_similarity(a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                                           use_sample_covariance=False, data_range=255)
                     for a, b in zip(ref, got, strict=True)]
        np.testing.assert_allclose(r["ssim_per_frame"], want_ssim, rtol=1e-9)
        assert r["lpips"] is None and r["lpips_per_frame"] is None
        assert (r["frames"], r["height"], r["width"]) == (5, 48, 48)
        psnrs.append(r["psnr"])
        ssims.append(np.mean(want_ssim))
    assert cand["mean"]["psnr"] == pytest.approx(np.mean(psnrs))
    assert cand["mean"]["ssim"] == pytest.approx(np.mean(ssims))
    assert cand["mean"]["lpips"] is None
    md = (out / "quality.md").read_text()
    assert "| xattn | 2 | 0 |" in md and "LPIPS: not available" in md and NAMES[1] in md
    assert "xattn" in captured.out and f"{np.mean(psnrs):.2f}" in captured.out
    import imageio.v2 as imageio

    pngs = [out / "plots" / "psnr_per_frame_candidates.png", out / "plots" / "xattn" / "psnr_per_frame.png",
            *(out / "plots" / "xattn" / f"{n}.png" for n in NAMES)]
    for png in pngs:
        image = imageio.imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, png


def test_lpips_with_local_weights_and_identical_videos(tmp_path):
    from test_metrics import write_random_weights

    weights = tmp_path / "weights"
    weights.mkdir()
    a_path, l_path, _, _ = write_random_weights(weights)
    run = make_run(tmp_path / "run", names=NAMES[:1])
    (run / "same").mkdir()
    (run / "same" / f"{NAMES[0]}.mp4").write_bytes((run / "dense" / f"{NAMES[0]}.mp4").read_bytes())
    args = ["quality", str(run), "--lpips-weights", str(l_path), "--alexnet-weights", str(a_path), "--no-plots"]
    assert cli.main(args) == 0
    report = json.loads((run / "quality" / "quality.json").read_text())
    assert report["lpips"]["available"] is True and set(report["candidates"]) == {"same", "xattn"}
    model = metrics.LPIPS.from_files(a_path, l_path)
    ref = read_video(run / "dense" / f"{NAMES[0]}.mp4")
    want = model.per_frame(ref, read_video(run / "xattn" / f"{NAMES[0]}.mp4"))
    got = report["candidates"]["xattn"]["videos"][NAMES[0]]
    np.testing.assert_allclose(got["lpips_per_frame"], want, rtol=1e-6)
    assert got["lpips"] == pytest.approx(float(np.mean(want)))
    same = report["candidates"]["same"]["videos"][NAMES[0]]
    assert same["psnr"] == "inf" and set(same["psnr_per_frame"]) == {"inf"}
    assert same["ssim"] == pytest.approx(1.0) and same["lpips"] == pytest.approx(0.0, abs=1e-9)
    assert "| same | 1 | 0 | n/a | n/a | n/a | inf | 1.0000 | 0.0000 |" in (run / "quality" / "quality.md").read_text()
    assert not (run / "quality" / "plots").exists()


def _write_sidecars(run: Path, variant: str, density: float, steps: list[list[float]], process: str,
                    device: str = "cuda:0") -> None:
    for i, name in enumerate(NAMES):
        sidecar = {"prompt": name, "attention": {"mode": variant}, "process": process, "device": device,
                   "video": f"{variant}/{name}.mp4",
                   "attention_stats": {"density": density, "sparse_density": density - 0.1 * i},
                   "timing": {"step_s": steps[i], "mean_step_s": sum(steps[i]) / len(steps[i])}}
        (run / "meta" / variant).mkdir(parents=True, exist_ok=True)
        (run / "meta" / variant / f"{name}.json").write_text(json.dumps(sidecar))


def test_density_and_speed_from_generate_sidecars(tmp_path, no_lpips, capsys):
    """Density, sparse-step density (named so in both jobs) and the step speed-up as generate defines it: the
    median step of the reference over the median step of the candidate, every step pooled; not the mean of
    per-video means (a first video's kernel compilation would dominate that)."""
    run = make_run(tmp_path / "run")
    _write_sidecars(run, "dense", 1.0, [[9.0, 0.4, 0.4], [0.4, 0.4, 0.4]], "host:1:a")
    _write_sidecars(run, "xattn", 0.3, [[5.0, 0.2, 0.2], [0.2, 0.2, 0.2]], "host:1:a")
    assert cli.main(["quality", str(run), "--no-plots"]) == 0
    out = capsys.readouterr().out
    report = json.loads((run / "quality" / "quality.json").read_text())["candidates"]["xattn"]
    assert report["generation"]["density"] == pytest.approx(0.3)
    assert report["generation"]["sparse_density"] == pytest.approx(0.25)
    assert report["generation"]["step_speedup"] == pytest.approx(0.4 / 0.2)
    assert report["generation"]["step_speedup_pairs"] == 2 and report["generation"]["step_speedup_note"] is None
    assert report["videos"][NAMES[1]]["generation"]["sparse_density"] == pytest.approx(0.2)
    assert "| xattn | 2 | 0 | 0.300 | 0.250 | 2.00x |" in (run / "quality" / "quality.md").read_text()
    assert "sparse-step density" in out and "2.00x" in out and "not a speed measurement" not in out


def test_timings_of_different_processes_are_not_compared(tmp_path, no_lpips, capsys):
    """Reference and candidate sidecars from different processes (another run, rank or machine): no speed-up,
    and the report says why; pairs from one process still count when others do not. CPU timings carry a note."""
    run = make_run(tmp_path / "run")
    _write_sidecars(run, "dense", 1.0, [[0.4, 0.4], [0.4, 0.4]], "host:1:a")
    _write_sidecars(run, "xattn", 0.3, [[0.03, 0.03], [0.03, 0.03]], "other:7:b")
    assert cli.main(["quality", str(run), "--no-plots"]) == 0
    out = capsys.readouterr().out
    gen = json.loads((run / "quality" / "quality.json").read_text())["candidates"]["xattn"]["generation"]
    assert gen["step_speedup"] is None and "not comparable" in gen["step_speedup_note"]
    assert "13.33x" not in out and "not comparable" in out
    xattn_line = next(line for line in out.splitlines() if line.startswith("xattn "))
    assert " - " in f" {xattn_line} ".replace("n/a", "-")
    # one of the two videos remade by the reference's process: the speed-up covers that pair only
    sidecar = run / "meta" / "xattn" / f"{NAMES[0]}.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "process": "host:1:a", "device": "cpu",
                                   "timing": {"step_s": [0.1, 0.1]}}))
    (run / "quality" / "quality.json").unlink()
    assert cli.main(["quality", str(run), "--no-plots"]) == 0
    out = capsys.readouterr().out
    gen = json.loads((run / "quality" / "quality.json").read_text())["candidates"]["xattn"]["generation"]
    assert gen["step_speedup"] == pytest.approx(4.0) and gen["step_speedup_pairs"] == 1
    assert "over the 1 of 2 videos" in out and "not a speed measurement" in out


def test_rerun_reuses_finished_pairs_and_redoes_changed_files(tmp_path, no_lpips, monkeypatch):
    run = make_run(tmp_path / "run")
    assert cli.main(["quality", str(run)]) == 0
    first = json.loads((run / "quality" / "quality.json").read_text())
    calls = []
    original = quality.compare_frames
    monkeypatch.setattr(quality, "compare_frames", lambda *a, **k: calls.append(1) or original(*a, **k))
    assert cli.main(["quality", str(run)]) == 0
    assert calls == []  # both pairs came from pairs/<candidate>/<name>.json
    again = json.loads((run / "quality" / "quality.json").read_text())
    assert again["candidates"]["xattn"]["videos"] == first["candidates"]["xattn"]["videos"]
    write_video(run / "xattn" / f"{NAMES[0]}.mp4", noisy(clip(0), 99, 30.0), fps=8, crf=10)
    assert cli.main(["quality", str(run)]) == 0
    assert len(calls) == 1
    changed = json.loads((run / "quality" / "quality.json").read_text())["candidates"]["xattn"]["videos"][NAMES[0]]
    assert changed["psnr"] < first["candidates"]["xattn"]["videos"][NAMES[0]]["psnr"]


def test_unmatched_names_are_an_error_unless_only_common(tmp_path, no_lpips, capsys):
    run = make_run(tmp_path / "run")
    write_video(run / "xattn" / "extra-0.mp4", clip(5), fps=8)
    (run / "dense" / f"{NAMES[0]}.mp4").unlink()
    assert cli.main(["quality", str(run / "dense"), str(run / "xattn")]) == 2
    err = capsys.readouterr().err
    assert "unmatched video names" in err and "'extra-0'" in err and repr(NAMES[0]) in err and "--only-common" in err
    assert cli.main(["quality", str(run / "dense"), str(run / "xattn"), "--only-common", "--no-plots"]) == 0
    report = json.loads((run / "quality" / "quality.json").read_text())["candidates"]["xattn"]
    assert report["compared"] == 1 and report["only_in_candidate"] == sorted(["extra-0", NAMES[0]])


def test_bad_pairs_are_reported_and_the_others_go_on(tmp_path, no_lpips, capsys):
    names = ("short", "small", "broken", "fine")
    run = tmp_path / "run"
    for i, name in enumerate(names):
        write_video(run / "dense" / f"{name}.mp4", clip(i), fps=8)
    write_video(run / "xattn" / "short.mp4", clip(0, frames=3), fps=8)
    write_video(run / "xattn" / "small.mp4", clip(1, size=32), fps=8)
    (run / "xattn" / "broken.mp4").write_bytes(b"this is not an mp4")
    write_video(run / "xattn" / "fine.mp4", noisy(clip(3), 1), fps=8)
    assert cli.main(["quality", str(run), "--no-plots"]) == 1
    err = capsys.readouterr().err
    assert "FAILED xattn/short: frame counts differ: reference 5, candidate 3" in err
    assert "FAILED xattn/small: resolutions differ: reference 48x48, candidate 32x32" in err
    assert "FAILED xattn/broken:" in err and "cannot be read" in err
    report = json.loads((run / "quality" / "quality.json").read_text())["candidates"]["xattn"]
    assert report["compared"] == 1 and report["failed"] == 3
    assert "error" in report["videos"]["short"] and report["videos"]["fine"]["psnr"] > 20


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{run}", "--reference", "nope"], "--reference 'nope' is not a variant folder"),
        (["{run}/dense", "{run}/dense"], "is the reference folder itself"),
        (["{run}/dense", "{run}/missing"], "is not a folder"),
        (["{run}/meta", "{run}/xattn"], "holds no video"),
        (["{run}", "--lpips-weights", "{run}/none.pth"], "LPIPS weight file"),
        (["{run}", "--device", "tpu"], "--device 'tpu' is not allowed"),
        (["{run}", "--strip-frames", "-1"], "--strip-frames -1 is not allowed"),
    ],
)
def test_usage_errors_are_one_line(tmp_path, no_lpips, capsys, args, message):
    run = make_run(tmp_path / "run", names=NAMES[:1])
    code = cli.main(["quality", *(a.format(run=run) for a in args)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_strip_frames_spread_over_the_video():
    assert quality.strip_frames(9, 4) == [0, 3, 5, 8]
    assert quality.strip_frames(3, 4) == [0, 1, 2]
    assert quality.strip_frames(129, 1) == [0]


def test_device_auto_is_cpu_without_cuda():
    if not torch.cuda.is_available():
        assert quality.resolve_device("auto") == "cpu"
        with pytest.raises(quality.QualityError, match="no CUDA device"):
            quality.resolve_device("cuda:0")
