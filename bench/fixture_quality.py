"""The paper's quality table on the trained video fixture: XAttention generations against dense ones.

    python bench/fixture_quality.py --out docs/quality          # one GPU, a few minutes; writes docs/quality.md
    python bench/fixture_quality.py --out docs/quality --render-only   # rewrite the Markdown from the JSON

For every prompt and seed, a dense generation (stock diffusers attention) is the reference; each setting
(token order x threshold x stride x dense warmup) regenerates the same videos with
``xattn_video.enable(transformer, ...)`` and is scored per video: PSNR (whole video) and SSIM (mean over
frames) against the reference on uint8 frames (``xattn_video.pipelines.metrics``), and the block density of the
sparse steps (kept / all blocks over the sparse steps' layers and heads, from the processor's statistics).
Two floor rows: the dense generation rerun (determinism) and XAttention at threshold 1.0 (every block kept:
the sparse kernel's rounding alone). LPIPS is not measured: it needs AlexNet and LPIPS weights, which cannot
be downloaded here or on the GPU machine.

Results go to ``<out>/quality.json`` after every setting (a rerun resumes: finished settings are kept), the
table to ``<out>.md`` (``docs/quality.md``), an attention report (density and error per step, layer and head,
``xattn_video.pipelines.attn_report``'s pictures) of one generation per token order to
``<out>/attn_report_<order>/``, and a few videos to ``<out>/videos.npz`` for frame strips. ``--max-seconds``
stops before a time limit with every finished setting saved.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: kernels/ must not shadow pip "kernels"

import xattn_video  # noqa: E402
from xattn_video.testing.fixture import generate, load_fixture  # noqa: E402
from xattn_video.testing.procedural import sample_specs  # noqa: E402

PROMPT_SEED = 77_000  # held-out captions (training draws specs from its own generator's seeds)
SCHEMA = 1
# docs/quality.md keeps what follows this line (the levers research, bench/levers.py) across reruns
KEPT_MARKER = "<!-- kept across reruns of bench/fixture_quality.py: -->"


def to_u8(videos: torch.Tensor) -> np.ndarray:
    return (videos.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def score(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """PSNR of the whole video and mean SSIM over frames, uint8 [T, H, W, 3] against the reference."""
    from xattn_video.pipelines.metrics import mse_per_frame, ssim_per_frame, video_psnr

    return {
        "psnr": video_psnr(mse_per_frame(reference, candidate)),
        "ssim": float(np.mean(ssim_per_frame(reference, candidate))),
    }


def sparse_density(stats: dict) -> dict:
    """Block density of the sparse steps and of all steps (dense steps count 1) of the last generation."""
    steps = stats["generations"][-1]["steps"]
    sparse = [s for s in steps if s["mode"] != "dense"]
    kept, total = sum(s["kept_blocks"] for s in sparse), sum(s["total_blocks"] for s in sparse)
    all_kept, all_total = sum(s["kept_blocks"] for s in steps), sum(s["total_blocks"] for s in steps)
    return {
        "sparse_density": kept / total if total else None,
        "density": all_kept / all_total,
        "sparse_steps": len(sparse),
        "steps": len(steps),
    }


def summary(values: list[float]) -> dict:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if arr.size == 0:
        return {"mean": None, "std": None, "min": None, "max": None}
    finite = arr[np.isfinite(arr)]
    return {
        "mean": float(arr.mean())
        if np.isfinite(arr).all()
        else (float("inf") if finite.size == 0 else float(arr.mean())),
        "std": float(finite.std()) if finite.size else None,
        "min": float(arr.min()),
        "max": float(arr.max()),
    }


def settings_list(args) -> list[dict]:
    """Floor rows first, then order x threshold x stride x warmup (raster before tiled), then the fixed-density
    (top-k) rows: order x density x stride x warmup."""
    rows = (
        []
        if args.no_floor
        else [
            {"name": "dense rerun", "kind": "dense"},
            {
                "name": "xattn t=1.0 s=8 w=0 raster",
                "kind": "xattn",
                "threshold": 1.0,
                "stride": 8,
                "warmup": 0.0,
                "order": "raster",
            },
        ]
    )
    for order, threshold, stride, warmup in itertools.product(args.orders, args.thresholds, args.strides, args.warmups):
        rows.append(
            {
                "name": f"xattn t={threshold} s={stride} w={warmup:.0%} {order}",
                "kind": "xattn",
                "threshold": threshold,
                "stride": stride,
                "warmup": warmup,
                "order": order,
            }
        )
    for order, density, stride, warmup in itertools.product(args.orders, args.densities, args.strides, args.warmups):
        rows.append(
            {
                "name": f"xattn top-k d={density} s={stride} w={warmup:.0%} {order}",
                "kind": "xattn",
                "threshold": None,
                "density": density,
                "stride": stride,
                "warmup": warmup,
                "order": order,
            }
        )
    # under a time limit the goal's rows come first: every raster row, then tiled with the longest warmup
    longest = max(args.warmups)
    return sorted(rows, key=lambda r: r.get("order") == "tiled" and r["warmup"] != longest)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def attention_report(fixture, args, caption: str, seed: int, order: str, folder: Path) -> dict:
    """One generation with the recording processor (density and error vs dense per step, layer, head)."""
    from xattn_video.pipelines.attn_report import ReportProcessor, markdown, summarize, write_plots

    transformer = fixture.transformer
    previous = dict(transformer.attn_processors)
    warmup = round(args.report_warmup * args.steps)
    proc = ReportProcessor(
        threshold=args.report_threshold,
        stride=args.report_stride,
        block_size=args.block_size,
        warmup_steps=warmup,
        token_order=order,
    )
    try:
        transformer.set_attn_processor(proc)
        proc.attach(transformer)
        generate(
            fixture,
            [caption],
            [seed],
            frames=args.frames,
            height=args.size,
            width=args.size,
            steps=args.steps,
            guidance_scale=args.guidance,
        )
    finally:
        proc.detach()
        transformer.set_attn_processor(previous)
    steps = [s for s in proc.report_steps() if s["generation"] == 0]
    report = {
        "variant": {
            "name": f"fixture {order}",
            "threshold": args.report_threshold,
            "stride": args.report_stride,
            "block_size": args.block_size,
            "warmup_steps": warmup,
            "token_order": order,
        },
        "prompt": caption,
        "seed": seed,
        "video": {"height": args.size, "width": args.size, "frames": args.frames, "steps": args.steps},
        "num_layers": len(proc.layer_kinds),
        "num_heads": max((len(row) for s in steps for row in s["density"] if row), default=0),
        "layer_kinds": [proc.layer_kinds[i] for i in sorted(proc.layer_kinds)],
        "summary": summarize(steps),
        "steps": steps,
    }
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "attn_report.json", report)
    (folder / "attn_report.md").write_text(markdown(report))
    write_plots(report, folder)
    return report


def fmt(stat: dict, key: str, spec: str) -> str:
    value = stat.get(key)
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else format(value, spec)


def comparison(data: dict) -> list[str]:
    """Raster vs tiled at equal settings, and where the rows stand against the issue's goal."""
    rows = {
        (
            r["setting"].get("order"),
            r["setting"].get("threshold"),
            r["setting"].get("stride"),
            r["setting"].get("warmup"),
            r["setting"].get("density"),
        ): r
        for r in data["rows"]
        if r["setting"]["kind"] == "xattn"
    }
    lines = [
        "",
        "## Raster vs tiled token order (equal threshold, stride and warmup)",
        "",
        "| selection | stride | warmup | sparse density raster / tiled | PSNR dB raster / tiled | "
        "SSIM raster / tiled |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    pairs = 0
    for (order, threshold, stride, warmup, density), tiled in rows.items():
        raster = rows.get(("raster", threshold, stride, warmup, density))
        if order != "tiled" or raster is None:
            continue
        pairs += 1
        a, b = raster["summary"], tiled["summary"]
        lines.append(
            f"| {threshold if density is None else f'top-k {density}'} | {stride} | {warmup:.0%} | "
            f"{fmt(a['sparse_density'], 'mean', '.3f')} / "
            f"{fmt(b['sparse_density'], 'mean', '.3f')} | {fmt(a['psnr'], 'mean', '.2f')} / "
            f"{fmt(b['psnr'], 'mean', '.2f')} | {fmt(a['ssim'], 'mean', '.4f')} / "
            f"{fmt(b['ssim'], 'mean', '.4f')} |"
        )
    if not pairs:
        lines.append("| - | - | - | no tiled row was run | - | - |")
    longest = max((k[3] for k in rows), default=0.0)
    goal = [r for k, r in rows.items() if k[3] == longest and (r["summary"]["sparse_density"]["mean"] or 1) <= 0.30]
    best = max(
        (r for k, r in rows.items() if k[3] == longest), key=lambda r: r["summary"]["psnr"]["mean"], default=None
    )
    lines += ["", "## The issue's goal: PSNR >= 30 dB at sparse-step density <= 0.30 with 20% dense warmup", ""]
    if goal:
        reached = any(r["summary"]["psnr"]["mean"] >= 30.0 for r in goal)
        lines.append(
            ("Reached. " if reached else "Not reached: ")
            + "rows at density <= 0.30: "
            + ", ".join(f"{r['setting']['name']} ({r['summary']['psnr']['mean']:.2f} dB)" for r in goal)
            + "."
        )
    else:
        lowest = min((r["summary"]["sparse_density"]["mean"] for k, r in rows.items() if k[3] == longest), default=None)
        lines.append(
            f"Not reached: no row with {longest:.0%} warmup gets down to density 0.30 (lowest: {lowest:.3f})."
            if lowest is not None
            else "Not reached: no row was run."
        )
    if best is not None:
        b = best["summary"]
        lines.append(
            f"Best PSNR with {longest:.0%} warmup: {best['setting']['name']}, {b['psnr']['mean']:.2f} dB at "
            f"sparse density {b['sparse_density']['mean']:.3f}."
        )
    return lines


def fixture_text(meta: dict) -> str:
    if "fixture" not in meta:
        return "the shipped fixture (`xattn_video/testing/fixture_model`, see [fixture.md](fixture.md))"
    return f"the {meta['family']} fixture in `{meta['fixture']}` (see [fixture.md](fixture.md))"


def text_tokens(meta: dict) -> str:
    if meta.get("family", "hunyuan") == "hunyuan":
        return "+ up to 24 text tokens in the joint attention"
    return (
        f"in self-attention (the xattn backend, min_len {meta['min_len']}); the 24 caption tokens enter by "
        "cross-attention, which stays native"
    )


def markdown(data: dict) -> str:
    meta = data["meta"]
    lines = [
        "# XAttention quality on the trained video fixture",
        "",
        f"Made by `python bench/fixture_quality.py` on {meta['device']} ({meta['dtype']}): {fixture_text(meta)}, "
        f"{meta['frames']} frames of {meta['size']}x{meta['size']} px = {meta['video_tokens']} video tokens "
        f"({meta['video_tokens'] // meta['block_size']} blocks of {meta['block_size']}) {text_tokens(meta)}, "
        f"{meta['steps']} Euler steps, CFG "
        f"{meta['guidance']}; {len(meta['captions'])} held-out captions x seeds {meta['seeds']} = "
        f"{meta['videos']} videos per row. Reference: the dense generation (stock diffusers attention) with the "
        "same caption and seed.",
        "",
        "- PSNR: of the whole video (MSE over all frames), uint8 frames; SSIM: mean over frames (Gaussian 11x11).",
        "- Sparse density: kept / all blocks over the sparse steps (all layers and heads, cond + uncond); "
        "density (all steps): dense warmup steps counted as 1.",
        "- Spread: std and min..max over the videos.",
        "- LPIPS: not measured. It needs AlexNet and the LPIPS linear weights, which cannot be downloaded on this "
        "machine or the GPU machine (no model hub); `xattn_video.pipelines.metrics.LPIPS` measures it where they "
        "are present.",
        "",
        "| setting | order | threshold | stride | warmup | sparse density (std) | density, all steps | "
        "PSNR dB mean (std) | PSNR min..max | SSIM mean (min) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in data["rows"]:
        s, r = row["setting"], row["summary"]
        if s["kind"] == "dense":
            params = "| - | - | - | - |"
        else:
            selection = s["threshold"] if s.get("density") is None else f"top-k {s['density']}"
            params = f"| {s['order']} | {selection} | {s['stride']} | {row['warmup_steps']} ({s['warmup']:.0%}) |"
        lines.append(
            f"| {s['name']} {params} {fmt(r['sparse_density'], 'mean', '.3f')} "
            f"({fmt(r['sparse_density'], 'std', '.3f')}) | {fmt(r['density'], 'mean', '.3f')} | "
            f"{fmt(r['psnr'], 'mean', '.2f')} ({fmt(r['psnr'], 'std', '.2f')}) | "
            f"{fmt(r['psnr'], 'min', '.2f')}..{fmt(r['psnr'], 'max', '.2f')} | "
            f"{fmt(r['ssim'], 'mean', '.4f')} ({fmt(r['ssim'], 'min', '.4f')}) |"
        )
    lines += comparison(data)
    if meta.get("family", "hunyuan") != "hunyuan":  # the report is the HunyuanVideo processor's: none was made
        lines += ["", "Attention report: not made (it records through the HunyuanVideo fixture's processor)."]
    else:
        lines += attention_report_section()
    missing = data.get("missing", [])
    if missing:
        lines += ["", f"Not run (time limit): {', '.join(missing)}."]
    lines.append("")
    return "\n".join(lines)


def attention_report_section() -> list[str]:
    lines = [
        "",
        "## Attention report (one generation per order: first caption, seed 0, threshold 0.9, stride 8, 20% warmup)",
        "",
        "Density and relative error against dense attention per step, layer and head, recorded by "
        "`xattn_video.pipelines.attn_report.ReportProcessor` (tables: `quality/attn_report_<order>/"
        "attn_report.md`). Dense warmup steps show the probe: XAttention run beside them, output unused.",
        "",
    ]
    for order in ("raster", "tiled"):
        lines += (
            [f"{order}:", ""]
            + [
                f"![{name}](quality/attn_report_{order}/{name}.png)"
                for name in ("density_layer_head", "density_layer_step", "error_vs_step")
            ]
            + [""]
        )
    return lines


def write_markdown(path: Path, text: str) -> None:
    """Write the table to ``path``, keeping the hand-written part after :data:`KEPT_MARKER` if it has one."""
    old = path.read_text() if path.is_file() else ""
    if KEPT_MARKER in old:
        text = text.rstrip("\n") + "\n\n" + old[old.index(KEPT_MARKER) :]
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/quality"))
    parser.add_argument("--render-only", action="store_true", help="rewrite <out>.md from <out>/quality.json")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    parser.add_argument("--strides", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--warmups", type=float, nargs="+", default=[0.0, 0.1, 0.2], help="dense share of steps")
    parser.add_argument("--orders", nargs="+", default=["raster", "tiled"], choices=["raster", "tiled"])
    parser.add_argument(
        "--densities",
        type=float,
        nargs="*",
        default=[],
        help="fixed-density rows (XAttnProcessor(density=...): top-k blocks per query block)",
    )
    parser.add_argument(
        "--fixture",
        type=Path,
        default=None,
        help="a fixture_model folder (e.g. a Wan fixture from bench/train_fixture.py --family wan); default: the "
        "shipped one",
    )
    parser.add_argument(
        "--min-len",
        type=int,
        default=0,
        help="Wan fixtures (the xattn backend): self-attention calls shorter than this run native (default 0: all "
        "on XAttention; the backend's own default, 12,288 tokens, is above the fixture's sizes)",
    )
    parser.add_argument("--no-floor", action="store_true", help="skip the dense-rerun and threshold-1.0 rows")
    parser.add_argument("--no-report", action="store_true", help="skip the attention reports")
    parser.add_argument("--report-threshold", type=float, default=0.9)
    parser.add_argument("--report-stride", type=int, default=8)
    parser.add_argument("--report-warmup", type=float, default=0.2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--max-seconds", type=float, default=float("inf"))
    args = parser.parse_args(argv)
    json_path = args.out / "quality.json"
    md_path = args.out.with_suffix(".md")
    if args.render_only:
        write_markdown(md_path, markdown(json.loads(json_path.read_text())))
        return 0

    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    fixture = load_fixture(args.fixture, device=args.device, dtype=getattr(torch, args.dtype))
    transformer = fixture.transformer
    backend_only = {"min_len": args.min_len} if fixture.family == "wan" else {}  # Wan runs on the xattn backend
    stock = dict(transformer.attn_processors)
    captions = [s.caption for s in sample_specs(args.prompts, PROMPT_SEED)]
    jobs = [(c, seed) for seed in args.seeds for c in captions]
    gen_kw = dict(frames=args.frames, height=args.size, width=args.size, steps=args.steps, guidance_scale=args.guidance)

    def run_all() -> list[np.ndarray]:
        return [to_u8(generate(fixture, [c], [seed], **gen_kw))[0] for c, seed in jobs]

    references = run_all()
    print(f"{len(jobs)} dense references in {time.perf_counter() - t0:.1f} s", flush=True)
    meta = {
        "schema": SCHEMA,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        "dtype": args.dtype,
        "frames": args.frames,
        "size": args.size,
        "steps": args.steps,
        "guidance": args.guidance,
        "block_size": args.block_size,
        "video_tokens": args.frames * (args.size // 4) ** 2,
        "captions": captions,
        "seeds": args.seeds,
        "videos": len(jobs),
        "diffusers": __import__("diffusers").__version__,
        "torch": torch.__version__,
    }
    if args.fixture is not None:  # (the shipped fixture's meta stays as it was, so its results resume)
        meta |= {"fixture": str(args.fixture), "family": fixture.family, "min_len": backend_only.get("min_len")}
    if fixture.family != "hunyuan" and not args.no_report:
        print("attention report: HunyuanVideo fixtures only (its recording processor); skipped", flush=True)
    for order in [] if args.no_report or fixture.family != "hunyuan" else args.orders:
        if (args.out / f"attn_report_{order}" / "attn_report.json").is_file():
            print(f"attention report ({order}) already there", flush=True)
            continue
        report = attention_report(fixture, args, captions[0], args.seeds[0], order, args.out / f"attn_report_{order}")
        sparse = [s["density"]["mean"] for s in report["summary"] if s["mode"] != "dense" and s["density"]]
        print(f"attention report {order}: mean sparse-step density {np.mean(sparse):.3f}", flush=True)
    old = json.loads(json_path.read_text()) if json_path.is_file() else None
    done = {r["setting"]["name"]: r for r in old["rows"]} if old and old["meta"] == meta else {}
    data = {"meta": meta, "rows": [], "missing": []}
    keep = {}
    for setting in settings_list(args):
        if setting["name"] in done:
            data["rows"].append(done[setting["name"]])
            continue
        if time.perf_counter() - t0 > args.max_seconds:
            data["missing"].append(setting["name"])
            continue
        t1 = time.perf_counter()
        videos, per_video = [], []
        if setting["kind"] == "dense":
            videos = run_all()
            per_video = [{} for _ in jobs]
            warmup_steps = None
        else:
            warmup_steps = round(setting["warmup"] * args.steps)
            proc = xattn_video.enable(
                transformer,
                threshold=setting["threshold"] or 0.9,
                stride=setting["stride"],
                block_size=args.block_size,
                warmup_steps=warmup_steps,
                token_order=setting["order"],
                density=setting.get("density"),
                **backend_only,
                estimate_fp8=False,  # the paper's estimate, as in the published rows (float8 on GPUs: docs/quality.md)
            )
            try:
                for c, seed in jobs:
                    videos.append(to_u8(generate(fixture, [c], [seed], **gen_kw))[0])
                    per_video.append(sparse_density(proc.stats))
                    proc.reset_stats()
            finally:
                proc.detach()
                transformer.set_attn_processor(dict(stock))  # diffusers pops the dict it is given
        for entry, ref, vid, (c, seed) in zip(per_video, references, videos, jobs, strict=True):
            entry.update(score(ref, vid), caption=c, seed=seed)
        keys = ("psnr", "ssim", "sparse_density", "density")
        row = {
            "setting": setting,
            "warmup_steps": warmup_steps,
            "seconds": time.perf_counter() - t1,
            "videos": per_video,
            "summary": {k: summary([v.get(k) for v in per_video]) for k in keys},
        }
        data["rows"].append(row)
        if setting["name"] in ("xattn t=0.95 s=8 w=20% raster", "xattn t=0.95 s=8 w=20% tiled"):
            keep[setting["name"]] = np.stack(videos[:2])
        write_json(json_path, data)
        r = row["summary"]
        print(
            f"{setting['name']}: sparse density {r['sparse_density']['mean']}, PSNR {r['psnr']['mean']:.2f} "
            f"(min {r['psnr']['min']:.2f}), SSIM {r['ssim']['mean']:.4f} [{row['seconds']:.1f} s]",
            flush=True,
        )
    write_json(json_path, data)
    write_markdown(md_path, markdown(data))
    np.savez_compressed(
        args.out / "videos.npz",
        dense=np.stack(references[:2]),
        captions=np.array(captions[:2]),
        **{k.replace(" ", "_"): v for k, v in keep.items()},
    )
    print(f"done in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
