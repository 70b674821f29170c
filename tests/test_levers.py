"""bench/levers.py's cached complement (issue 12's research harness): the kept blocks' part of a step merged with
the dropped blocks' part cached at that same step is exact attention, against float64 SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from bench_scripts import load_bench_script


def _levers():
    return load_bench_script("levers")


def _inputs(length: int = 300, heads: int = 2, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(heads, length, dim, generator=g, dtype=torch.float64) for _ in range(3)]


def test_cached_complement_of_the_same_step_is_exact_attention():
    levers = _levers()
    q, k, v = _inputs()
    parts = levers.exact_parts(q, k, v)
    mass_blocks = levers.block_rows(parts[0])
    mask = levers.select("otopk:0.34", mass_blocks, q, k)
    assert 0 < mask.float().mean() < 1
    cache = levers.complement_part(mask, *parts)
    reference = F.scaled_dot_product_attention(q, k, v)
    for comp in ("c", "f"):
        torch.testing.assert_close(levers.cached_out(comp, cache, *parts), reference, rtol=1e-10, atol=1e-10)
    # "m" ignores the dropped blocks: attention over the kept keys alone
    keys = mask.repeat_interleave(levers.BLOCK, 1)[:, : q.shape[1]].repeat_interleave(levers.BLOCK, 2)
    keys = keys[:, :, : k.shape[1]]
    kept_only = F.scaled_dot_product_attention(q, k, v, attn_mask=keys)
    torch.testing.assert_close(levers.cached_out("m", cache, *parts), kept_only, rtol=1e-10, atol=1e-10)


def test_cached_complement_of_another_step_merges_by_softmax_sums():
    """At a later step ("c"): kept blocks exact, dropped ones from the cache, weighted by their cached exp-sum."""
    levers = _levers()
    q0, k0, v0 = _inputs(seed=1)
    q1, k1, v1 = (t + 0.3 * s for t, s in zip((q0, k0, v0), _inputs(seed=2), strict=True))
    parts0, parts1 = levers.exact_parts(q0, k0, v0), levers.exact_parts(q1, k1, v1)
    mask = levers.select("otopk:0.34", levers.block_rows(parts0[0]), q0, k0)
    cache = levers.complement_part(mask, *parts0)
    keys = mask.repeat_interleave(levers.BLOCK, 1)[:, : q0.shape[1]].repeat_interleave(levers.BLOCK, 2)
    keys = keys[:, :, : k0.shape[1]]
    scale = q0.shape[-1] ** -0.5
    e_kept = torch.exp(q1 @ k1.transpose(1, 2) * scale).masked_fill(~keys, 0)
    e_dropped = torch.exp(q0 @ k0.transpose(1, 2) * scale).masked_fill(keys, 0)
    expected = (e_kept @ v1 + e_dropped @ v0) / (e_kept.sum(-1, keepdim=True) + e_dropped.sum(-1, keepdim=True))
    torch.testing.assert_close(levers.cached_out("c", cache, *parts1), expected, rtol=1e-9, atol=1e-9)
