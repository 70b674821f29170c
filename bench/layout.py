"""Do the kernels care about memory layout? Times them on q/k/v in SDPA layout [B, H, N, D] (contiguous)
and as the transposed views of [B, N, H, D] that diffusers' processors produce, at one HunyuanVideo size.

    python -m bench.layout --tokens 119056
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from bench.attention import SIZES, bench_ms, rel_err
from xattn_video.kernels import block_scores_triton, block_sparse_attention_triton
from xattn_video.testing.synthetic import random_block_selection, video_like_qkv


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=119056, choices=sorted(SIZES))
    parser.add_argument("--density", type=float, default=0.35)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    _, frames, height, width, text = SIZES[args.tokens]
    q, k, v = video_like_qkv(frames=frames, height=height, width=width, text_tokens=text, heads=24, head_dim=128,
                             dtype=torch.bfloat16, device="cuda", seed=0)
    views = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]  # [B, N, H, D] memory
    n_blocks = math.ceil(args.tokens / 128)
    sel = random_block_selection(1, 24, n_blocks, args.density, device="cuda")
    print(f"# {torch.cuda.get_device_name()}, {args.tokens} tokens, density {args.density}", flush=True)
    for name, (a, b, c) in (("[B,H,N,D] contiguous", (q, k, v)), ("[B,N,H,D] transposed view", views)):
        scores = block_scores_triton(a, b, stride=8, block_size=128, causal=False)
        out = block_sparse_attention_triton(a, b, c, sel.kv_count, sel.kv_indices, block_size=128, causal=False)
        est = bench_ms(lambda a=a, b=b: block_scores_triton(a, b, stride=8, block_size=128, causal=False),
                       args.repeats)
        att = bench_ms(lambda a=a, b=b, c=c: block_sparse_attention_triton(
            a, b, c, sel.kv_count, sel.kv_indices, block_size=128, causal=False), args.repeats)
        copy = bench_ms(lambda a=a, b=b, c=c: [t.contiguous() for t in (a, b, c)], args.repeats)
        if name.startswith("[B,H"):
            ref_scores, ref_out = scores, out
        print(f"{name}: block scores {est:.2f} ms, sparse attention {att:.2f} ms, making q/k/v contiguous "
              f"{copy:.2f} ms; vs contiguous: scores max diff {float((scores - ref_scores).abs().max()):.1e}, "
              f"output rel err {rel_err(out, ref_out):.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
