"""xattn_video/kernels/select.py: the Triton block selection equals select_blocks_torch and hand-derived cases."""

from __future__ import annotations

import pytest
import torch

from xattn_video.core.reference import block_scores_torch, select_blocks_torch
from xattn_video.kernels.select import select_blocks_triton


def assert_same_selection(got, want):
    mask, count, indices = got
    assert mask.dtype == torch.bool and count.dtype == torch.int32 and indices.dtype == torch.int32
    assert mask.shape == want[0].shape and count.shape == want[1].shape and indices.shape == want[2].shape
    assert torch.equal(mask, want[0])
    assert torch.equal(count, want[1])
    assert torch.equal(indices, want[2])


def check_format(mask, count, indices):
    """kv_indices holds the kept blocks ascending, then -1; kv_count counts them."""
    n_kb = mask.shape[-1]
    assert torch.equal(count, mask.sum(-1, dtype=torch.int32))
    place = torch.arange(n_kb, device=mask.device)
    assert torch.equal(indices < 0, place >= count[..., None])
    kept_sorted = torch.where(indices >= 0, indices, n_kb)
    assert torch.equal(kept_sorted, kept_sorted.sort(-1).values)
    rebuilt = torch.zeros(*mask.shape[:-1], n_kb + 1, dtype=torch.bool, device=mask.device)
    rebuilt.scatter_(-1, kept_sorted.long(), True)
    assert torch.equal(rebuilt[..., :n_kb], mask)


def rand_scores(shape, device, seed, kind="uniform"):
    gen = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        x = torch.rand(shape, generator=gen)
    elif kind == "ties":  # few distinct, exactly representable values: many ties, exact sums
        x = torch.randint(0, 5, shape, generator=gen).float() / 8
    elif kind == "peaked":  # softmax-like: a few large blocks, a long tail of tiny ones
        x = torch.softmax(torch.randn(shape, generator=gen) * 4, dim=-1) * 16
    else:
        raise ValueError(kind)
    return x.to(device)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["uniform", "ties", "peaked"])
@pytest.mark.parametrize("threshold", [0.9, 0.5, 1.0, 1e-4, 0.999])
def test_random_scores_match_torch(kind, threshold, causal, device):
    seed = len(kind) * 100 + int(threshold * 1000) + causal
    scores = rand_scores((2, 4, 13, 13), device, seed=seed, kind=kind)
    got = select_blocks_triton(scores, threshold=threshold, causal=causal)
    assert_same_selection(got, select_blocks_torch(scores, threshold=threshold, causal=causal))
    check_format(*got)


@pytest.mark.parametrize(
    "shape,causal,rows_per_program",
    [
        ((1, 1, 6, 6), True, 1),
        ((1, 3, 10, 10), True, 4),  # the last program runs past the end
        ((1, 2, 3, 1000), False, None),  # nkb ~ 1000 (119k tokens at block 128)
        ((1, 1, 2, 5000), False, None),  # padded to 8192
        ((1, 1, 2, 9000), False, 2),  # padded to 16384
        ((2, 2, 5, 7), False, None),  # more key blocks than query blocks
        ((1, 2, 40, 40), True, None),
    ],
)
def test_shapes_match_torch(shape, causal, rows_per_program, device):
    for seed, kind in enumerate(["uniform", "peaked", "ties"]):
        scores = rand_scores(shape, device, seed=seed, kind=kind)
        got = select_blocks_triton(scores, threshold=0.9, causal=causal, rows_per_program=rows_per_program)
        assert_same_selection(got, select_blocks_torch(scores, threshold=0.9, causal=causal))
        check_format(*got)


def test_scores_from_the_estimate_and_strided_views(device):
    gen = torch.Generator().manual_seed(5)
    q = (torch.randn(2, 4, 400, 32, generator=gen) * 2).to(device)
    k = torch.randn(2, 2, 400, 32, generator=gen).to(device)
    for causal in (False, True):
        scores = block_scores_torch(q, k, stride=8, block_size=32, causal=causal)
        for threshold in (0.3, 0.8, 0.95):
            got = select_blocks_triton(scores, threshold=threshold, causal=causal)
            assert_same_selection(got, select_blocks_torch(scores, threshold=threshold, causal=causal))
    view = scores.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    assert not view.is_contiguous()
    got = select_blocks_triton(view, threshold=0.8, causal=True)
    assert_same_selection(got, select_blocks_torch(scores, threshold=0.8, causal=True))


# ---------------------------------------------------------------- hand-derived cases


def rows_case(values):
    scores = torch.tensor(values, dtype=torch.float32)
    if scores.dim() == 1:
        scores = scores[None]
    return scores[None, None]


@pytest.mark.parametrize(
    "threshold,kept",
    [
        # ranked 0.5, 0.25, 0.125, 0.125 (mass 1); exclusive running sums 0, 0.5, 0.75, 0.875
        (0.5, [1]),  # only 0 < 0.5: the top block alone reaches the target
        (0.6, [1, 2]),  # 0 and 0.5 < 0.6: the crossing block (0.25) is kept
        (0.8, [0, 1, 2, 3]),  # 0.75 < 0.8: cutoff 0.125, and its tie (block 0) is kept too
        (0.75, [1, 2]),  # 0.75 is not < 0.75
        (1e-6, [1]),
        (1.0, [0, 1, 2, 3]),
    ],
)
def test_hand_row(threshold, kept, device):
    scores = rows_case([0.125, 0.5, 0.25, 0.125]).to(device)
    mask, count, indices = select_blocks_triton(scores, threshold=threshold, causal=False)
    assert mask[0, 0, 0].nonzero().flatten().tolist() == kept
    assert count.item() == len(kept)
    assert indices[0, 0, 0].tolist() == kept + [-1] * (4 - len(kept))
    want = select_blocks_torch(scores, threshold=threshold, causal=False)
    assert_same_selection((mask, count, indices), want)


def test_hand_causal(device):
    junk = 9.0  # right of the diagonal: must be ignored
    scores = torch.tensor(
        [
            [0.5, junk, junk, junk],
            [0.25, 0.75, junk, junk],
            [0.0625, 0.75, 0.1875, junk],
            [0.0625, 0.5, 0.125, 0.3125],
        ]
    )[None, None].to(device)
    mask, count, indices = select_blocks_triton(scores, threshold=0.5, causal=True)
    # row 0: block 0 only. Row 1: 0.75 alone reaches 0.5 (plus diagonal 1 and first 0). Row 2: 0.75 alone,
    # plus diagonal 2 and first 0. Row 3: ranked 0.5, 0.3125, ...: 0.5 alone reaches 0.5; plus 3 and 0, not 2.
    expected = [[0], [0, 1], [0, 1, 2], [0, 1, 3]]
    for qb, kept in enumerate(expected):
        assert mask[0, 0, qb].nonzero().flatten().tolist() == kept
        assert indices[0, 0, qb].tolist() == kept + [-1] * (4 - len(kept))
    assert count[0, 0].tolist() == [1, 2, 3, 3]
    assert_same_selection((mask, count, indices), select_blocks_torch(scores, threshold=0.5, causal=True))
    # threshold 1 keeps every block at or left of the diagonal, whatever the scores
    mask1, count1, _ = select_blocks_triton(scores, threshold=1.0, causal=True)
    assert torch.equal(mask1[0, 0].cpu(), torch.ones(4, 4, dtype=torch.bool).tril())
    assert count1[0, 0].tolist() == [1, 2, 3, 4]


def test_hand_zero_scores(device):
    scores = rows_case([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]).to(device)
    mask, count, _ = select_blocks_triton(scores, threshold=0.99, causal=False)
    # row 0: ranked 1, 0, 0, 0 with running sums 0, 1, 1, 1: only the 1 is below 0.99. Row 1: no mass, so the
    # top block is kept, and every block ties it.
    assert mask[0, 0].tolist() == [[False, True, False, False], [True, True, True, True]]
    assert count[0, 0].tolist() == [1, 4]
    mask, count, _ = select_blocks_triton(scores, threshold=1.0, causal=False)
    assert mask.all() and count[0, 0].tolist() == [4, 4]


def test_empty_and_bad_input(device):
    empty = torch.zeros(1, 2, 0, 0, device=device)
    mask, count, indices = select_blocks_triton(empty, threshold=0.9, causal=True)
    assert mask.shape == (1, 2, 0, 0) and count.shape == (1, 2, 0) and indices.shape == (1, 2, 0, 0)
    scores = torch.zeros(1, 1, 3, 3, device=device)
    with pytest.raises(ValueError, match="scores must be 4-D"):
        select_blocks_triton(scores[0], threshold=0.9, causal=False)
    with pytest.raises(ValueError, match="threshold"):
        select_blocks_triton(scores, threshold=float("nan"), causal=False)
    with pytest.raises(ValueError, match="rows_per_program"):
        select_blocks_triton(scores, threshold=0.9, causal=False, rows_per_program=3)
