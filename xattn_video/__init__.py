"""xattn-video: XAttention (antidiagonal-scored block-sparse attention) for video models.

Rooms: ``core`` (config, estimate, attention backends), ``diffusion`` (diffusers processor, backend, step
tracking), ``llm`` (transformers attention function, Qwen video inputs), ``testing`` (tiny offline models,
synthetic inputs); the Triton kernels are ``xattn_video.kernels`` and the jobs ``xattn_video.pipelines``.

Public surface:
- :func:`xattn_attention` — block-sparse attention in SDPA layout (triton / flex / torch backends);
- :func:`estimate_block_mask` — the blocks XAttention keeps;
- :class:`XAttnConfig` — validated parameters; :class:`XAttnStats` — density and timings of a call;
- :func:`enable` — XAttention on a diffusers video pipeline (HunyuanVideo processor, or the ``xattn`` backend).
"""

from .core.attention import XAttnStats, xattn_attention
from .core.config import XAttnConfig
from .core.estimate import estimate_block_mask
from .diffusion.enable import enable
from .diffusion.hunyuan import XAttnProcessor

__all__ = ["XAttnConfig", "XAttnProcessor", "XAttnStats", "enable", "estimate_block_mask", "xattn_attention"]
__version__ = "0.1.0"
