"""GPU benchmark: what fixed-density (top-k) block selection (``XAttnProcessor(density=...)``) costs at
HunyuanVideo 720p against the threshold selection, in one run.

Size: 119,056 tokens (a 33 x 45 x 80 video grid = 118,800 tokens + 256 text), 24 heads x 128, bf16, 128-token
blocks, video-like q/k (``xattn_video.testing.synthetic``). Checks first (the top-k selection from the Triton
scores equals the one from the torch reference scores at a small size, up to ties), then times with CUDA events
(median of 10): the antidiagonal scores alone (stride 8), threshold selection (Triton, 0.9) and top-k selection
(density 0.3 and 0.5) on those scores, and the whole ``estimate_blocks`` / ``estimate_topk_blocks`` calls.

    python bench/topk_cost.py            # one H100/H200, about 30 s
"""

from __future__ import annotations

import torch
from attention import bench_ms  # noqa: E402  (bench/ is the script's folder: one timing helper)

from xattn_video.core.config import XAttnConfig
from xattn_video.core.estimate import estimate_blocks
from xattn_video.core.reference import block_scores_torch
from xattn_video.core.topk import estimate_topk_blocks, select_topk
from xattn_video.kernels.estimate import block_scores_triton
from xattn_video.kernels.select import select_blocks_triton
from xattn_video.testing.synthetic import video_like_qkv


def main() -> int:
    dev = "cuda"
    # 1. check: Triton scores + top-k against the torch reference scores + top-k, small size
    q, k, _ = video_like_qkv(
        frames=4, height=16, width=24, text_tokens=40, heads=4, head_dim=128, device=dev, dtype=torch.bfloat16
    )
    q, k = q.bfloat16(), k.bfloat16()
    sel = estimate_topk_blocks(q, k, density=0.3, stride=8, block_size=128)
    ref = select_topk(block_scores_torch(q.float(), k.float(), stride=8, block_size=128, causal=False), 0.3)
    differ = (sel.mask != ref.mask).float().mean().item()
    print(f"check: top-k from Triton vs torch scores differ on {differ:.4f} of blocks", flush=True)
    if differ > 0.02:
        print("CHECK FAILED", flush=True)
        return 1
    # 2. timings at 720p
    q, k, _ = video_like_qkv(frames=33, height=45, width=80, text_tokens=256, heads=24, head_dim=128, device=dev)
    q, k = q.bfloat16(), k.bfloat16()
    n = q.shape[2]
    scores = block_scores_triton(q, k, stride=8, block_size=128, causal=False)
    config = XAttnConfig(0.9, 8, 128, False, "triton")
    rows = [
        ("scores (stride 8)", lambda: block_scores_triton(q, k, stride=8, block_size=128, causal=False)),
        ("threshold 0.9 selection (Triton)", lambda: select_blocks_triton(scores, threshold=0.9, causal=False)),
        ("top-k 0.3 selection", lambda: select_topk(scores, 0.3)),
        ("top-k 0.5 selection", lambda: select_topk(scores, 0.5)),
        ("estimate_blocks, threshold 0.9", lambda: estimate_blocks(q, k, config)),
        ("estimate_topk_blocks, density 0.3", lambda: estimate_topk_blocks(q, k, density=0.3, stride=8)),
    ]
    print(f"{torch.cuda.get_device_name()}: {n} tokens, 24 heads x 128, bf16, {scores.shape[-1]} key blocks")
    for name, fn in rows:
        print(f"| {name} | {bench_ms(fn, 10):.2f} ms |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
