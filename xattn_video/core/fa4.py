"""FlashAttention-4 as a backend: when it can run, its dense forward, and XAttention's kept blocks handed to its
block-sparse forward.

FlashAttention-4 is the package ``flash-attn-4`` (module ``flash_attn.cute``, CuTe DSL kernels; optional extra
``xattn-video[fa4]``). Its block-sparse forward takes, per (batch, head, query block), a count and an ascending list
of key blocks in two kinds: "mask" blocks, on which a ``mask_mod`` runs, and "full" blocks, computed without one.
XAttention's selection (``kv_count`` / ``kv_indices``, ascending, then -1) is exactly a "full" list, so the adapter
passes it through unchanged (no copy) and gives an empty "mask" list. FA4 processes a row's list from its end,
applying the key-length mask only to the first block it processes: the highest index, which is where a ragged
last key block sits. Causal selections keep nothing right of the diagonal; FA4's causal mask then runs on every
kept block.

Block size: on Hopper (sm90) the forward at head_dim <= 128 tiles queries and keys by 128 x 128 and requires the
sparse key block to equal its key tile, so ``block_size`` must be 128. On Blackwell (sm100) its query tile is
two stages of 128 rows, so sparse query blocks must be 256 rows: XAttention's 128-row selection does not fit, and
only the dense forward is offered there.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import warnings
from functools import lru_cache
from typing import NamedTuple

import torch

PACKAGE = "flash-attn-4"
# Versions this adapter was run against (the block-sparse API is private-ish and moves between betas).
TESTED_MIN, TESTED_BELOW = (4, 0, 0, "b36"), (4, 1)
TESTED_RANGE = ">=4.0.0b36,<4.1"
SPARSE_BLOCK_SIZE = 128
FA4_DTYPES = (torch.bfloat16, torch.float16)


def _version_key(version: str) -> tuple:
    """(major, minor, patch, pre) of versions like 4.0.0b36 / 4.0.0 (a release sorts after its betas)."""
    core, _, pre = version.partition("b")
    parts = [int(p) for p in core.split(".")[:3] if p.isdigit()]
    parts += [0] * (3 - len(parts))
    return (*parts, int(pre) if pre.isdigit() else 10**6)


def version_supported(version: str) -> bool:
    key = _version_key(version)
    low = (*TESTED_MIN[:3], int(TESTED_MIN[3][1:]))
    return low <= key and key[:2] < TESTED_BELOW


@lru_cache(maxsize=1)
def installed_version() -> str | None:
    """The installed flash-attn-4 version, or None."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def problem(
    *,
    device_type: str,
    capability: tuple[int, int] | None,
    version: str | None,
    dtype: torch.dtype,
    head_dim: int,
    block_size: int | None,
) -> str | None:
    """Why FA4 cannot run these inputs (one line), or None when it can. ``block_size`` None: the dense forward."""
    if version is None:
        return f"the {PACKAGE} package is not installed (pip install 'xattn-video[fa4]')"
    if not version_supported(version):
        return f"{PACKAGE} {version} is installed; this adapter supports {TESTED_RANGE}"
    if device_type != "cuda" or capability is None:
        return f"FlashAttention-4 runs on CUDA tensors, got {device_type}"
    major = capability[0]
    if major not in (9, 10, 11):
        return f"FlashAttention-4 needs a Hopper (sm90) or Blackwell (sm100) GPU, this one is sm{major}{capability[1]}"
    if dtype not in FA4_DTYPES:
        return f"FlashAttention-4 takes bfloat16 or float16 inputs, got {dtype}"
    if block_size is None:
        ok = 8 <= head_dim <= (256 if major == 9 else 128) and head_dim % 8 == 0
        if not ok:
            return f"FlashAttention-4's dense forward on sm{major}x takes head_dim multiple of 8 up to " + (
                f"{256 if major == 9 else 128}, got {head_dim}"
            )
        return None
    if major != 9:
        return (
            "FlashAttention-4's block-sparse forward on Blackwell needs 256-row query blocks; XAttention selects "
            f"{block_size}-row blocks (use backend='triton')"
        )
    if block_size != SPARSE_BLOCK_SIZE:
        return (
            f"FlashAttention-4's block-sparse forward on Hopper runs 128 x 128 blocks: block_size must be 128, "
            f"got {block_size}"
        )
    if not (8 <= head_dim <= 128 and head_dim % 8 == 0):
        return f"FlashAttention-4's block-sparse forward takes head_dim a multiple of 8 up to 128, got {head_dim}"
    return None


@lru_cache(maxsize=1)
def import_problem() -> str | None:
    """Why an installed FA4 does not import (one line), or None when ``flash_attn.cute`` imports. An install can
    have the package's metadata but not its CuTe DSL runtime (e.g. ``nvidia_cutlass_dsl/dsl_packages`` missing
    from the path); "auto" then runs the Triton kernels, and says so once."""
    try:
        importlib.import_module("flash_attn.cute")
    except Exception as err:  # ImportError, or the DSL runtime failing while it loads
        reason = f"{PACKAGE} {installed_version()} is installed but does not import ({type(err).__name__}: {err})"
        warnings.warn(f"{reason}; backend='auto' runs the Triton kernels instead", RuntimeWarning, stacklevel=2)
        return reason
    return None


def problem_for(q: torch.Tensor, *, block_size: int | None) -> str | None:
    """:func:`problem` for a q tensor on this machine, then whether FA4 imports (checked once, only where
    everything else allows it)."""
    capability = torch.cuda.get_device_capability(q.device) if q.is_cuda else None
    reason = problem(
        device_type=q.device.type,
        capability=capability,
        version=installed_version(),
        dtype=q.dtype,
        head_dim=q.shape[-1],
        block_size=block_size,
    )
    return reason if reason is not None else import_problem()


def use_fa4_dense(backend: str, q: torch.Tensor) -> bool:
    """Whether dense attention (dense warmup steps, dense layers) of a model configured with ``backend`` runs on
    FA4's dense forward: "fa4" always (a one-line RuntimeError where it cannot), "auto" where it can run q."""
    if backend == "fa4":
        reason = problem_for(q, block_size=None)
        if reason is not None:
            raise RuntimeError(f"backend='fa4' cannot run here: {reason}")
        return True
    return backend == "auto" and problem_for(q, block_size=None) is None


class BlockSparseFields(NamedTuple):
    """The fields of FA4's ``BlockSparseTensorsTorch`` for one selection (int32, on the selection's device)."""

    mask_block_cnt: torch.Tensor  # [B, H, nqb] zeros: no block needs a mask_mod
    mask_block_idx: torch.Tensor  # [B, H, nqb, 1], never read (the counts are 0)
    full_block_cnt: torch.Tensor  # [B, H, nqb]: XAttention's kv_count
    full_block_idx: torch.Tensor  # [B, H, nqb, nkb]: XAttention's kv_indices (ascending, then -1)
    block_size: tuple[int, int]


def block_sparse_fields(kv_count: torch.Tensor, kv_indices: torch.Tensor, block_size: int) -> BlockSparseFields:
    """XAttention's kept blocks as FA4's block-sparse fields: every kept block a "full" block, no "mask" block.

    kv_count int32 [B, H, nqb], kv_indices int32 [B, H, nqb, nkb] with the kept blocks ascending first (the
    format of :class:`~xattn_video.core.estimate.BlockSelection`). No copy of the selection is made."""
    if kv_count.dtype != torch.int32 or kv_indices.dtype != torch.int32:
        raise ValueError(f"kv_count and kv_indices must be int32, got {kv_count.dtype} and {kv_indices.dtype}")
    if kv_indices.dim() != 4 or kv_count.shape != kv_indices.shape[:3]:
        raise ValueError(
            f"kv_count [B, H, nqb] and kv_indices [B, H, nqb, nkb] disagree: {tuple(kv_count.shape)} vs "
            f"{tuple(kv_indices.shape)}"
        )
    zeros = torch.zeros(kv_count.shape, dtype=torch.int32, device=kv_count.device)
    return BlockSparseFields(
        mask_block_cnt=zeros,
        mask_block_idx=zeros.unsqueeze(-1),
        full_block_cnt=kv_count.contiguous(),
        full_block_idx=kv_indices if kv_indices.stride(-1) == 1 else kv_indices.contiguous(),
        block_size=(block_size, block_size),
    )


def _flash_attn_func():
    from flash_attn.cute import flash_attn_func

    return flash_attn_func


def _block_sparse_tensors(fields: BlockSparseFields):
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    return BlockSparseTensorsTorch(**fields._asdict())


def _to_bshd(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2)  # [B, H, N, D] -> [B, N, H, D], a view: FA4 takes any 16-byte-aligned strides


def _into(out_bshd: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    result = out_bshd.transpose(1, 2)
    return result if out is None else out.copy_(result)


def fa4_dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense attention through FA4, SDPA layout ([B, H, N, D]; k/v may have fewer heads). Equals
    ``F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)`` up to rounding."""
    reason = problem_for(q, block_size=None)
    if reason is not None:
        raise RuntimeError(f"backend='fa4' cannot run here: {reason}")
    with torch.no_grad():
        result, _ = _flash_attn_func()(_to_bshd(q), _to_bshd(k), _to_bshd(v), softmax_scale=scale, causal=causal)
    return _into(result, out)


def fa4_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_count: torch.Tensor,
    kv_indices: torch.Tensor,
    *,
    block_size: int,
    causal: bool,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over XAttention's kept blocks through FA4's block-sparse forward; equals
    ``block_sparse_attention_torch`` with the matching mask. Same contract as
    :func:`~xattn_video.kernels.block_sparse_attention.block_sparse_attention_triton` (q may have more query blocks
    than keys: the processor's padded text rows)."""
    reason = problem_for(q, block_size=block_size)
    if reason is not None:
        raise RuntimeError(f"backend='fa4' cannot run here: {reason}")
    tensors = _block_sparse_tensors(block_sparse_fields(kv_count, kv_indices, block_size))
    with torch.no_grad():
        result, _ = _flash_attn_func()(
            _to_bshd(q), _to_bshd(k), _to_bshd(v), softmax_scale=scale, causal=causal, block_sparse_tensors=tensors
        )
    return _into(result, out)


__all__ = [
    "BlockSparseFields",
    "block_sparse_fields",
    "fa4_block_sparse_attention",
    "fa4_dense_attention",
    "installed_version",
    "problem",
    "problem_for",
    "use_fa4_dense",
    "version_supported",
]
