"""Block-sparse attention kernel (xattn_video/kernels/block_sparse_attention.py) against the torch reference and SDPA.

On a machine without CUDA these run in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET),
so the shapes are small: a few hundred tokens, batch 2, four query heads.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from xattn_video.core.reference import block_sparse_attention_torch, select_blocks_torch
from xattn_video.kernels.block_sparse_attention import block_sparse_attention_triton

TOL = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float16: {"atol": 3e-3, "rtol": 3e-3},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}


def make_qkv(device, *, n, dim, kv_heads, dtype, heads=4, batch=2, n_k=None, transposed=False, seed=0):
    """q [B, H, N, D], k/v [B, Hkv, Nk, D]; transposed: views of [B, N, H, D] storage (projections)."""
    gen = torch.Generator().manual_seed(seed)
    n_k = n if n_k is None else n_k

    def rand(h, tokens):
        if transposed:
            return torch.randn(batch, tokens, h, dim, generator=gen).to(device, dtype).transpose(1, 2)
        return torch.randn(batch, h, tokens, dim, generator=gen).to(device, dtype)

    return rand(heads, n), rand(kv_heads, n_k), rand(kv_heads, n_k)


def random_selection(q, k, *, block_size, causal, threshold, seed=0):
    """A selection from select_blocks_torch on random block scores (threshold 1: every block kept)."""
    batch, heads, n_q = q.shape[:3]
    n_qb, n_kb = math.ceil(n_q / block_size), math.ceil(k.shape[2] / block_size)
    gen = torch.Generator().manual_seed(seed + 1)
    scores = torch.rand(batch, heads, n_qb, n_kb, generator=gen).to(q.device)
    return select_blocks_torch(scores, threshold=threshold, causal=causal)


def run_kernel(q, k, v, count, indices, **kw):
    """Launch into a NaN-filled buffer: a row the kernel fails to write stays NaN and fails the test."""
    out = torch.full_like(q, float("nan"))
    result = block_sparse_attention_triton(q, k, v, count, indices, out=out, **kw)
    assert result is out
    assert not out.isnan().any(), "rows left unwritten (or NaN produced)"
    return out


# (tokens, block_size, head_dim, kv_heads, dtype, causal, threshold, extra launcher kwargs)
REFERENCE_CASES = [
    (200, 64, 64, 2, torch.float32, False, 0.6, {}),
    (200, 32, 32, 2, torch.float32, True, 0.6, {}),
    (200, 64, 40, 1, torch.bfloat16, False, 0.7, {}),
    (333, 64, 40, 1, torch.bfloat16, True, 0.7, {}),
    (200, 64, 32, 4, torch.float16, False, 0.8, {}),
    (333, 32, 32, 4, torch.float16, True, 0.6, {}),
    (200, 32, 80, 2, torch.bfloat16, False, 0.5, {}),
    (333, 128, 32, 4, torch.float16, False, 0.5, {}),
    # Tiles smaller than the selection block: query sub-tiles (the last one past Nq) and key sub-tiles.
    (200, 64, 32, 2, torch.float16, False, 0.3, {"block_m": 32, "block_n": 16}),
    (200, 64, 32, 2, torch.float32, True, 0.5, {"block_m": 32, "block_n": 32}),
    # K/V through tensor descriptors (TMA on GPU), ragged tokens and a padded head dim.
    (333, 64, 40, 2, torch.float16, False, 0.7, {"use_tma": True}),
    (200, 64, 40, 2, torch.bfloat16, True, 0.7, {"use_tma": True}),
]


@pytest.mark.parametrize(
    ("n", "block_size", "dim", "kv_heads", "dtype", "causal", "threshold", "kw"),
    REFERENCE_CASES,
    ids=[
        f"n{c[0]}-b{c[1]}-d{c[2]}-kv{c[3]}-{str(c[4])[6:]}-{'causal' if c[5] else 'full'}"
        + "".join(f"-{key}{val}" for key, val in c[7].items())
        for c in REFERENCE_CASES
    ],
)
def test_matches_reference_on_random_selection(
    device, n, block_size, dim, kv_heads, dtype, causal, threshold, kw
):
    q, k, v = make_qkv(device, n=n, dim=dim, kv_heads=kv_heads, dtype=dtype)
    mask, count, indices = random_selection(q, k, block_size=block_size, causal=causal, threshold=threshold)
    if not causal:
        assert not mask.all(), "the random selection should drop blocks"
    out = run_kernel(q, k, v, count, indices, block_size=block_size, causal=causal, **kw)
    ref = block_sparse_attention_torch(q, k, v, mask, block_size=block_size, causal=causal)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize(
    ("n", "block_size", "dim", "kv_heads", "dtype", "causal"),
    [
        (333, 128, 32, 2, torch.bfloat16, True),
        (200, 64, 64, 1, torch.float32, True),
        (200, 64, 40, 4, torch.float16, True),
        (200, 64, 32, 2, torch.float32, False),
    ],
)
def test_all_blocks_kept_equals_sdpa(device, n, block_size, dim, kv_heads, dtype, causal):
    q, k, v = make_qkv(device, n=n, dim=dim, kv_heads=kv_heads, dtype=dtype, seed=1)
    mask, count, indices = random_selection(q, k, block_size=block_size, causal=causal, threshold=1.0)
    assert (count == (torch.arange(mask.shape[2], device=device) + 1 if causal else mask.shape[3])).all()
    out = run_kernel(q, k, v, count, indices, block_size=block_size, causal=causal)
    ref = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=causal, enable_gqa=True
    ).to(dtype)
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_transposed_views_and_strided_out(device):
    """Inputs that are transposed views of [B, N, H, D] and an output written through a transposed view."""
    q, k, v = make_qkv(device, n=200, dim=32, kv_heads=2, dtype=torch.float16, transposed=True, seed=2)
    assert not q.is_contiguous() and q.stride(-1) == 1
    mask, count, indices = random_selection(q, k, block_size=64, causal=False, threshold=0.4, seed=2)
    storage = torch.full((2, 200, 4, 32), float("nan"), dtype=torch.float16, device=device)
    out = storage.transpose(1, 2)
    block_sparse_attention_triton(q, k, v, count, indices, block_size=64, causal=False, out=out)
    assert not storage.isnan().any()
    ref = block_sparse_attention_torch(
        q.contiguous(), k.contiguous(), v.contiguous(), mask, block_size=64, causal=False
    )
    torch.testing.assert_close(out, ref, **TOL[torch.float16])
    # A fresh output (laid out like q) and the other launch orders (default here: heavy_first): same bits.
    for schedule in ("natural", "reverse"):
        again = block_sparse_attention_triton(
            q, k, v, count, indices, block_size=64, causal=False, schedule=schedule
        )
        assert again.stride() == q.stride()
        assert torch.equal(again, out)


def test_cross_attention_lengths_and_custom_scale(device):
    """Nq != Nk (non-causal), with an explicit scale."""
    q, k, v = make_qkv(device, n=130, n_k=333, dim=32, kv_heads=2, dtype=torch.float32, seed=3)
    mask, count, indices = random_selection(q, k, block_size=64, causal=False, threshold=0.6, seed=3)
    out = run_kernel(q, k, v, count, indices, block_size=64, causal=False, scale=0.3)
    ref = block_sparse_attention_torch(q, k, v, mask, block_size=64, causal=False, scale=0.3)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


def test_rows_without_kept_blocks_give_zero(device):
    """A query block with no kept block (not produced by selection) yields zeros, never NaN."""
    q, k, v = make_qkv(device, n=200, dim=32, kv_heads=1, dtype=torch.float32, seed=4)
    mask, count, indices = random_selection(q, k, block_size=64, causal=True, threshold=0.5, seed=4)
    count, indices, mask = count.clone(), indices.clone(), mask.clone()
    count[0, 1, 2] = 0
    indices[0, 1, 2] = -1
    mask[0, 1, 2] = False
    out = run_kernel(q, k, v, count, indices, block_size=64, causal=True)
    assert (out[0, 1, 128:192] == 0).all()
    ref = block_sparse_attention_torch(q, k, v, mask, block_size=64, causal=True)
    keep = torch.ones(200, dtype=torch.bool, device=device)
    keep[128:192] = False
    torch.testing.assert_close(out[0, 1, keep], ref[0, 1, keep], **TOL[torch.float32])
    torch.testing.assert_close(out[1], ref[1], **TOL[torch.float32])


def _error_cases():
    def base(device):
        q, k, v = make_qkv(device, n=100, dim=32, kv_heads=2, dtype=torch.float16)
        _, count, indices = random_selection(q, k, block_size=32, causal=False, threshold=1.0)
        kw = {"block_size": 32, "causal": False}
        return {"q": q, "k": k, "v": v, "count": count, "indices": indices, "kw": kw}

    def k_dtype(a):
        a["k"] = a["k"].float()

    def v_shape(a):
        a["v"] = a["v"][:, :, :50]

    def heads(a):
        a["k"] = a["k"][:, :1].expand(2, 3, 100, 32)
        a["v"] = a["v"][:, :1].expand(2, 3, 100, 32)

    def indices_shape(a):
        a["indices"] = a["indices"][..., :2]

    def indices_dtype(a):
        a["indices"] = a["indices"].long()

    def count_shape(a):
        a["count"] = a["count"][:, :2]

    def block_size(a):
        a["kw"]["block_size"] = 48

    def block_m(a):
        a["kw"]["block_m"] = 64

    def causal_lengths(a):
        a["k"], a["v"] = a["k"][:, :, :64], a["v"][:, :, :64]
        a["indices"] = a["indices"][..., :2]
        a["kw"]["causal"] = True

    def out_shape(a):
        a["kw"]["out"] = torch.empty_like(a["q"][:, :, :10])

    def schedule(a):
        a["kw"]["schedule"] = "random"

    def scale(a):
        a["kw"]["scale"] = -1.0

    cases = [
        (k_dtype, "k has dtype"),
        (v_shape, "v shape"),
        (heads, "heads"),
        (indices_shape, "kv_indices"),
        (indices_dtype, "kv_indices"),
        (count_shape, "kv_count"),
        (block_size, "block_size"),
        (block_m, "block_m"),
        (causal_lengths, "causal"),
        (out_shape, "out"),
        (schedule, "schedule"),
        (scale, "scale"),
    ]
    return base, cases


_ERROR_BASE, _ERROR_CASES = _error_cases()


@pytest.mark.parametrize(("mutate", "message"), _ERROR_CASES, ids=[m.__name__ for m, _ in _ERROR_CASES])
def test_launcher_rejects_bad_arguments(device, mutate, message):
    args = _ERROR_BASE(device)
    mutate(args)
    with pytest.raises(ValueError, match=message):
        block_sparse_attention_triton(
            args["q"], args["k"], args["v"], args["count"], args["indices"], **args["kw"]
        )
