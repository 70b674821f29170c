"""Checks on attention inputs shared by every entry point, so each error names the parameter at fault."""

from __future__ import annotations

import os

import torch

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_HEAD_DIM = 256


def autocast_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """q, k, v cast to the autocast dtype of q's device when ``torch.autocast`` is on there, else unchanged.

    SDPA is on autocast's lower-precision list: under ``torch.autocast("cuda", torch.bfloat16)`` it runs in
    bfloat16 whatever its inputs' floating dtypes (e.g. float32 q/k from an RMS norm beside bfloat16 v). The
    XAttention entry points follow the same rule so that they stay drop-ins for it.
    """
    if not all(isinstance(t, torch.Tensor) for t in (q, k)):
        return q, k, v  # check_qkv names the bad argument
    device_type = q.device.type
    if not torch.is_autocast_enabled(device_type):
        return q, k, v
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    return cast(q), cast(k), cast(v)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, *, causal: bool) -> None:
    """Validate SDPA-layout tensors: q [B, H, Nq, D], k/v [B, Hkv, Nk, D] with H % Hkv == 0."""
    named = {"q": q, "k": k} if v is None else {"q": q, "k": k, "v": v}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D in SDPA layout [batch, heads, tokens, head_dim], got shape {tuple(t.shape)}"
            )
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; supported: bfloat16, float16, float32")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has {q.dtype}; pass one dtype")
    batch, heads, n_q, dim = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    if k.shape[0] != batch or k.shape[3] != dim:
        raise ValueError(
            f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)}: batch and head_dim must agree "
            "(layout is [batch, heads, tokens, head_dim])"
        )
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v shape {tuple(v.shape)} must equal k shape {tuple(k.shape)}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(
            f"q heads ({heads}) must be a multiple of k/v heads ({kv_heads}) for grouped-query attention; "
            "is the layout [batch, heads, tokens, head_dim]?"
        )
    if not 1 <= dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {dim}")
    if n_q == 0 or n_k == 0:
        raise ValueError(f"q and k need at least one token, got Nq={n_q}, Nk={n_k}")
    if causal and n_q != n_k:
        raise ValueError(
            f"causal=True needs as many queries as keys (a prefill), got Nq={n_q}, Nk={n_k}"
        )


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (how CI tests kernels)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map "auto" to a concrete backend; an explicit backend that cannot run here is an error, never a switch.

    This is the device-only answer (``auto``: triton on CUDA, torch elsewhere); :func:`resolve_backend_for` also
    weighs the inputs and prefers FlashAttention-4 where it runs them."""
    if backend == "fa4":
        raise RuntimeError("backend='fa4' is resolved against the inputs: use resolve_backend_for")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and not triton_usable(device):
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors (got {device}); use backend='torch' or 'auto' on this "
            "device, or set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter"
        )
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as err:  # pragma: no cover - triton ships with Linux torch builds
            raise RuntimeError("backend='triton' needs the triton package: pip install triton") from err
    return backend


def resolve_estimate_fp8(estimate_fp8: bool | str, q: torch.Tensor, backend: str) -> bool:
    """Whether the estimate scores float8 copies of q and k, for ``backend`` already resolved. "auto": where the
    Triton estimate runs (backend triton, fa4 or flex, on CUDA) on a GPU with float8 tensor cores (sm89 and
    newer), where it halves the estimate's time; elsewhere float8 would only add a quantisation, so the inputs'
    precision."""
    if estimate_fp8 != "auto":
        return bool(estimate_fp8)
    if not (q.is_cuda and backend in ("triton", "fa4", "flex")):
        return False
    return torch.cuda.get_device_capability(q.device) >= (8, 9)


def resolve_backend_for(backend: str, q: torch.Tensor, *, block_size: int, attention_fp8: bool = False) -> str:
    """The backend that runs XAttention on ``q``'s device, dtype and head dim.

    "auto": "fa4" where FlashAttention-4 is installed and runs these inputs (Hopper, bfloat16/float16,
    head_dim <= 128, block_size 128), else "triton" on CUDA and "torch" elsewhere; with ``attention_fp8`` the
    float8 kernel is Triton's, so "triton" (CUDA or TRITON_INTERPRET=1). "fa4" where it cannot run: a one-line
    RuntimeError naming why."""
    from .fa4 import problem_for

    if attention_fp8:
        if backend == "auto" and triton_usable(q.device):
            return "triton"
        if backend not in ("auto", "triton"):
            raise ValueError(
                f"attention_fp8=True runs on the Triton kernel: backend must be 'auto' or 'triton', got {backend!r}"
            )
        if not triton_usable(q.device):
            raise RuntimeError(
                f"attention_fp8=True needs the Triton kernel: CUDA tensors (got {q.device}) or TRITON_INTERPRET=1"
            )
        return resolve_backend("triton", q.device)
    if backend == "fa4":
        reason = problem_for(q, block_size=block_size)
        if reason is not None:
            raise RuntimeError(f"backend='fa4' cannot run here: {reason}")
        return "fa4"
    if backend == "auto" and problem_for(q, block_size=block_size) is None:
        return "fa4"
    return resolve_backend(backend, q.device)
