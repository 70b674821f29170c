"""A tiny random Qwen2-VL, built fully offline: model, tokenizer, chat template and video processor.

:func:`build_tiny_qwen2vl` makes a :class:`transformers.Qwen2VLForConditionalGeneration` from a small config:
a 2-layer language model (hidden 64, 4 query heads sharing 2 key/value heads of 16 channels, 3D M-RoPE
with sections 2/3/3) and a 2-block vision tower (32 channels, 2 heads) with Qwen2-VL's real patch geometry
(14-pixel patches, 2 frames a temporal patch, 2x2 merge). Random weights (std 0.2, see INIT_STD), eval
mode, float32.

:func:`build_tiny_qwen_tokenizer` makes a tokenizer with the ``tokenizers`` library: Qwen2-VL's special
tokens (``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``, ``<|video_pad|>``, ...), a WordPiece
vocabulary of printable characters and a few words, and a chat template that lays out a conversation as
Qwen2-VL's does (default system turn, ``<|vision_start|><|video_pad|><|vision_end|>`` where a video goes,
``<|im_start|>assistant`` for the generation prompt).

:func:`build_tiny_qwen_processor` pairs it with :class:`xattn_video.llm.qwen_inputs.BuiltinQwenProcessor` at a
small pixel range (56x56 to 112x112 frames: 4 to 16 LLM tokens a temporal patch). :func:`save_tiny_qwen`
writes all of it as a model folder that ``from_pretrained`` and ``xattn-video videomme model.id=<folder>``
load like a real checkpoint.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration

from ..llm.qwen_inputs import BuiltinQwenProcessor, QwenVideoGeometry

__all__ = [
    "SPECIAL_TOKENS",
    "TINY_GEOMETRY",
    "build_tiny_qwen2_5_vl",
    "build_tiny_qwen2vl",
    "build_tiny_qwen_processor",
    "build_tiny_qwen_tokenizer",
    "save_tiny_qwen",
    "tiny_qwen2_5_vl_config",
    "tiny_qwen2vl_config",
]

# Qwen2-VL's special tokens, in its order; ids 0..13 here. <unk> is this tokenizer's own (WordPiece needs one).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<unk>",
]
_WORDS = ("Select the best answer to following multiple choice question based on video Respond with only letter "
          "of correct option Answer is The You are a helpful assistant system user This subtitles listed below")
_PIECES = r"\w+|[^\w\s]|\n"
VOCAB_SIZE = 320
# Weights drawn with std 0.2 instead of Qwen's 0.02: attention is then peaked enough for XAttention to drop
# blocks at threshold 0.9 (density ~0.8 on a 300-token prefill instead of ~0.99) and greedy tokens vary.
INIT_STD = 0.2
TINY_GEOMETRY = QwenVideoGeometry(min_pixels=56 * 56, max_pixels=112 * 112)

# Jinja; newlines are written as expressions so that whitespace control cannot eat them.
CHAT_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'video' or 'video' in part -%}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'image' or 'image' in part -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif 'text' in part -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def _vocab() -> dict[str, int]:
    printable = [c for c in string.printable if c not in " \t\r\x0b\x0c"]
    entries = SPECIAL_TOKENS + _WORDS.split() + printable + ["##" + c for c in printable if c != "\n"]
    vocab: dict[str, int] = {}
    for entry in entries:
        vocab.setdefault(entry, len(vocab))
    if len(vocab) > VOCAB_SIZE:
        raise AssertionError(f"tiny vocabulary of {len(vocab)} entries exceeds VOCAB_SIZE={VOCAB_SIZE}")
    return vocab


def build_tiny_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny Qwen2-VL tokenizer with its chat template (pad ``<|endoftext|>``, eos ``<|im_end|>``)."""
    tok = Tokenizer(models.WordPiece(_vocab(), unk_token="<unk>", max_input_chars_per_word=100))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[ \t\r]+"), behavior="removed"),
        pre_tokenizers.Split(Regex(_PIECES), behavior="isolated"),
    ])
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=32768,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_qwen2vl_config() -> Qwen2VLConfig:
    """The tiny model's config; token ids are those of :func:`build_tiny_qwen_tokenizer`."""
    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            initializer_range=INIT_STD,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            num_heads=2,
            mlp_ratio=2,
            initializer_range=INIT_STD,
            patch_size=TINY_GEOMETRY.patch_size,
            spatial_merge_size=TINY_GEOMETRY.merge_size,
            temporal_patch_size=TINY_GEOMETRY.temporal_patch_size,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return config


def build_tiny_qwen2vl(seed: int = 0, *, attn_implementation: str = "sdpa",
                       dtype: torch.dtype = torch.float32) -> Qwen2VLForConditionalGeneration:
    """A tiny random Qwen2-VL in eval mode, deterministic for ``seed`` (the caller's RNG state is kept)."""
    if attn_implementation == "xattn":
        from ..llm.transformers_attention import register

        register()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration._from_config(tiny_qwen2vl_config(),
                                                             attn_implementation=attn_implementation)
    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.do_sample = False
    return model.to(dtype).eval()


def tiny_qwen2_5_vl_config():
    """A tiny Qwen2.5-VL config: the same language model as :func:`tiny_qwen2vl_config`, and Qwen2.5-VL's
    vision tower (windowed attention in block 0, full attention in block 1)."""
    from transformers import Qwen2_5_VLConfig

    base = tiny_qwen2vl_config()
    text = base.text_config.to_dict()
    text = {k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                 "rope_parameters", "initializer_range", "bos_token_id", "eos_token_id",
                                 "pad_token_id")}
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2,
                           window_size=56, fullatt_block_indexes=[1], patch_size=TINY_GEOMETRY.patch_size,
                           spatial_merge_size=TINY_GEOMETRY.merge_size,
                           temporal_patch_size=TINY_GEOMETRY.temporal_patch_size, initializer_range=INIT_STD),
        image_token_id=base.image_token_id, video_token_id=base.video_token_id,
        vision_start_token_id=base.vision_start_token_id, vision_end_token_id=base.vision_end_token_id,
    )


def build_tiny_qwen2_5_vl(seed: int = 0, *, attn_implementation: str = "sdpa") -> Any:
    """A tiny random Qwen2.5-VL in eval mode, float32 (its inputs also need ``second_per_grid_ts``: use
    ``build_tiny_qwen_processor(seconds_per_grid=True)``)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    if attn_implementation == "xattn":
        from ..llm.transformers_attention import register

        register()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration._from_config(tiny_qwen2_5_vl_config(),
                                                                attn_implementation=attn_implementation)
    return model.eval()


def build_tiny_qwen_processor(geometry: QwenVideoGeometry = TINY_GEOMETRY, *,
                              seconds_per_grid: bool = False) -> BuiltinQwenProcessor:
    """The tiny tokenizer with the builtin video processor at ``geometry`` (``seconds_per_grid``: Qwen2.5-VL)."""
    return BuiltinQwenProcessor(build_tiny_qwen_tokenizer(), geometry, seconds_per_grid=seconds_per_grid)


def save_tiny_qwen(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny model, tokenizer and video processor settings as a checkpoint folder; return it."""
    folder = Path(folder)
    build_tiny_qwen2vl(seed).save_pretrained(folder)
    build_tiny_qwen_tokenizer().save_pretrained(folder)
    g = TINY_GEOMETRY
    settings = {
        "patch_size": g.patch_size, "temporal_patch_size": g.temporal_patch_size, "merge_size": g.merge_size,
        "size": {"shortest_edge": g.min_pixels, "longest_edge": g.max_pixels},
        "image_mean": list(g.image_mean), "image_std": list(g.image_std),
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    return folder
