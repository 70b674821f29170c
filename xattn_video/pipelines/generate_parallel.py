"""`generate` with `parallel.ulysses=P`: groups of P processes each make one video at a time (Ulysses).

Under `torchrun --nproc-per-node N`, ranks `g*P .. g*P+P-1` form group g (N/P groups). The groups share the video
list as single processes do today (every (N/P)-th video from the group's index). In a group, the first rank (the
leader) does everything a single process does (resume checks, locks, files, manifest, sidecars); the others
(followers) load the same pipeline and make each video with it, told which by the leader, and write nothing. Every
transformer of the pipeline runs under diffusers' context parallelism with the model's plan
(:mod:`xattn_video.diffusion.parallel_plans`); the attention variants use the `xattn` backend (HunyuanVideo too:
its processor does not run in parallel).

The sidecar of a video made this way has `parallel`: the degree, the group, and per rank its time, its step
times, the density of its heads and its sparse-attention time (estimate + attention over the sparse steps), with
`sparse_attention_imbalance`: the slowest rank's sparse-attention time over the mean (ranks wait for the slowest).
`attention_stats.density` and `sparse_density` count the blocks of all ranks' heads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .generate_config import ConfigError

__all__ = ["Group", "combine_rank_stats", "rank_record", "setup_group"]


@dataclass
class Group:
    """This process's Ulysses group."""

    degree: int
    index: int  # the group's index among the world's groups
    count: int  # number of groups
    local: int  # this process's rank within the group (0: the leader)
    config: Any  # diffusers ContextParallelConfig, set up on the group's mesh
    process_group: Any = None  # the group's torch.distributed group (set once parallelism is enabled)

    @property
    def leader(self) -> bool:
        return self.local == 0

    def enable(self, pipe: Any, transformers: list[Any]) -> None:
        """Context parallelism on every transformer of the pipeline, each with its model's plan."""
        from xattn_video.diffusion.parallel_plans import enable_parallelism

        for transformer in transformers:
            enable_parallelism(transformer, self.config)

    def broadcast(self, message: Any) -> Any:
        """The leader's ``message`` on every rank of the group."""
        import torch.distributed as dist

        box = [message if self.leader else None]
        dist.broadcast_object_list(box, group_src=0, group=self.process_group)
        return box[0]

    def gather(self, record: Any) -> list | None:
        """Every rank's ``record``, in rank order, on the leader (None on the others)."""
        import torch.distributed as dist

        out = [None] * self.degree if self.leader else None
        dist.gather_object(record, out, group_dst=0, group=self.process_group)
        return out


def setup_group(degree: int, rank: int, world_size: int, device: str) -> Group | None:
    """Initialise torch.distributed (NCCL on CUDA, gloo on CPU, torchrun's environment) and this process's
    group; None when ``degree`` is 1 (no parallelism)."""
    if degree == 1:
        return None
    if world_size % degree:
        raise ConfigError(
            f"parallel.ulysses = {degree} is not allowed with {world_size} processes: it must divide the number of "
            "processes (torchrun --nproc-per-node N: groups of P processes make one video each)"
        )
    import torch
    import torch.distributed as dist

    from xattn_video.diffusion.parallel_plans import ulysses_config

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world_size)
    config = ulysses_config(degree, device_type="cuda" if cuda else "cpu")
    group = config.mesh["ulysses"].get_group()
    return Group(degree, rank // degree, world_size // degree, rank % degree, config, group)


def rank_record(rank: int, gen: Any) -> dict:
    """What one rank reports about one video: times, and its heads' blocks and sparse-attention time."""
    if gen is None:
        return {"rank": rank, "failed": True}
    attention = gen.attention or {}
    modes = attention.get("mode_per_step") or []
    sparse = [i for i, mode in enumerate(modes) if mode != "dense"]
    steps = attention.get("blocks_per_step") or []
    kept = sum(steps[i][0] for i in sparse) if steps else None
    total = sum(steps[i][1] for i in sparse) if steps else None
    estimate = attention.get("estimate_ms_per_step") or []
    attend = attention.get("attention_ms_per_step") or []
    return {
        "rank": rank,
        "total_s": gen.timing.get("total_s"),
        "denoise_s": gen.timing.get("denoise_s"),
        "step_s": gen.timing.get("step_s"),
        "sparse_density": kept / total if total else None,
        "sparse_kept_blocks": kept,
        "sparse_total_blocks": total,
        "blocks": [list(x) for x in steps],
        "sparse_attention_ms": sum(estimate[i] + attend[i] for i in sparse) if sparse and attend else None,
    }


def combine_rank_stats(group: Group, gen: Any, records: list[dict]) -> dict:
    """The sidecar's ``parallel`` entry; ``gen.attention``'s densities recounted over every rank's heads."""
    ranks = [r for r in records if not r.get("failed")]
    times = [r["sparse_attention_ms"] for r in ranks if r.get("sparse_attention_ms") is not None]
    attention = gen.attention
    if attention is not None and ranks and all(r["blocks"] for r in ranks):
        kept = sum(k for r in ranks for k, _ in r["blocks"])
        total = sum(t for r in ranks for _, t in r["blocks"])
        sparse_kept = sum(r["sparse_kept_blocks"] or 0 for r in ranks)
        sparse_total = sum(r["sparse_total_blocks"] or 0 for r in ranks)
        per_step = [
            sum(r["blocks"][i][0] for r in ranks) / max(1, sum(r["blocks"][i][1] for r in ranks))
            for i in range(len(ranks[0]["blocks"]))
        ]
        attention.update(
            density=kept / total if total else None,
            sparse_density=sparse_kept / sparse_total if sparse_total else None,
            density_per_step=per_step,
            density_heads="all ranks",
        )
    return {
        "ulysses": group.degree,
        "group": group.index,
        "groups": group.count,
        "ranks": [{k: v for k, v in r.items() if k != "blocks"} for r in records],
        "sparse_attention_imbalance": max(times) / (sum(times) / len(times)) if times and sum(times) else None,
    }
