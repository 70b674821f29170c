"""The xattn backend's Ulysses forward op on one device, with the all-to-all emulated (one process).

diffusers 0.42 refuses ``ulysses_degree=1`` and NCCL refuses two ranks on one GPU (two ranks sharing one GPU through
gloo crashed, docs/benchmarks.md), so on a single GPU this is what runs of the parallel path: for each of P
emulated ranks, the q/k/v that diffusers' all-to-all would hand it (its H/P heads, the whole sequence, in the
interleaved order of HunyuanVideo's plan: rank 0's video and text, rank 1's, ...) and the full-length key-padding
mask in that order go through ``xattn_video.diffusion.parallel._forward_op`` (the order put back, the
``xattn_video::attention`` op, the output put back in the interleaved order); the P outputs, put back in
video-then-text order and joined over heads, are compared with the op on all heads in one call, and the ranks'
kept blocks with the one call's. Then the same for a sequence with no text part (Wan's self-attention).

  python bench/ulysses_emulated.py --device cuda --out results.json
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch

from xattn_video.diffusion.attention_op import ForwardState, activate, deactivate
from xattn_video.diffusion.backend import XAttnSession, register_xattn_backend
from xattn_video.diffusion.parallel import _forward_op, sequence_layout, to_natural_order
from xattn_video.diffusion.steps import StepPosition


def _kept(session: XAttnSession) -> int:
    return session.stats["totals"]["kept_blocks"]


def run_case(device, dtype, heads, video, text, pad, parts, settings) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    n = video + text
    q, k, v = (torch.randn(1, n, heads, 64, generator=g).to(device, dtype) for _ in range(3))
    q[:, :video] += torch.randn(1, video, heads, 64, generator=g).to(device, dtype)  # some structure: shared part
    k[:, :video] += q[:, :video] * 0.5
    mask = None
    if text:
        mask = torch.ones(1, 1, 1, n, dtype=torch.bool, device=device)
        mask[..., n - pad :] = False
    position = StepPosition(0, 1, 500.0)

    one = XAttnSession(**settings)
    activate(ForwardState(one, position, dense_step=False))
    t0 = time.perf_counter()
    ref = torch.ops.xattn_video.attention(q, k, v, mask, None, False)
    torch.cuda.synchronize() if device.startswith("cuda") else None
    one_s = time.perf_counter() - t0
    deactivate()

    natural_to_interleaved = torch.argsort(to_natural_order(n, text, parts, device=device))
    config = SimpleNamespace(context_parallel_config=SimpleNamespace(ulysses_degree=parts))
    outs, kept, times = [], [], []
    for r in range(parts):
        hs = slice(r * heads // parts, (r + 1) * heads // parts)
        qi, ki, vi = (t[:, :, hs].index_select(1, natural_to_interleaved) for t in (q, k, v))
        mi = None if mask is None else mask.index_select(-1, natural_to_interleaved)
        rank = XAttnSession(**settings)
        activate(ForwardState(rank, position, dense_step=False))
        t0 = time.perf_counter()
        with sequence_layout(text):
            out = _forward_op(None, qi, ki, vi, mi, 0.0, False, None, False, False, _parallel_config=config)
        torch.cuda.synchronize() if device.startswith("cuda") else None
        times.append(time.perf_counter() - t0)
        deactivate()
        outs.append(out.index_select(1, to_natural_order(n, text, parts, device=device)))
        kept.append(_kept(rank))
    joined = torch.cat(outs, dim=2)
    valid = n - pad if text else n  # padded query rows: both see the valid keys; compared too
    diff = (joined.float() - ref.float()).abs().max().item()
    return {
        "heads": heads,
        "video_tokens": video,
        "text_tokens": text,
        "text_pad": pad,
        "ranks": parts,
        "dtype": str(dtype),
        "max_abs_diff": diff,
        "max_abs_diff_valid_rows": (joined[:, :valid].float() - ref[:, :valid].float()).abs().max().item(),
        "ref_max": ref.float().abs().max().item(),
        "kept_one_call": _kept(one),
        "kept_ranks": kept,
        "kept_equal": sum(kept) == _kept(one),
        "density": one.stats["totals"]["density"],
        "one_call_s": one_s,
        "rank_s": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    register_xattn_backend()
    dtype = getattr(torch, args.dtype)
    settings = dict(threshold=0.9, stride=8, block_size=128, min_len=16)
    cases = [
        dict(heads=8, video=8192, text=256, pad=200, parts=2),
        dict(heads=8, video=8192, text=256, pad=200, parts=4),
        dict(heads=8, video=8192, text=0, pad=0, parts=4),
    ]
    rows = []
    for case in cases:
        run_case(args.device, dtype, **case, settings=settings)  # warm-up (kernel compilation)
        rows.append(run_case(args.device, dtype, **case, settings=settings))
    print("heads | video+text (pad) | P | max abs diff (valid rows) | kept one call = sum over ranks | density")
    for r in rows:
        print(
            f"{r['heads']} | {r['video_tokens']}+{r['text_tokens']} ({r['text_pad']}) | {r['ranks']} | "
            f"{r['max_abs_diff']:.3g} ({r['max_abs_diff_valid_rows']:.3g}) | {r['kept_one_call']} = "
            f"{'+'.join(map(str, r['kept_ranks']))}: {r['kept_equal']} | {r['density']:.3f}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
