"""XAttention parameters, validated once at construction so that every later layer can trust them."""

from __future__ import annotations

from dataclasses import asdict, dataclass

BACKENDS = ("auto", "fa4", "triton", "flex", "torch")


def check_threshold(threshold: float) -> float:
    """Return ``threshold`` as a float if 0 < threshold <= 1, else raise a ValueError naming it."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a number in (0, 1], got {threshold!r}")
    if not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in (0, 1] (1.0 keeps every block), got {threshold!r}")
    return float(threshold)


def check_block_size(block_size: int) -> int:
    """Block sizes are powers of two from 16 to 256 (the kernels tile queries and keys by them)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, got {block_size!r}")
    if block_size < 16 or block_size > 256 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two in [16, 256] (default 128), got {block_size}")
    return block_size


def check_stride(stride: int, block_size: int) -> int:
    """The antidiagonal stride must be a power of two that divides the block size, leaving >= 1 row a block."""
    if isinstance(stride, bool) or not isinstance(stride, int):
        raise TypeError(f"stride must be an int, got {stride!r}")
    if stride < 1 or stride & (stride - 1) or block_size % stride:
        allowed = [s for s in (1, 2, 4, 8, 16, 32, 64, 128, 256) if s <= block_size]
        raise ValueError(
            f"stride must be a power of two dividing block_size={block_size}: one of {allowed}; got {stride}"
        )
    return stride


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    return backend


def check_estimate_fp8(estimate_fp8: bool | str) -> bool | str:
    if not (isinstance(estimate_fp8, bool) or estimate_fp8 == "auto"):
        raise TypeError(f"estimate_fp8 must be a bool or 'auto', got {estimate_fp8!r}")
    return estimate_fp8


@dataclass(frozen=True)
class XAttnConfig:
    """Parameters of XAttention.

    threshold: share of each query block's attention mass the kept key blocks must cover, in (0, 1];
        1.0 keeps every block (dense attention).
    stride: antidiagonal stride S (power of two dividing block_size); the estimate costs about 1/S of
        the QK^T product.
    block_size: tokens per query/key block (power of two, 16..256; 128 matches the kernels' tiles).
    causal: causal attention (video LLM prefill); the diagonal and the first block are always kept.
    backend: "auto" (fa4 where FlashAttention-4 is installed and runs the inputs, else triton on CUDA, torch
        elsewhere), "fa4" (FlashAttention-4's block-sparse forward, Hopper), "triton", "flex" or "torch".
    estimate_fp8: run the estimate's strided product on q and k quantised to float8 e4m3 (one scale per
        tensor). On an H100 it halves the estimate's time (24.3 -> 12.3 ms at 119,056 tokens) and changes
        about 0.15% of the kept blocks at threshold 0.9 (bench/tune.py); the attention itself stays exact. On the
        trained video fixture it changes no quality measure (docs/quality.md). "auto": float8 where the Triton
        estimate runs on a GPU with float8 tensor cores (sm89 and newer), else the inputs' precision; the default
        of the diffusers integrations. False (the default here): the paper's estimate, in the inputs' precision.
    attention_fp8: run the attention over the kept blocks in float8 e4m3 (q/k per-block and V per-channel scales,
        P in float8, float32 accumulation; :mod:`xattn_video.kernels.block_sparse_attention_fp8`). Approximate: 5-7%
        relative error at 119,056 video-like tokens, 1-7% per layer on the trained fixture; on an H100 1.25x the
        bf16 Triton kernel, level with FlashAttention-4's exact bf16 (docs/benchmarks.md). Runs on the Triton
        kernel, so "auto" resolves to "triton" with it. Off by default: the attention is exact.
    """

    threshold: float = 0.9
    stride: int = 8
    block_size: int = 128
    causal: bool = False
    backend: str = "auto"
    estimate_fp8: bool | str = False
    attention_fp8: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", check_threshold(self.threshold))
        check_block_size(self.block_size)
        check_stride(self.stride, self.block_size)
        if not isinstance(self.causal, bool):
            raise TypeError(f"causal must be a bool, got {self.causal!r}")
        check_backend(self.backend)
        check_estimate_fp8(self.estimate_fp8)
        if not isinstance(self.attention_fp8, bool):
            raise TypeError(f"attention_fp8 must be a bool, got {self.attention_fp8!r}")
        if self.attention_fp8 and self.backend not in ("auto", "triton"):
            raise ValueError(
                "attention_fp8=True runs on the Triton kernel: backend must be 'auto' or 'triton', "
                f"got {self.backend!r}"
            )

    def to_dict(self) -> dict:
        return asdict(self)
