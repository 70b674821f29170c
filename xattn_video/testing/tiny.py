"""A tiny random HunyuanVideo pipeline, built fully offline (no model hub, no downloads).

:func:`build_tiny_hunyuan_pipeline` assembles a complete :class:`diffusers.HunyuanVideoPipeline` from tiny
configs: a 2-layer ``LlamaModel`` and a 2-layer ``CLIPTextModel`` as text encoders, a small
``HunyuanVideoTransformer3DModel`` (2 double-stream + 2 single-stream blocks, 2 heads of 16 channels, patch 1),
an ``AutoencoderKLHunyuanVideo`` with 8-channel blocks, and tokenizers made in code with the ``tokenizers``
library. It is the project's embedded default model (``tiny``) and the fixture of the CPU tests.

Geometry: the VAE compresses 4x in time and 8x in space and the transformer patch is 1x1x1, so 9 frames of
128x128 pixels are 3 x 16 x 16 = 768 video tokens (six 128-token blocks), followed by ``max_sequence_length``
(default 256) text tokens of which only the prompt's are valid.

Tokenizers: a WordPiece vocabulary holding the special tokens of the pipeline's prompt template, every word of
that template, and the printable ASCII characters (plain and as ``##`` continuations), so any prompt tokenizes
(words outside the vocabulary split into characters). The pre-tokenizer isolates words, runs of punctuation
and single newlines, which makes the template's fixed prefix exactly ``crop_start`` = 95 tokens: after the
pipeline crops it, the text tokens are the user's prompt, ``<|eot_id|>`` and right padding, as with the real
Llama tokenizer.
"""

from __future__ import annotations

import re
import string

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
)
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
from diffusers.utils import logging as diffusers_logging
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel, PreTrainedTokenizerFast

__all__ = ["TINY_TRANSFORMER_CONFIG", "build_tiny_hunyuan_pipeline", "build_tiny_tokenizer"]

# Special tokens: ids 0..6 in this order.
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<|begin_of_text|>", "<|end_of_text|>"
TEMPLATE_SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
SPECIALS = [PAD, UNK, BOS, EOS, *TEMPLATE_SPECIALS]
# Words, runs of punctuation, single newlines; spaces and tabs are dropped first.
_PIECES = r"\w+|[^\w\s]+|\n"
VOCAB_SIZE = 512  # embedding rows of both text encoders (the vocabulary itself is ~290 entries)

TINY_TRANSFORMER_CONFIG = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=2,
    num_single_layers=2,
    num_refiner_layers=1,
    mlp_ratio=2.0,
    patch_size=1,
    patch_size_t=1,
    qk_norm="rms_norm",
    guidance_embeds=True,
    text_embed_dim=16,
    pooled_projection_dim=8,
    rope_theta=256.0,
    rope_axes_dim=(4, 6, 6),
)


def _template_words() -> list[str]:
    words: list[str] = []
    for segment in re.split(r"(<\|[a-z_]+\|>)", DEFAULT_PROMPT_TEMPLATE["template"].replace("{}", " ")):
        if segment in SPECIALS:
            continue
        for word in re.findall(_PIECES, segment):
            if word not in words:
                words.append(word)
    return words


def _vocab() -> dict[str, int]:
    printable = [c for c in string.printable if c not in " \t\r\x0b\x0c"]  # letters, digits, punctuation, \n
    entries = SPECIALS + _template_words() + printable + ["##" + c for c in printable if c != "\n"]
    vocab: dict[str, int] = {}
    for entry in entries:
        vocab.setdefault(entry, len(vocab))
    return vocab


def build_tiny_tokenizer(*, clip: bool = False, model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """The tiny pipeline's tokenizer; ``clip=True`` adds CLIP-style ``<|begin_of_text|> ... <|end_of_text|>``."""
    tok = Tokenizer(models.WordPiece(_vocab(), unk_token=UNK, max_input_chars_per_word=100))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[ \t\r]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(_PIECES), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(SPECIALS)
    if clip:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}", special_tokens=[(BOS, SPECIALS.index(BOS)), (EOS, SPECIALS.index(EOS))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        padding_side="right",
        truncation_side="right",
        model_max_length=model_max_length,
    )


def build_tiny_hunyuan_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> HunyuanVideoPipeline:
    """A complete tiny random :class:`HunyuanVideoPipeline` on the CPU, deterministic for a given ``seed``.

    Weights are drawn from torch's generator seeded with ``seed`` inside :func:`torch.random.fork_rng`, so the
    caller's random state is left as it was. ``dtype`` casts every model (float32 by default). Generate with,
    for example, ``pipe(prompt, height=128, width=128, num_frames=9, num_inference_steps=2)``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        llama = LlamaModel(
            LlamaConfig(
                vocab_size=VOCAB_SIZE,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=1024,
                hidden_act="silu",
                pad_token_id=SPECIALS.index(PAD),
                bos_token_id=SPECIALS.index(BOS),
                eos_token_id=SPECIALS.index(EOS),
            )
        )
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=VOCAB_SIZE,
                hidden_size=8,
                intermediate_size=16,
                projection_dim=8,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=77,
                hidden_act="gelu",
                pad_token_id=SPECIALS.index(PAD),
                bos_token_id=SPECIALS.index(BOS),
                eos_token_id=SPECIALS.index(EOS),  # 3, not the legacy 2: pooled at the first EOS
            )
        )
        transformer = HunyuanVideoTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
        vae = AutoencoderKLHunyuanVideo(
            in_channels=3,
            out_channels=3,
            latent_channels=TINY_TRANSFORMER_CONFIG["in_channels"],
            down_block_types=("HunyuanVideoDownBlock3D",) * 4,
            up_block_types=("HunyuanVideoUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            act_fn="silu",
            norm_num_groups=4,
            scaling_factor=0.476986,
            spatial_compression_ratio=8,
            temporal_compression_ratio=4,
            mid_block_add_attention=True,
        )
    pipe = HunyuanVideoPipeline(
        text_encoder=llama.eval(),
        tokenizer=build_tiny_tokenizer(),
        transformer=transformer.eval(),
        vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=clip.eval(),
        tokenizer_2=build_tiny_tokenizer(clip=True, model_max_length=77),
    )
    pipe.set_progress_bar_config(disable=True)
    if dtype != torch.float32:
        # Every module of these tiny models may take ``dtype``: silence diffusers' "keep in float32" notice.
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()
        try:
            pipe.to(dtype=dtype)
        finally:
            diffusers_logging.set_verbosity(verbosity)
    return pipe
