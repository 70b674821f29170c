"""``xattn_video::attention``: the ``xattn`` backend's attention as a ``torch.library`` custom op.

The op is opaque to ``torch.compile``: a compiled transformer calls it like any kernel, and everything that
changes from call to call (which forward and step this is, the layer index, dense or sparse, the statistics)
is read and written *inside* it, at run time, from the :class:`ForwardState` that the step hook activates
before each transformer forward. Dynamo therefore never sees a step or layer number and never recompiles for
one. Its fake implementation gives the output's shape: ``[B, S, H, D_v]``, contiguous.

What one call does (q/k/v ``[B, S, H, D]`` as diffusers' dispatcher passes them):

- no active forward (a model that was not enabled but dispatches to ``xattn``, e.g. through the process default):
  diffusers' native backend;
- cross-attention (query and key lengths differ): native; it is not counted as a layer;
- every self-attention call counts as the next layer of the forward (layer i = block i for every supported
  model); shorter than ``min_len`` tokens, or a mask the sparse path cannot honour, or a dtype/head size it does
  not take: native, recorded with mode "native";
- otherwise attention over each sample's *valid segment*, the prefix of tokens a key-padding mask keeps (the
  whole sequence without a mask), with no mask: dense SDPA on warmup steps and ``dense_layers``,
  :func:`~xattn_video.xattn_attention` on the others. Padded query rows get what the native backend gives them:
  attention over the valid keys when the mask lets them see those (``[B, 1, 1, N]`` key padding,
  HunyuanVideo), zeros when their mask row is empty (``[B, 1, N, N]`` outer-product masks, HunyuanVideo 1.5;
  the native CPU kernel returns zeros there, other kernels NaN).
"""

import logging
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.attention import _Timer, run_xattn
from ..core.estimate import checked_config
from ..core.fa4 import fa4_dense_attention, use_fa4_dense
from ..core.inputs import MAX_HEAD_DIM, SUPPORTED_DTYPES
from ..core.token_order import TokenOrder, tiled_order
from . import _diffusers_private as private
from .stats import blocks
from .steps import StepPosition, tensor_version

__all__ = ["ForwardState", "activate", "active", "analyse_mask", "deactivate", "outside_calls", "sparse_valid"]

logger = logging.getLogger(__name__)


@dataclass
class ForwardState:
    """What the op needs to know about the transformer forward it runs in; set by the step hook."""

    session: object  # XAttnSession: settings (config, min_len, dense_layers) and stats
    position: StepPosition
    dense_step: bool
    self_calls: int = 0  # self-attention calls so far in this forward: the next one is layer `self_calls`
    grid: tuple[int, int, int] | None = None  # the video token grid, when the session's token order is "tiled"
    kind: tuple = ()  # (transformer, cond/uncond or forward of the step): whose kept blocks it reuses


_ACTIVE: list[ForwardState | None] = [None]
_OUTSIDE: dict[str, int] = {}
_MASK_CACHE: list = [None]  # (weakref to mask, version, batch, n, result): masks shared by every layer of a forward


def activate(state: ForwardState) -> None:
    _ACTIVE[0] = state


def deactivate() -> None:
    _ACTIVE[0] = None


def active() -> ForwardState | None:
    return _ACTIVE[0]


def outside_calls() -> dict[str, int]:
    """Calls that reached the ``xattn`` backend outside an enabled transformer's forward (they ran native)."""
    return dict(_OUTSIDE)


def native_reason(query, key, value, dropout_p: float, is_causal: bool, return_lse: bool) -> str | None:
    """Why a backend call goes to diffusers' native backend before the op, or None: what XAttention does not do
    (the log-sum-exp, dropout, causal masking) and calls that need gradients."""
    if return_lse:
        return "return_lse"
    if dropout_p > 0.0:
        return "dropout"
    if is_causal:
        return "causal"
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return "grad"
    return None


def route_native(reason: str, **arguments) -> torch.Tensor:
    """Count ``reason`` and run diffusers' native backend on the backend call's own ``arguments``."""
    if not torch.compiler.is_compiling():
        count_native(reason)
    return private.native_backend()(**arguments)


def count_native(reason: str) -> None:
    """Count a call that the backend handed to the native backend before the op (dropout, return_lse, ...)."""
    state = _ACTIVE[0]
    if state is None:
        _OUTSIDE[reason] = _OUTSIDE.get(reason, 0) + 1
    else:
        state.session.stats_store.count_native(reason)


# ---------------------------------------------------------------------------------------------- masks


def analyse_mask(mask: torch.Tensor | None, batch: int, n: int) -> tuple[list[int], bool] | None:
    """Per-sample valid lengths of a key-padding attention mask, and whether padded query rows see the valid keys.

    Accepted: None (every token valid); boolean ``[B|1, N]`` or ``[B|1, 1, 1, N]`` True on a prefix (padded
    query rows see the valid keys); boolean ``[B|1, 1, N, N]`` whose rows below the valid length are that prefix
    and whose rows from it on are either all False (the outer product of a padding vector: padded rows see
    nothing) or the same prefix. Checked with reductions over views of the mask, so no N x N tensor is built.
    Returns None for anything else (the caller goes native), or for a sample with no valid token.
    """
    if mask is None:
        return [n] * batch, True
    if mask.dtype != torch.bool:
        return None
    if mask.dim() == 2:
        mask = mask[:, None, None, :]
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-1] != n or mask.shape[0] not in (1, batch):
        return None
    rows = mask.shape[2]
    if rows not in (1, n):
        return None
    first = mask[:, 0, 0, :]  # [B', N]
    lengths_t = first.sum(dim=1)
    checks = [(first == (torch.arange(n, device=mask.device)[None, :] < lengths_t[:, None])).all(dim=1)]
    lengths = [int(x) for x in lengths_t.tolist()]
    if min(lengths) == 0:
        return None
    see_keys = True
    if rows == n:
        flags = []
        for b, length in enumerate(lengths):
            m = mask[b, 0]
            valid_rows_ok = m[:length, :length].all() & ~m[:length, length:].any()
            if length == n:
                flags.append(torch.stack([valid_rows_ok, valid_rows_ok]))
                continue
            pad_keys = m[length:, :length]
            pad_rest = ~m[length:, length:].any()
            # padded rows either see the valid keys (key padding) or nothing (outer product)
            ok = valid_rows_ok & pad_rest
            flags.append(torch.stack([ok & pad_keys.all(), ok & ~pad_keys.any()]))
        per_sample = torch.stack(flags).tolist()  # [B', 2]: (keys, empty)
        if all(keys for keys, _ in per_sample):
            see_keys = True
        elif all(empty for _, empty in per_sample):
            see_keys = False
        else:
            return None
    if not bool(torch.stack(checks).all()):
        return None
    if len(lengths) == 1 and batch > 1:
        lengths = lengths * batch
    return lengths, see_keys


def _cached_analysis(mask: torch.Tensor | None, batch: int, n: int):
    if mask is None:
        return [n] * batch, True
    cached = _MASK_CACHE[0]
    if cached is not None and cached[0]() is mask and cached[1:4] == (tensor_version(mask), batch, n):
        return cached[4]
    result = analyse_mask(mask, batch, n)
    _MASK_CACHE[0] = (weakref.ref(mask), tensor_version(mask), batch, n, result)
    return result


# ---------------------------------------------------------------------------------------------- the op


def _native(query, key, value, attn_mask, scale, enable_gqa) -> torch.Tensor:
    out = private.native_backend()(
        query=query, key=key, value=value, attn_mask=attn_mask, scale=scale, enable_gqa=enable_gqa
    )
    return out.contiguous()


@torch.library.custom_op("xattn_video::attention", mutates_args=())
def xattn_dispatch(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    enable_gqa: bool,
) -> torch.Tensor:
    """The ``xattn`` backend's attention: q/k/v ``[B, S, H, D]``; returns ``[B, S, H, D_v]`` (see the module)."""
    state = _ACTIVE[0]
    if state is None:
        _OUTSIDE["outside_enabled_forward"] = _OUTSIDE.get("outside_enabled_forward", 0) + 1
        return _native(query, key, value, attn_mask, scale, enable_gqa)
    session = state.session
    store = session.stats_store
    batch, n, heads, dim = query.shape
    if key.shape[1] != n:
        store.count_native("cross_attention")
        return _native(query, key, value, attn_mask, scale, enable_gqa)
    layer = state.self_calls
    state.self_calls += 1
    reason = None
    if n < session.min_len:
        reason = "short"
    elif query.dtype not in SUPPORTED_DTYPES or not 1 <= dim <= MAX_HEAD_DIM or value.shape != key.shape:
        reason = "inputs"
    elif heads % key.shape[2]:
        reason = "inputs"
    if reason is None:
        analysis = _cached_analysis(attn_mask, batch, n)
        if analysis is None:
            reason = "mask"
    if reason is not None:
        store.count_native(reason)
        if session.probe is not None:
            session.probe.native(reason, n)
        timer = _Timer(query.device, enabled=True)
        out = _native(query, key, value, attn_mask, scale, enable_gqa)
        timer.mark()
        total = blocks(n, session.config.block_size) ** 2 * batch * heads
        store.record(state.position, layer, "native", total, total, 0.0, 0.0, [timer])
        return out
    lengths, see_keys = analysis
    dense = state.dense_step or layer in session.dense_layers
    out = _attend_valid(session, query, key, value, lengths, see_keys, dense, scale, state, layer)
    return out


@xattn_dispatch.register_fake
def _(query, key, value, attn_mask, scale, enable_gqa):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def _dense(backend: str, q, k, v, scale, gqa: bool) -> torch.Tensor:
    """Dense attention of a valid segment: FlashAttention-4 where the session's backend asks for it ("fa4", or
    "auto" where FA4 runs the inputs), else SDPA."""
    if use_fa4_dense(backend, q):
        return fa4_dense_attention(q, k, v, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)


def _groups(lengths: list[int]) -> list[tuple[slice, int, int]]:
    """(batch slice, valid length, samples): one group when all samples share a length, else one per sample."""
    if len(set(lengths)) == 1:
        return [(slice(None), lengths[0], len(lengths))]
    return [(slice(b, b + 1), length, 1) for b, length in enumerate(lengths)]


def _attend_valid(session, query, key, value, lengths, see_keys, dense, scale, state, layer) -> torch.Tensor:
    """Attention of each sample's valid prefix without a mask, written into one ``[B, S, H, D]`` output."""
    batch, n, heads, dim = query.shape
    out = query.new_empty(batch, n, heads, dim)
    q, k, v, o = (t.permute(0, 2, 1, 3) for t in (query, key, value, out))  # [B, H, S, D] views
    gqa = k.shape[1] != q.shape[1]
    block_size = session.config.block_size
    kept = total = 0
    timers: list = []
    for index, length, count in _groups(lengths):
        qg, kg, vg = q[index, :, :length], k[index, :, :length], v[index, :, :length]
        if dense:
            timer = _Timer(q.device, enabled=True)
            rows = q[index] if see_keys else qg  # padded rows that see the valid keys ride along
            o[index, :, : rows.shape[2]] = _dense(session.config.backend, rows, kg, vg, scale, gqa)
            timer.mark()
            timers.append(timer)
            if session.probe is not None:  # report mode only
                order = _token_order(session, state, length, q.device)
                session.probe.dense(session, state.position, layer, qg, kg, vg, o[index, :, :length], scale, order)
            kept += blocks(length, block_size) ** 2 * heads * count
            total += blocks(length, block_size) ** 2 * heads * count
        else:
            target = o[index, :, :length]
            order = _token_order(session, state, length, q.device)
            reuse = session.reuse.slot((*state.kind, layer, index.start), state.position, qg, kg)
            result, pending = sparse_valid(session, qg, kg, vg, scale, target, order, reuse)
            if result is not target:
                target.copy_(result)
            if session.probe is not None:  # report mode only
                session.probe.sparse(state.position, layer, qg, kg, vg, target, pending, scale)
            total += pending.total_blocks
            timers.append(pending)  # kept blocks and times are read when the statistics are
            if length < n and see_keys:  # padded query rows: dense over the valid keys, exactly as native
                o[index, :, length:] = F.scaled_dot_product_attention(
                    q[index, :, length:], kg, vg, scale=scale, enable_gqa=gqa
                )
        if length < n and not see_keys:
            o[index, :, length:] = 0
    mode = "dense" if dense else "sparse"
    session.stats_store.record(state.position, layer, mode, kept, total, 0.0, 0.0, timers)
    return out


def sparse_valid(
    session,
    q,
    k,
    v,
    scale: float | None,
    out: torch.Tensor | None,
    order: TokenOrder | None = None,
    reuse=None,
):
    """XAttention over one valid segment (q/k/v [B, H, L, D], no mask) with the session's block choice
    (:meth:`~.backend.XAttnSession.select_blocks`, by default the antidiagonal estimate, as
    :func:`~xattn_video.xattn_attention`), or the kept blocks of an earlier step that ``reuse`` (refresh_every)
    holds; writes into ``out`` when given. With ``order`` (tiled token order) the video tokens (the first
    ``order.n_video`` of the segment; text after them stays in place) are gathered into that order first and the
    output scattered back: exact apart from the block choice. Returns the output and its :class:`PendingStats`
    (estimate and attention timed, read after the forward)."""
    if order is not None:
        q, k, v = (order.permute(t, dim=2) for t in (q, k, v))
        result, pending = sparse_valid(session, q, k, v, scale, None, reuse=reuse)
        result = order.unpermute(result, dim=2)
        if out is None:
            return result, pending
        out.copy_(result)
        return out, pending
    config = checked_config(q, k, v, session.config)
    return run_xattn(
        q,
        k,
        v,
        config,
        scale=scale,
        out=out,
        timed=True,
        reuse=reuse,
        select=lambda q_, k_: session.select_blocks(q_, k_, scale=scale),
    )


def _token_order(session, state: ForwardState, length: int, device: torch.device) -> TokenOrder | None:
    """The tiled order of this forward's video grid for a valid segment of ``length`` tokens (None in raster
    order). The video tokens must come first in the self-attention sequence (Wan, SkyReels-V2, HunyuanVideo and
    HunyuanVideo 1.5 put text after them); a segment shorter than the grid is an error, not a silent raster run."""
    if state.grid is None:
        return None
    n_video = state.grid[0] * state.grid[1] * state.grid[2]
    if length < n_video:
        raise RuntimeError(
            f"xattn token_order='tiled': the latents give a {state.grid} grid of {n_video} video tokens, but this "
            f"self-attention call's valid segment has {length} tokens; tiled order needs the video tokens first"
        )
    return tiled_order(state.grid, session.tile, device=device)
