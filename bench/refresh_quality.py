"""The quality cost of ``refresh_every`` on the trained video fixture: XAttention with the kept blocks estimated
every k sparse steps, against dense generations.

    python bench/refresh_quality.py --out docs/results/refresh_quality_h100.json        # one GPU, about a minute
    python bench/refresh_quality.py --device cpu --dtype float32 --prompts 3 --seeds 0  # CPU, ~3 min a video

The setting is that of docs/quality.md's table (threshold 0.9, stride 8, 20% dense warmup, raster order, 20
Euler steps, CFG 4, 16 frames of 64x64 = 4,096 video tokens, 32 blocks of 128), and its scoring
(``bench/fixture_quality.py``: PSNR of the whole video and mean SSIM over frames on uint8 frames, against the
dense generation with stock diffusers attention, same caption and seed). Per k: PSNR/SSIM against dense, PSNR
against the k=1 video (what reuse alone changes), the sparse steps' block density, and the share of sparse
attention calls that reused blocks instead of estimating (from the processor's statistics). Rows are written
to ``--out`` (JSON) after each k; the Markdown table is printed last.

``--fp8`` adds, for each k, a row with the float8 estimate (``estimate_fp8=True``: q and k scored as float8
e4m3 copies), scored the same way and paired with the bfloat16-estimate row of the same k (the question of the
speed issue: does the float8 estimate change quality?). ``--density D`` selects the estimate's top-k at that
density (``density=D``) instead of ``--threshold``.

    python bench/refresh_quality.py --ks 1 5 --fp8 --out docs/results/estimate_fp8_quality_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixture_quality import PROMPT_SEED, fmt, score, summary, to_u8  # noqa: E402  (one scoring for both tables)

import xattn_video  # noqa: E402
from xattn_video.testing.fixture import generate, load_fixture  # noqa: E402
from xattn_video.testing.procedural import sample_specs  # noqa: E402


def step_counts(stats: dict) -> dict:
    """Sparse-step block density and how the sparse calls got their blocks, over the last generation."""
    steps = stats["generations"][-1]["steps"]
    sparse = [s for s in steps if s["mode"] != "dense"]
    kept, total = sum(s["kept_blocks"] for s in sparse), sum(s["total_blocks"] for s in sparse)
    estimated = sum(s["estimated_calls"] for s in steps)
    reused = sum(s["reused_calls"] for s in steps)
    return {
        "sparse_density": kept / total if total else None,
        "estimated_calls": estimated,
        "reused_calls": reused,
        "reused_share": reused / max(1, estimated + reused),
        "estimate_ms": sum(s["estimate_ms"] for s in steps),
        "blocks": [s["blocks"] for s in steps],
    }


def meta_device(args) -> str:
    return torch.cuda.get_device_name() if args.device == "cuda" else args.device


def selection_text(meta: dict) -> str:
    return f"top-k density {meta['density']}" if meta.get("density") else f"threshold {meta['threshold']}"


def markdown(data: dict) -> str:
    meta = data["meta"]
    lines = [
        f"{meta['device']} ({meta['dtype']}), {meta['videos']} videos ({len(meta['captions'])} captions x seeds "
        f"{meta['seeds']}), {selection_text(meta)}, stride {meta['stride']}, {meta['warmup_steps']} of "
        f"{meta['steps']} steps dense, {meta['order']} order; {meta['seconds_per_generation']:.1f} s a "
        "generation.",
        "",
        "| refresh_every | estimate | sparse calls reused | sparse density (std) | PSNR dB vs dense mean (std) | "
        "PSNR min..max | SSIM vs dense mean (min) | PSNR dB vs k=1 mean (min) | PSNR vs bf16-estimate row, "
        "paired mean (min..max) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in data["rows"]:
        r = row["summary"]
        paired = r.get("psnr_gain_vs_bf16")
        cells = [
            str(row["refresh_every"]),
            "float8" if row.get("estimate_fp8") else meta["dtype"],
            f"{r['reused_share']['mean']:.0%}",
            f"{fmt(r['sparse_density'], 'mean', '.3f')} ({fmt(r['sparse_density'], 'std', '.3f')})",
            f"{fmt(r['psnr'], 'mean', '.2f')} ({fmt(r['psnr'], 'std', '.2f')})",
            f"{fmt(r['psnr'], 'min', '.2f')}..{fmt(r['psnr'], 'max', '.2f')}",
            f"{fmt(r['ssim'], 'mean', '.4f')} ({fmt(r['ssim'], 'min', '.4f')})",
            f"{fmt(r['psnr_vs_k1'], 'mean', '.2f')} ({fmt(r['psnr_vs_k1'], 'min', '.2f')})",
            (
                f"{fmt(paired, 'mean', '+.2f')} ({fmt(paired, 'min', '+.2f')}..{fmt(paired, 'max', '+.2f')})"
                if paired and paired.get("mean") is not None
                else "-"
            ),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def block_drift(fixture, transformer, caption: str, seed: int, gen_kw: dict, args, warmup_steps: int) -> dict:
    """How the kept blocks move: one generation at k=1 keeps every sparse step's estimated mask; for each lag j,
    over all pairs of sparse steps (s, s+j) and every call (layer, sample): the share of step s+j's blocks that
    step s also kept (what reusing s's blocks at s+j covers), the share of s's blocks still kept, and their
    Jaccard index, each as kept-block counts summed over heads."""
    stock = dict(transformer.attn_processors)
    proc = xattn_video.enable(
        transformer,
        threshold=args.threshold,
        stride=args.stride,
        block_size=128,
        warmup_steps=warmup_steps,
        token_order=args.order,
        density=args.density,
    )
    masks: dict[int, list[torch.Tensor]] = {}
    estimate = proc.select_blocks

    def keep(q, k):
        selection = estimate(q, k)
        masks.setdefault(proc.tracker.position.step, []).append(selection.mask.cpu())
        return selection

    proc.select_blocks = keep
    try:
        generate(fixture, [caption], [seed], **gen_kw)
    finally:
        proc.detach()
        transformer.set_attn_processor(stock)
    steps = sorted(masks)
    rows = []
    for lag in range(1, len(steps)):
        covered = kept_later = kept_before = union = 0
        for s in steps[:-lag]:
            for a, b in zip(masks[s], masks[s + lag], strict=True):
                both = int((a & b).sum())
                covered += both
                kept_later += int(b.sum())
                kept_before += int(a.sum())
                union += int((a | b).sum())
        rows.append(
            {
                "lag": lag,
                "later_blocks_covered": covered / kept_later,
                "earlier_blocks_kept": covered / kept_before,
                "jaccard": covered / union,
            }
        )
    return {"caption": caption, "seed": seed, "sparse_steps": steps, "by_lag": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: $OUT/refresh_quality.json if $OUT)")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 5, 10])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--density", type=float, default=None, help="top-k selection at this density instead")
    parser.add_argument("--fp8", action="store_true", help="also a float8-estimate row for each k")
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=0.2, help="dense share of the steps")
    parser.add_argument("--order", default="raster", choices=["raster", "tiled"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--drift-only", action="store_true", help="only the block drift of one generation")
    args = parser.parse_args(argv)
    if 1 not in args.ks:
        parser.error("--ks must include 1 (the reference for what reuse alone changes)")
    out = args.out or (Path(os.environ["OUT"]) / "refresh_quality.json" if os.environ.get("OUT") else None)

    t0 = time.perf_counter()
    fixture = load_fixture(device=args.device, dtype=getattr(torch, args.dtype))
    transformer = fixture.transformer
    stock = dict(transformer.attn_processors)
    captions = [s.caption for s in sample_specs(args.prompts, PROMPT_SEED)]
    jobs = [(c, seed) for seed in args.seeds for c in captions]
    gen_kw = dict(frames=args.frames, height=args.size, width=args.size, steps=args.steps, guidance_scale=args.guidance)
    warmup_steps = round(args.warmup * args.steps)
    if args.drift_only:
        drift = block_drift(fixture, transformer, captions[0], args.seeds[0], gen_kw, args, warmup_steps)
        drift["device"], drift["dtype"] = meta_device(args), args.dtype
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(drift, indent=1) + "\n")
        print("| steps apart | later step's blocks the earlier kept | earlier blocks still kept | Jaccard |")
        print("|---:|---:|---:|---:|")
        for r in drift["by_lag"]:
            print(
                f"| {r['lag']} | {r['later_blocks_covered']:.3f} | {r['earlier_blocks_kept']:.3f} | "
                f"{r['jaccard']:.3f} |"
            )
        return 0
    t1 = time.perf_counter()
    references = [to_u8(generate(fixture, [c], [seed], **gen_kw))[0] for c, seed in jobs]
    per_generation = (time.perf_counter() - t1) / len(jobs)
    print(f"{len(jobs)} dense references, {per_generation:.1f} s each", flush=True)
    meta = {
        "device": meta_device(args),
        "dtype": args.dtype,
        "frames": args.frames,
        "size": args.size,
        "steps": args.steps,
        "guidance": args.guidance,
        "threshold": args.threshold,
        "density": args.density,
        "stride": args.stride,
        "warmup_steps": warmup_steps,
        "order": args.order,
        "captions": captions,
        "seeds": args.seeds,
        "videos": len(jobs),
        "seconds_per_generation": per_generation,
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
    }
    data = {"meta": meta, "rows": []}
    k1_videos = None
    bf16_psnr: dict[int, list[float]] = {}
    for k, fp8 in [(k, fp8) for k in sorted(args.ks) for fp8 in ([False, True] if args.fp8 else [False])]:
        t1 = time.perf_counter()
        proc = xattn_video.enable(
            transformer,
            threshold=args.threshold,
            stride=args.stride,
            block_size=128,
            warmup_steps=warmup_steps,
            token_order=args.order,
            refresh_every=k,
            estimate_fp8=fp8,
            density=args.density,
        )
        videos, per_video = [], []
        try:
            for (c, seed), ref in zip(jobs, references, strict=True):
                video = to_u8(generate(fixture, [c], [seed], **gen_kw))[0]
                entry = {
                    "caption": c,
                    "seed": seed,
                    **score(ref, video),
                    **step_counts(proc.stats),
                }
                if k1_videos is not None:
                    entry["psnr_vs_k1"] = score(k1_videos[len(videos)], video)["psnr"]
                if fp8 and k in bf16_psnr:
                    entry["psnr_gain_vs_bf16"] = entry["psnr"] - bf16_psnr[k][len(videos)]
                videos.append(video)
                per_video.append(entry)
                proc.reset_stats()
        finally:
            proc.detach()
            transformer.set_attn_processor(dict(stock))  # diffusers pops the dict it is given
        if k == 1 and not fp8:
            k1_videos = videos
        if not fp8:
            bf16_psnr[k] = [v["psnr"] for v in per_video]
        keys = ("psnr", "ssim", "sparse_density", "reused_share", "psnr_vs_k1", "psnr_gain_vs_bf16")
        row = {
            "refresh_every": k,
            "estimate_fp8": fp8,
            "seconds": time.perf_counter() - t1,
            "videos": per_video,
            "summary": {key: summary([v.get(key) for v in per_video]) for key in keys},
        }
        data["rows"].append(row)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(data, indent=1) + "\n")
        r = row["summary"]
        print(
            f"k={k}{' fp8 estimate' if fp8 else ''}: PSNR {r['psnr']['mean']:.2f} dB (min {r['psnr']['min']:.2f}), "
            f"SSIM {r['ssim']['mean']:.4f}, "
            f"sparse density {r['sparse_density']['mean']:.3f}, reused {r['reused_share']['mean']:.0%} "
            f"[{row['seconds']:.1f} s]",
            flush=True,
        )
    print()
    print(markdown(data))
    print(f"\ndone in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
