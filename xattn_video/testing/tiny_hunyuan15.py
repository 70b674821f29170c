"""A tiny random HunyuanVideo 1.5 T2V pipeline, built fully offline.

:func:`build_tiny_hunyuan15_pipeline` assembles :class:`diffusers.HunyuanVideo15Pipeline` from tiny components
with the real model's structure: a 3-layer ``Qwen2_5_VLTextModel`` (the pipeline reads its third-last hidden
state) with the tiny Qwen tokenizer and chat template of :mod:`xattn_video.testing.tiny_qwen`, a 1-layer
``T5EncoderModel`` with the real ``ByT5Tokenizer`` (byte-level: it needs no vocabulary file) for quoted glyph
text, a ``HunyuanVideo15Transformer3DModel`` (2 blocks, 2 heads of 16 channels, patch 1), an
``AutoencoderKLHunyuanVideo15`` (16x space, 4x time) and classifier-free guidance through diffusers'
``ClassifierFreeGuidance`` guider, as the real pipeline.

Geometry: 9 frames of 128x192 -> latents 3 x 8 x 12 = 288 video tokens (eighteen 16-token blocks), then the
text tokens of the joint attention: 729 image-token slots (masked out in text-to-video), 256 ByT5 slots and
1000 prompt slots, valid ones first, padding masked (``attention_mask`` reaches the attention processor).

The pipeline crops the chat template's fixed prefix (system message and the user header) from the text
encoder's output by a token count, ``prompt_template_encode_start_idx`` (108 with the real Qwen tokenizer).
The tiny tokenizer splits that prefix differently, so the builder sets the count it really has (measured by
tokenizing the prefix): the cropped text tokens are then exactly the prompt, as with the real model.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo15,
    ClassifierFreeGuidance,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15Pipeline,
    HunyuanVideo15Transformer3DModel,
)
from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import format_text_input
from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

from .tiny_pipelines import to_dtype_quietly
from .tiny_qwen import SPECIAL_TOKENS, VOCAB_SIZE, build_tiny_qwen_tokenizer

__all__ = ["TINY_HUNYUAN15_TRANSFORMER_CONFIG", "build_tiny_hunyuan15_pipeline"]

QWEN_HIDDEN = 32
BYT5_DIM = 8
LATENT_CHANNELS = 4

# HunyuanVideo 1.5's shape, scaled down: the real one is 54 blocks, 16 heads x 128, text 3584 / ByT5 1472.
TINY_HUNYUAN15_TRANSFORMER_CONFIG = dict(
    in_channels=2 * LATENT_CHANNELS + 1,  # noisy latents, condition latents, condition mask
    out_channels=LATENT_CHANNELS,
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=2,
    num_refiner_layers=1,
    mlp_ratio=2.0,
    patch_size=1,
    patch_size_t=1,
    qk_norm="rms_norm",
    text_embed_dim=QWEN_HIDDEN,
    text_embed_2_dim=BYT5_DIM,
    image_embed_dim=8,
    rope_theta=256.0,
    rope_axes_dim=(4, 6, 6),
    target_size=128,
    task_type="t2v",
)


def _qwen_text_encoder() -> Qwen2_5_VLTextModel:
    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    config = Qwen2_5_VLTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=QWEN_HIDDEN, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    return Qwen2_5_VLTextModel(config)


def _byt5_encoder(vocab_size: int) -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=BYT5_DIM, d_kv=4, d_ff=16, num_layers=1,
                                   num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0,
                                   feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1))


def template_prefix_length(pipe: HunyuanVideo15Pipeline) -> int:
    """Tokens of the chat template before the user's prompt (system turn and user header), as the pipeline's
    tokenizer lays it out: what ``prompt_template_encode_start_idx`` must crop."""
    marker = "\x01"  # a character the prompt itself never holds: split the rendered template at it
    text = pipe.tokenizer.apply_chat_template(format_text_input([marker], pipe.system_message)[0],
                                              add_generation_prompt=True, tokenize=False)
    prefix = text[: text.index(marker)]
    return len(pipe.tokenizer(prefix, add_special_tokens=False).input_ids)


def build_tiny_hunyuan15_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32,
                                  device: str | torch.device = "cpu") -> HunyuanVideo15Pipeline:
    """A tiny random :class:`HunyuanVideo15Pipeline`, deterministic for ``seed`` (the caller's RNG state is
    kept). Generate with e.g. ``pipe(prompt, height=128, width=192, num_frames=9, num_inference_steps=2)``."""
    tokenizer = build_tiny_qwen_tokenizer()
    tokenizer.padding_side = "right"  # the pipeline crops a fixed prefix: prompts must start at the same place
    tokenizer_2 = ByT5Tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _qwen_text_encoder()
        text_encoder_2 = _byt5_encoder(len(tokenizer_2))
        transformer = HunyuanVideo15Transformer3DModel(**TINY_HUNYUAN15_TRANSFORMER_CONFIG)
        vae = AutoencoderKLHunyuanVideo15(latent_channels=LATENT_CHANNELS, block_out_channels=(4, 4, 8, 8, 8),
                                          layers_per_block=1, spatial_compression_ratio=16,
                                          temporal_compression_ratio=4)
    pipe = HunyuanVideo15Pipeline(
        text_encoder=text_encoder.eval(), tokenizer=tokenizer, transformer=transformer.eval(), vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer_2, guider=ClassifierFreeGuidance(guidance_scale=6.0),
    )
    pipe.prompt_template_encode_start_idx = template_prefix_length(pipe)
    pipe.set_progress_bar_config(disable=True)
    return to_dtype_quietly(pipe, dtype).to(device)
