"""Pictures of docs/fixture.md: the fixture's loss curves and frame strips of its samples.

    python bench/fixture_figures.py --train-log docs/fixture/train_log.json --samples samples.npz \
        --quality-videos docs/quality/videos.npz --out docs/fixture

``--samples``: ``samples.npz`` written by bench/train_fixture.py (generated videos of held-out captions and the
procedural clips those captions describe); ``--quality-videos``: ``videos.npz`` of bench/fixture_quality.py
(dense and XAttention generations of one caption and seed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def loss_curve(log: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for size in sorted({e["size"] for e in log["steps"]}):
        pts = [(e["step"], e["loss"]) for e in log["steps"] if e["size"] == size]
        x, y = np.array(pts).T
        ax1.plot(x, y, lw=0.6, alpha=0.4, label=f"train loss, {size} clips")
        k = 15
        if len(y) > k:
            ax1.plot(x[k - 1:], np.convolve(y, np.ones(k) / k, mode="valid"), lw=1.5,
                     label=f"{size}, moving mean of {k}")
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_ylabel("flow-matching MSE (velocity)")
    ax1.set_title(f"training loss ({log['total_steps']} steps, {log['train_seconds']:.0f} s)")
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    val = log["validation"]
    for key in [k for k in val[0] if k not in ("step", "seconds")]:
        ax2.plot([v["step"] for v in val], [v[key] for v in val], marker="o", ms=3, label=f"noise level {key}")
    ax2.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_title("validation loss: 8 held-out clips, fixed noise, 16x64x64")
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def caption_strips(samples: dict, path: Path, frames=(0, 3, 6, 9, 12, 15)) -> None:
    """One row per caption: generated frames, then the procedural clip that the caption describes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    videos, truth, captions = samples["videos"], samples["truth"], samples["captions"]
    n = len(captions)
    fig, axes = plt.subplots(n, 1, figsize=(13, 1.55 * n))
    for i, ax in enumerate(np.atleast_1d(axes)):
        gap = np.full((videos.shape[2], 6, 3), 255, np.uint8)
        row = np.concatenate([*(np.concatenate([videos[i, f], gap[:, :2]], 1) for f in frames), gap, gap,
                              *(np.concatenate([truth[i, f], gap[:, :2]], 1) for f in frames)], 1)
        ax.imshow(row, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"\"{captions[i]}\"", fontsize=8, loc="left")
    fig.suptitle(f"left: generated (frames {list(frames)}, seed = row); right: a procedural clip of the same caption",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-log", type=Path, required=True)
    parser.add_argument("--samples", type=Path, required=True)
    parser.add_argument("--quality-videos", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/fixture"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    loss_curve(json.loads(args.train_log.read_text()), args.out / "loss.png")
    caption_strips(dict(np.load(args.samples)), args.out / "samples.png")
    if args.quality_videos is not None:
        from xattn_video.pipelines.plots import frame_strip

        q = np.load(args.quality_videos)
        name = next(k for k in q.files if k.startswith("xattn"))
        frame_strip(args.out / "dense_vs_xattn.png", q["dense"][0], q[name][0], [0, 5, 10, 15],
                    title=f"\"{q['captions'][0]}\", seed 0: dense vs {name.replace('_', ' ')}",
                    labels=("dense", "xattn"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
