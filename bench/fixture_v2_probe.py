"""Does a fixture on a larger token grid, with more layers, have sparser attention? One GPU call (issue 12).

    python bench/fixture_v2_probe.py --out $OUT                  # one H100, under 9 minutes in all

The shipped fixture (16x64x64 px, 32 blocks, 5 layers) caps block selection low: the oracle's top 30% of
blocks keep ~63% of the attention mass, 20.6 dB (docs/quality.md, "Levers"). This trains a variant with
``bench/train_fixture.py`` (default: 16 frames x 128x128 px = 16,384 video tokens, 128 blocks; 4 heads x 32,
3 double + 6 single blocks, 3.3 M parameters; every fourth step at 16x64x64), then with ``bench/levers.py``
(exact float32 block mass, so the oracle is available), in priority order:

1. ``probe`` the variant and the shipped fixture at the variant's size (grid size alone): kept mass, error
   and density of oracle / estimate top-k 0.3 and threshold 0.9 at a few steps of the dense trajectory;
2. ``gen`` the variant at its size, one video at a time with every setting (so a time cut leaves paired
   rows): oracle top-k 0.3, estimate top-k 0.3, oracle threshold 0.9, with 20% dense warmup, PSNR against
   the dense generation (whose time is recorded);
3. ``probe`` both fixtures at the comparison size (16x64x64, the shipped one's): depth alone.

Works in --work: ``fixture_v2/`` (the trained fixture, train_log.json, samples.npz), ``train.log``,
``probe_<name>.json`` / ``.log``, ``gen_v2.json`` / ``.log`` (levers' outputs). Writes under --out three flat
files (the device returns at most 8, two folders deep): ``fixture_v2.tar.gz`` (fixture_v2/ and train.log, right
after training), ``results.tar.gz`` (every JSON and log of --work, rewritten after each stage) and
``summary.json`` (the table's numbers); the table goes to stdout. Every stage stops starting work at the
--budget deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
V2_CONFIG = '{"num_attention_heads": 4, "num_layers": 3, "num_single_layers": 6}'
SELECTIONS = ("otopk:0.3", "xtopk:0.3:8", "oracle:0.9", "xattn:0.9:8")
GEN_SELECTIONS = ("otopk:0.3", "xtopk:0.3:8", "oracle:0.9")


class Tee:
    """Write to a log file and to stdout."""

    def __init__(self, path: Path):
        self.file = path.open("a")

    def write(self, text: str) -> int:
        self.file.write(text)
        sys.__stdout__.write(text)
        return len(text)

    def flush(self) -> None:
        self.file.flush()
        sys.__stdout__.flush()


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict) -> int | None:
    """Run ``cmd``, its output to ``log`` and stdout; killed after ``timeout`` s (returns None then)."""
    print(f"$ {' '.join(cmd)}  [timeout {timeout:.0f} s]", flush=True)
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            for line in proc.stdout:
                f.write(line)
                sys.stdout.write(line)
            proc.wait()
        finally:
            timer.cancel()
    return None if proc.returncode == -9 else proc.returncode


def pack(archive: Path, root: Path, names: list[str]) -> None:
    """tar.gz of ``names`` (files or folders under ``root``), written atomically; training checkpoints (float32
    weights and optimiser state, several times the fixture's size) stay on the machine."""
    tmp = archive.with_name(archive.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for name in names:
            if (root / name).exists():
                tar.add(root / name, arcname=name, filter=lambda info: None if info.name.endswith(".pt") else info)
    os.replace(tmp, archive)


def size_of(text: str) -> tuple[int, int]:
    frames, _, size = text.partition("x")
    return int(frames), int(size)


def probe_rows(path: Path) -> dict:
    """Per selection: mean density, kept mass, relative error over all probed calls; kept mass per layer."""
    if not path.is_file():
        return {}
    runs = json.loads(path.read_text())["runs"]
    recs: dict[str, list] = {}
    for run in runs:
        for r in run["records"]:
            recs.setdefault(r["selection"], []).append(r)
    out = {}
    for sel, rs in recs.items():
        layers = sorted({r["layer"] for r in rs})
        out[sel] = {
            "calls": len(rs),
            "density": float(np.mean([r["density"] for r in rs])),
            "kept_mass": float(np.mean([r["kept_mass"] for r in rs])),
            "rel_err": float(np.mean([r["rel_err"] for r in rs])),
            "kept_mass_per_layer": [float(np.mean([r["kept_mass"] for r in rs if r["layer"] == la])) for la in layers],
            "density_per_layer": [float(np.mean([r["density"] for r in rs if r["layer"] == la])) for la in layers],
        }
    return out


def gen_rows(path: Path) -> tuple[dict, dict]:
    """Per (selection, warmup): videos merged over the one-video runs; and the dense seconds per video."""
    if not path.is_file():
        return {}, {}
    results = json.loads(path.read_text())
    rows: dict[str, list] = {}
    for run in results["runs"]:
        rows.setdefault(f"{run['order']}@{run['selection']}@{run['warmup']}", []).extend(run["videos"])
    out = {}
    for key, vids in rows.items():
        if not vids:
            continue
        ps = [v["psnr"] for v in vids]
        out[key] = {
            "videos": len(vids),
            "psnr_mean": float(np.mean(ps)),
            "psnr_std": float(np.std(ps)),
            "psnr_min": float(np.min(ps)),
            "psnr_max": float(np.max(ps)),
            "ssim": float(np.mean([v["ssim"] for v in vids])),
            "density": float(np.mean([v["density"] for v in vids])),
            "kept_mass": float(np.mean([v["kept_mass"] for v in vids])),
            "rel_err": float(np.mean([v["rel_err"] for v in vids])),
            "seconds_per_video": float(np.mean([v["seconds"] for v in vids])),
        }
    return out, results.get("dense_seconds", {})


def table(out: Path, probes: list[tuple[str, str, int, int]], summary: dict) -> None:
    train = summary.get("train", {})
    if train:
        print(
            f"\ntrain: {train.get('parameters', 0) / 1e6:.2f} M params, {train.get('total_steps')} steps in "
            f"{train.get('train_seconds', 0):.0f} s; last loss {train.get('last_loss')}; validation {train.get('val')}"
        )
    print("\nprobe (dense trajectory; kept mass | rel err; density for thresholds; per-layer kept mass at otopk:0.3)")
    print(
        f"{'fixture@size':<16} {'tokens':>6} {'blocks':>6}  {'otopk:0.3':>13}  {'xtopk:0.3:8':>13}  "
        f"{'oracle:0.9 d|err':>16}  {'xattn:0.9:8 d|err':>17}  otopk kept/layer"
    )
    for name, _, frames, size in probes:
        rows = summary["probe"].get(name, {})
        if not rows:
            print(f"{name:<16} (no result)")
            continue
        tokens = frames * (size // 4) ** 2
        cell = {}
        for sel in SELECTIONS:
            r = rows.get(sel)
            key = "density" if sel.startswith(("oracle", "xattn")) else "kept_mass"
            cell[sel] = f"{r[key]:.3f} | {r['rel_err']:.3f}" if r else "-"
        layers = " ".join(f"{m:.2f}" for m in rows.get("otopk:0.3", {}).get("kept_mass_per_layer", []))
        print(
            f"{name:<16} {tokens:>6} {math.ceil(tokens / 128):>6}  {cell['otopk:0.3']:>13}  {cell['xtopk:0.3:8']:>13}  "
            f"{cell['oracle:0.9']:>16}  {cell['xattn:0.9:8']:>17}  {layers}"
        )
    print("\ngen (variant at its size; PSNR vs dense, same caption and seed)")
    print(f"{'setting':<26} {'n':>2} {'PSNR mean (std)':>16} {'min..max':>13} {'SSIM':>6} {'density':>7} {'kept':>6}")
    for key, r in summary.get("gen", {}).items():
        print(
            f"{key:<26} {r['videos']:>2} {r['psnr_mean']:>9.2f} ({r['psnr_std']:.2f}) "
            f"{r['psnr_min']:>6.2f}..{r['psnr_max']:<6.2f} {r['ssim']:>6.3f} {r['density']:>7.3f} "
            f"{r['kept_mass']:>6.3f}  [{r['seconds_per_video']:.1f} s/video]"
        )
    dense = summary.get("dense_seconds", {})
    if dense:
        print("dense generation seconds per video: " + ", ".join(f"{k} {v:.2f}" for k, v in dense.items()))
    print(f"(summary.json, results.tar.gz, fixture_v2.tar.gz in {out})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="results (three flat files)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "fixture_v2_work")
    parser.add_argument("--budget", type=float, default=520.0, help="seconds for everything (stages stop by then)")
    parser.add_argument("--train-seconds", type=float, default=240.0)
    parser.add_argument("--config-json", default=V2_CONFIG)
    parser.add_argument("--size", default="16x128", help="variant's main size FRAMESxPIXELS")
    parser.add_argument("--compare-size", default="16x64", help="its small training size and the shipped one's")
    parser.add_argument("--batch", type=int, default=6, help="clips per main-size step (4x at the small size)")
    parser.add_argument("--warmup-steps", type=int, default=100, help="training LR warmup steps")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--dense-warmup", type=int, default=4, help="dense sampling steps first (20%% of 20)")
    parser.add_argument("--videos", type=int, default=8, help="gen: captions 0..N-1, seed 0")
    parser.add_argument("--probe-videos", nargs="+", default=["0:0", "3:0"])
    parser.add_argument("--probe-steps", type=int, nargs="+", default=[4, 10, 16])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--skip-train", action="store_true", help="reuse <out>/fixture_v2/fixture_model")
    args = parser.parse_args(argv)

    t_start = time.perf_counter()
    deadline = t_start + args.budget
    left = lambda: deadline - time.perf_counter()  # noqa: E731
    out, work = args.out, args.work
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    for stale in [*work.glob("probe_*"), *work.glob("gen_v2*"), *work.glob("*.log")]:  # levers appends to its JSON
        stale.unlink()
    frames, size = size_of(args.size)
    cframes, csize = size_of(args.compare_size)
    v2_dir = work / "fixture_v2"
    v2_model = v2_dir / "fixture_model"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), str(ROOT)) if p)
    summary: dict = {"args": vars(args) | {"out": str(out), "work": str(work)}, "probe": {}, "gen": {}}

    def save_summary() -> None:
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        logs = sorted(p.name for p in work.iterdir() if p.suffix in (".json", ".log"))
        pack(out / "results.tar.gz", work, logs)

    # 1. train (a subprocess: a hard time limit, its own GPU memory)
    if not args.skip_train:
        cmd = [sys.executable, str(ROOT / "bench" / "train_fixture.py"), "--out", str(v2_dir)]
        cmd += ["--seconds", str(args.train_seconds), "--config-json", args.config_json, "--batch", str(args.batch)]
        cmd += ["--frames", str(frames), "--size", str(size), "--small-frames", str(cframes)]
        cmd += ["--small-size", str(csize), "--warmup", str(args.warmup_steps), "--samples", "2"]
        cmd += ["--save-every", "60", "--device", args.device]
        rc = run_logged(cmd, work / "train.log", min(args.train_seconds + 120, left() - 30), env)
        print(f"train exit {rc} at {time.perf_counter() - t_start:.0f} s", flush=True)
        pack(out / "fixture_v2.tar.gz", work, ["fixture_v2", "train.log"])
    log_path = v2_dir / "train_log.json"
    if log_path.is_file():
        log = json.loads(log_path.read_text())
        steps = log["steps"]
        summary["train"] = {
            "parameters": log["parameters"],
            "total_steps": log.get("total_steps", steps[-1]["step"] if steps else 0),
            "train_seconds": log.get("train_seconds", steps[-1]["seconds"] if steps else 0),
            "last_loss": {s["size"]: round(s["loss"], 4) for s in steps[-8:]},
            "val": {k: round(v, 4) for k, v in log["validation"][-1].items()} if log["validation"] else None,
            "transformer_config": log.get("transformer_config"),
        }
        save_summary()
    have_v2 = (v2_model / "transformer" / "config.json").is_file()
    if not have_v2:
        print("no trained variant fixture: only the shipped one is probed", flush=True)

    # 2. levers stages in this process (no repeated start-up); each stops starting work at the deadline
    sys.path.append(str(ROOT))
    sys.path.append(str(ROOT / "bench"))
    import levers

    common = ["--device", args.device, "--dtype", args.dtype, "--steps", str(args.steps)]

    def lever(name: str, argv: list[str]) -> None:
        if left() < 5:
            print(f"skipped (time): {name}", flush=True)
            return
        tee = Tee(work / f"{name}.log")
        with contextlib.closing(tee.file), contextlib.redirect_stdout(tee):
            print(f"== {name} [{left():.0f} s left]: levers {' '.join(argv)}", flush=True)
            try:
                levers.main(argv + common + ["--max-seconds", str(max(1.0, left() - 20))])
            except Exception:  # a failed stage must not cost the others
                traceback.print_exc(file=sys.stdout)

    def probe(name: str, fixture: Path | None, f: int, s: int) -> None:
        argv = ["probe", "--video-list", *args.probe_videos, "--orders", "raster", "--selections", *SELECTIONS]
        argv += ["--probe-steps", *map(str, args.probe_steps), "--frames", str(f), "--size", str(s)]
        stem = "probe_" + name.replace("@", "_")
        argv += ["--out", str(work / f"{stem}.json")] + (["--fixture", str(fixture)] if fixture else [])
        lever(stem, argv)
        summary["probe"][name] = probe_rows(work / f"{stem}.json")
        save_summary()

    probes = [
        (f"v2@{args.size}", str(v2_model), frames, size),
        (f"shipped@{args.size}", "", frames, size),
        (f"v2@{args.compare_size}", str(v2_model), cframes, csize),
        (f"shipped@{args.compare_size}", "", cframes, csize),
    ]
    for name, fx, f, s in probes[:2]:  # the variant, and the shipped fixture at its size: grid size alone
        if have_v2 or not fx:
            probe(name, Path(fx) if fx else None, f, s)

    gen_out = work / "gen_v2.json"
    settings = [f"raster@{sel}@{args.dense_warmup}" for sel in GEN_SELECTIONS]
    last = 45.0  # seconds of one video's gen (every setting); measured after the first
    for ci in range(args.videos if have_v2 else 0):  # one video at a time, every setting: paired rows
        argv = ["gen", "--video-list", f"{ci}:0", "--settings", *settings, "--fixture", str(v2_model)]
        argv += ["--frames", str(frames), "--size", str(size), "--out", str(gen_out)]
        if left() < last + 60:  # keep about a minute for the cheap probes below
            print(f"skipped (time): gen from video {ci}", flush=True)
            break
        t0 = time.perf_counter()
        lever("gen_v2", argv)
        last = time.perf_counter() - t0
        summary["gen"], summary["dense_seconds"] = gen_rows(gen_out)
        save_summary()

    for name, fx, f, s in probes[2:]:  # both at the comparison size: depth alone
        if have_v2 or not fx:
            probe(name, Path(fx) if fx else None, f, s)

    summary["seconds"] = time.perf_counter() - t_start
    save_summary()
    table(out, probes, summary)
    print(f"done in {summary['seconds']:.0f} s", flush=True)
    return 0 if have_v2 else 1


if __name__ == "__main__":
    raise SystemExit(main())
