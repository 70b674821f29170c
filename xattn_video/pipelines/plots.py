"""PNG figures of the quality checks and attention reports (matplotlib, Agg backend: no display needed).

Each function writes one PNG atomically (temporary file renamed over the name) and returns its path.
matplotlib is imported inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["frame_strip", "heatmap", "psnr_curves", "step_curves"]

PSNR_CAP_DB = 100.0  # identical frames (infinite PSNR) are drawn at this height


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=(width, height), dpi=100)


def _save(fig: Any, plt: Any, path: str | os.PathLike) -> Path:
    from .video_io import atomic_path

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def psnr_curves(
    path: str | os.PathLike,
    curves: Mapping[str, Sequence[float]],
    *,
    title: str,
    mean_label: str | None = "mean over videos",
) -> Path:
    """Per-frame PSNR, one line per video, and their mean in black (``mean_label``; None: no mean line) when
    there are several of one length. Infinite values (identical frames) are drawn at :data:`PSNR_CAP_DB` and
    the title says so."""
    plt, fig = _figure(8, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    capped = False
    arrays = {}
    for label, values in curves.items():
        arr = np.asarray(values, dtype=np.float64)
        if np.isinf(arr).any():
            capped = True
            arr = np.where(np.isinf(arr), PSNR_CAP_DB, arr)
        arrays[label] = arr
        faint = len(curves) > 1 and mean_label is not None
        ax.plot(np.arange(len(arr)), arr, lw=1.0 if faint else 1.8, alpha=0.55 if faint else 1.0,
                label=label if len(curves) <= 12 else None)
    lengths = {len(a) for a in arrays.values()}
    if mean_label is not None and len(arrays) > 1 and len(lengths) == 1:
        ax.plot(np.arange(lengths.pop()), np.mean(list(arrays.values()), axis=0), color="black", lw=2.2,
                label=mean_label)
    ax.set_xlabel("frame")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(title + (f"\n(identical frames drawn at {PSNR_CAP_DB:.0f} dB)" if capped else ""))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    return _save(fig, plt, path)


def frame_strip(
    path: str | os.PathLike,
    reference: np.ndarray,
    candidate: np.ndarray,
    frames: Sequence[int],
    *,
    title: str,
    labels: tuple[str, str] = ("reference", "candidate"),
) -> Path:
    """Rows of (reference, candidate, |difference|) for the chosen frame indices, uint8 frames [T, H, W, 3].

    The difference is the per-pixel mean absolute difference over RGB, shown on a fixed 0..64 scale (brighter
    is larger; 64 of 255 and above saturate), so strips of different videos compare at a glance."""
    n = len(frames)
    h, w = reference.shape[1:3]
    panel = 2.6
    aspect = max(w / h, 0.5)
    plt, fig = _figure(3 * panel * aspect + 0.9, n * panel + 0.7)
    grid = fig.add_gridspec(n, 4, width_ratios=[1, 1, 1, 0.06], wspace=0.08, hspace=0.12)
    image = None
    for row, t in enumerate(frames):
        ref, cand = reference[t], candidate[t]
        diff = np.abs(ref.astype(np.float64) - cand.astype(np.float64)).mean(axis=-1)
        for col, (img, name) in enumerate(((ref, labels[0]), (cand, labels[1]), (diff, "|difference|"))):
            ax = fig.add_subplot(grid[row, col])
            if col == 2:
                image = ax.imshow(img, cmap="magma", vmin=0, vmax=64)
                ax.set_xlabel(f"mean {diff.mean():.2f}, max {diff.max():.0f}", fontsize=7, labelpad=2)
            else:
                ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
            if col == 0:
                ax.set_ylabel(f"frame {t}", fontsize=9)
    if image is not None:
        fig.colorbar(image, cax=fig.add_subplot(grid[:, 3]), label="mean |diff| over RGB (0..255)")
    fig.suptitle(title, fontsize=10)
    return _save(fig, plt, path)


def heatmap(
    path: str | os.PathLike,
    matrix: np.ndarray,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    colorbar: str,
    vmin: float | None = None,
    vmax: float | None = None,
    annotate: bool | None = None,
) -> Path:
    """A matrix as a heatmap (rows on the y axis), values written in the cells when it is small enough."""
    matrix = np.asarray(matrix, dtype=np.float64)
    rows, cols = matrix.shape
    plt, fig = _figure(min(max(5.0, 2 + 0.45 * cols), 18), min(max(3.5, 1.5 + 0.32 * rows), 20))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
    fig.colorbar(image, ax=ax, label=colorbar)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.set_xticks(range(cols))
    ax.set_yticks(range(rows))
    ax.tick_params(labelsize=7)
    if annotate if annotate is not None else rows * cols <= 400:
        for i in range(rows):
            for j in range(cols):
                if np.isfinite(matrix[i, j]):
                    ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6, color="white")
    return _save(fig, plt, path)


def step_curves(
    path: str | os.PathLike,
    steps: Sequence[int],
    series: Mapping[str, Sequence[float]],
    *,
    title: str,
    ylabel: str,
    band: tuple[Sequence[float], Sequence[float]] | None = None,
    band_label: str = "min..max",
    logy: bool = False,
    shade: Sequence[int] = (),
) -> Path:
    """Curves over denoising steps, an optional shaded band (e.g. min..max over layers and heads), and the
    steps in ``shade`` (e.g. dense warmup steps) greyed."""
    plt, fig = _figure(8, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    x = np.asarray(list(steps))
    for s in shade:
        ax.axvspan(s - 0.5, s + 0.5, color="grey", alpha=0.15, lw=0)
    if band is not None:
        ax.fill_between(x, np.asarray(band[0], dtype=float), np.asarray(band[1], dtype=float), alpha=0.2,
                        label=band_label)
    for label, values in series.items():
        ax.plot(x, np.asarray(values, dtype=float), marker="o", lw=1.5, label=label)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("denoising step")
    ax.set_ylabel(ylabel)
    ax.set_xticks(x)
    ax.set_title(title + ("\n(grey: dense steps)" if len(shade) else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, plt, path)
