"""Frame metrics against independent references: PSNR from its formula in float64 numpy, SSIM against
scikit-image, LPIPS against a float64 functional computation of the published formula on random weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xattn_video.pipelines import metrics
from xattn_video.pipelines.metrics import LPIPS, find_lpips_weights, psnr_per_frame, ssim_per_frame, video_psnr

skimage_metrics = pytest.importorskip("skimage.metrics")


def synthetic_video(seed: int, t: int = 4, h: int = 40, w: int = 48) -> np.ndarray:
    """A smooth moving pattern plus noise, uint8 [T, H, W, 3]: structure for SSIM, not only noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    frames = []
    for i in range(t):
        base = 127 + 80 * np.sin(xx / 5.0 + i) * np.cos(yy / 7.0 - 0.5 * i)
        rgb = np.stack([base, base[::-1], 255 - base], axis=-1) + rng.normal(0, 12, (h, w, 3))
        frames.append(np.clip(rgb, 0, 255).round().astype(np.uint8))
    return np.stack(frames)


def perturbed(video: np.ndarray, seed: int, sigma: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(video.astype(np.float64) + rng.normal(0, sigma, video.shape), 0, 255).round().astype(np.uint8)


def test_psnr_equals_its_formula():
    ref = synthetic_video(0)
    cand = perturbed(ref, 1, 9.0)
    got = psnr_per_frame(ref, cand)
    diff = ref.astype(np.float64) - cand.astype(np.float64)
    mse = (diff**2).reshape(len(ref), -1).mean(axis=1)
    np.testing.assert_allclose(got, 10 * np.log10(255.0**2 / mse), rtol=1e-12)
    assert video_psnr(mse) == pytest.approx(10 * np.log10(255.0**2 / mse.mean()), rel=1e-12)


def test_psnr_identical_frames_is_inf_and_float_input_matches_uint8():
    ref = synthetic_video(2)
    cand = ref.copy()
    cand[1] = perturbed(ref[1:2], 3, 5.0)[0]
    got = psnr_per_frame(ref, cand)
    assert np.isinf(got[0]) and np.isinf(got[2]) and np.isfinite(got[1])
    np.testing.assert_allclose(psnr_per_frame(ref / 255.0, cand / 255.0), got, rtol=1e-9)


@pytest.mark.parametrize("sigma", [4.0, 25.0])
def test_ssim_matches_scikit_image(sigma):
    ref = synthetic_video(4)
    cand = perturbed(ref, 5, sigma)
    got = ssim_per_frame(ref, cand)
    want = [
        skimage_metrics.structural_similarity(
            r, c, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
        )
        for r, c in zip(ref, cand, strict=True)
    ]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert np.all(got < 1.0)


def test_ssim_identical_is_one_and_chunking_does_not_matter():
    ref = synthetic_video(6, t=5)
    np.testing.assert_allclose(ssim_per_frame(ref, ref), 1.0, atol=1e-12)
    cand = perturbed(ref, 7, 10.0)
    np.testing.assert_allclose(ssim_per_frame(ref, cand, chunk=2), ssim_per_frame(ref, cand, chunk=8), rtol=1e-12)
    np.testing.assert_allclose(metrics.mse_per_frame(ref, cand, chunk=1), metrics.mse_per_frame(ref, cand), rtol=1e-12)


def test_shape_mismatch_and_tiny_frames_raise():
    ref = synthetic_video(8)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr_per_frame(ref, ref[:, :, :-2])
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim_per_frame(ref[:, :8, :8], ref[:, :8, :8])
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        psnr_per_frame(ref[..., 0], ref[..., 0])


# ---------------------------------------------------------------------------------------------- LPIPS

CONVS = {0: (3, 64, 11), 3: (64, 192, 5), 6: (192, 384, 3), 8: (384, 256, 3), 10: (256, 256, 3)}
CHANNELS = (64, 192, 384, 256, 256)


def write_random_weights(folder, seed: int = 0):
    """Random weights in the two files' real formats: torchvision's AlexNet state dict (features and a
    classifier) and LPIPS's alex.pth (non-negative per-channel weights [1, C, 1, 1])."""
    g = torch.Generator().manual_seed(seed)
    alex = {}
    for idx, (cin, cout, k) in CONVS.items():
        alex[f"features.{idx}.weight"] = torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cin * k * k)) ** 0.5
        alex[f"features.{idx}.bias"] = torch.randn(cout, generator=g) * 0.05
    alex["classifier.1.weight"] = torch.randn(8, 4, generator=g)  # present in the real file, unused
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) * 0.1 for i, c in enumerate(CHANNELS)}
    a_path, l_path = folder / metrics.ALEXNET_FILE, folder / "alex.pth"
    torch.save(alex, a_path)
    torch.save(lin, l_path)
    return a_path, l_path, alex, lin


def lpips_reference(alex: dict, lin: dict, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """LPIPS written out in float64 with torch.nn.functional, from the published definition."""
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)

    def conv(h, idx, stride=1, padding=0):
        return F.relu(F.conv2d(h, alex[f"features.{idx}.weight"].double(), alex[f"features.{idx}.bias"].double(),
                               stride=stride, padding=padding))

    def taps(x):
        h1 = conv((x.double() - shift) / scale, 0, stride=4, padding=2)
        h2 = conv(F.max_pool2d(h1, 3, 2), 3, padding=2)
        h3 = conv(F.max_pool2d(h2, 3, 2), 6, padding=1)
        h4 = conv(h3, 8, padding=1)
        h5 = conv(h4, 10, padding=1)
        return [h1, h2, h3, h4, h5]

    total = torch.zeros(x0.shape[0], dtype=torch.float64)
    for i, (a, b) in enumerate(zip(taps(x0), taps(x1), strict=True)):
        a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
        b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
        w = lin[f"lin{i}.model.1.weight"].double().view(1, -1, 1, 1)
        total += ((a - b) ** 2 * w).sum(dim=1).mean(dim=(1, 2))
    return total


def test_lpips_equals_float64_formula_and_is_zero_on_identical(tmp_path):
    a_path, l_path, alex, lin = write_random_weights(tmp_path)
    model = LPIPS.from_files(a_path, l_path)
    ref = synthetic_video(9, t=3, h=72, w=80)
    cand = perturbed(ref, 10, 20.0)
    got = model.per_frame(ref, cand, chunk=2)
    x0 = torch.from_numpy(ref).permute(0, 3, 1, 2).double() / 127.5 - 1
    x1 = torch.from_numpy(cand).permute(0, 3, 1, 2).double() / 127.5 - 1
    want = lpips_reference(alex, lin, x0, x1).numpy()
    np.testing.assert_allclose(got, want, rtol=2e-4)
    assert np.all(got > 0)
    np.testing.assert_allclose(model.per_frame(ref, ref), 0.0, atol=1e-12)


def test_lpips_weights_found_from_explicit_paths_and_torch_home(tmp_path, monkeypatch):
    a_path, l_path, _, _ = write_random_weights(tmp_path)
    found = find_lpips_weights(lpips_weights=l_path, alexnet_weights=a_path)
    assert found.available and found.missing_message() == ""
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / metrics.ALEXNET_FILE).write_bytes(a_path.read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    found = find_lpips_weights(lpips_weights=l_path)
    assert found.alexnet == hub / metrics.ALEXNET_FILE


def test_lpips_missing_weights_message_names_files_and_places(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    monkeypatch.setattr(metrics, "_lpips_package_weights",
                        lambda: (None, "the lpips package's weights/v0.1/ (lpips is not installed)"))
    found = find_lpips_weights()
    assert not found.available
    message = found.missing_message()
    assert metrics.ALEXNET_FILE in message and str(tmp_path / "empty_home" / "hub" / "checkpoints") in message
    assert "alex.pth" in message and "lpips is not installed" in message and "--lpips-weights" in message
    given = find_lpips_weights(lpips_weights=tmp_path / "nope.pth")
    assert given.linear is None and str(tmp_path / "nope.pth") in given.missing_message()


def test_lpips_rejects_files_of_the_wrong_format(tmp_path):
    a_path, l_path, _, lin = write_random_weights(tmp_path)
    lin["lin2.model.1.weight"] = torch.rand(1, 7, 1, 1)
    bad = tmp_path / "bad.pth"
    torch.save(lin, bad)
    with pytest.raises(metrics.LpipsUnavailable, match="lin2.model.1.weight must hold 384"):
        LPIPS.from_files(a_path, bad)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(metrics.LpipsUnavailable, match="cannot be read"):
        LPIPS.from_files(junk, l_path)
