"""Triton kernels of XAttention, installed as ``xattn_video.kernels``; one concern a file, each launcher
checks its inputs and names the torch reference (``xattn_video.core.reference``) it equals:

- :func:`block_scores_triton` — fused antidiagonal block estimate (``estimate.py``);
- :func:`select_blocks_triton` — threshold block selection (``select.py``);
- :func:`block_sparse_attention_triton` — block-sparse flash attention forward (``block_sparse_attention.py``).
"""

from .block_sparse_attention import block_sparse_attention_triton
from .estimate import block_scores_triton
from .select import select_blocks_triton

__all__ = ["block_scores_triton", "block_sparse_attention_triton", "select_blocks_triton"]
