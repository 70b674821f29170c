"""Every use of diffusers' private API in this project, in one place, behind one version check.

diffusers' attention-backend registry (``_AttentionBackendRegistry``) is private and its backend names
(``AttentionBackendName``) are a closed enum; a stateful hook reads the pipeline's cache context from
``StateManager`` (``diffusers.hooks.hooks``, not exported). This module is the only one that touches them, and
only for the diffusers versions it was tested with (:data:`SUPPORTED`); any other version fails with one line.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import diffusers
from diffusers.hooks.hooks import BaseState, StateManager

SUPPORTED = ("0.42.0", "0.43.0")  # [low, high): tested with 0.42.1
SUPPORTED_TEXT = "0.42.x"
BACKEND_NAME = "xattn"
_MEMBER_NAME = "XATTN"


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit()) or "0"
        parts.append(int(digits))
    return tuple(parts)


def check_diffusers_version(version: str | None = None) -> str:
    """The installed diffusers version if this module supports it; else a RuntimeError of one line."""
    version = diffusers.__version__ if version is None else version
    low, high = (_version_tuple(v) for v in SUPPORTED)
    if not low <= _version_tuple(version) < high:
        raise RuntimeError(
            f"xattn_video's diffusers backend supports diffusers {SUPPORTED_TEXT}; found diffusers {version} "
            f"(pip install 'diffusers>={SUPPORTED[0]},<{SUPPORTED[1]}')"
        )
    return version


# ---------------------------------------------------------------------------------------------- backend registry


def register_backend(fn: Callable, *, supports_context_parallel: bool) -> None:
    """Register ``fn`` as diffusers attention backend ``"xattn"`` (idempotent).

    ``AttentionBackendName`` is a closed ``str`` enum: ``set_attention_backend`` and ``attention_backend`` both
    call ``AttentionBackendName(name)``, so the name gets a member, added the way ``Enum`` stores its own
    (member map, value map, member names). The function goes into the registry with the checks diffusers runs
    on its native backend (``DIFFUSERS_ATTN_CHECKS=1``) and the context-parallel flag."""
    check_diffusers_version()
    from diffusers.models import attention_dispatch as dispatch

    names = dispatch.AttentionBackendName
    member = names._value2member_map_.get(BACKEND_NAME)
    if member is None:
        member = str.__new__(names, BACKEND_NAME)
        member._name_ = _MEMBER_NAME
        member._value_ = BACKEND_NAME
        member.__objclass__ = names
        member._sort_order_ = len(names._member_names_)
        type.__setattr__(names, _MEMBER_NAME, member)
        names._member_map_[_MEMBER_NAME] = member
        names._value2member_map_[BACKEND_NAME] = member
        names._member_names_.append(_MEMBER_NAME)
    registry = dispatch._AttentionBackendRegistry
    if registry._backends.get(member) is fn:
        return
    constraints = [dispatch._check_device, dispatch._check_shape]
    registry.register(member, constraints=constraints, supports_context_parallel=supports_context_parallel)(fn)


def backend_member():
    """The ``AttentionBackendName`` member of the ``xattn`` backend (after :func:`register_backend`)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return AttentionBackendName(BACKEND_NAME)


def native_backend() -> Callable:
    """diffusers' own ``native`` backend function (SDPA), called unchanged for what XAttention does not do."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    return _AttentionBackendRegistry._backends[AttentionBackendName.NATIVE]


def active_backend():
    """The process-wide default backend (what processors whose backend is unset dispatch to)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    return _AttentionBackendRegistry.get_active_backend()[0]


def set_active_backend(backend) -> None:
    """Restore the process-wide default backend (``set_attention_backend`` overwrites it)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    _AttentionBackendRegistry.set_active_backend(backend)


def supports_context_parallel(name: str) -> bool:
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    return _AttentionBackendRegistry._is_context_parallel_available(AttentionBackendName(name))


# ---------------------------------------------------------------------------------------------- context parallelism


def templated_context_parallel_attention(query, key, value, attn_mask, scale, *, forward_op, parallel_config):
    """diffusers' context-parallel attention (``_templated_context_parallel_attention``) around ``forward_op``:
    under Ulysses it exchanges q/k/v by all-to-all so that ``forward_op`` sees the whole sequence for this rank's
    heads (and all-gathers a mask given per rank), then exchanges the output back. Inference only (no LSE, no
    dropout, not causal, no grouped-query)."""
    from diffusers.models.attention_dispatch import _templated_context_parallel_attention

    return _templated_context_parallel_attention(
        query,
        key,
        value,
        attn_mask,
        0.0,
        False,
        scale,
        False,
        False,
        forward_op=forward_op,
        backward_op=None,
        _parallel_config=parallel_config,
    )


def context_parallel_input(split_dim: int, expected_dims: int, split_output: bool = False):
    """diffusers' ``ContextParallelInput`` (a ``_cp_plan`` entry: split a module's input or output)."""
    from diffusers.models._modeling_parallel import ContextParallelInput

    return ContextParallelInput(split_dim=split_dim, expected_dims=expected_dims, split_output=split_output)


def context_parallel_output(gather_dim: int, expected_dims: int):
    """diffusers' ``ContextParallelOutput`` (a ``_cp_plan`` entry: gather a module's output)."""
    from diffusers.models._modeling_parallel import ContextParallelOutput

    return ContextParallelOutput(gather_dim=gather_dim, expected_dims=expected_dims)


@contextlib.contextmanager
def cpu_device_index():
    """While it is open, ``torch.accelerator.device_count()`` is 1 on a machine without an accelerator.

    diffusers 0.42's ``ModelMixin._resolve_parallel_config`` (run by ``enable_parallelism``) takes the device
    index as ``rank % torch.accelerator.device_count()``, which divides by zero on a CPU-only machine (gloo);
    the device it makes there is the CPU whatever the index. With an accelerator this does nothing."""
    import torch

    if torch.accelerator.device_count() > 0:
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


# ---------------------------------------------------------------------------------------------- hooks


def cache_context(manager: StateManager) -> object | None:
    """The cache context (``CacheContext``) the pipeline opened around the current forward with
    ``transformer.cache_context(name, ...)``, or None for a direct call."""
    return manager._context


__all__ = [
    "BACKEND_NAME",
    "BaseState",
    "StateManager",
    "active_backend",
    "backend_member",
    "cache_context",
    "check_diffusers_version",
    "context_parallel_input",
    "context_parallel_output",
    "cpu_device_index",
    "native_backend",
    "register_backend",
    "set_active_backend",
    "supports_context_parallel",
    "templated_context_parallel_attention",
]
