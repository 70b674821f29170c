"""xattn-video: XAttention (antidiagonal-scored block-sparse attention) for video models.

Public surface:
- :func:`xattn_attention` — block-sparse attention in SDPA layout (triton / flex / torch backends);
- :func:`estimate_block_mask` — the blocks XAttention keeps;
- :class:`XAttnConfig` — validated parameters; :class:`XAttnStats` — density and timings of a call.
"""

from .attention import XAttnStats, xattn_attention
from .config import XAttnConfig
from .estimate import estimate_block_mask
from .hunyuan import XAttnProcessor, enable

__all__ = ["XAttnConfig", "XAttnProcessor", "XAttnStats", "enable", "estimate_block_mask", "xattn_attention"]
__version__ = "0.1.0"
