"""Float8 attention's error per layer and step on the trained video fixture (CPU or GPU).

Generates with the fixture (:mod:`xattn_video.testing.fixture`) under the XAttention processor on its exact path;
at every sparse call the same kept blocks are also run through the float8 kernel
(:mod:`xattn_video.kernels.block_sparse_attention_fp8`) and compared with the exact result over the valid rows:
relative L2 error per (step, layer), and the mean per layer. The generation itself stays exact, so every
step's inputs are those of the exact run. On the CPU the kernel runs in Triton's interpreter
(TRITON_INTERPRET=1, set here when there is no GPU).

    python bench/fp8_fixture_error.py --frames 8 --steps 6 --json docs/results/fp8_fixture_error.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="height and width in pixels")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--caption", default="red circle moving right on plain")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import xattn_video
    from xattn_video.core.attention import _sparse_attention
    from xattn_video.testing.fixture import generate, load_fixture

    device = "cuda" if torch.cuda.is_available() else "cpu"
    fixture = load_fixture(device=device)
    errors: dict[tuple[int, int], float] = {}
    proc = xattn_video.enable(fixture.transformer, threshold=args.threshold, stride=8, warmup_steps=0)
    exact_sparse = proc.sparse_attention
    fp8_attend = _sparse_attention("triton", fp8=True)

    def sparse_attention(q, k, v, out=None):
        result, stats = exact_sparse(q, k, v, out=out)
        selection = proc.select_blocks(q[:, :, : k.shape[2]], k)
        length = k.shape[2]
        qv = q[:, :, :length]
        approx = fp8_attend(qv, k, v, selection, block_size=proc.block_size, causal=False, scale=None)
        exact = result[:, :, :length]
        step = proc.tracker.position.step
        layer = len([key for key in errors if key[0] == step])  # one call a layer: conditional batch only
        errors[(step, layer)] = float((approx.double() - exact.double()).norm() / exact.double().norm())
        return result, stats

    proc.sparse_attention = sparse_attention
    with torch.inference_mode():
        generate(fixture, [args.caption], [0], frames=args.frames, height=args.size, width=args.size,
                 steps=args.steps, guidance_scale=1.0)  # fmt: skip
    layers = sorted({layer for _, layer in errors})
    per_layer = {layer: sum(e for (s, ly), e in errors.items() if ly == layer) / args.steps for layer in layers}
    print("| layer | " + " | ".join(f"step {s}" for s in range(args.steps)) + " | mean |")
    print("|---|" + "---|" * (args.steps + 1))
    for layer in layers:
        cells = " | ".join(f"{errors.get((s, layer), float('nan')):.3f}" for s in range(args.steps))
        print(f"| {layer} | {cells} | {per_layer[layer]:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": device, "per_step_layer": {f"{s},{ly}": e for (s, ly), e in
                                                                               errors.items()},
                       "per_layer_mean": per_layer}, f, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
