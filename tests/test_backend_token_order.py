"""Tiled token order on the ``xattn`` backend: the grid read from the transformer's input, exact at threshold 1.0
(equal to stock diffusers), the gather/scatter round trip against a float64 computation in tiled order (text after
the video in place, ragged grid), and one-line refusals."""

from __future__ import annotations

import pytest
import torch
from backend_helpers import LOW_THRESHOLD, SPARSE, generate, pipeline, stock

import xattn_video
from reference64 import antidiagonal_block_scores64, block_sparse_attention64, select_blocks64
from xattn_video.core.token_order import tiled_order
from xattn_video.diffusion.attention_op import ForwardState, activate, deactivate
from xattn_video.diffusion.backend import XAttnSession, xattn_backend
from xattn_video.diffusion.steps import StepPosition

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", ["wan21", "hunyuan15"])
def test_tiled_threshold_one_equals_stock_and_low_threshold_runs_tiled(family):
    pipe = pipeline(family)
    session = xattn_video.enable(pipe, threshold=1.0, token_order="tiled", **SPARSE)
    out = generate(pipe, family)
    torch.testing.assert_close(out, stock(family), atol=2e-5, rtol=1e-5)
    assert session.settings()["token_order"] == "tiled" and session.settings()["tile"] == [1, 4, 4]
    # the grid reached the op: 9 frames of 128x192 -> latents 3 x 16 x 24 -> 3 x 8 x 12 tokens
    seen = []
    original = XAttnSession.select_blocks

    def spy(self, q, k, *, scale=None):
        seen.append(q.shape[2])
        return original(self, q, k, scale=scale)

    session = xattn_video.enable(pipe, threshold=LOW_THRESHOLD, token_order="tiled", warmup_steps=1, **SPARSE)
    hook = pipe.transformer._diffusers_hook.get_hook("xattn_video_steps")
    try:
        XAttnSession.select_blocks = spy
        generate(pipe, family, steps=2)
    finally:
        XAttnSession.select_blocks = original
    assert hook.last_state.grid == (3, 8, 12) and seen and min(seen) >= 288
    session.disable()


class Capture(XAttnSession):
    """Records the q/k each sparse call's block choice sees."""

    def select_blocks(self, q, k, *, scale=None):
        self.seen = (q.clone(), k.clone())
        return super().select_blocks(q, k, scale=scale)


@pytest.mark.parametrize("n_text", [0, 9])
def test_round_trip_against_float64_in_tiled_order(n_text):
    grid, tile = (3, 5, 7), (2, 2, 4)  # ragged on every axis
    n_video = 3 * 5 * 7
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n_video + n_text, 2, 16, generator=g) for _ in range(3))  # [B, S, H, D]
    session = Capture(threshold=0.6, stride=4, block_size=16, min_len=16, token_order="tiled", tile=tile)
    state = ForwardState(session, StepPosition(0, 0, 1.0), False, grid=grid)
    activate(state)
    try:
        out = xattn_backend(q, k, v)
    finally:
        deactivate()
    order = tiled_order(grid, tile)
    qt, kt, vt = (order.permute(t.transpose(1, 2), dim=2) for t in (q, k, v))  # [B, H, S, D], text in place
    torch.testing.assert_close(session.seen[0], qt, atol=0, rtol=0)  # the estimate saw the tiled order
    if n_text:
        torch.testing.assert_close(qt[:, :, n_video:], q.transpose(1, 2)[:, :, n_video:], atol=0, rtol=0)
    mask = select_blocks64(
        antidiagonal_block_scores64(qt, kt, stride=4, block_size=16, causal=False), threshold=0.6, causal=False
    )
    assert mask.double().mean() < 0.9  # the choice is sparse, so the order matters
    expected = order.unpermute(block_sparse_attention64(qt, kt, vt, mask, block_size=16, causal=False), dim=2)
    torch.testing.assert_close(out.transpose(1, 2).double(), expected, atol=1e-5, rtol=1e-5)


def test_tiled_refusals_are_one_line():
    from diffusers import WanTransformer3DModel

    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=8,
        freq_dim=16,
        ffn_dim=16,
        num_layers=1,
    )
    transformer.register_to_config(patch_size=None)  # a config that gives no patch size
    with pytest.raises(ValueError, match=r"^token_order='tiled' needs config.patch_size"):
        xattn_video.enable(transformer, token_order="tiled")
    with pytest.raises(ValueError, match=r"^token_order must be one of \['raster', 'tiled'\], got 'zigzag'"):
        XAttnSession(token_order="zigzag")
    # a segment shorter than the grid (video tokens not first): an error, not a silent raster run
    q = torch.randn(1, 64, 2, 16)
    activate(
        ForwardState(
            XAttnSession(min_len=16, block_size=16, token_order="tiled"), StepPosition(0, 0, 1.0), False, grid=(2, 8, 8)
        )
    )
    try:
        with pytest.raises(RuntimeError, match="grid of 128 video tokens, but this self-attention call's valid"):
            xattn_backend(q, q, q)
    finally:
        deactivate()


def test_ltx_packed_tokens_take_the_grid_from_their_arguments():
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    ltx = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        num_layers=2,
        caption_channels=16,
    ).eval()
    inputs = dict(
        hidden_states=torch.randn(1, 288, 8),
        encoder_hidden_states=torch.randn(1, 7, 16),
        encoder_attention_mask=torch.ones(1, 7),
        timestep=torch.tensor([900.0]),
        num_frames=3,
        height=8,
        width=12,
    )
    with torch.no_grad():
        reference = ltx(**inputs, return_dict=False)[0]
        session = xattn_video.enable(ltx, threshold=1.0, token_order="tiled", **SPARSE)
        out = ltx(**inputs, return_dict=False)[0]
        assert ltx._diffusers_hook.get_hook("xattn_video_steps").last_state.grid == (3, 8, 12)
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match=r"^token_order='tiled' needs LTXVideoTransformer3DModel's video grid"):
            ltx(**{**inputs, "width": 11}, return_dict=False)  # the arguments do not match the tokens
    session.disable()
