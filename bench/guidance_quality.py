"""Does classifier-free guidance amplify sparse attention's errors? XAttention against dense on the trained
fixture at several guidance scales, each against the dense generation at the SAME guidance (issue 12).

    python bench/guidance_quality.py --frames 8 --videos 2 --out docs/results/guidance_quality_cpu_float32.json

Per guidance scale and video (held-out caption i of ``bench/fixture_quality.py``'s list, one seed): a dense
generation (stock diffusers attention), then each sparse setting with ``xattn_video.enable``: XAttention at a
threshold, and the estimate's top-k (``density=``), both with a dense warmup share of the steps. Scoring and
density are ``bench/fixture_quality.py``'s (PSNR of the whole video, mean SSIM over frames, uint8 frames; block
density of the sparse steps). Guidance 1.0 runs the conditional branch only (no CFG). Results go to ``--out``
after every generation (a rerun with the same settings resumes); the Markdown table is printed last.
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
from fixture_quality import PROMPT_SEED, fmt, score, sparse_density, summary, to_u8  # noqa: E402

import xattn_video  # noqa: E402
from xattn_video.testing.fixture import generate, load_fixture  # noqa: E402
from xattn_video.testing.procedural import sample_specs  # noqa: E402


def settings(args) -> list[dict]:
    """The sparse rows: XAttention at ``--threshold`` and the estimate's top-k at ``--density``."""
    warm = f"w={args.warmup:.0%}"
    rows = {
        "threshold": {"name": f"xattn t={args.threshold} s={args.stride} {warm}", "threshold": args.threshold},
        "topk": {"name": f"xattn top-k d={args.density} s={args.stride} {warm}", "threshold": 0.9},
    }
    return [{**rows[r], "density": args.density if r == "topk" else None} for r in args.rows]


def markdown(data: dict) -> str:
    meta = data["meta"]
    lines = [
        f"{meta['device']} ({meta['dtype']}), {meta['frames']} frames of {meta['size']}x{meta['size']}, "
        f"{meta['steps']} steps, {meta['warmup_steps']} dense warmup steps, raster order, {meta['videos']} videos "
        f"(captions {meta['caption_indices']} x seed {meta['seed']}); each row against the dense generation at "
        "its own guidance.",
        "",
        "| guidance | setting | sparse density mean | PSNR dB mean | PSNR min..max | SSIM mean (min) | "
        "s a generation |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in data["rows"]:
        r = row["summary"]
        lines.append(
            f"| {row['guidance']} | {row['setting']} | {fmt(r['sparse_density'], 'mean', '.3f')} | "
            f"{fmt(r['psnr'], 'mean', '.2f')} | {fmt(r['psnr'], 'min', '.2f')}..{fmt(r['psnr'], 'max', '.2f')} | "
            f"{fmt(r['ssim'], 'mean', '.4f')} ({fmt(r['ssim'], 'min', '.4f')}) | {row['seconds_mean']:.0f} |"
        )
    return "\n".join(lines)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def rows_from(entries: list[dict]) -> list[dict]:
    """Per (guidance, setting): the summary over videos of the entries finished so far."""
    rows: dict[tuple, dict] = {}
    for e in entries:
        if e["setting"] == "dense":
            continue
        rows.setdefault((e["guidance"], e["setting"]), []).append(e)
    return [
        {
            "guidance": g,
            "setting": name,
            "videos": len(es),
            "seconds_mean": sum(e["seconds"] for e in es) / len(es),
            "summary": {k: summary([e[k] for e in es]) for k in ("psnr", "ssim", "sparse_density", "density")},
        }
        for (g, name), es in rows.items()
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--guidances", type=float, nargs="+", default=[1.0, 4.0, 2.0], help="run in this order")
    parser.add_argument("--videos", type=int, default=2, help="held-out captions 0..N-1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--density", type=float, default=0.3)
    parser.add_argument("--warmup", type=float, default=0.2, help="dense share of the steps")
    parser.add_argument("--rows", nargs="+", default=["threshold", "topk"], choices=["threshold", "topk"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    fixture = load_fixture(device="cpu", dtype=torch.float32)
    transformer = fixture.transformer
    stock = dict(transformer.attn_processors)
    captions = [s.caption for s in sample_specs(8, PROMPT_SEED)][: args.videos]
    warmup_steps = round(args.warmup * args.steps)
    meta = {
        "device": "cpu",
        "dtype": "float32",
        "frames": args.frames,
        "size": args.size,
        "steps": args.steps,
        "warmup_steps": warmup_steps,
        "threshold": args.threshold,
        "stride": args.stride,
        "density": args.density,
        "rows": args.rows,
        "caption_indices": list(range(args.videos)),
        "captions": captions,
        "seed": args.seed,
        "videos": len(captions),
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
    }
    old = json.loads(args.out.read_text()) if args.out.is_file() else None
    entries = old["entries"] if old and old["meta"] == meta else []
    done = {(e["guidance"], e["caption"], e["setting"]) for e in entries}
    refs = {(e["guidance"], e["caption"]): None for e in entries if e["setting"] == "dense"}

    def save() -> None:
        write_json(args.out, {"meta": meta, "entries": entries, "rows": rows_from(entries)})

    for g in args.guidances:
        kw = dict(frames=args.frames, height=args.size, width=args.size, steps=args.steps, guidance_scale=g)
        for caption in captions:
            todo = [s for s in settings(args) if (g, caption, s["name"]) not in done]
            if not todo:
                continue
            t = time.perf_counter()
            reference = to_u8(generate(fixture, [caption], [args.seed], **kw))[0]  # rerun: deterministic
            if (g, caption) not in refs:
                entries.append(
                    {"guidance": g, "caption": caption, "setting": "dense", "seconds": time.perf_counter() - t}
                )
                refs[(g, caption)] = None
                save()
            print(f"g={g} dense {time.perf_counter() - t:.0f} s", flush=True)
            for s in todo:
                t = time.perf_counter()
                proc = xattn_video.enable(
                    transformer,
                    threshold=s["threshold"],
                    stride=args.stride,
                    block_size=128,
                    warmup_steps=warmup_steps,
                    token_order="raster",
                    density=s["density"],
                    estimate_fp8=False,  # the paper's estimate, as in the published rows
                )
                try:
                    video = to_u8(generate(fixture, [caption], [args.seed], **kw))[0]
                    entry = {"guidance": g, "caption": caption, "setting": s["name"], **sparse_density(proc.stats)}
                finally:
                    proc.detach()
                    transformer.set_attn_processor(dict(stock))  # diffusers pops the dict it is given
                entry.update(score(reference, video), seconds=time.perf_counter() - t)
                entries.append(entry)
                save()
                print(
                    f"g={g} {s['name']}: PSNR {entry['psnr']:.2f}, SSIM {entry['ssim']:.4f}, sparse density "
                    f"{entry['sparse_density']:.3f} [{entry['seconds']:.0f} s]",
                    flush=True,
                )
    save()
    print(markdown({"meta": meta, "rows": rows_from(entries)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
