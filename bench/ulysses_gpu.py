"""Ulysses with the xattn backend on the GPU: P processes against one process, on tiny Wan / HunyuanVideo.

Run under torchrun; every process uses the first visible GPU (``--device cuda``) or the CPU. With one GPU and
``--nproc-per-node 2`` the two ranks share it and talk through gloo (NCCL refuses two ranks on one device): that
checks the code path (all-to-all, Triton kernels per rank on H/P heads, the interleaved HunyuanVideo order) on the
GPU, not its speed. diffusers 0.42 refuses ``ulysses_degree=1``, so P=1 cannot run through this path.

  torchrun --nproc-per-node 2 bench/ulysses_gpu.py --device cuda --out results.json

Per case: the largest difference of the P-rank output from the one-process output (max abs, and relative to the
output's max), whether every rank's steps/layers/modes equal the single run's and their kept blocks add up, and the
step times (one-process vs parallel, same GPU: not a speed-up when ranks share a GPU).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist

from xattn_video.testing.ulysses import compare_case

CASES = [
    dict(family="wan", attention="native", heads=4, frames=21),
    dict(family="wan", attention="xattn", heads=4, frames=21, xattn=dict(block_size=64, stride=8, threshold=0.9)),
    dict(
        family="hunyuan",
        attention="xattn",
        heads=4,
        frames=21,
        text_tokens=64,
        text_pad=20,
        xattn=dict(block_size=64, stride=8, threshold=0.9),
    ),
    dict(
        family="hunyuan",
        attention="xattn",
        heads=4,
        frames=21,
        text_tokens=64,
        text_pad=20,
        balance_heads=True,
        xattn=dict(block_size=64, stride=8, threshold=0.9),
    ),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = "cuda:0" if args.device == "cuda" else args.device
    if device.startswith("cuda"):
        torch.cuda.set_device(0)
    dtype = getattr(torch, args.dtype)
    rows = []
    for case in CASES:
        t0 = time.perf_counter()
        try:
            result = compare_case(**case, device=device, dtype=dtype)
            error = None
        except Exception as exc:  # reported in the table, the next case runs
            result, error = None, f"{type(exc).__name__}: {exc}"
        per_rank = [None] * world
        dist.all_gather_object(per_rank, None if result is None else result["parallel"].get("rows"))
        if rank != 0:
            continue
        row = {
            "case": {k: v for k, v in case.items()},
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "world": world,
            "dtype": args.dtype,
            "error": error,
            "wall_s": time.perf_counter() - t0,
        }
        if result is not None:
            single, parallel = result["single"]["outputs"], result["parallel"]["outputs"]
            diffs = [float((a - b).abs().max()) for a, b in zip(single, parallel, strict=True)]
            scale = max(float(a.abs().max()) for a in single)
            row.update(
                max_abs_diff=max(diffs),
                rel_diff=max(diffs) / scale,
                step_diffs=diffs,
                single_step_s=result["single"]["times"],
                parallel_step_s=result["parallel"]["times"],
            )
            ref = result["single"].get("rows")
            if ref is not None:
                same = all([r[:3] for r in rows_] == [r[:3] for r in ref] for rows_ in per_rank)
                kept_single = [r[3] for r in ref]
                kept_ranks = [sum(rows_[i][3] for rows_ in per_rank) for i in range(len(ref))]
                sparse = [r for r in ref if r[2] == "sparse"]
                row.update(
                    modes_equal=same,
                    kept_equal=kept_single == kept_ranks,
                    kept_mismatch_layers=sum(a != b for a, b in zip(kept_single, kept_ranks, strict=True)),
                    sparse_density=sum(r[3] for r in sparse) / max(1, sum(r[4] for r in sparse)),
                    imbalance=result["parallel"]["balance"]["imbalance"],
                    rank_sparse_attention_ms=[b["sparse_attention_ms"] for b in result["parallel"]["balance"]["ranks"]],
                    rank_sparse_density=[
                        sum(r[3] for r in rr if r[2] == "sparse") / max(1, sum(r[4] for r in rr if r[2] == "sparse"))
                        for rr in per_rank
                    ],
                )
        rows.append(row)
    if rank == 0:
        print(
            "case | max abs diff | rel | modes equal | kept equal | sparse density (ranks) | last step s "
            "single/parallel | sparse-attention imbalance"
        )
        for r in rows:
            c = r["case"]
            name = f"{c['family']} {c['attention']} H={c['heads']} frames={c['frames']}"
            name += " balanced" if c.get("balance_heads") else ""
            if r["error"]:
                print(f"{name} | ERROR {r['error']}")
                continue
            ranks = [round(x, 3) for x in r.get("rank_sparse_density", [])]
            dens = f"{r.get('sparse_density', float('nan')):.3f} {ranks}"
            times = f"{r['single_step_s'][-1]:.4f}/{r['parallel_step_s'][-1]:.4f}"
            print(
                f"{name} | {r['max_abs_diff']:.3g} | {r['rel_diff']:.3g} | {r.get('modes_equal')} | "
                f"{r.get('kept_equal')} | {dens} | {times} | {r.get('imbalance')}"
            )
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
