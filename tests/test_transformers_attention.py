"""The ``xattn`` entry of transformers' attention registry: dispatch, exactness, stats, the tiny Qwen2-VL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xattn_video.llm import transformers_attention as xta
from xattn_video.llm.qwen_inputs import video_messages
from xattn_video.testing.tiny_qwen import (
    build_tiny_qwen2_5_vl,
    build_tiny_qwen2vl,
    build_tiny_qwen_processor,
    save_tiny_qwen,
)

SMALL = dict(block_size=16, stride=4, min_len=64)


class FakeAttention(torch.nn.Module):
    """What the registry function reads from a transformers attention module."""

    def __init__(self, causal: bool = True, groups: int = 2, layer_idx: int | None = 3):
        super().__init__()
        self.is_causal = causal
        self.num_key_value_groups = groups
        self.layer_idx = layer_idx


def _qkv(n: int, heads: int = 4, kv_heads: int = 2, d: int = 16, batch: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, d, generator=g)
    k = torch.randn(batch, kv_heads, n, d, generator=g)
    v = torch.randn(batch, kv_heads, n, d, generator=g)
    return q, k, v


def _reference(q, k, v, causal=True, mask=None):
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, enable_gqa=True)
    return out.transpose(1, 2)


@pytest.fixture(autouse=True)
def _restore_settings():
    with xta.settings():
        yield


def test_register_puts_function_and_mask_in_the_registries():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    xta.register()
    assert AttentionInterface._global_mapping["xattn"] is xta.xattn_attention_forward
    assert AttentionMaskInterface._global_mapping["xattn"] is sdpa_mask


def test_threshold_one_equals_causal_gqa_sdpa_and_counts_the_call():
    q, k, v = _qkv(100)
    with xta.settings(threshold=1.0, **SMALL), xta.collect_stats() as stats:
        out, weights = xta.xattn_attention_forward(FakeAttention(), q, k, v, None, scaling=None)
    assert weights is None and out.shape == (1, 100, 4, 16)
    torch.testing.assert_close(out, _reference(q, k, v), atol=1e-5, rtol=1e-5)
    assert stats.xattn_calls == 1 and stats.density == 1.0 and not stats.dense_calls
    assert stats.layers == [(3, 100, 1.0)]


def test_low_threshold_drops_blocks_and_stays_close_to_dense():
    q, k, v = _qkv(256, seed=1)
    with xta.settings(threshold=0.5, **SMALL), xta.collect_stats() as stats:
        out, _ = xta.xattn_attention_forward(FakeAttention(), q, k, v, None)
    assert stats.density < 1.0
    assert stats.kept_blocks < stats.total_blocks == 4 * (16 * 17 // 2)  # 4 heads x 16 causal block rows
    ref = _reference(q, k, v)
    assert not torch.allclose(out, ref, atol=1e-4)
    assert (out - ref).abs().mean() < 0.5 * ref.abs().mean()


@pytest.mark.parametrize(
    "case, reason",
    [("decode", "decode"), ("cached", "cached_prefill"), ("short", "short"), ("mask", "mask"), ("vision", "vision")],
)
def test_dense_paths_are_exact_sdpa_and_counted(case, reason):
    q, k, v = _qkv(128, seed=2)
    module, mask, causal = FakeAttention(), None, True
    if case == "decode":
        q = q[:, :, -1:]
        causal = False  # one query attends to every key
    elif case == "cached":
        q = q[:, :, -40:]
        idx = torch.arange(128)
        mask = (idx[-40:, None] >= idx[None, :])[None, None]  # lower-right aligned causal block
    elif case == "short":
        q, k, v = q[:, :, :50], k[:, :, :50], v[:, :, :50]
    elif case == "mask":
        valid = torch.ones(128, dtype=torch.bool)
        valid[:7] = False  # left padding
        idx = torch.arange(128)
        mask = ((idx[:, None] >= idx[None, :]) & valid[None, :])[None, None]
    elif case == "vision":
        module, causal = FakeAttention(causal=False, groups=1, layer_idx=None), False
        q, k, v = _qkv(128, heads=2, kv_heads=2, seed=3)
    with xta.settings(threshold=0.3, **SMALL), xta.collect_stats() as stats:
        out, _ = xta.xattn_attention_forward(module, q, k, v, mask)
    expected = _reference(q, k, v, causal=causal, mask=mask)
    if case == "mask":  # fully padded query rows are undefined in SDPA; compare the real rows
        out, expected = out[:, 7:], expected[:, 7:]
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    assert stats.xattn_calls == 0 and dict(stats.dense_calls) == {reason: 1}


def test_vision_xattn_runs_noncausal_on_long_chunks_only():
    module = FakeAttention(causal=False, groups=1, layer_idx=None)
    long_q, long_k, long_v = _qkv(128, heads=2, kv_heads=2, seed=4)
    with xta.settings(threshold=1.0, vision="xattn", **SMALL), xta.collect_stats() as stats:
        out, _ = xta.xattn_attention_forward(module, long_q, long_k, long_v, None, is_causal=False)
        xta.xattn_attention_forward(module, long_q[:, :, :32], long_k[:, :, :32], long_v[:, :, :32], None,
                                    is_causal=False)
    torch.testing.assert_close(out, _reference(long_q, long_k, long_v, causal=False), atol=1e-5, rtol=1e-5)
    assert stats.xattn_calls == 1 and dict(stats.dense_calls) == {"vision_short": 1}


def test_settings_are_validated_and_restored():
    before = xta.current_config()
    with pytest.raises(ValueError, match="min_len"):
        xta.configure(min_len=8, block_size=16)
    with pytest.raises(ValueError, match="threshold"):
        xta.configure(threshold=1.5)
    with pytest.raises(ValueError, match="vision"):
        xta.configure(vision="sparse")
    with pytest.raises(TypeError, match="warmup"):
        xta.configure(warmup=3)
    assert xta.current_config() == before
    with xta.settings(threshold=0.5):
        assert xta.current_config().threshold == 0.5
    assert xta.current_config() == before


# ------------------------------------------------------------------------------------------------ the model


@pytest.fixture(scope="module")
def tiny():
    """Tiny Qwen2-VL, its processor and one video prompt of ~300 tokens (19 blocks of 16)."""
    model = build_tiny_qwen2vl(0)
    processor = build_tiny_qwen_processor()
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (32, 112, 112, 3), dtype=np.uint8)
    frames[:, 30:60, 30:60] = 255  # some structure shared by all frames
    prompt = processor.chat_prompt(video_messages("Which colour is the square?\nA. red\nB. white"))
    return model, processor, processor(prompt, frames)


def _generate(model, inputs, impl, **kw):
    model.set_attn_implementation(impl)
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=6, do_sample=False, output_scores=True,
                              return_dict_in_generate=True, **kw)


def test_generate_threshold_one_equals_sdpa_token_for_token(tiny):
    model, _, inputs = tiny
    assert inputs["input_ids"].shape[1] >= 256
    dense = _generate(model, inputs, "sdpa")
    with xta.settings(threshold=1.0, **SMALL), xta.collect_stats() as stats:
        sparse = _generate(model, inputs, "xattn")
    assert torch.equal(dense.sequences, sparse.sequences)
    torch.testing.assert_close(sparse.scores[0], dense.scores[0], atol=1e-4, rtol=1e-4)  # the prefill's logits
    n_layers = model.config.text_config.num_hidden_layers
    assert stats.xattn_calls == n_layers and stats.density == 1.0
    grid_t = int(inputs["video_grid_thw"][0, 0])
    assert stats.dense_calls["vision"] == grid_t * model.config.vision_config.depth  # one call per frame pair
    assert stats.dense_calls["decode"] == n_layers * (dense.sequences.shape[1] - inputs["input_ids"].shape[1] - 1)


def test_generate_low_threshold_is_sparse_and_still_decodes(tiny):
    model, _, inputs = tiny
    dense = _generate(model, inputs, "sdpa")
    with xta.settings(threshold=0.8, **SMALL), xta.collect_stats() as stats:
        sparse = _generate(model, inputs, "xattn")
    assert stats.xattn_calls == model.config.text_config.num_hidden_layers
    assert 0.0 < stats.density < 1.0
    assert not torch.allclose(sparse.scores[0], dense.scores[0], atol=1e-4)  # sparsity reached the logits
    assert sparse.sequences.shape[1] > inputs["input_ids"].shape[1]


def test_padded_batch_runs_dense_exactly(tiny):
    model, processor, _ = tiny
    tok = processor.tokenizer
    texts = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
             for c in ("short question", "a much longer question " * 20)]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert batch["attention_mask"][0, 0] == 0  # left padding
    model.set_attn_implementation("sdpa")
    with torch.inference_mode():
        dense = model.generate(**batch, max_new_tokens=4, do_sample=False)
    with xta.settings(threshold=0.3, **SMALL), xta.collect_stats() as stats:
        model.set_attn_implementation("xattn")
        with torch.inference_mode():
            sparse = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert torch.equal(dense, sparse)
    assert stats.xattn_calls == 0 and stats.dense_calls["mask"] == model.config.text_config.num_hidden_layers


def test_from_pretrained_with_xattn(tmp_path, tiny):
    from transformers import AutoModelForImageTextToText

    _, _, inputs = tiny
    folder = save_tiny_qwen(tmp_path / "tiny-qwen")
    xta.register()
    model = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="xattn").eval()
    assert model.config._attn_implementation == "xattn"
    assert model.config.vision_config._attn_implementation == "xattn"
    with xta.settings(threshold=0.9, **SMALL), xta.collect_stats() as stats, xta.time_prefill(model) as timing:
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert stats.xattn_calls == model.config.text_config.num_hidden_layers
    assert timing.prefill_ms > timing.vision_ms > 0


def test_qwen2_5_vl_threshold_one_equals_sdpa_and_low_threshold_is_sparse():
    model = build_tiny_qwen2_5_vl(0)
    processor = build_tiny_qwen_processor(seconds_per_grid=True)
    frames = np.random.default_rng(5).integers(0, 256, (32, 112, 112, 3), dtype=np.uint8)
    inputs = processor(processor.chat_prompt(video_messages("Which colour?")), frames, {"sampled_fps": 2.0})
    assert inputs["second_per_grid_ts"].tolist() == [1.0]
    dense = _generate(model, inputs, "sdpa")
    with xta.settings(threshold=1.0, **SMALL), xta.collect_stats() as exact:
        same = _generate(model, inputs, "xattn")
    assert torch.equal(dense.sequences, same.sequences)
    assert exact.xattn_calls == 2 and exact.dense_calls["vision"] > 0  # windowed + full vision blocks: dense
    with xta.settings(threshold=0.8, **SMALL), xta.collect_stats() as sparse:
        _generate(model, inputs, "xattn")
    assert sparse.density < 1.0


def test_vision_tower_xattn_at_threshold_one_equals_sdpa(tiny):
    model, _, inputs = tiny
    dense = _generate(model, inputs, "sdpa")
    settings = dict(SMALL, min_len=64)  # a frame pair at 112x112 is 8 x 8 = 64 patches: one chunk
    with xta.settings(threshold=1.0, vision="xattn", **settings), xta.collect_stats() as stats:
        same = _generate(model, inputs, "xattn")
    assert torch.equal(dense.sequences, same.sequences)
    grid_t = int(inputs["video_grid_thw"][0, 0])
    n_text = model.config.text_config.num_hidden_layers
    assert stats.xattn_calls == grid_t * model.config.vision_config.depth + n_text
    assert "vision" not in stats.dense_calls


def test_estimate_fp8_reaches_xattn_attention(monkeypatch):
    import xattn_video.core.attention as attention

    seen = []
    real = attention.xattn_attention

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "xattn_attention", spy)
    q, k, v = _qkv(256, seed=6)
    with xta.settings(threshold=0.6, estimate_fp8=True, **SMALL), xta.collect_stats() as stats:
        out, _ = xta.xattn_attention_forward(FakeAttention(), q, k, v, None)
    assert [kw["estimate_fp8"] for kw in seen] == [True]
    ref, ref_stats = real(q, k, v, threshold=0.6, stride=4, block_size=16, causal=True, estimate_fp8=True,
                          return_stats=True)
    torch.testing.assert_close(out, ref.transpose(1, 2))
    assert stats.kept_blocks == ref_stats.kept_blocks
    with pytest.raises(TypeError, match="estimate_fp8"):
        xta.configure(estimate_fp8="yes")
