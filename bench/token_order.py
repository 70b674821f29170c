"""GPU benchmark: what the tiled token order (``XAttnProcessor(token_order="tiled")``) costs at HunyuanVideo 720p.

Size: 720x1280x129 -> 33 x 90 x 160 latents -> a 33 x 45 x 80 grid after 2x2 patches = 118,800 video tokens,
+ 256 text tokens (120 valid), 24 heads x 128 channels (hidden 3072), bf16, tile 2 x 8 x 8, 128-token blocks.

The processor reorders per layer: it gathers the layer's video hidden states [1, 118800, 3072] into tiled order
before the projections, scatters the projected video output back after them, and gathers the rotary embedding
once per forward. This script, in one run:

1. checks first: the permutation round-trips exactly at full size; a real-width HunyuanVideo transformer cut
   to one double- and one single-stream block (random weights), run at threshold 1.0 (every block kept), gives
   the same output in tiled and in raster order (bf16 rounding apart) and the same as diffusers' stock
   processors; it stops if a check fails;
2. times (CUDA events, median): building the order (once per grid, then cached), the per-layer gather and
   scatter, the per-forward RoPE gather, the alternative route (gather q, k, v, scatter the output), and the
   layer's sparse attention at density 0.35 (random blocks, the Triton kernel) for scale;
3. times whole forwards of that 1 + 1 block transformer at fixed density 0.35 (the same random blocks in both
   orders, the real estimate still running): raster against tiled, so the difference is the reorder's cost
   as the processor pays it;

and prints a short table. ``--tiny`` runs the same on the CPU (a narrow model, a 3 x 8 x 16 grid, tile
1 x 4 x 4, 16-token blocks, float32, torch backend, wall clock) to check the script itself.

    python bench/token_order.py           # one H100: about 2 minutes
    python bench/token_order.py --tiny    # CPU, seconds
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.e2e_hunyuan import (  # noqa: E402
    HUNYUAN_VIDEO_13B,
    SMOKE_CONFIG,
    Clock,
    build_transformer,
    fixed_density_processor_class,
    import_project,
    make_inputs,
    rel_err,
)

GPU = dict(latent=(33, 90, 160), text=256, text_valid=120, tile=(2, 8, 8), block=128, backend="triton")
TINY = dict(latent=(3, 16, 32), text=32, text_valid=12, tile=(1, 4, 4), block=16, backend="torch")


def time_ms(fn, repeats: int, clock: Clock) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` runs after two warm-ups."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = clock.start()
        fn()
        times.append(clock.stop_ms(start))
    return statistics.median(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def processor(kind: str, token_order: str, setup: dict, density: float = 1.0):
    """An XAttnProcessor ("threshold-1": the estimate keeps every block) or one with a fixed random block
    choice at ``density`` ("fixed"), in ``token_order``."""
    from xattn_video import XAttnProcessor

    common = dict(
        stride=8 if setup["block"] >= 64 else 4,
        block_size=setup["block"],
        backend=setup["backend"],
        token_order=token_order,
        tile=setup["tile"],
    )
    if kind == "threshold-1":
        return XAttnProcessor(threshold=1.0, **common)
    return fixed_density_processor_class()(density, threshold=0.9, **common)


def forward(model, proc, inputs) -> torch.Tensor:
    model.set_attn_processor(proc)
    proc.attach(model)
    with torch.inference_mode():
        out = model(**inputs)[0]
    proc.detach()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU check of the script: narrow model, tiny grid")
    parser.add_argument("--density", type=float, default=0.35, help="fixed block density of the timed attention")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs of each small operation")
    parser.add_argument("--forwards", type=int, default=5, help="timed forwards per order")
    args = parser.parse_args(argv)
    import_project()
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

    from xattn_video.core.attention import _sparse_attention
    from xattn_video.core.token_order import TokenOrder, grid_from_latents, tiled_order
    from xattn_video.testing.synthetic import random_block_selection

    if not args.tiny and not torch.cuda.is_available():
        print("no CUDA device: run with --tiny for the CPU check of this script", file=sys.stderr)
        return 2
    setup = TINY if args.tiny else GPU
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    config = dict(SMOKE_CONFIG if args.tiny else HUNYUAN_VIDEO_13B, num_layers=1, num_single_layers=1)
    config["num_refiner_layers"] = 1
    clock = Clock(device)
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    hidden = heads * head_dim
    grid = grid_from_latents((1, config["in_channels"], *setup["latent"]), config["patch_size"], config["patch_size_t"])
    n_video = math.prod(grid)
    n_valid = n_video + setup["text_valid"]
    print(
        f"grid {grid} = {n_video:,} video + {setup['text']} text tokens ({setup['text_valid']} valid), "
        f"{heads} heads x {head_dim}, {dtype}, tile {setup['tile']}, block {setup['block']}, {device}",
        flush=True,
    )

    # ------------------------------------------------------------------------------------------ checks
    start = time.perf_counter()
    order = TokenOrder(grid, setup["tile"], device)  # uncached: what the first forward pays
    sync(device)
    build_ms = (time.perf_counter() - start) * 1e3
    order = tiled_order(grid, setup["tile"], device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, n_video, hidden, generator=gen, device=device, dtype=torch.float32).to(dtype)
    tiled_x = order.permute(x, dim=1)
    picks = torch.randint(0, n_video, (64,), generator=gen, device=device)
    ok_round = bool(torch.equal(order.unpermute(tiled_x, dim=1), x))
    ok_gather = bool(torch.equal(tiled_x[0, picks], x[0, order.index[picks]]))
    print(f"check: round trip exact {ok_round}, gather semantics {ok_gather}", flush=True)

    model = build_transformer(config, device, dtype, seed=0)
    inputs = make_inputs(config, setup["latent"], setup["text"], setup["text_valid"], device, dtype, seed=1)
    outs = {o: forward(model, processor("threshold-1", o, setup), inputs) for o in ("raster", "tiled")}
    stock = {
        n: AttnProcessor2_0() if n.startswith("context_embedder") else HunyuanVideoAttnProcessor2_0()
        for n in model.attn_processors
    }
    model.set_attn_processor(stock)
    with torch.inference_mode():
        out_stock = model(**inputs)[0]
    err_orders, err_stock = rel_err(outs["tiled"], outs["raster"]), rel_err(outs["tiled"], out_stock)
    limit = 1e-4 if dtype == torch.float32 else 2e-2
    print(
        f"check: threshold 1.0 forward, tiled vs raster rel err {err_orders:.2e}, tiled vs stock {err_stock:.2e}"
        f" (limit {limit:.0e})",
        flush=True,
    )
    if not (ok_round and ok_gather and err_orders < limit and err_stock < limit):
        print("CHECK FAILED: timings not run", flush=True)
        return 1
    del outs, out_stock, x, tiled_x

    # ------------------------------------------------------------------------------------------ operations
    rows = []  # (what, ms, per, share of the layer's sparse attention)
    h = torch.randn(1, n_video, hidden, generator=gen, device=device, dtype=torch.float32).to(dtype)
    gather_ms = time_ms(lambda: order.permute(h, dim=1), args.repeats, clock)
    scatter_ms = time_ms(lambda: order.unpermute(h, dim=1), args.repeats, clock)
    rope = tuple(torch.randn(n_video, head_dim, generator=gen, device=device) for _ in range(2))
    rope_ms = time_ms(lambda: [order.permute(r, dim=0) for r in rope], args.repeats, clock)
    n = n_video + setup["text"]
    q = torch.randn(1, heads, n, head_dim, generator=gen, device=device, dtype=torch.float32).to(dtype)
    qkv_ms = time_ms(lambda: order.permute(q, dim=2), args.repeats, clock)  # one of q, k, v ([B, H, N, D])
    o_bnhd = q.permute(0, 2, 1, 3).contiguous()
    out_ms = time_ms(lambda: order.unpermute(o_bnhd, dim=1), args.repeats, clock)  # the output, [B, N, H, D]
    n_blocks = -(-n_valid // setup["block"])
    sel = random_block_selection(1, heads, n_blocks, args.density, device=device, seed=1)
    qv = q[:, :, :n_valid]
    attend = _sparse_attention(setup["backend"])
    attention_ms = time_ms(
        lambda: attend(qv, qv, qv, sel, block_size=setup["block"], causal=False, scale=None), 5, clock
    )

    def share(ms: float) -> str:
        return f"{100 * ms / attention_ms:.2f}%"

    rows += [
        ("build the order (first forward of a grid; cached after)", build_ms, "grid", ""),
        (f"gather video hidden states [1, {n_video}, {hidden}]", gather_ms, "layer", share(gather_ms)),
        ("scatter the projected video output back", scatter_ms, "layer", share(scatter_ms)),
        (f"gather RoPE cos, sin [{n_video}, {head_dim}] fp32", rope_ms, "forward", ""),
        ("processor route: gather + scatter", gather_ms + scatter_ms, "layer", share(gather_ms + scatter_ms)),
        (
            f"alternative: gather q, k, v [1, {heads}, {n}, {head_dim}] + scatter output",
            3 * qkv_ms + out_ms,
            "layer",
            share(3 * qkv_ms + out_ms),
        ),
        (f"sparse attention, density {args.density} ({setup['backend']}), for scale", attention_ms, "layer", "100%"),
    ]

    # ------------------------------------------------------------------------------------------ forwards
    forward_ms = {}
    for token_order in ("raster", "tiled"):
        proc = processor("fixed", token_order, setup, args.density)
        model.set_attn_processor(proc)
        proc.attach(model)
        with torch.inference_mode():
            forward_ms[token_order] = time_ms(lambda: model(**inputs), args.forwards, clock)
        assert proc.stats["settings"]["token_order"] == token_order, proc.stats["settings"]
        proc.detach()
    per_layer = (forward_ms["tiled"] - forward_ms["raster"]) / 2
    rows += [
        (f"forward, 1 double + 1 single block, raster, density {args.density}", forward_ms["raster"], "forward", ""),
        ("the same, tiled", forward_ms["tiled"], "forward", ""),
        ("difference per layer (tiled - raster) / 2", per_layer, "layer", share(per_layer)),
    ]

    print()
    print(f"| {'what':<78} | {'ms':>9} | {'per':<7} | share of sparse attention |")
    print(f"|{'-' * 80}|{'-' * 11}|{'-' * 9}|---------------------------|")
    for what, ms, per, sh in rows:
        print(f"| {what:<78} | {ms:9.3f} | {per:<7} | {sh:>25} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
