"""Tiny random Wan pipelines (Wan 2.1 T2V, Wan 2.2 A14B T2V, Wan 2.2 TI2V-5B), built fully offline.

Each is the real diffusers pipeline class around tiny components with the real models' structure:

- ``wan21``: :class:`diffusers.WanPipeline` with a 2-layer ``UMT5EncoderModel``, a ``WanTransformer3DModel``
  (2 blocks, 2 heads of 16 channels, patch 1x2x2 as every Wan model) and an ``AutoencoderKLWan`` (Wan 2.1's
  VAE layout: 8x space, 4x time), with Wan's default scheduler, ``UniPCMultistepScheduler`` in flow mode.
- ``wan22_a14b``: the same with a second transformer (``transformer_2``, other weights) and
  ``boundary_ratio=0.875`` as Wan 2.2 A14B: steps at timesteps >= 875 run ``transformer`` (high noise), the
  later ones ``transformer_2`` (low noise).
- ``wan22_ti2v``: :class:`diffusers.WanImageToVideoPipeline` with ``expand_timesteps=True`` and no image encoder,
  as Wan 2.2 TI2V-5B: the VAE is Wan 2.2's residual one (2x2 pixel patches, 16x space, 4x time), the image is
  encoded into the first latent frame, and the transformer gets a per-token timestep that is 0 on the first
  frame's tokens (already clean) and t elsewhere.

Geometry (the sizes of :mod:`xattn_video.testing.tiny_pipelines`): Wan 2.1 / A14B at 9 frames of 128x192 ->
latents 3 x 16 x 24 -> patches 3 x 8 x 12 = 288 video tokens (eighteen 16-token blocks); TI2V at 9 frames of
256x384 -> latents 3 x 16 x 24 -> the same 288 tokens, the first 96 (frame 0) from the input image. Text:
the prompt's tokens then zeros up to ``max_sequence_length`` (cross-attention only; Wan's self-attention sees
video tokens alone).

The tokenizer is made in code with the ``tokenizers`` library, laid out as T5's (``<pad>`` 0, ``</s>`` 1,
``<unk>`` 2, ``</s>`` appended): WordPiece over printable characters, so any prompt tokenizes.
"""

from __future__ import annotations

import string

import torch
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from .tiny_pipelines import to_dtype_quietly

__all__ = [
    "TINY_WAN_TRANSFORMER_CONFIG",
    "build_tiny_t5_tokenizer",
    "build_tiny_wan21_pipeline",
    "build_tiny_wan22_a14b_pipeline",
    "build_tiny_wan22_ti2v_pipeline",
]

T5_SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5 / UMT5
_PIECES = r"\w+|[^\w\s]+|\n"
T5_VOCAB_SIZE = 256
TEXT_DIM = 16

# Wan's transformer shape, scaled down: 14B is 40 layers, 40 heads x 128, ffn 13824, text_dim 4096.
TINY_WAN_TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    text_dim=TEXT_DIM,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=None,
    added_kv_proj_dim=None,
    rope_max_seq_len=1024,
)
A14B_BOUNDARY_RATIO = 0.875  # Wan 2.2 T2V A14B's switch from the high-noise to the low-noise expert


def build_tiny_t5_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """A T5-style tokenizer made in code: WordPiece over printable characters, ``</s>`` appended."""
    printable = [c for c in string.printable if c not in " \t\r\x0b\x0c"]
    vocab: dict[str, int] = {}
    for entry in T5_SPECIALS + printable + ["##" + c for c in printable if c != "\n"]:
        vocab.setdefault(entry, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", max_input_chars_per_word=100))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[ \t\r]+"), behavior="removed"),
        pre_tokenizers.Split(Regex(_PIECES), behavior="isolated"),
    ])
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(T5_SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   padding_side="right", truncation_side="right", model_max_length=model_max_length)


def _umt5() -> UMT5EncoderModel:
    return UMT5EncoderModel(UMT5Config(vocab_size=T5_VOCAB_SIZE, d_model=TEXT_DIM, d_kv=8, d_ff=32, num_layers=2,
                                       num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0,
                                       feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1))


def _wan21_vae(z_dim: int) -> AutoencoderKLWan:
    return AutoencoderKLWan(base_dim=4, z_dim=z_dim, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                            temperal_downsample=[False, True, True],
                            latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)


def _wan22_vae(z_dim: int) -> AutoencoderKLWan:
    # Wan 2.2's VAE: pixels folded 2x2 into channels (12 in), residual down/up blocks, 16x space overall.
    return AutoencoderKLWan(base_dim=4, decoder_base_dim=4, z_dim=z_dim, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                            temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                            out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
                            latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)


def _scheduler(flow_shift: float) -> UniPCMultistepScheduler:
    # Wan's default scheduler in diffusers (the repos' scheduler_config.json).
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift,
                                   num_train_timesteps=1000)


def _finish(pipe, dtype: torch.dtype, device: str | torch.device):
    pipe.set_progress_bar_config(disable=True)
    for name in ("text_encoder", "transformer", "transformer_2", "vae"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.eval()
    return to_dtype_quietly(pipe, dtype).to(device)


def build_tiny_wan21_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32,
                              device: str | torch.device = "cpu") -> WanPipeline:
    """A tiny random Wan 2.1 T2V :class:`WanPipeline`, deterministic for ``seed`` (caller's RNG state kept)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _umt5()
        transformer = WanTransformer3DModel(**TINY_WAN_TRANSFORMER_CONFIG)
        vae = _wan21_vae(TINY_WAN_TRANSFORMER_CONFIG["in_channels"])
    pipe = WanPipeline(tokenizer=build_tiny_t5_tokenizer(), text_encoder=text_encoder, vae=vae,
                       scheduler=_scheduler(3.0), transformer=transformer)
    return _finish(pipe, dtype, device)


def build_tiny_wan22_a14b_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32,
                                   device: str | torch.device = "cpu") -> WanPipeline:
    """A tiny random Wan 2.2 A14B T2V :class:`WanPipeline`: two transformers (high- and low-noise experts) of
    the same shape and different weights, switched at ``boundary_ratio`` 0.875 of the training timesteps."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _umt5()
        transformer = WanTransformer3DModel(**TINY_WAN_TRANSFORMER_CONFIG)
        transformer_2 = WanTransformer3DModel(**TINY_WAN_TRANSFORMER_CONFIG)
        vae = _wan21_vae(TINY_WAN_TRANSFORMER_CONFIG["in_channels"])
    pipe = WanPipeline(tokenizer=build_tiny_t5_tokenizer(), text_encoder=text_encoder, vae=vae,
                       scheduler=_scheduler(3.0), transformer=transformer, transformer_2=transformer_2,
                       boundary_ratio=A14B_BOUNDARY_RATIO)
    return _finish(pipe, dtype, device)


def build_tiny_wan22_ti2v_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32,
                                   device: str | torch.device = "cpu") -> WanImageToVideoPipeline:
    """A tiny random Wan 2.2 TI2V-5B style :class:`WanImageToVideoPipeline` (``expand_timesteps=True``, no image
    encoder): call it with ``image=`` (a PIL image; :func:`xattn_video.testing.tiny_pipelines.tiny_image`)."""
    z_dim = 8
    config = dict(TINY_WAN_TRANSFORMER_CONFIG, in_channels=z_dim, out_channels=z_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _umt5()
        transformer = WanTransformer3DModel(**config)
        vae = _wan22_vae(z_dim)
    pipe = WanImageToVideoPipeline(tokenizer=build_tiny_t5_tokenizer(), text_encoder=text_encoder, vae=vae,
                                   scheduler=_scheduler(5.0), transformer=transformer, expand_timesteps=True)
    return _finish(pipe, dtype, device)
