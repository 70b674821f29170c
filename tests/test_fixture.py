"""The shipped video fixture on the CPU: loading, deterministic dense sampling, XAttention quality floor.

Size: 8 frames of 32x32 px = 512 video tokens (+ up to 24 text tokens), block 64 = 8+ blocks, 20 Euler steps.
The floor comes from the measurement at this size (docs/fixture.md: 16.6 and 16.3 dB at sparse density 0.78
and 0.81 for captions 0 and 1 of the quality table, against 12.7 and 12.3 dB for a different seed).
"""

import pytest
import torch
from safetensors.torch import load_file

import xattn_video
from xattn_video.pipelines.metrics import mse_per_frame, video_psnr
from xattn_video.testing.fixture import FIXTURE_DIR, generate, load_fixture
from xattn_video.testing.procedural import sample_specs

SIZE = dict(frames=8, height=32, width=32, steps=20)
PSNR_FLOOR_DB = 15.0  # measured 16.3-16.6 dB (threshold 0.95, stride 8, block 64, 4 of 20 steps dense)
DENSITY_FLOOR_DB = 14.0  # measured 15.8 and 15.6 dB (captions 0 and 1; density=0.5: 5 of 9 blocks, same settings)
CAPTION = sample_specs(1, 77_000)[0].caption  # the quality table's first held-out caption


def _u8(video: torch.Tensor):
    return (video.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def fixture():
    return load_fixture()


@pytest.fixture(scope="module")
def dense(fixture):
    return generate(fixture, [CAPTION], [0], **SIZE)


def test_weights_are_small_and_load_through_from_pretrained(monkeypatch):
    from diffusers import HunyuanVideoTransformer3DModel

    files = list(FIXTURE_DIR.rglob("*.safetensors"))
    assert sum(f.stat().st_size for f in files) <= 10_000_000
    calls = []
    original = HunyuanVideoTransformer3DModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(args[0])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(HunyuanVideoTransformer3DModel, "from_pretrained", classmethod(spy))
    loaded = load_fixture()
    assert calls == [FIXTURE_DIR / "transformer"]
    stored = load_file(str(FIXTURE_DIR / "transformer" / "diffusion_pytorch_model.safetensors"))
    state = loaded.transformer.state_dict()
    assert stored.keys() == state.keys()
    for name, tensor in stored.items():
        assert torch.equal(state[name], tensor.float()), name


def test_dense_generation_is_deterministic(fixture, dense):
    again = generate(fixture, [CAPTION], [0], **SIZE)
    assert torch.equal(dense, again)
    assert dense.shape == (1, 8, 32, 32, 3)
    other = generate(fixture, [CAPTION], [1], **SIZE)
    assert not torch.equal(dense, other)


def _sparse_generation(fixture, **settings):
    """The CAPTION/seed-0 video with XAttention (stride 8, 64-token blocks, 4 dense steps, torch backend) and
    ``settings``, and its per-step statistics; the fixture's stock processors are put back after."""
    stock = dict(fixture.transformer.attn_processors)
    proc = xattn_video.enable(fixture.transformer, stride=8, block_size=64, warmup_steps=4, backend="torch", **settings)
    try:
        sparse = generate(fixture, [CAPTION], [0], **SIZE)
        stats = proc.stats
    finally:
        proc.detach()
        fixture.transformer.set_attn_processor(stock)
    return sparse, stats["generations"][0]["steps"]


def test_xattn_quality_floor(fixture, dense):
    sparse, steps = _sparse_generation(fixture, threshold=0.95)
    assert [s["mode"] for s in steps] == ["dense"] * 4 + ["sparse"] * 16
    kept = sum(s["kept_blocks"] for s in steps if s["mode"] == "sparse")
    total = sum(s["total_blocks"] for s in steps if s["mode"] == "sparse")
    assert 0 < kept / total < 0.95
    psnr = video_psnr(mse_per_frame(_u8(dense[0]), _u8(sparse[0])))
    assert psnr >= PSNR_FLOOR_DB
    assert not torch.equal(sparse, dense)  # sparse attention did change something


def test_fixed_density_option_keeps_its_share_and_a_quality_floor(fixture, dense):
    """``density=0.5``: every sparse call keeps ceil(0.5 * 9) = 5 of the 9 key blocks of each query block."""
    sparse, steps = _sparse_generation(fixture, density=0.5)
    assert [s["mode"] for s in steps] == ["dense"] * 4 + ["sparse"] * 16
    assert all(s["kept_blocks"] * 9 == s["total_blocks"] * 5 for s in steps if s["mode"] == "sparse")
    assert video_psnr(mse_per_frame(_u8(dense[0]), _u8(sparse[0]))) >= DENSITY_FLOOR_DB


def test_generation_follows_the_caption_colour(fixture):
    """The same seed under "red ..." and "blue ..." captions: more red-dominant pixels under the red caption
    and more blue-dominant ones under the blue caption."""
    captions = ["red square still on plain", "blue square still on plain"]
    videos = generate(fixture, captions, [3, 3], **SIZE)
    r, g, b = videos.unbind(-1)
    red = ((r > 0.5) & (r > g + 0.3) & (r > b + 0.3)).float().mean(dim=(1, 2, 3))
    blue = ((b > 0.5) & (b > r + 0.3) & (b > g + 0.2)).float().mean(dim=(1, 2, 3))
    assert red[0] > 0.01 and red[0] > 5 * red[1]
    assert blue[1] > 0.01 and blue[1] > 5 * blue[0]


def test_bad_sizes_and_seeds_are_one_line_errors(fixture):
    with pytest.raises(ValueError, match="multiples of the patch size 4"):
        generate(fixture, [CAPTION], [0], frames=2, height=30, width=32, steps=1)
    with pytest.raises(ValueError, match="one length"):
        generate(fixture, [CAPTION], [0, 1], frames=2, height=32, width=32, steps=1)
