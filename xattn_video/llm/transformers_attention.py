"""XAttention in transformers' attention-function registry, under the name ``xattn``.

After :func:`register`, any model whose attention goes through ``ALL_ATTENTION_FUNCTIONS`` (Qwen2-VL,
Qwen2.5-VL, Llama, Qwen2, ...) accepts ``attn_implementation="xattn"``::

    from xattn_video.llm import transformers_attention as xta
    xta.register()                                    # once; configure() also registers
    xta.configure(threshold=0.9, stride=16, min_len=2048)
    model = Qwen2VLForConditionalGeneration.from_pretrained(path, attn_implementation="xattn")
    with xta.collect_stats() as stats:
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    print(stats.density, stats.dense_calls)

Which attention runs where (each call is counted in :class:`AttentionStats` with its reason):

- causal self-attention with as many queries as keys (a prefill), no mask and at least ``min_len`` tokens:
  XAttention (``xattn_attention(..., causal=True)``, grouped-query heads as they are);
- everything else runs transformers' own SDPA function, exactly as ``attn_implementation="sdpa"`` would:
  decoding steps and prefills against a non-empty cache (queries fewer than keys: ``"decode"``,
  ``"cached_prefill"``), prefills shorter than ``min_len`` (``"short"``), calls with a mask (``"mask"``: a
  padded batch, packed sequences or a sliding window; a padded batch therefore runs dense, exactly), dropout
  in training (``"dropout"``), a position bias or logit soft-capping (``"bias"``);
- non-causal calls (the vision tower of Qwen2-VL calls the registry once per image or per pair of frames,
  without a mask; Qwen2.5-VL once per window): dense SDPA by default (``"vision"``). Those chunks are at most
  a few thousand patches (768 merged tokens x 4 at Qwen2-VL's default pixel cap), too short for the estimate
  to pay for itself; with ``vision="xattn"`` chunks of at least ``min_len`` tokens run non-causal XAttention
  (shorter ones: ``"vision_short"``; cross-attention, queries and keys of other lengths: ``"cross"``).

A static cache (``cache_implementation="static"``) hands the prefill keys of the cache's full length, so
the prefill runs dense (``"cached_prefill"``): use the default dynamic cache.

The mask: transformers builds masks only for implementations registered in its ``AttentionMaskInterface``;
for any other name it passes no mask at all, which would silently drop padding. :func:`register` therefore
registers SDPA's mask function under the same name, so that an unpadded causal prefill gets ``None`` (causal
is implied) and a padded batch gets SDPA's 4D boolean mask.

Settings are process-wide (the registry is): :func:`configure` sets them, :func:`settings` overrides them
inside a ``with`` block. ``threshold=1.0`` keeps every block and reproduces SDPA up to rounding.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from ..core.config import check_backend, check_block_size, check_estimate_fp8, check_stride, check_threshold

__all__ = [
    "NAME",
    "AttentionStats",
    "LLMAttentionConfig",
    "collect_stats",
    "configure",
    "current_config",
    "register",
    "PrefillTiming",
    "settings",
    "time_prefill",
    "xattn_attention_forward",
]

NAME = "xattn"
VISION_MODES = ("dense", "xattn")


@dataclass(frozen=True)
class LLMAttentionConfig:
    """Settings of the ``xattn`` attention function.

    threshold, stride, block_size, backend: as for :func:`xattn_video.xattn_attention` (stride 16 and
        threshold 0.9 are the XAttention paper's Video-MME setting).
    min_len: prefills shorter than this many tokens run dense SDPA (the estimate costs more than it saves on
        short sequences); at least one block.
    vision: ``"dense"`` (default) or ``"xattn"``: what non-causal calls (vision towers) run.
    estimate_fp8: score blocks on float8 copies of q and k (see :class:`xattn_video.XAttnConfig`; "auto": on GPUs
        with float8 tensor cores); off by default (the fixture that validated it is a video DiT, not an LLM).
    """

    threshold: float = 0.9
    stride: int = 16
    block_size: int = 128
    min_len: int = 2048
    backend: str = "auto"
    vision: str = "dense"
    estimate_fp8: bool | str = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", check_threshold(self.threshold))
        check_block_size(self.block_size)
        check_stride(self.stride, self.block_size)
        check_backend(self.backend)
        if isinstance(self.min_len, bool) or not isinstance(self.min_len, int) or self.min_len < self.block_size:
            raise ValueError(f"min_len must be an int >= block_size={self.block_size}, got {self.min_len!r}")
        if self.vision not in VISION_MODES:
            raise ValueError(f"vision must be one of {list(VISION_MODES)}, got {self.vision!r}")
        check_estimate_fp8(self.estimate_fp8)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AttentionStats:
    """What the ``xattn`` function did while these stats were collected.

    xattn_calls: calls that ran XAttention; kept_blocks / total_blocks over them (causal: the lower triangle
    with the diagonal), summed over layers, batches and heads; density = kept / total (None without an
    XAttention call). xattn_tokens: query tokens of those calls (per layer). estimate_ms / attention_ms: summed
    times of those calls. dense_calls: calls that ran dense SDPA, by reason (see the module docstring).
    layers: per XAttention call, (layer index or -1, tokens, density).
    """

    xattn_calls: int = 0
    kept_blocks: int = 0
    total_blocks: int = 0
    xattn_tokens: int = 0
    estimate_ms: float = 0.0
    attention_ms: float = 0.0
    dense_calls: Counter = field(default_factory=Counter)
    layers: list = field(default_factory=list)

    @property
    def density(self) -> float | None:
        return self.kept_blocks / self.total_blocks if self.total_blocks else None

    def to_dict(self) -> dict:
        return {
            "density": self.density,
            "xattn_calls": self.xattn_calls,
            "kept_blocks": self.kept_blocks,
            "total_blocks": self.total_blocks,
            "xattn_tokens": self.xattn_tokens,
            "estimate_ms": self.estimate_ms,
            "attention_ms": self.attention_ms,
            "dense_calls": dict(self.dense_calls),
        }


_lock = threading.Lock()
_config = LLMAttentionConfig()
_collectors: list[AttentionStats] = []


def current_config() -> LLMAttentionConfig:
    """The settings the ``xattn`` function uses now."""
    return _config


def configure(config: LLMAttentionConfig | None = None, **kwargs: Any) -> LLMAttentionConfig:
    """Set the process-wide settings (a config, or keyword changes to the current one) and register ``xattn``.

    Unknown keys raise a TypeError naming them; bad values a ValueError naming the parameter.
    """
    global _config
    new = config if config is not None else _config
    if kwargs:
        unknown = sorted(set(kwargs) - set(LLMAttentionConfig.__dataclass_fields__))
        if unknown:
            allowed = list(LLMAttentionConfig.__dataclass_fields__)
            raise TypeError(f"unknown xattn setting(s) {unknown}: allowed {allowed}")
        new = replace(new, **kwargs)
    register()
    with _lock:
        _config = new
    return new


@contextlib.contextmanager
def settings(config: LLMAttentionConfig | None = None, **kwargs: Any) -> Iterator[LLMAttentionConfig]:
    """Use other settings inside a ``with`` block; the previous ones come back on exit."""
    previous = _config
    try:
        yield configure(config, **kwargs)
    finally:
        configure(previous)


@contextlib.contextmanager
def collect_stats() -> Iterator[AttentionStats]:
    """Collect the statistics of every ``xattn`` call inside the block into a fresh :class:`AttentionStats`."""
    stats = AttentionStats()
    _collectors.append(stats)
    try:
        yield stats
    finally:
        _collectors.remove(stats)


def _record_dense(reason: str) -> None:
    for stats in _collectors:
        stats.dense_calls[reason] += 1


def _record_xattn(layer: int, tokens: int, call_stats: Any) -> None:
    for stats in _collectors:
        stats.xattn_calls += 1
        stats.kept_blocks += call_stats.kept_blocks
        stats.total_blocks += call_stats.total_blocks
        stats.xattn_tokens += tokens
        stats.estimate_ms += call_stats.estimate_ms
        stats.attention_ms += call_stats.attention_ms
        stats.layers.append((layer, tokens, call_stats.density))


def _dense_reason(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: Any,
                  dropout: float, is_causal: bool, config: LLMAttentionConfig, kwargs: dict) -> str | None:
    """Why this call must run dense SDPA, or None when XAttention may run."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if not is_causal and config.vision == "dense":
        return "vision"
    if q_len != kv_len:
        if not is_causal:
            return "cross"
        return "decode" if q_len == 1 else "cached_prefill"
    if attention_mask is not None:
        return "mask"
    if dropout > 0.0:
        return "dropout"
    if kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None:
        return "bias"
    if q_len < config.min_len:
        return "short" if is_causal else "vision_short"
    return None


def xattn_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The registry function: query [B, H, Nq, D], key/value [B, KVH, Nk, D] (not repeated); returns the output
    as [B, Nq, H, D] and no attention weights, as every transformers attention function does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    config = _config
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    dropout_p = float(dropout or 0.0) if module.training else 0.0
    reason = _dense_reason(module, query, key, attention_mask, dropout_p, causal, config, kwargs)
    if reason is not None:
        _record_dense(reason)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)

    from ..core.attention import xattn_attention

    collecting = bool(_collectors)  # statistics wait for the GPU: only when someone collects them
    result = xattn_attention(
        query, key, value, threshold=config.threshold, stride=config.stride, block_size=config.block_size,
        causal=causal, backend=config.backend, scale=scaling, estimate_fp8=config.estimate_fp8,
        return_stats=collecting,
    )
    out = result[0] if collecting else result
    if collecting:
        layer = getattr(module, "layer_idx", None)
        _record_xattn(-1 if layer is None else int(layer), query.shape[2], result[1])
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME) -> None:
    """Register :func:`xattn_attention_forward` and SDPA's mask function under ``name`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, xattn_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)


@dataclass
class PrefillTiming:
    """Times of one ``generate`` call's prefill, in milliseconds (CUDA-synchronised on a GPU), None until
    measured. prefill_ms: from the start of the vision tower (transformers 5 encodes the video before the
    first forward) or of the first forward, whichever comes first, to the end of the first forward.
    vision_ms: the vision tower's first call."""

    prefill_ms: float | None = None
    vision_ms: float | None = None


def _sync(module: torch.nn.Module) -> None:
    param = next(module.parameters(), None)
    if param is not None and param.device.type == "cuda":
        torch.cuda.synchronize(param.device)


@contextlib.contextmanager
def time_prefill(model: torch.nn.Module) -> Iterator[PrefillTiming]:
    """Time the prefill of the one ``generate`` call inside the block: the first call of the vision tower (a
    submodule named ``visual``) and the first forward of ``model``."""
    import time

    timing = PrefillTiming()
    marks: dict[str, float] = {}
    visual = next((m for name, m in model.named_modules() if name.split(".")[-1] == "visual"), None)

    def now() -> float:
        _sync(model)
        return time.perf_counter()

    def visual_pre(module, args):
        if "visual" not in marks and timing.prefill_ms is None:
            marks["visual"] = now()
            marks.setdefault("start", marks["visual"])

    def visual_post(module, args, output):
        if "visual" in marks and timing.vision_ms is None:
            timing.vision_ms = (now() - marks["visual"]) * 1e3

    def model_pre(module, args):
        if "start" not in marks:
            marks["start"] = now()

    def model_post(module, args, output):
        if timing.prefill_ms is None:
            timing.prefill_ms = (now() - marks["start"]) * 1e3

    handles = [model.register_forward_pre_hook(model_pre), model.register_forward_hook(model_post)]
    if visual is not None:
        handles += [visual.register_forward_pre_hook(visual_pre), visual.register_forward_hook(visual_post)]
    try:
        yield timing
    finally:
        for h in handles:
            h.remove()
