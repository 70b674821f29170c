"""3D-tiled token order: the permutation against a plain-Python statement of the order, round trips, block
compactness; the HunyuanVideo processor with token_order="tiled" against stock diffusers (threshold 1.0) and
against xattn_attention on explicitly permuted q/k/v (sparse); fewer kept blocks on 3D-local attention."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

import xattn_video
from xattn_video import XAttnProcessor, estimate_block_mask, xattn_attention
from xattn_video.core.token_order import (
    TokenOrder,
    attend_in_order,
    default_tile,
    grid_from_latents,
    tile_permutation,
    tiled_order,
)
from xattn_video.diffusion.steps import StepTracker
from xattn_video.testing.synthetic import gaussian_local_qk, video_like_qkv
from xattn_video.testing.tiny import build_tiny_hunyuan_pipeline

# (grid, tile): divisible, ragged in one, two and three axes, tiles larger than the grid, degenerate axes
CASES = [
    ((4, 8, 8), (2, 8, 8)),
    ((3, 16, 16), (1, 4, 4)),
    ((5, 9, 17), (2, 4, 4)),
    ((7, 3, 100), (2, 8, 8)),
    ((2, 5, 7), (3, 2, 5)),
    ((1, 1, 1), (2, 8, 8)),
    ((3, 1, 13), (1, 1, 4)),
    ((6, 10, 12), (9, 9, 9)),
    ((5, 21, 45), (2, 8, 8)),
]


def spec_order(grid, tile) -> list[int]:
    """The order as the module docstring states it, one token at a time: sort raster indices by (box flags,
    tile index in snake order, offset inside the tile)."""
    keys = []
    for f, y, x in itertools.product(*(range(n) for n in grid)):
        flags, tile_pos, offset, counts = [], [], [], []
        for c, n, t in zip((f, y, x), grid, tile, strict=True):
            t = min(t, n)
            whole = n - n % t
            rem = c >= whole
            size = n - whole if rem else t
            flags.append(rem)
            tile_pos.append((c - (whole if rem else 0)) // size)
            offset.append((c - (whole if rem else 0)) % size)
            counts.append(1 if rem else whole // t)
        it, ih, iw = tile_pos
        if it % 2:
            ih = counts[1] - 1 - ih
        if (it * counts[1] + ih) % 2:
            iw = counts[2] - 1 - iw
        keys.append((tuple(flags), it, ih, iw, *offset, (f * grid[1] + y) * grid[2] + x))
    return [key[-1] for key in sorted(keys)]


def coords(grid, index: torch.Tensor) -> torch.Tensor:
    _, H, W = grid
    return torch.stack([index // (H * W), (index // W) % H, index % W], dim=1)


# ---------------------------------------------------------------------------------------------- the order


@pytest.mark.parametrize("grid, tile", CASES)
def test_order_matches_its_statement_and_inverts(grid, tile):
    order = TokenOrder(grid, tile)
    assert order.index.tolist() == spec_order(grid, tile)
    assert torch.equal(order.index[order.inverse], torch.arange(math.prod(grid)))
    assert torch.equal(order.inverse[order.index], torch.arange(math.prod(grid)))


def test_large_ragged_grid_is_a_permutation_with_aligned_core():
    grid, tile = (33, 45, 80), (2, 8, 8)  # HunyuanVideo 720p after 2x2 patches
    index = tile_permutation(grid, tile)
    assert torch.equal(index.sort().values, torch.arange(118_800))
    c = coords(grid, index[: 32 * 40 * 80])  # the core of whole tiles comes first: 800 blocks, each one tile
    blocks = c.view(800, 128, 3)
    assert torch.equal(blocks.amax(1) - blocks.amin(1) + 1, torch.tensor([2, 8, 8]).expand(800, 3))
    assert torch.equal(blocks.amin(1) % torch.tensor([2, 8, 8]), torch.zeros(800, 3, dtype=torch.long))


@pytest.mark.parametrize("grid, tile", CASES)
@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
def test_permute_round_trips_and_leaves_other_tokens(grid, tile, layout):
    n_video, n_text, offset = math.prod(grid), 11, 3
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, offset + n_video + n_text, 3, 4, generator=gen)
    dim = 1
    if layout == "bhnd":
        x, dim = x.transpose(1, 2).contiguous(), 2
    order = tiled_order(grid, tile)
    y = order.permute(x, dim=dim, offset=offset)
    video = x.narrow(dim, offset, n_video)
    assert torch.equal(y.narrow(dim, offset, n_video), video.index_select(dim, order.index))
    assert torch.equal(y.narrow(dim, 0, offset), x.narrow(dim, 0, offset))
    assert torch.equal(y.narrow(dim, offset + n_video, n_text), x.narrow(dim, offset + n_video, n_text))
    assert torch.equal(order.unpermute(y, dim=dim, offset=offset), x)
    # video-only tensors, negative dim, bf16
    v = video.to(torch.bfloat16)
    assert torch.equal(order.unpermute(order.permute(v, dim=dim - 4), dim=dim - 4), v)


@pytest.mark.parametrize("grid, tile", CASES + [((33, 45, 80), (2, 8, 8)), ((13, 30, 52), (2, 8, 8))])
def test_blocks_are_compact(grid, tile):
    """Blocks of the tiled order (block = the volume of the tile clipped to the grid): a block of the core is
    exactly one tile; a block inside one remainder box (partial tiles in snake order) spans a box at most 3x its
    token count; only blocks at the few box boundaries may do otherwise."""
    index = tile_permutation(grid, tile)
    c = coords(grid, index)
    clipped = torch.tensor([min(t, n) for t, n in zip(tile, grid, strict=True)])
    block = int(clipped.prod())
    whole = torch.tensor(grid) - torch.tensor(grid) % clipped
    box = (c >= whole).long() @ torch.tensor([4, 2, 1])
    n_core = int(whole.prod())
    crossing = 0
    for start in range(0, index.numel(), block):
        cb, bb = c[start : start + block], box[start : start + block]
        extent = cb.amax(0) - cb.amin(0) + 1
        if start + block <= n_core:
            assert torch.equal(extent, clipped)
            assert torch.equal(cb.amin(0) % clipped, torch.zeros(3, dtype=torch.long))
        elif bb.unique().numel() == 1:
            assert int(extent.prod()) <= 3 * cb.shape[0], (start, extent.tolist())
        else:
            crossing += 1
    assert crossing <= int(box.unique().numel()) - 1


def _block_spread(grid, index: torch.Tensor) -> float:
    """Mean distance between two tokens of one 128-token block (whole blocks only)."""
    usable = index.numel() - index.numel() % 128
    c = coords(grid, index[:usable]).float().view(-1, 128, 3)
    return float(torch.cdist(c, c).mean())


@pytest.mark.parametrize("grid", [(33, 45, 80), (9, 30, 52), (4, 16, 64)])
def test_tiled_blocks_are_smaller_than_raster_blocks(grid):
    """On wide grids (rows much shorter than a block, as in HunyuanVideo at 720p)."""
    tiled = _block_spread(grid, tile_permutation(grid, (2, 8, 8)))
    raster = _block_spread(grid, torch.arange(math.prod(grid)))
    assert tiled < 0.5 * raster, (tiled, raster)


def test_cache_defaults_and_errors():
    assert tiled_order((3, 4, 5), (1, 2, 2)) is tiled_order((3, 4, 5), (1, 2, 2))
    assert tiled_order((3, 4, 5)).tile == (2, 8, 8) == default_tile(128)
    assert [math.prod(default_tile(b)) for b in (16, 32, 64, 128, 256)] == [16, 32, 64, 128, 256]
    assert default_tile(16) == (1, 4, 4)
    assert grid_from_latents((2, 16, 33, 90, 160), patch_size=2, patch_size_t=1) == (33, 45, 80)
    assert grid_from_latents((1, 16, 21, 60, 104), patch_size=(1, 2, 2)) == (21, 30, 52)  # Wan's tuple
    order = tiled_order((2, 3, 4), (1, 2, 2))
    with pytest.raises(ValueError, match="x has 20 tokens along dim 1, fewer than offset 0 \\+ 24 video tokens"):
        order.permute(torch.zeros(1, 20, 2))
    with pytest.raises(ValueError, match="^tile must be three positive ints"):
        tiled_order((2, 3, 4), (0, 2, 2))
    with pytest.raises(ValueError, match="^tile must be three positive ints"):
        tiled_order((2, 3, 4), (2, 2))
    with pytest.raises(ValueError, match="^grid must be three positive ints"):
        tiled_order((2, 3.0, 4), (1, 2, 2))
    with pytest.raises(ValueError, match="^latent_shape must be"):
        grid_from_latents((1, 16, 90, 160), 2)


def test_attend_in_order_for_other_integrations():
    """[B, N, H, D] as diffusers' dispatcher passes: dense SDPA is unchanged by the order (equivariance); sparse
    XAttention equals xattn_attention on q/k/v gathered by the order, scattered back by hand."""
    grid = (3, 8, 16)
    q, k, v = (t.transpose(1, 2) for t in video_like_qkv(frames=3, height=8, width=16, text_tokens=20, seed=2))
    order = tiled_order(grid, (1, 4, 8))

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)

    def sparse(q, k, v):
        bhnd = (t.transpose(1, 2) for t in (q, k, v))
        return xattn_attention(*bhnd, threshold=0.6, stride=4, block_size=32, backend="torch").transpose(1, 2)

    torch.testing.assert_close(attend_in_order(sdpa, q, k, v, order), sdpa(q, k, v), rtol=1e-5, atol=1e-6)
    assert attend_in_order(sparse, q, k, v, None).equal(sparse(q, k, v))
    perm = torch.cat([order.index, torch.arange(384, q.shape[1])])
    expected = torch.empty_like(q)
    expected[:, perm] = sparse(q[:, perm], k[:, perm], v[:, perm])
    got = attend_in_order(sparse, q, k, v, order)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert (got - sparse(q, k, v)).abs().max() > 1e-3  # the order changed the block choice


def test_step_tracker_keeps_the_latents_shape():
    tracker = StepTracker()
    assert tracker.latents_shape is None
    tracker.observe(900.0, torch.zeros(2, 4, 3, 8, 8))
    assert tracker.latents_shape == (2, 4, 3, 8, 8)
    tracker.observe(800.0)
    assert tracker.latents_shape is None
    tracker.observe(700.0, torch.zeros(1, 4, 5, 8, 8))
    tracker.reset()
    assert tracker.latents_shape is None


# ---------------------------------------------------------------------------------------------- processor

GEN = dict(height=128, width=128, num_frames=9)  # a 3 x 16 x 16 latent grid (patch 1)
PROMPT = "a cat walks on the grass"
TINY = dict(block_size=16, stride=4, tile=(1, 4, 4), backend="torch")  # 16-token blocks: 48 video blocks


pytestmark = pytest.mark.usefixtures("one_thread")


def latents() -> torch.Tensor:
    return torch.randn(1, 4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def generate(pipe, steps=2):
    return pipe(PROMPT, latents=latents(), num_inference_steps=steps, output_type="latent", **GEN).frames


def test_threshold_one_tiled_equals_raster_equals_stock():
    stock = generate(build_tiny_hunyuan_pipeline(seed=0))
    outs = {}
    for token_order in ("raster", "tiled"):
        pipe = build_tiny_hunyuan_pipeline(seed=0)
        proc = xattn_video.enable(pipe, threshold=1.0, token_order=token_order, **TINY)
        outs[token_order] = generate(pipe)
        steps = proc.stats["generations"][0]["steps"]
        assert [s["mode"] for s in steps] == ["sparse", "sparse"]
        assert proc.stats["settings"]["token_order"] == token_order and proc.stats["settings"]["tile"] == [1, 4, 4]
    torch.testing.assert_close(outs["tiled"], stock, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs["raster"], stock, rtol=1e-4, atol=1e-5)


def test_dense_steps_and_layers_stay_raster(monkeypatch):
    """No reorder on dense steps (same bits as raster order) nor in dense layers; on a sparse step, one gather of
    the video hidden states per sparse layer and one of the rotary embedding's cos and sin per forward."""
    shapes = []
    permute = TokenOrder.permute

    def spy(self, x, dim=1, offset=0):
        shapes.append(tuple(x.shape))
        return permute(self, x, dim, offset)

    monkeypatch.setattr(TokenOrder, "permute", spy)
    outs = {}
    for token_order in ("raster", "tiled"):
        pipe = build_tiny_hunyuan_pipeline(seed=0)
        xattn_video.enable(pipe, threshold=0.5, token_order=token_order, warmup_steps=1, **TINY)
        outs[token_order] = generate(pipe, steps=1)
    assert shapes == [] and torch.equal(outs["tiled"], outs["raster"])
    pipe = build_tiny_hunyuan_pipeline(seed=0)
    xattn_video.enable(pipe, threshold=0.5, token_order="tiled", warmup_steps=1, dense_layers=(1,), **TINY)
    generate(pipe, steps=2)
    assert sorted(shapes) == [(1, 768, 32)] * 3 + [(768, 16)] * 2  # layers 0, 2, 3; RoPE cos, sin


def _reference_attention(index: torch.Tensor, n_video: int, threshold: float):
    """A stand-in for diffusers' dispatch_attention_fn: per sample, the valid segment (from the key-padding
    mask) with its video tokens gathered by ``index``, xattn_attention, then scattered back. Padded rows: 0."""

    def attend(query, key, value, attn_mask=None, **kwargs):
        out = torch.zeros_like(query)
        for b in range(query.shape[0]):
            length = int(attn_mask[b].sum())
            perm = torch.cat([index, torch.arange(n_video, length)])
            q, k, v = (t[b : b + 1, perm].transpose(1, 2) for t in (query, key, value))
            o = xattn_attention(q, k, v, threshold=threshold, stride=4, block_size=16, backend="torch")
            out[b, perm] = o[0].transpose(0, 1)
        return out

    return attend


def test_sparse_tiled_layer_equals_xattn_on_explicitly_permuted_qkv(monkeypatch):
    """Each joint layer of the tiny transformer at a sparse step: the processor's output with tiled order equals
    stock's processor whose attention call is replaced by xattn_attention on q/k/v gathered into the tiled order
    (and scattered back), on every video token and every valid text token; raster order gives another result."""
    import diffusers.models.transformers.transformer_hunyuan_video as hv

    pipe = build_tiny_hunyuan_pipeline(seed=0)
    model = pipe.transformer
    joint = [b.attn for b in model.transformer_blocks] + [b.attn for b in model.single_transformer_blocks]
    calls = {}

    def capture(module, args, kwargs):
        calls.setdefault(module, kwargs)

    hooks = [a.register_forward_pre_hook(capture, with_kwargs=True) for a in joint]
    generate(pipe, steps=1)
    for h in hooks:
        h.remove()

    threshold, grid = 0.5, (3, 16, 16)
    index = tile_permutation(grid, (1, 4, 4))
    monkeypatch.setattr(hv, "dispatch_attention_fn", _reference_attention(index, 768, threshold))
    tiled = XAttnProcessor(threshold=threshold, token_order="tiled", **TINY).attach(model)
    raster = XAttnProcessor(threshold=threshold, **TINY).attach(model)
    tiled.tracker.observe(1000.0, latents())  # a sparse step of a [1, 4, 3, 16, 16] latent
    differs = []
    for attn in joint:
        kw = calls[attn]
        n_text_valid = int(kw["attention_mask"].sum()) - 768
        ref_video, ref_text = HunyuanVideoAttnProcessor2_0()(attn, **kw)
        video, text = tiled(attn, **kw)
        torch.testing.assert_close(video, ref_video, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(text[:, :n_text_valid], ref_text[:, :n_text_valid], rtol=1e-5, atol=1e-5)
        differs.append(float((raster(attn, **kw)[0] - ref_video).abs().max().detach()))
    assert min(differs) > 1e-3  # the block choice differs between orders: the test sees the order
    layers = tiled.stats["generations"][0]["steps"][0]["layers"]
    assert tiled.stats["settings"]["token_order"] == "tiled" and all(la["density"] < 1 for la in layers)


def test_tiled_needs_the_grid_and_valid_parameters():
    pipe = build_tiny_hunyuan_pipeline(seed=0)
    proc = XAttnProcessor(threshold=0.5, token_order="tiled", **TINY)
    pipe.transformer.set_attn_processor(proc)
    with pytest.raises(RuntimeError, match="token_order='tiled'.* needs the video grid.*xattn_video.enable"):
        generate(pipe, steps=1)
    with pytest.raises(ValueError, match=r"^token_order must be one of \['raster', 'tiled'\], got 'snake'$"):
        XAttnProcessor(token_order="snake")
    with pytest.raises(ValueError, match=r"^tile must be three positive ints .*\(2, 8, 8\), got \(2, 8\)$"):
        xattn_video.enable(pipe, token_order="tiled", tile=(2, 8))
    assert XAttnProcessor(block_size=64).tile == (1, 8, 8)


# ---------------------------------------------------------------------------------------------- sparsity


@pytest.mark.parametrize("grid", [(6, 24, 80), (5, 21, 45), (9, 30, 52)])
@pytest.mark.parametrize("sigma", [(1.0, 1.0, 1.0), (2.0, 2.0, 2.0), (1.0, 2.0, 2.0), (3.0, 1.0, 1.0)])
def test_tiled_order_keeps_fewer_blocks_on_3d_local_attention(grid, sigma):
    """Attention that is a Gaussian kernel in (frame, row, column): at threshold 0.9, tiles of 2 x 8 x 8 keep
    well under the raster order's blocks (measured 0.19-0.51x over these cases)."""
    q, k = gaussian_local_qk(grid, sigma)
    order = tiled_order(grid, (2, 8, 8))
    raster = estimate_block_mask(q, k, threshold=0.9, stride=8, backend="torch").float().mean()
    tiled = estimate_block_mask(order.permute(q, 2), order.permute(k, 2), threshold=0.9, stride=8, backend="torch")
    assert float(tiled.float().mean()) < 0.8 * float(raster), (float(tiled.float().mean()), float(raster))
