"""The shipped Wan fixture on the CPU through the ``xattn`` diffusers backend: loading, the stock-attention equality
at threshold 1.0, and XAttention quality floors.

Size: 8 frames of 32x32 px = 512 video tokens, block 64 = 8 blocks, 20 Euler steps, 4 dense, stride 8, float32,
torch backend. Floors from the measurement at this size (captions 0 and 1 of the quality table, seed 0): threshold
0.95 26.0 and 27.9 dB at sparse density 0.91 and 0.94; ``density=0.5`` 21.9 and 20.0 dB; another seed 11.7 and
9.9 dB; threshold 1.0 89-92 dB (float32 rounding).
"""

import pytest
import torch

import xattn_video
from xattn_video.pipelines.metrics import mse_per_frame, video_psnr
from xattn_video.testing.fixture import WAN_FIXTURE_DIR, generate, load_fixture
from xattn_video.testing.procedural import sample_specs

SIZE = dict(frames=8, height=32, width=32, steps=20)
THRESHOLD_FLOOR_DB = 23.0  # measured 26.0 (threshold 0.95)
DENSITY_FLOOR_DB = 18.0  # measured 21.9 (density=0.5)
CAPTION = sample_specs(1, 77_000)[0].caption


def _u8(video: torch.Tensor):
    return (video.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def fixture():
    return load_fixture(WAN_FIXTURE_DIR)


@pytest.fixture(scope="module")
def dense(fixture):
    return generate(fixture, [CAPTION], [0], **SIZE)


def _sparse(fixture, **settings):
    stock = dict(fixture.transformer.attn_processors)
    proc = xattn_video.enable(
        fixture.transformer, stride=8, block_size=64, warmup_steps=4, backend="torch", min_len=0, **settings
    )
    try:
        video = generate(fixture, [CAPTION], [0], **SIZE)
        steps = proc.stats["generations"][0]["steps"]
    finally:
        proc.detach()
        fixture.transformer.set_attn_processor(stock)
    sparse = [s for s in steps if s["mode"] == "sparse"]
    assert [s["mode"] for s in steps] == ["dense"] * 4 + ["sparse"] * 16
    return video, sum(s["kept_blocks"] for s in sparse) / sum(s["total_blocks"] for s in sparse)


def test_the_wan_fixture_is_small_and_a_wan_transformer(fixture):
    from diffusers import WanTransformer3DModel

    assert sum(f.stat().st_size for f in WAN_FIXTURE_DIR.rglob("*.safetensors")) <= 10_000_000
    assert isinstance(fixture.transformer, WanTransformer3DModel) and fixture.family == "wan"


def test_threshold_one_is_stock_attention(fixture, dense):
    video, density = _sparse(fixture, threshold=1.0)
    assert density == 1.0
    assert video_psnr(mse_per_frame(_u8(dense[0]), _u8(video[0]))) > 60


def test_xattn_quality_floors(fixture, dense):
    other_seed = generate(fixture, [CAPTION], [1], **SIZE)
    unrelated = video_psnr(mse_per_frame(_u8(dense[0]), _u8(other_seed[0])))
    video, density = _sparse(fixture, threshold=0.95)
    assert 0 < density < 0.95
    psnr = video_psnr(mse_per_frame(_u8(dense[0]), _u8(video[0])))
    assert psnr >= THRESHOLD_FLOOR_DB > unrelated + 5
    video, density = _sparse(fixture, density=0.5)
    assert density == 0.5
    assert video_psnr(mse_per_frame(_u8(dense[0]), _u8(video[0]))) >= DENSITY_FLOOR_DB
