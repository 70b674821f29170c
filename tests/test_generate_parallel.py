"""`xattn-video generate ... parallel.ulysses=2` in two processes (gloo, CPU): one group of two makes each video.

The videos' latents equal a one-process run's within float32 round-off (with head balancing on), the sidecar records
the degree and each rank's times and blocks (their blocks adding up to the one-process run's), followers write
nothing, and a rerun skips every video (resume unchanged)."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from xattn_video.pipelines.generate import run_generate
from xattn_video.pipelines.generate_config import ConfigError, load_config

OVERRIDES = [
    "model.id=tiny-wan21",
    "prompts.list=[a cat]",
    "video.steps=3",
    "output.keep_latents=true",
    "attention.min_len=16",
    "attention.block_size=16",
    "attention.stride=4",
    "attention.threshold=0.5",
    "progress=false",
]
NAME = "0000_a-cat_seed0_0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, root: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    cfg = load_config(
        None, [*OVERRIDES, f"output.root={root}", f"parallel.ulysses={world}", "parallel.balance_heads=true"]
    )
    result = run_generate(cfg, rank=rank, world_size=world, log=lambda line: None)
    torch.save({"made": result.made, "skipped": result.skipped, "followed": result.followed}, f"{out}.{rank}")
    torch.distributed.barrier()  # no rank tears gloo down while the other still has work in flight
    torch.distributed.destroy_process_group()


def _run_two(root: str, tmp_path) -> list[dict]:
    out = str(tmp_path / "result")
    mp.spawn(_rank, args=(2, _free_port(), root, out), nprocs=2, join=True)
    return [torch.load(f"{out}.{r}") for r in range(2)]


@pytest.mark.usefixtures("one_thread")
def test_two_processes_make_each_video_together(tmp_path):
    single_root, parallel_root = tmp_path / "single", tmp_path / "parallel"
    run_generate(load_config(None, [*OVERRIDES, f"output.root={single_root}"]), log=lambda line: None)

    leader, follower = _run_two(str(parallel_root), tmp_path)
    assert sorted(leader["made"]) == [f"dense/{NAME}", f"xattn/{NAME}"]
    assert follower["made"] == [] and follower["followed"].startswith("rank 0 (Ulysses group 0")
    for variant in ("dense", "xattn"):
        a = torch.load(single_root / "meta" / variant / f"{NAME}.latents.pt")
        b = torch.load(parallel_root / "meta" / variant / f"{NAME}.latents.pt")
        assert (a - b).abs().max() <= 2e-6 * max(1.0, float(a.abs().max())), variant

    one = json.loads((single_root / "meta" / "xattn" / f"{NAME}.json").read_text())
    two = json.loads((parallel_root / "meta" / "xattn" / f"{NAME}.json").read_text())
    assert "parallel" not in one
    par = two["parallel"]
    assert (par["ulysses"], par["group"], par["groups"]) == (2, 0, 1)
    assert [r["rank"] for r in par["ranks"]] == [0, 1]
    assert all(len(r["step_s"]) == 3 and r["sparse_attention_ms"] > 0 for r in par["ranks"])
    kept = sum(r["sparse_kept_blocks"] for r in par["ranks"])
    total = sum(r["sparse_total_blocks"] for r in par["ranks"])
    single_sparse = one["attention_stats"]["blocks_per_step"][1:]  # warmup_steps=1
    assert (kept, total) == (sum(k for k, _ in single_sparse), sum(t for _, t in single_sparse))
    assert two["attention_stats"]["sparse_density"] == pytest.approx(one["attention_stats"]["sparse_density"])
    assert par["sparse_attention_imbalance"] >= 1.0
    assert par["balance_heads"] is True and sorted(par["head_balance"]) == ["0", "1"]  # tiny Wan: 2 layers

    leader, follower = _run_two(str(parallel_root), tmp_path)  # resume: nothing left to make
    assert leader["made"] == [] and sorted(leader["skipped"]) == [f"dense/{NAME}", f"xattn/{NAME}"]
    assert follower["made"] == []


def test_degree_must_divide_the_processes(tmp_path):
    cfg = load_config(None, [*OVERRIDES, f"output.root={tmp_path}", "parallel.ulysses=2"])
    with pytest.raises(ConfigError, match=r"parallel.ulysses = 2 is not allowed with 3 processes"):
        run_generate(cfg, rank=0, world_size=3, log=lambda line: None)
    with pytest.raises(ConfigError, match="parallel.ulysses"):
        load_config(None, ["parallel.ulysses=0"])
    cfg = load_config(None, [*OVERRIDES, f"output.root={tmp_path}", "parallel.ulysses=2", "model.cpu_offload=true"])
    with pytest.raises(ConfigError, match="model.cpu_offload = True is not allowed with parallel.ulysses = 2"):
        run_generate(cfg, rank=0, world_size=2, log=lambda line: None)
