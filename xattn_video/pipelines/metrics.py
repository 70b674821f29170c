"""Frame fidelity metrics, per frame: PSNR, SSIM and LPIPS of a candidate video against a reference.

What the XAttention paper reports for video generation (sparse against full attention, same seed and prompt).
Inputs are frames ``[T, H, W, 3]``: uint8 (as :func:`xattn_video.pipelines.video_io.read_video` returns) or float in
[0, 1]; both are measured on the 0..255 scale, so a float video and its uint8 rounding agree to the rounding.

- PSNR: ``10 log10(255^2 / MSE)`` with the MSE over the pixels and the three channels of a frame; identical
  frames give ``inf``. :func:`video_psnr` is the PSNR of the whole video (MSE averaged over its frames first),
  which stays finite when a few frames match exactly.
- SSIM (Wang et al. 2004): Gaussian window 11x11, sigma 1.5, K1 = 0.01, K2 = 0.03, population (not sample)
  statistics, computed on each RGB channel and averaged over channels and over the positions where the whole
  window fits in the frame (no padding). This is scikit-image's ``structural_similarity(..., channel_axis=-1,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)``.
- LPIPS v0.1 with the AlexNet backbone (Zhang et al. 2018): the five ReLU feature maps of AlexNet on inputs
  scaled to [-1, 1] and shifted/scaled per channel, each unit-normalised over channels, squared difference,
  weighted per channel by the learned linear layer, averaged over positions, summed over layers. The
  backbone is built here (the ``lpips`` package needs torchvision, which cannot be installed beside the CPU
  torch this project pins); its weights are only ever read from local files (:func:`find_lpips_weights`).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "ALEXNET_FILE",
    "LPIPS",
    "LPIPS_FILE",
    "LpipsUnavailable",
    "LpipsWeights",
    "find_lpips_weights",
    "frames_to_tensor",
    "mse_per_frame",
    "psnr_from_mse",
    "psnr_per_frame",
    "ssim_per_frame",
    "video_psnr",
]

DATA_RANGE = 255.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


# ---------------------------------------------------------------------------------------------- frames


def _raw(frames: Any) -> torch.Tensor:
    """Frames [T, H, W, 3] as a CPU tensor without copying or converting (numpy arrays are shared)."""
    t = frames.detach() if isinstance(frames, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(frames))
    if t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got shape {tuple(t.shape)}")
    if t.dtype != torch.uint8 and not t.is_floating_point():
        raise ValueError(f"frames must be uint8 or float in [0, 1], got dtype {t.dtype}")
    return t


def _scaled(t: torch.Tensor, device, dtype) -> torch.Tensor:
    """Raw frames [n, H, W, 3] as [n, 3, H, W] on the 0..255 scale in ``dtype`` on ``device``."""
    out = t.to(device=device, dtype=dtype)
    if t.dtype != torch.uint8:
        out = out * DATA_RANGE
    return out.permute(0, 3, 1, 2)


def frames_to_tensor(frames: Any, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64) -> (
    torch.Tensor
):
    """Frames [T, H, W, 3] (uint8, or float in [0, 1]; numpy or torch) as a tensor [T, 3, H, W] on the 0..255
    scale."""
    return _scaled(_raw(frames), device, dtype)


def _pair_chunks(
    reference: Any, candidate: Any, device, dtype, chunk: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Matching slices of ``chunk`` frames of both videos, converted one slice at a time (a 720p video of 129
    frames is 2.9 GB in float64: converting it whole would hold several such copies at once)."""
    ref, cand = _raw(reference), _raw(candidate)
    if ref.shape != cand.shape:
        raise ValueError(
            f"reference and candidate differ in shape: {_describe(ref)} vs {_describe(cand)} (frames x height x width)"
        )
    for part in _chunks(ref.shape[0], chunk):
        yield _scaled(ref[part], device, dtype), _scaled(cand[part], device, dtype)


def _describe(t: torch.Tensor) -> str:
    return f"{t.shape[0]} x {t.shape[1]} x {t.shape[2]}"


def _chunks(n: int, size: int) -> Iterator[slice]:
    if size < 1:
        raise ValueError(f"chunk must be >= 1, got {size}")
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


# ---------------------------------------------------------------------------------------------- PSNR


def mse_per_frame(reference: Any, candidate: Any, *, device: str | torch.device = "cpu", chunk: int = 8) -> (
    np.ndarray
):
    """Mean squared error of each frame on the 0..255 scale (float64 [T])."""
    parts = [((x - y) ** 2).mean(dim=(1, 2, 3)) for x, y in _pair_chunks(reference, candidate, device,
                                                                          torch.float64, chunk)]
    return torch.cat(parts).cpu().numpy()


def psnr_from_mse(mse: np.ndarray | float, data_range: float = DATA_RANGE) -> np.ndarray:
    """``10 log10(data_range^2 / mse)``; ``inf`` where the MSE is 0."""
    mse = np.asarray(mse, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / mse)


def psnr_per_frame(reference: Any, candidate: Any, *, device: str | torch.device = "cpu") -> np.ndarray:
    """PSNR in dB of each frame (float64 [T]; ``inf`` for identical frames)."""
    return psnr_from_mse(mse_per_frame(reference, candidate, device=device))


def video_psnr(mse: np.ndarray) -> float:
    """PSNR of a whole video from its per-frame MSE: the MSE is averaged over frames first."""
    return float(psnr_from_mse(float(np.mean(mse))))


# ---------------------------------------------------------------------------------------------- SSIM


def _gaussian_1d(size: int, sigma: float, device, dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter of x [N, C, H, W] per channel, 'valid' positions only."""
    c = x.shape[1]
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def ssim_per_frame(
    reference: Any,
    candidate: Any,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    chunk: int = 8,
) -> np.ndarray:
    """SSIM of each frame (float64 [T]): mean over RGB channels and window positions (see the module docs).

    Frames are processed ``chunk`` at a time so that 720p videos of 129 frames fit in memory.
    """
    h, w = _raw(reference).shape[1:3]
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {h}x{w}")
    g = _gaussian_1d(SSIM_WINDOW, SSIM_SIGMA, device, dtype)
    c1 = (SSIM_K1 * DATA_RANGE) ** 2
    c2 = (SSIM_K2 * DATA_RANGE) ** 2
    out = []
    for x, y in _pair_chunks(reference, candidate, device, dtype, chunk):
        mu_x, mu_y = _blur(x, g), _blur(y, g)
        var_x = _blur(x * x, g) - mu_x**2
        var_y = _blur(y * y, g) - mu_y**2
        cov = _blur(x * y, g) - mu_x * mu_y
        s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
        out.append(s.mean(dim=(1, 2, 3)))
    return torch.cat(out).double().cpu().numpy()


# ---------------------------------------------------------------------------------------------- LPIPS

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet weights, as torch.hub caches them
LPIPS_FILE = "alex.pth"  # LPIPS v0.1 linear layers for AlexNet, shipped in the lpips package (weights/v0.1/)
# Input normalisation of LPIPS (its "scaling layer") for inputs in [-1, 1]
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
# AlexNet's feature extractor cut after each of its five ReLUs (module index ranges of torchvision's layout)
_SLICES = ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12))
_CHANNELS = (64, 192, 384, 256, 256)


class LpipsUnavailable(RuntimeError):
    """LPIPS cannot run: its weight files are not on this machine. The message names each missing file and
    every place it was looked for."""


@dataclass
class LpipsWeights:
    """Where the two LPIPS weight files were found (None when missing) and where they were looked for."""

    alexnet: Path | None
    linear: Path | None
    alexnet_searched: list[str] = field(default_factory=list)
    linear_searched: list[str] = field(default_factory=list)

    @property
    def available(self) -> bool:
        return self.alexnet is not None and self.linear is not None

    def missing_message(self) -> str:
        """What is missing, where it was looked for and how to provide it; empty when nothing is missing."""
        lines = []
        if self.alexnet is None:
            lines.append(
                f"missing AlexNet backbone weights {ALEXNET_FILE}; looked in: {', '.join(self.alexnet_searched)} "
                "(torch.hub's checkpoint folder, $TORCH_HOME/hub/checkpoints; copy the file there, or pass "
                "--alexnet-weights PATH)"
            )
        if self.linear is None:
            lines.append(
                f"missing LPIPS v0.1 linear layers {LPIPS_FILE}; looked in: {', '.join(self.linear_searched)} "
                "(`pip install --no-deps lpips` installs the file without touching torch, or pass "
                "--lpips-weights PATH)"
            )
        return "; ".join(lines)


def _hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _lpips_package_weights() -> tuple[Path | None, str]:
    """The alex.pth inside an installed ``lpips`` package, found without importing it (its import needs
    torchvision)."""
    try:
        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None, "the lpips package's weights/v0.1/ (lpips is not installed)"
    folder = Path(next(iter(spec.submodule_search_locations))) / "weights" / "v0.1"
    path = folder / LPIPS_FILE
    return (path if path.is_file() else None), str(folder)


def find_lpips_weights(
    lpips_weights: str | os.PathLike | None = None, alexnet_weights: str | os.PathLike | None = None
) -> LpipsWeights:
    """Locate LPIPS's two weight files on this machine; nothing is downloaded.

    AlexNet: ``alexnet_weights`` if given, else torch.hub's cache (``$TORCH_HOME/hub/checkpoints``, by default
    ``~/.cache/torch/hub/checkpoints``). Linear layers: ``lpips_weights`` if given, else the installed ``lpips``
    package's ``weights/v0.1/alex.pth``. A path given explicitly that does not exist counts as missing.
    """
    if alexnet_weights is not None:
        a_path = Path(alexnet_weights).expanduser()
        alexnet, a_searched = (a_path if a_path.is_file() else None), [str(a_path)]
    else:
        a_path = _hub_checkpoints() / ALEXNET_FILE
        alexnet, a_searched = (a_path if a_path.is_file() else None), [str(a_path.parent)]
    if lpips_weights is not None:
        l_path = Path(lpips_weights).expanduser()
        linear, l_searched = (l_path if l_path.is_file() else None), [str(l_path)]
    else:
        linear, where = _lpips_package_weights()
        l_searched = [where]
    return LpipsWeights(alexnet, linear, a_searched, l_searched)


def _alexnet_features() -> torch.nn.Sequential:
    """AlexNet's convolutional part up to its fifth ReLU, in torchvision's module layout (so that the state
    dict keys ``features.N.*`` of its checkpoint load as they are)."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
    )


def _load_state(path: Path, what: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LpipsUnavailable(f"{what} {path} cannot be read: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict):
        raise LpipsUnavailable(f"{what} {path} is not a state dict (got {type(state).__name__})")
    return state


class LPIPS(torch.nn.Module):
    """LPIPS v0.1 (AlexNet) distance: ``model(x0, x1)`` with images [N, 3, H, W] in [-1, 1] gives [N]."""

    def __init__(self) -> None:
        super().__init__()
        self.features = _alexnet_features()
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self.lins = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(c)) for c in _CHANNELS])
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_files(cls, alexnet: str | os.PathLike, linear: str | os.PathLike) -> LPIPS:
        """Build from torchvision's AlexNet checkpoint and LPIPS's ``alex.pth`` (keys ``lin{i}.model.1.weight``,
        shapes [1, C, 1, 1]). Raises :class:`LpipsUnavailable` naming the file when one does not fit."""
        model = cls()
        alex = _load_state(Path(alexnet), "AlexNet weights")
        features = {k[len("features."):]: v for k, v in alex.items() if k.startswith("features.")}
        try:
            model.features.load_state_dict(features)
        except RuntimeError as e:
            raise LpipsUnavailable(f"AlexNet weights {alexnet} do not fit AlexNet's features: {e}") from None
        lin = _load_state(Path(linear), "LPIPS linear layers")
        for i, c in enumerate(_CHANNELS):
            key = f"lin{i}.model.1.weight"
            w = lin.get(key)
            if not isinstance(w, torch.Tensor) or w.numel() != c:
                got = None if w is None else tuple(getattr(w, "shape", ()))
                raise LpipsUnavailable(f"LPIPS linear layers {linear}: {key} must hold {c} weights, got {got}")
            model.lins[i].data.copy_(w.reshape(c).float())
        return model

    def layer_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five AlexNet ReLU feature maps of images in [-1, 1] after LPIPS's input scaling."""
        h = (x - self.shift) / self.scale
        feats = []
        for start, stop in _SLICES:
            for i in range(start, stop):
                h = self.features[i](h)
            feats.append(h)
        return feats

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        f0, f1 = self.layer_features(x0), self.layer_features(x1)
        total = x0.new_zeros(x0.shape[0])
        for a, b, w in zip(f0, f1, self.lins, strict=True):
            a = a / (a.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total = total + ((a - b) ** 2 * w.view(1, -1, 1, 1)).sum(dim=1).mean(dim=(1, 2))
        return total

    @torch.no_grad()
    def per_frame(self, reference: Any, candidate: Any, *, chunk: int = 8) -> np.ndarray:
        """LPIPS of each frame pair (float64 [T]) for frames [T, H, W, 3] (uint8 or float in [0, 1])."""
        out = []
        for x, y in _pair_chunks(reference, candidate, self.shift.device, torch.float32, chunk):
            out.append(self(x / 127.5 - 1.0, y / 127.5 - 1.0))
        return torch.cat(out).double().cpu().numpy()

