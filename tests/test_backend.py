"""The ``xattn`` diffusers attention backend: registration, routing, masks, and whole tiny pipelines (Wan 2.1,
Wan 2.2 A14B, Wan 2.2 TI2V, HunyuanVideo 1.5, HunyuanVideo) against stock diffusers."""

from __future__ import annotations

import diffusers
import pytest
import torch
from backend_helpers import FAMILIES, LOW_THRESHOLD, SPARSE, clean, generate, pipeline, step_rows, stock
from diffusers.models.attention_dispatch import AttentionBackendName, attention_backend

import xattn_video
from xattn_video import XAttnProcessor, xattn_attention
from xattn_video.diffusion import _diffusers_private as private
from xattn_video.diffusion.attention_op import ForwardState, activate, analyse_mask, deactivate
from xattn_video.diffusion.backend import XAttnSession, register_xattn_backend, xattn_backend
from xattn_video.diffusion.steps import StepPosition

# ---------------------------------------------------------------------------------------------- registration


def test_backend_is_registered_and_process_default_kept():
    register_xattn_backend()
    member = AttentionBackendName("xattn")
    assert member.value == "xattn" and "XATTN" in AttentionBackendName.__members__
    assert private.supports_context_parallel("xattn")
    pipe = pipeline("wan21")
    clean(pipe)
    before = private.active_backend()
    session = xattn_video.enable(pipe, threshold=1.0, **SPARSE)
    processors = [
        m.processor for m in pipe.transformer.modules() if hasattr(getattr(m, "processor", None), "_attention_backend")
    ]
    assert processors and all(p._attention_backend == member for p in processors)
    assert private.active_backend() == before  # enable() leaves the process-wide default alone
    session.disable()
    assert all(p._attention_backend is None for p in processors)
    # diffusers' own set_attention_backend does move the process default (what enable() undoes)
    pipe.transformer.set_attention_backend("xattn")
    try:
        assert private.active_backend() == member
    finally:
        private.set_active_backend(before)
        clean(pipe)


def test_attention_backend_context_manager_selects_xattn():
    pipe = pipeline("wan21")
    clean(pipe)
    session = xattn_video.enable(pipe, threshold=LOW_THRESHOLD, select_backend=False, **SPARSE)
    try:
        generate(pipe, "wan21", steps=2)
        assert session.stats["generations"] == []  # processors kept diffusers' default (native)
        with attention_backend("xattn"):
            generate(pipe, "wan21", steps=2)
        modes = [mode for _, _, mode, _ in step_rows(session.stats)]
        assert modes == ["sparse", "sparse"]
    finally:
        session.disable()


def test_unsupported_diffusers_version_fails_with_one_line(monkeypatch):
    pipe = pipeline("wan21")
    for version in ("0.43.0", "0.41.2"):
        monkeypatch.setattr(diffusers, "__version__", version)
        with pytest.raises(RuntimeError) as err:
            xattn_video.enable(pipe, threshold=0.9)
        message = str(err.value)
        assert "\n" not in message and f"found diffusers {version}" in message and "0.42.x" in message


def test_unsupported_pipelines_fail_with_one_line():
    from diffusers import (
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
        MochiTransformer3DModel,
    )

    cog = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=8, num_layers=1, sample_width=8, sample_height=8, sample_frames=3, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8,
    )
    cog_pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=cog,
                                 scheduler=CogVideoXDDIMScheduler())
    mochi = MochiTransformer3DModel(num_attention_heads=2, attention_head_dim=8, num_layers=1, in_channels=4,
                                    text_embed_dim=8, time_embed_dim=4, pooled_projection_dim=8)
    for target, name in ((cog_pipe, "CogVideoXPipeline"), (cog, "CogVideoXTransformer3DModel"),
                         (mochi, "MochiTransformer3DModel")):
        with pytest.raises(TypeError) as err:
            xattn_video.enable(target)
        message = str(err.value)
        assert "\n" not in message and f"got {name}" in message and "WanPipeline" in message


def test_context_parallel_refusals_in_one_line():
    """Ulysses runs (tests/test_parallel.py); ring attention and configs without context parallelism are refused."""
    from diffusers import ContextParallelConfig, ParallelConfig

    q = torch.randn(1, 32, 2, 8)
    with pytest.raises(ValueError, match="runs under context parallelism only"):
        xattn_backend(q, q, q, _parallel_config=object())
    ring = ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=2))
    with pytest.raises(ValueError, match=r"^ring_degree=2 is not supported by the xattn backend: [^\n]*$"):
        xattn_backend(q, q, q, _parallel_config=ring)


# ---------------------------------------------------------------------------------------------- whole pipelines


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_threshold_one_full_warmup_and_warmup_one(family):
    pipe = pipeline(family)
    reference = stock(family)
    # threshold 1.0 on every step: the sparse path keeps every block and equals stock diffusers
    session = xattn_video.enable(pipe, threshold=1.0, **SPARSE)
    out = generate(pipe, family)
    assert [(mode, density) for _, _, mode, density in step_rows(session.stats)] == [("sparse", 1.0)] * 3
    torch.testing.assert_close(out, reference, atol=2e-5, rtol=1e-5)
    # warmup over every step: dense attention over the valid segment, equal to stock
    session = xattn_video.enable(pipe, threshold=LOW_THRESHOLD, warmup_steps=3, **SPARSE)
    out = generate(pipe, family)
    assert [mode for _, _, mode, _ in step_rows(session.stats)] == ["dense"] * 3
    torch.testing.assert_close(out, reference, atol=2e-5, rtol=1e-5)
    # one warmup step: later steps go sparse (density below 1 there only) and the result moves
    session = xattn_video.enable(pipe, threshold=LOW_THRESHOLD, warmup_steps=1, **SPARSE)
    out = generate(pipe, family)
    rows = step_rows(session.stats)
    assert [mode for _, _, mode, _ in rows] == ["dense", "sparse", "sparse"]
    assert rows[0][3] == 1.0 and all(density < 0.6 for *_, density in rows[1:])
    assert (out - reference).abs().max() > 1e-3
    session.disable()


def test_cross_attention_and_short_calls_go_native():
    pipe = pipeline("wan21")
    session = xattn_video.enable(pipe, threshold=LOW_THRESHOLD)  # default min_len: 288 tokens are short
    out = generate(pipe, "wan21")
    stats = session.stats
    layers, forwards, steps = 2, 2, 3  # true CFG: two forwards a step
    assert stats["native_calls"] == {"cross_attention": layers * forwards * steps, "short": layers * forwards * steps}
    assert {layer["mode"] for step in stats["generations"][0]["steps"] for layer in step["layers"]} == {"native"}
    torch.testing.assert_close(out, stock("wan21"), atol=0, rtol=0)
    session = xattn_video.enable(pipe, threshold=LOW_THRESHOLD, **SPARSE)
    generate(pipe, "wan21")
    assert session.stats["native_calls"] == {"cross_attention": layers * forwards * steps}
    session.disable()


def test_hunyuan_keeps_processor_by_default_and_takes_the_backend():
    pipe = pipeline("hunyuan")
    reference = stock("hunyuan")
    proc = xattn_video.enable(pipe, threshold=LOW_THRESHOLD, stride=4, block_size=16, warmup_steps=1)
    assert isinstance(proc, XAttnProcessor)
    generate(pipe, "hunyuan")
    session = xattn_video.enable(pipe, integration="backend", threshold=1.0, **SPARSE)
    assert isinstance(session, XAttnSession)
    out = generate(pipe, "hunyuan")
    torch.testing.assert_close(out, reference, atol=2e-5, rtol=1e-5)
    # the same statistics structure from both integrations
    p_stats, b_stats = proc.stats, session.stats
    assert set(p_stats) == set(b_stats) - {"native_calls"}
    for stats in (p_stats, b_stats):  # estimate_fp8="auto" as both resolved it on these CPU tensors
        assert stats["resolved"]["estimate_fp8"] is False and stats["resolved"]["backend"] in ("torch", "triton")
    p_step, b_step = p_stats["generations"][0]["steps"][1], b_stats["generations"][0]["steps"][1]
    assert set(p_step) == set(b_step) and set(p_step["layers"][0]) == set(b_step["layers"][0])
    assert p_step["mode"] == "sparse" and p_step["density"] < 1.0
    assert len(b_step["layers"]) == len(p_step["layers"])  # layer i = joint block i in both
    with pytest.raises(ValueError, match="integration='backend'"):
        xattn_video.enable(pipe, warmup_fraction=0.5)
    with pytest.raises(ValueError, match="HunyuanVideo only"):
        xattn_video.enable(pipeline("wan21"), integration="processor")
    # back to the processor: the backend session lets go (no hook, no xattn backend left behind)
    proc = xattn_video.enable(pipe, threshold=1.0, stride=4, block_size=16)
    assert pipe.transformer._diffusers_hook.get_hook("xattn_video_steps") is None
    torch.testing.assert_close(generate(pipe, "hunyuan"), reference, atol=2e-5, rtol=1e-5)
    assert proc.stats["totals"]["calls"] == 3 * 4
    clean(pipe)
    clean(pipeline("wan21"))


def test_save_and_reset_stats(tmp_path):
    import json

    pipe = pipeline("wan21")
    session = xattn_video.enable(pipe, threshold=LOW_THRESHOLD, warmup_steps=1, **SPARSE)
    generate(pipe, "wan21", steps=2)
    path = session.save_stats(tmp_path / "stats.json")
    saved = json.loads(open(path).read())
    assert saved["settings"] == session.settings() and step_rows(saved) == step_rows(session.stats)
    session.reset_stats()
    assert session.stats["generations"] == [] and "native_calls" not in session.stats
    session.disable()


# ---------------------------------------------------------------------------------------------- masks, op level


def _qkv(batch=2, n=96, heads=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, n, heads, dim, generator=g) for _ in range(3)]


def _prefix(lengths, n):
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]  # [B, N]


def _run(session, q, k, v, mask, dense=False):
    activate(ForwardState(session, StepPosition(0, 0, 1.0), dense))
    try:
        return xattn_backend(q, k, v, attn_mask=mask)
    finally:
        deactivate()


def _native(q, k, v, mask):
    return private.native_backend()(query=q, key=k, value=v, attn_mask=mask)


LENGTHS = [80, 57]
N = 96


def _masks():
    valid = _prefix(LENGTHS, N)
    return {
        "key_padding": valid[:, None, None, :],  # HunyuanVideo: [B, 1, 1, N]
        "outer": (valid[:, :, None] & valid[:, None, :])[:, None],  # HunyuanVideo 1.5: [B, 1, N, N]
        "key_padding_full": valid[:, None, None, :].expand(-1, 1, N, -1),  # every row the same prefix
    }


@pytest.mark.parametrize("kind", ["key_padding", "outer", "key_padding_full"])
def test_masks_threshold_one_equal_native(kind):
    q, k, v = _qkv()
    mask = _masks()[kind]
    session = XAttnSession(threshold=1.0, **SPARSE)
    for dense in (False, True):
        out = _run(session, q, k, v, mask, dense=dense)
        torch.testing.assert_close(out, _native(q, k, v, mask), atol=1e-5, rtol=1e-5)
    assert "native_calls" not in session.stats  # both went through XAttention's own paths
    assert [layer["mode"] for layer in session.stats["generations"][0]["steps"][0]["layers"]] == ["mixed"]


@pytest.mark.parametrize("kind", ["key_padding", "outer"])
def test_masks_sparse_valid_rows_are_xattn_and_padded_rows_native(kind):
    q, k, v = _qkv()
    mask = _masks()[kind]
    session = XAttnSession(threshold=LOW_THRESHOLD, **SPARSE)
    out = _run(session, q, k, v, mask)
    native = _native(q, k, v, mask)
    for b, length in enumerate(LENGTHS):
        segment = [t[b : b + 1, :length].transpose(1, 2) for t in (q, k, v)]
        expected = xattn_attention(*segment, threshold=LOW_THRESHOLD, stride=4, block_size=16).transpose(1, 2)
        torch.testing.assert_close(out[b : b + 1, :length], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[b, length:], native[b, length:], atol=1e-5, rtol=1e-5)
    if kind == "outer":
        assert out[1, LENGTHS[1] :].abs().max() == 0
    assert session.stats["totals"]["density"] < 0.8


def test_masks_it_cannot_honour_go_native():
    q, k, v = _qkv()
    holed = _prefix(LENGTHS, N)
    holed[0, 10] = False  # a hole: not a key-padding prefix
    additive = torch.zeros(2, 1, 1, N)
    session = XAttnSession(threshold=LOW_THRESHOLD, **SPARSE)
    for mask in (holed[:, None, None, :], additive, torch.ones(N, N, dtype=torch.bool)):
        torch.testing.assert_close(_run(session, q, k, v, mask), _native(q, k, v, mask), atol=0, rtol=0)
    assert session.stats["native_calls"] == {"mask": 3}


def test_analyse_mask_reads_the_structure():
    masks = _masks()
    assert analyse_mask(None, 2, N) == ([N, N], True)
    assert analyse_mask(masks["key_padding"], 2, N) == (LENGTHS, True)
    assert analyse_mask(masks["key_padding"][:, 0, 0], 2, N) == (LENGTHS, True)  # [B, N]
    assert analyse_mask(masks["outer"], 2, N) == (LENGTHS, False)
    assert analyse_mask(masks["key_padding_full"], 2, N) == (LENGTHS, True)
    assert analyse_mask(masks["outer"][:1], 2, N) == ([80, 80], False)  # one mask for the whole batch
    mixed = torch.cat([masks["outer"][:1], masks["key_padding_full"][1:]])
    assert analyse_mask(mixed, 2, N) is None  # padded rows see keys in one sample and nothing in the other
    bad_row = masks["outer"].clone()
    bad_row[0, 0, 5, 3] = False  # one valid row not the prefix
    assert analyse_mask(bad_row, 2, N) is None
    assert analyse_mask(torch.zeros(2, 1, 1, N, dtype=torch.bool), 2, N) is None  # no valid token


def test_dropout_and_return_lse_are_diffusers_native():
    q, k, v = _qkv()
    session = XAttnSession(threshold=LOW_THRESHOLD, **SPARSE)
    activate(ForwardState(session, StepPosition(0, 0, 1.0), False))
    try:
        torch.manual_seed(0)
        out = xattn_backend(q, k, v, dropout_p=0.5)
        torch.manual_seed(0)
        torch.testing.assert_close(out, private.native_backend()(query=q, key=k, value=v, dropout_p=0.5))
        with pytest.raises(ValueError, match="return_lse"):  # what diffusers' native backend says about it
            xattn_backend(q, k, v, return_lse=True)
    finally:
        deactivate()
    assert session.stats["native_calls"] == {"dropout": 1, "return_lse": 1}


# ---------------------------------------------------------------------------------------------- LTX, SkyReels-V2


def test_ltx_and_skyreels_transformers_threshold_one_equal_native():
    from diffusers import LTXVideoTransformer3DModel, SkyReelsV2Transformer3DModel

    torch.manual_seed(0)
    ltx = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=2, caption_channels=16,
    ).eval()
    timestep = torch.full((1, 288), 900.0)
    timestep[:, :96] = 0.0  # image-to-video: the conditioning frame's tokens at 0
    ltx_inputs = dict(
        hidden_states=torch.randn(1, 288, 8), encoder_hidden_states=torch.randn(1, 7, 16),
        encoder_attention_mask=torch.ones(1, 7), timestep=timestep, num_frames=3, height=8, width=12,
    )
    skyreels = SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=1024,
    ).eval()
    skyreels_inputs = dict(
        hidden_states=torch.randn(1, 4, 3, 16, 24), timestep=torch.tensor([900.0]),
        encoder_hidden_states=torch.randn(1, 7, 16),
    )
    for transformer, inputs in ((ltx, ltx_inputs), (skyreels, skyreels_inputs)):
        with torch.no_grad():
            reference = transformer(**inputs, return_dict=False)[0]
            session = xattn_video.enable(transformer, threshold=1.0, **SPARSE)
            out = transformer(**inputs, return_dict=False)[0]
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
        (step,) = session.stats["generations"][0]["steps"]
        assert (step["timestep"], step["mode"], len(step["layers"])) == (900.0, "sparse", 2)
        assert session.stats["native_calls"] == {"cross_attention": 2}
        session.disable()
