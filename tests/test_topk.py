"""Fixed-density (top-k) block selection: against float64 antidiagonal scores and block-sparse attention, alone
and through the HunyuanVideo processor's ``density`` option."""

from __future__ import annotations

import math

import pytest
import torch

from reference64 import antidiagonal_block_scores64, block_sparse_attention64
from xattn_video import XAttnProcessor
from xattn_video.core.topk import estimate_topk_blocks, select_topk
from xattn_video.testing.synthetic import video_like_qkv

pytestmark = pytest.mark.usefixtures("one_thread")


def _qkv(frames: int = 3, heads: int = 2, seed: int = 0, text: int = 12):
    """Video-like q/k/v: frames x 12 x 16 tokens plus ``text`` tokens (a ragged last block)."""
    return video_like_qkv(frames=frames, height=12, width=16, text_tokens=text, heads=heads, head_dim=32, seed=seed)


@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 1.0])
def test_select_topk_keeps_the_highest_scores_at_the_exact_share(density):
    scores = torch.rand(2, 3, 5, 11, generator=torch.Generator().manual_seed(1))
    sel = select_topk(scores, density)
    keep = max(1, math.ceil(density * 11 - 1e-9))
    assert (sel.mask.sum(-1) == keep).all()
    assert (sel.kv_count == keep).all()
    for b, h, r in ((0, 0, 0), (1, 2, 4), (0, 1, 3)):
        row = scores[b, h, r].double()
        kept, dropped = row[sel.mask[b, h, r]], row[~sel.mask[b, h, r]]
        assert dropped.numel() == 0 or kept.min() >= dropped.max()
        assert sel.kv_indices[b, h, r, :keep].tolist() == sorted(torch.nonzero(sel.mask[b, h, r]).flatten().tolist())
        assert (sel.kv_indices[b, h, r, keep:] == -1).all()


def test_estimate_topk_matches_float64_scores_and_attention():
    q, k, v = _qkv()
    block = 64
    sel = estimate_topk_blocks(q, k, density=0.3, stride=8, block_size=block, backend="torch")
    scores64 = antidiagonal_block_scores64(q, k, stride=8, block_size=block, causal=False)
    n_kb = scores64.shape[-1]
    keep = math.ceil(0.3 * n_kb)
    expected = torch.zeros_like(sel.mask)
    expected.scatter_(-1, scores64.topk(keep, dim=-1).indices, True)
    # the same blocks up to ties at the cut (float32 vs float64 scores)
    assert (sel.mask != expected).float().mean() < 0.02
    from xattn_video.core.attention import _sparse_attention

    out = _sparse_attention("torch")(q, k, v, sel, block_size=block, causal=False, scale=None)
    ref = block_sparse_attention64(q, k, v, sel.mask, block_size=block, causal=False)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_processor_density_option_keeps_that_share():
    q, k, v = _qkv(frames=5, heads=3, seed=2)
    n = q.shape[2]
    proc = XAttnProcessor(stride=8, block_size=64, backend="torch", density=0.25)
    assert proc.settings()["density"] == 0.25
    seen = []
    original = proc.select_blocks

    def spy(qq, kk):
        sel = original(qq, kk)
        seen.append(sel)
        return sel

    proc.select_blocks = spy
    out = proc.attention(q, k, v)
    (sel,) = seen
    n_kb = math.ceil(n / 64)
    assert (sel.kv_count == math.ceil(0.25 * n_kb)).all()
    ref = block_sparse_attention64(q, k, v, sel.mask, block_size=64, causal=False)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.1, True, "0.3"])
def test_density_is_checked(bad):
    with pytest.raises((ValueError, TypeError), match="density"):
        XAttnProcessor(density=bad)


def test_backend_density_option_keeps_that_share_on_a_tiny_wan_pipeline():
    """The xattn backend's ``density``: every sparse call keeps ceil(density x key blocks) blocks per query block,
    chosen by the estimate's scores (float64 reference), and attends exactly over them."""
    from backend_helpers import SPARSE, clean, generate, pipeline

    import xattn_video
    from xattn_video.diffusion.backend import XAttnSession

    pipe = pipeline("wan21")
    calls = []
    original = XAttnSession.select_blocks

    def spy(self, q, k, *, scale=None):
        sel = original(self, q, k, scale=scale)
        calls.append((q.clone(), k.clone(), sel))
        return sel

    try:
        XAttnSession.select_blocks = spy
        handle = xattn_video.enable(pipe, integration="backend", density=0.5, warmup_steps=1, backend="torch", **SPARSE)
        assert handle.settings()["density"] == 0.5
        generate(pipe, "wan21", steps=2)
    finally:
        XAttnSession.select_blocks = original
        clean(pipe)
    assert calls, "no sparse call reached select_blocks"
    for q, k, sel in calls:
        n_kb = sel.mask.shape[-1]
        assert (sel.kv_count == math.ceil(0.5 * n_kb - 1e-9)).all()
        scores64 = antidiagonal_block_scores64(
            q, k, stride=SPARSE["stride"], block_size=SPARSE["block_size"], causal=False
        )
        kept, dropped = scores64.masked_fill(~sel.mask, float("inf")), scores64.masked_fill(sel.mask, -float("inf"))
        # every kept block scores at least every dropped one, up to float32 rounding of the scores
        assert (kept.amin(-1) >= dropped.amax(-1) - 1e-5).all()
    densities = [s["density"] for g in handle.stats["generations"] for s in g["steps"]]
    assert densities[0] == 1.0 and 0 < densities[1] < 1
