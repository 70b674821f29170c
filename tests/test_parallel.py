"""Ulysses sequence parallelism with the ``xattn`` backend (diffusers' context parallelism), on CPU with gloo.

P spawned processes run tiny Wan and HunyuanVideo transformers under ``ContextParallelConfig(ulysses_degree=P)``;
each compares with the same transformer run as one process (diffusers' native backend, and XAttention with one
dense warmup step then sparse steps): outputs within float32 round-off, and the XAttention statistics of the P ranks
(each on its H/P heads) adding up to the single process's, step by step and layer by layer.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import ContextParallelConfig

from xattn_video.diffusion.head_balance import assign_heads
from xattn_video.diffusion.parallel import check_parallel_config, split_sizes, to_natural_order
from xattn_video.testing.ulysses import TIMESTEPS, compare_cases, run_ranks

RING_LINE = "ring_degree=2 is not supported by the xattn backend"
HEADS_LINE = "ulysses_degree=2 does not divide the 3 attention heads"


def _assert_matches(result: dict, what: str) -> None:
    assert "error" not in result, f"{what}: {result.get('traceback')}"
    single, parallel = result["single"]["outputs"], result["parallel"]["outputs"]
    assert len(single) == len(parallel) == len(TIMESTEPS)
    for step, (a, b) in enumerate(zip(single, parallel, strict=True)):
        scale = max(1.0, float(a.abs().max()))
        assert (a - b).abs().max() <= 2e-6 * scale, f"{what}: step {step} differs by {float((a - b).abs().max())}"


def _assert_stats_add_up(results: list[dict], index: int, what: str) -> None:
    """Every rank records the same steps, layers and modes as one process; kept and total blocks add up."""
    single = results[0][index]["single"]["rows"]
    ranks = [r[index]["parallel"]["rows"] for r in results]
    assert {row[2] for row in single} == {"dense", "sparse"}, f"{what}: warmup then sparse steps expected"
    for rows in ranks:
        assert [row[:3] for row in rows] == [row[:3] for row in single], f"{what}: steps/layers/modes differ"
    for i, row in enumerate(single):
        assert sum(rows[i][3] for rows in ranks) == row[3], f"{what}: kept blocks at {row[:3]}"
        assert sum(rows[i][4] for rows in ranks) == row[4], f"{what}: total blocks at {row[:3]}"
    sparse = [row for row in single if row[2] == "sparse"]
    assert sum(r[3] for r in sparse) < sum(r[4] for r in sparse), f"{what}: sparse steps skipped nothing"
    balance = results[0][index]["parallel"]["balance"]  # rank_balance: every rank's heads, seen from rank 0
    assert [b["rank"] for b in balance["ranks"]] == list(range(len(ranks)))
    for b, rows in zip(balance["ranks"], ranks, strict=True):
        assert b["sparse_kept_blocks"] == sum(r[3] for r in rows if r[2] == "sparse"), what
        assert b["sparse_attention_ms"] > 0, what
    assert balance["imbalance"] >= 1.0


CASES_2 = [
    dict(family="wan", attention="native", heads=4),
    dict(family="wan", attention="xattn", heads=4),
    dict(family="hunyuan", attention="native", heads=4),
    dict(family="hunyuan", attention="xattn", heads=4),  # interleaved video/text, key padding
    dict(family="wan", attention="xattn", heads=3),  # refused: 2 does not divide 3
    dict(family="wan", attention="xattn", heads=3, ulysses_anything=True),  # diffusers pads the heads
    dict(family="wan", attention="xattn", heads=4, ring_degree=2),  # refused by enable_parallelism
    dict(family="wan", attention="xattn", heads=4, ring_degree=2, direct=True),  # refused by the backend
    dict(family="hunyuan", attention="xattn", heads=4, balance_heads=True),  # heads assigned by measured density
    dict(family="wan", attention="xattn", heads=4, compile=True),  # torch.compile (aot_eager) under Ulysses
    dict(family="hunyuan", attention="native", heads=4, text_tokens=15),  # refused: 2 does not divide 15 text tokens
]


@pytest.fixture(scope="module")
def two_ranks() -> list:
    return run_ranks(2, compare_cases, CASES_2)


@pytest.mark.parametrize("index", [0, 1, 2, 3, 5, 8, 9])
def test_two_ranks_match_one_process(two_ranks, index):
    case = CASES_2[index]
    for rank, results in enumerate(two_ranks):
        _assert_matches(results[index], f"{case} rank {rank}")
    if case["attention"] == "xattn":
        _assert_stats_add_up(two_ranks, index, str(case))


def test_compiled_transformer_under_ulysses_does_not_recompile(two_ranks):
    """Compiled, the parallel run matches one process (test above) and Dynamo makes no new graph after step 0:
    nothing of a step or layer (the backend's state is read inside the op) is guarded on."""
    for results in two_ranks:
        graphs = results[9]["parallel"]["graphs"]
        assert len(graphs) == len(TIMESTEPS) and graphs[0] > 0 and len(set(graphs)) == 1, graphs


def test_head_balancing_evens_the_ranks(two_ranks):
    """Measured at the first sparse step (step 1) for every layer; the ranks' kept blocks after the assignment are
    never further apart than before (2 ranks of 2 heads: the greedy assignment is the best one)."""
    summary = two_ranks[0][8]["parallel"]["head_balance"]
    single = two_ranks[0][8]["single"]["rows"]
    assert sorted(summary) == sorted({row[1] for row in single})
    for layer, loads in summary.items():
        assert sum(loads["before"]) == sum(loads["after"])
        assert max(loads["after"]) <= max(loads["before"]), layer
    assert summary == two_ranks[1][8]["parallel"]["head_balance"]  # every rank chose the same


@pytest.mark.parametrize("seed", range(5))
def test_assign_heads_balances_two_ranks_optimally(seed):
    cost = torch.rand(4, generator=torch.Generator().manual_seed(seed)) * 100
    perm = assign_heads(cost, 2)
    assert sorted(perm.tolist()) == [0, 1, 2, 3]
    pairs = [(0, 1), (0, 2), (0, 3)]
    best = min(max(float(cost[list(a)].sum()), float(cost.sum() - cost[list(a)].sum())) for a in pairs)
    assert max(float(cost[perm[:2]].sum()), float(cost[perm[2:]].sum())) == pytest.approx(best)


def test_indivisible_heads_refused_in_one_line(two_ranks):
    for results in two_ranks:
        error = results[4].get("error", "")
        assert HEADS_LINE in error and "ulysses_anything=True" in error and "\n" not in error


def test_indivisible_text_refused_in_one_line(two_ranks):
    for results in two_ranks:
        error = results[10].get("error", "")
        assert "the text has 15 tokens, which ulysses_degree=2 does not divide" in error and "\n" not in error


@pytest.mark.parametrize("index", [6, 7])
def test_ring_refused_in_one_line(two_ranks, index):
    for results in two_ranks:
        error = results[index].get("error", "")
        assert error.startswith("ValueError: " + RING_LINE) and "\n" not in error


def test_four_ranks_match_one_process():
    cases = [dict(family="wan", attention="xattn", heads=4), dict(family="hunyuan", attention="xattn", heads=4)]
    results = run_ranks(4, compare_cases, cases)
    for index, case in enumerate(cases):
        for rank, per_rank in enumerate(results):
            _assert_matches(per_rank[index], f"{case} rank {rank}")
        _assert_stats_add_up(results, index, str(case))


@pytest.mark.parametrize("head,tail,parts", [(288, 16, 2), (288, 16, 4), (10, 7, 3), (5, 0, 2)])
def test_natural_order_undoes_the_interleaving(head, tail, parts):
    """What the all-to-all gathers when each rank holds its share of the head part then of the tail part."""
    natural = torch.arange(head + tail)
    heads = torch.tensor_split(natural[:head], parts)
    tails = torch.tensor_split(natural[head:], parts)
    interleaved = torch.cat([torch.cat([h, t]) for h, t in zip(heads, tails, strict=True)])
    assert [len(h) for h in heads] == split_sizes(head, parts)
    assert torch.equal(interleaved[to_natural_order(head + tail, tail, parts)], natural)


def test_config_checks_without_processes():
    check_parallel_config(ContextParallelConfig(ulysses_degree=2), 4)
    check_parallel_config(ContextParallelConfig(ulysses_degree=2, ulysses_anything=True), 3)
    with pytest.raises(ValueError, match=HEADS_LINE):
        check_parallel_config(ContextParallelConfig(ulysses_degree=2), 3)
    with pytest.raises(ValueError, match=RING_LINE):
        check_parallel_config(ContextParallelConfig(ring_degree=2), 4)


def test_refusals_before_any_process_group():
    """What enable_parallelism refuses in one line, before torch.distributed is needed."""
    from diffusers import SkyReelsV2Transformer3DModel

    import xattn_video
    from xattn_video.diffusion.parallel_plans import enable_parallelism
    from xattn_video.testing.ulysses import build_transformer

    config = ContextParallelConfig(ulysses_degree=2)
    hunyuan = build_transformer("hunyuan", 4)
    xattn_video.enable(hunyuan, threshold=0.9)  # HunyuanVideo's own processor
    with pytest.raises(ValueError, match="XAttention processor does not run under context parallelism"):
        enable_parallelism(hunyuan, config)
    wan = build_transformer("wan", 4)
    with pytest.raises(ValueError, match="balance_heads=True needs XAttention on the transformer first"):
        enable_parallelism(wan, config, balance_heads=True)
    skyreels = SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=32,
        ffn_dim=64,
        num_layers=1,
        rope_max_seq_len=1024,
    )
    with pytest.raises(ValueError, match="SkyReelsV2Transformer3DModel has no context-parallel plan"):
        enable_parallelism(skyreels, config)
