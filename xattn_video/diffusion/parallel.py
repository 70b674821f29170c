"""The ``xattn`` backend under diffusers' context parallelism: Ulysses, through diffusers' own templated attention.

Under Ulysses (``ContextParallelConfig(ulysses_degree=P)`` and ``enable_parallelism``) each rank holds 1/P of the
sequence. diffusers' templated context-parallel attention exchanges q/k/v by all-to-all so that every rank holds
the *whole* sequence for H/P heads, calls a backend's forward op there, and exchanges the output back. XAttention
(estimate and block-sparse attention) is per head and needs nothing else, so the forward op here is the
``xattn_video::attention`` op itself, unchanged: each rank counts its own layers and steps (its forwards make the
same calls as a single process's) and records its own heads' statistics.

What is refused, with one line:

- ring attention (``ring_degree > 1``): a ring rank holds 1/P of the keys, and the estimate needs each query
  row's attention mass over *all* keys to choose its blocks;
- a head count that the Ulysses degree does not divide, unless diffusers' ``ulysses_anything=True`` is set
  (diffusers then pads heads, and the last rank runs XAttention on fewer heads).

Sequence order: when a model's plan shards a sequence made of two parts (HunyuanVideo: video tokens then text
tokens, each part split across ranks), the gathered sequence arrives interleaved, ``[video_0, text_0, video_1,
text_1, ...]``. The plan declares the text length with :func:`sequence_layout`; the forward op then puts q/k/v
(and a full-length mask) back in video-then-text order before XAttention and the output back after, so the
estimate sees exactly the single-process sequence.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from . import _diffusers_private as private
from .attention_op import active, native_reason, route_native

__all__ = [
    "check_parallel_config",
    "parallel_attention",
    "rank_balance",
    "sequence_layout",
    "split_sizes",
    "to_natural_order",
]


# Tokens of the second part (text) of sharded self-attention sequences, 0 for none (set by a model's plan). An int,
# not an object: torch.compile guards on its value, which stays the same from one forward to the next.
_TAIL: list[int] = [0]
# Sessions with head balancing on; while 0, the parallel path reads no forward state (nothing for Dynamo to guard).
_BALANCING: list[int] = [0]


@contextlib.contextmanager
def sequence_layout(tail: int) -> Iterator[None]:
    """While open, sharded self-attention sequences are ``[head part, tail part]`` with ``tail`` tokens in the
    tail, each part split across the Ulysses ranks as ``tensor_split`` does (set by a model's parallel plan)."""
    previous = _TAIL[0]
    _TAIL[0] = int(tail)
    try:
        yield
    finally:
        _TAIL[0] = previous


def split_sizes(n: int, parts: int) -> list[int]:
    """Lengths of ``torch.tensor_split(x, parts)`` along a dim of ``n`` (what diffusers' sharders give; equal when
    ``parts`` divides ``n``)."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def to_natural_order(total: int, tail: int, parts: int, device=None) -> torch.Tensor:
    """Index that takes an interleaved sequence ``[head_0, tail_0, head_1, tail_1, ...]`` (``parts`` ranks, each part
    split as :func:`split_sizes`) to ``[head, tail]``: ``natural = interleaved[:, index]``."""
    head_sizes, tail_sizes = split_sizes(total - tail, parts), split_sizes(tail, parts)
    heads, tails, start = [], [], 0
    for h, t in zip(head_sizes, tail_sizes, strict=True):
        heads.append(torch.arange(start, start + h, device=device))
        tails.append(torch.arange(start + h, start + h + t, device=device))
        start += h + t
    return torch.cat(heads + tails)


def check_parallel_config(parallel_config, heads: int | None = None) -> None:
    """One-line errors for what the ``xattn`` backend does not run under (see the module); ``parallel_config``: a
    diffusers ``ParallelConfig`` or ``ContextParallelConfig``."""
    cp = parallel_config if hasattr(parallel_config, "ulysses_degree") else None
    cp = cp or getattr(parallel_config, "context_parallel_config", None)
    if cp is None:
        raise ValueError(
            "the xattn backend runs under context parallelism only (ContextParallelConfig(ulysses_degree=P)); "
            f"got {type(parallel_config).__name__} without a context_parallel_config"
        )
    if cp.ring_degree > 1:
        raise ValueError(
            f"ring_degree={cp.ring_degree} is not supported by the xattn backend: its estimate needs each query "
            "row's attention mass over all keys, which a ring rank does not hold; use ulysses_degree=P, ring_degree=1"
        )
    if heads is not None and heads % cp.ulysses_degree and cp.ulysses_anything:
        pad = cp.ulysses_degree - heads % cp.ulysses_degree
        if pad >= (heads + pad) // cp.ulysses_degree:  # diffusers pads the last rank's heads only
            raise ValueError(
                f"ulysses_anything with ulysses_degree={cp.ulysses_degree} and {heads} heads needs {pad} padding "
                f"heads, more than diffusers allows (fewer than {(heads + pad) // cp.ulysses_degree}); choose a "
                "smaller degree"
            )
    if heads is not None and heads % cp.ulysses_degree and not cp.ulysses_anything:
        raise ValueError(
            f"ulysses_degree={cp.ulysses_degree} does not divide the {heads} attention heads: choose a divisor of "
            f"{heads}, or ContextParallelConfig(ulysses_degree={cp.ulysses_degree}, ulysses_anything=True) "
            "(diffusers pads the heads)"
        )


def _forward_op(
    ctx,
    query,
    key,
    value,
    attn_mask,
    dropout_p,
    is_causal,
    scale,
    enable_gqa,
    return_lse,
    _save_ctx=True,
    _parallel_config=None,
):
    """diffusers' forward-op signature around ``xattn_video::attention``; q/k/v ``[B, S, H/P, D]`` after the
    all-to-all."""
    if not _BALANCING[0]:
        return _attend_in_order(query, key, value, attn_mask, scale, enable_gqa, _parallel_config)
    layer = _next_layer()
    out = _attend_in_order(query, key, value, attn_mask, scale, enable_gqa, _parallel_config)
    if layer is not None and key.shape[1] == query.shape[1]:
        _measure(layer, _parallel_config)
    return out


@torch.compiler.disable
def _next_layer() -> int | None:
    state = active()
    return state.self_calls if state is not None else None


@torch.compiler.disable
def _balance_permutation() -> torch.Tensor | None:
    state = active()
    balance = getattr(state.session, "head_balance", None) if state is not None else None
    return balance.permutation(state.self_calls) if balance is not None else None


@torch.compiler.disable
def _measure(layer: int, parallel_config) -> None:
    """At a layer's first sparse call, its heads' kept blocks set its head permutation (:mod:`.head_balance`)."""
    state = active()
    balance = getattr(state.session, "head_balance", None) if state is not None else None
    if balance is None or balance.permutation(layer) is not None:
        return
    kept = _sparse_kept_per_head(state, layer)
    if kept is not None:
        cp = parallel_config.context_parallel_config
        balance.measure(layer, kept, cp._ulysses_mesh.get_group(), cp.ulysses_degree)


def _sparse_kept_per_head(state, layer: int) -> torch.Tensor | None:
    """This call's kept blocks per head (``[H/P]``) if it ran sparse, from the statistics the op just recorded."""
    pos = state.position
    record = state.session.stats_store.records.get((pos.generation, pos.step, layer))
    if record is None or record.mode != "sparse":
        return None
    pending = [p for p in record.pending if hasattr(p, "kept_per_head")]
    return pending[-1].kept_per_head.sum(0) if pending else None


def _attend_in_order(query, key, value, attn_mask, scale, enable_gqa, _parallel_config):
    """The op on the gathered sequence, put in its natural order first when the plan declared a layout."""
    tail = _TAIL[0]
    n = query.shape[1]
    if tail == 0 or key.shape[1] != n:
        return torch.ops.xattn_video.attention(query, key, value, attn_mask, scale, enable_gqa)
    parts = _parallel_config.context_parallel_config.ulysses_degree
    index = to_natural_order(n, tail, parts, device=query.device)
    query, key, value = (t.index_select(1, index) for t in (query, key, value))
    if attn_mask is not None and attn_mask.shape[-1] == n:
        attn_mask = attn_mask.index_select(-1, index)
        if attn_mask.dim() == 4 and attn_mask.shape[-2] == n:
            attn_mask = attn_mask.index_select(-2, index)
    out = torch.ops.xattn_video.attention(query, key, value, attn_mask, scale, enable_gqa)
    return torch.empty_like(out).index_copy_(1, index, out)


def parallel_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    return_lse: bool,
    parallel_config,
) -> torch.Tensor:
    """The ``xattn`` backend's call under context parallelism: q/k/v ``[B, S/P, H, D]`` (this rank's tokens)."""
    check_parallel_config(parallel_config, query.shape[2])
    reason = native_reason(query, key, value, dropout_p, is_causal, return_lse)
    if reason is not None:  # diffusers' native backend runs its own context-parallel attention
        return route_native(
            reason,
            query=query,
            key=key,
            value=value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
            return_lse=return_lse,
            _parallel_config=parallel_config,
        )
    perm = None
    if _BALANCING[0] and key.shape[1] == query.shape[1]:
        perm = _balance_permutation()
    if perm is not None:  # head balancing: rank r gets heads perm[r*H/P:(r+1)*H/P]
        perm = perm.to(query.device)
        query, key, value = (t.index_select(2, perm) for t in (query, key, value))
    out = private.templated_context_parallel_attention(
        query, key, value, attn_mask, scale, forward_op=_forward_op, parallel_config=parallel_config
    )
    if perm is not None:
        out = torch.empty_like(out).index_copy_(2, perm, out)
    return out


def rank_balance(stats: dict, group=None) -> dict:
    """How evenly the Ulysses ranks' heads cost: call it on every rank of the group (a collective) with that
    rank's ``session.stats``; returns, on every rank, per rank its heads' sparse-step density and sparse-attention
    time (estimate + attention over the sparse steps), and ``imbalance``: the slowest rank's time over the mean
    (every rank waits for the slowest at the next all-to-all)."""
    import torch.distributed as dist

    steps = [s for g in stats.get("generations", []) for s in g["steps"] if s["mode"] != "dense"]
    mine = {
        "rank": dist.get_rank(group),
        "sparse_kept_blocks": sum(s["kept_blocks"] for s in steps),
        "sparse_total_blocks": sum(s["total_blocks"] for s in steps),
        "sparse_attention_ms": sum(s["estimate_ms"] + s["attention_ms"] for s in steps),
    }
    ranks: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(ranks, mine, group=group)
    for r in ranks:
        r["sparse_density"] = r["sparse_kept_blocks"] / r["sparse_total_blocks"] if r["sparse_total_blocks"] else None
    times = [r["sparse_attention_ms"] for r in ranks]
    mean = sum(times) / len(times)
    return {"ranks": ranks, "imbalance": max(times) / mean if mean else None}
