"""kernels/block_sparse_attention_fp8.py against its definition in float64 on the same float8 values (written out
here, independently of the kernel's quantisation code), and its error against exact attention."""

from __future__ import annotations

import math

import pytest
import torch

from xattn_video.core.reference import block_sparse_attention_torch, select_blocks_torch
from xattn_video.kernels.block_sparse_attention_fp8 import block_sparse_attention_fp8

LOG2E = math.log2(math.e)


def randn(shape, seed, scale=1.0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=torch.bfloat16)


def e4m3_values(x: torch.Tensor) -> torch.Tensor:
    """float64 -> the nearest e4m3 value (ties to even), in float64; torch's cast is exact round-to-nearest-even."""
    return x.to(torch.float8_e4m3fn).double()


def quantised(x: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x8, s): x [..., rows, D] float64 in groups of rows given by ``groups`` (a group id per row); one scale per
    group, the smallest power of two >= amax/448 (1 for an all-zero group); x8 the e4m3 values of x / s."""
    x8 = torch.empty_like(x)
    scales = torch.empty(*x.shape[:-2], int(groups.max()) + 1, dtype=torch.float64)
    for g in range(scales.shape[-1]):
        rows = groups == g
        amax = x[..., rows, :].abs().flatten(-2).amax(-1)
        s = torch.where(amax > 0, torch.exp2(torch.ceil(torch.log2(amax / 448))), torch.ones_like(amax))
        scales[..., g] = s
        x8[..., rows, :] = e4m3_values(x[..., rows, :] / s[..., None, None])
    return x8, scales


def fp8_attention_definition(q, k, v, kv_count, kv_indices, *, block_size, block_n, causal, scale=None):
    """The float8 algorithm of the module written out in float64: power-of-two block/channel scales, base-2 logits, the
    online softmax over the kept blocks in ascending BLOCK_N tiles, P rounded to e4m3 after multiplying by 448,
    out = acc * sv / (448 l)."""
    q, k, v = (t.cpu().double() for t in (q, k, v))
    batch, heads, n_q, dim = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    scale = dim**-0.5 if scale is None else scale
    q8, sq = quantised(q, torch.arange(n_q) // block_size)
    k8, sk = quantised(k, torch.arange(n_k) // block_size)
    sv = v.abs().amax(2)  # [B, Hkv, D]
    sv = torch.where(sv > 0, torch.exp2(torch.ceil(torch.log2(sv / 448))), torch.ones_like(sv))
    v8 = e4m3_values(v / sv[:, :, None, :])
    out = torch.zeros(batch, heads, n_q, dim, dtype=torch.float64)
    group = heads // kv_heads
    for b in range(batch):
        for h in range(heads):
            hk = h // group
            for qb in range(math.ceil(n_q / block_size)):
                rows = torch.arange(qb * block_size, min(n_q, (qb + 1) * block_size))
                m = torch.full((len(rows),), -math.inf, dtype=torch.float64)
                l_sum = torch.zeros(len(rows), dtype=torch.float64)
                acc = torch.zeros(len(rows), dim, dtype=torch.float64)
                for kb in kv_indices[b, h, qb, : int(kv_count[b, h, qb])].tolist():
                    for n0 in range(kb * block_size, (kb + 1) * block_size, block_n):
                        keys = torch.arange(n0, n0 + block_n)
                        valid = (keys < n_k)[None, :].expand(len(rows), -1)
                        if causal:
                            valid = valid & (keys[None, :] <= rows[:, None])
                        if not valid.any():
                            continue
                        kk = keys.clamp(max=n_k - 1)
                        s = (q8[b, h, rows] @ k8[b, hk, kk].T) * (sq[b, h, qb] * scale * LOG2E) * sk[b, hk, kb]
                        s = s.masked_fill(~valid, -math.inf)
                        m_new = torch.maximum(m, s.amax(1))
                        p = torch.exp2(s - m_new[:, None])
                        alpha = torch.exp2(m - m_new)
                        l_sum = l_sum * alpha + p.sum(1)
                        acc = acc * alpha[:, None] + e4m3_values(448 * p) @ v8[b, hk, kk]
                        m = m_new
                out[b, h, rows] = acc * sv[b, hk] / 448 / l_sum[:, None]
    return out


def selection(batch, heads, n_q, n_k, block_size, *, causal, seed, threshold=0.7):
    gen = torch.Generator().manual_seed(seed)
    n_qb, n_kb = math.ceil(n_q / block_size), math.ceil(n_k / block_size)
    scores = torch.rand(batch, heads, n_qb, n_kb, generator=gen)
    return select_blocks_torch(scores, threshold=threshold, causal=causal)


@pytest.mark.parametrize(
    "n_q,n_k,heads,kv_heads,dim,block_size,block_n,causal,schedule",
    [
        (300, 300, 2, 1, 64, 64, 64, False, "auto"),  # ragged last block, grouped-query
        (200, 130, 2, 2, 40, 64, 32, False, "heavy_first"),  # padded query rows past the keys, two key tiles a block
        (260, 260, 2, 1, 32, 64, 64, True, "auto"),  # causal prefill
    ],
)
def test_fp8_kernel_equals_its_float64_definition(n_q, n_k, heads, kv_heads, dim, block_size, block_n, causal,
                                                  schedule, device):  # fmt: skip
    q = randn((1, heads, n_q, dim), 1, scale=2.0, device=device)
    k = randn((1, kv_heads, n_k, dim), 2, device=device)
    v = randn((1, kv_heads, n_k, dim), 3, device=device)
    _, kv_count, kv_indices = selection(1, heads, n_q, n_k, block_size, causal=causal, seed=4)
    if n_q > n_k:  # query blocks with no key block of their own see every key block (the processor's padded rows)
        n_kb = math.ceil(n_k / block_size)
        kv_count, kv_indices = kv_count.clone(), kv_indices.clone()
        kv_count[:, :, n_kb:] = n_kb
        kv_indices[:, :, n_kb:, :n_kb] = torch.arange(n_kb, dtype=torch.int32)
    got = block_sparse_attention_fp8(
        q, k, v, kv_count.to(device), kv_indices.to(device), block_size=block_size, causal=causal,
        block_n=block_n, schedule=schedule,
    ).cpu().double()  # fmt: skip
    want = fp8_attention_definition(q, k, v, kv_count, kv_indices, block_size=block_size, block_n=block_n,
                                    causal=causal).to(got.dtype)  # fmt: skip
    if device == "cpu":  # the interpreter multiplies the float8 values exactly in float32; the output is bf16
        torch.testing.assert_close(got, want, atol=2e-2 * 2**-6, rtol=2**-7)
    else:  # Hopper's float8 tensor cores add with fewer bits than float32 within a tile: a logit moves by ~1e-4,
        # which flips the float8 rounding of a few P values (0.1-0.2% of outputs move by up to one P step)
        far = ~torch.isclose(got, want, atol=5e-3, rtol=2e-2)
        assert float(far.double().mean()) < 0.01 and float((got - want).abs().max()) < 0.08


def test_fp8_error_against_exact_attention_is_bounded(device):
    """Video-like q/k (a few dominant keys per query), random v: float8 stays within a few percent of exact."""
    from xattn_video.testing.synthetic import video_like_qkv

    q, k, v = video_like_qkv(frames=2, height=8, width=16, text_tokens=40, heads=2, head_dim=64,
                             dtype=torch.bfloat16, device=device)  # fmt: skip
    n = q.shape[2]
    mask, kv_count, kv_indices = selection(1, 2, n, n, 64, causal=False, seed=5, threshold=0.8)
    got = block_sparse_attention_fp8(q, k, v, kv_count.to(device), kv_indices.to(device), block_size=64, causal=False)
    exact = block_sparse_attention_torch(q.double(), k.double(), v.double(), mask.to(device), block_size=64,
                                         causal=False)  # fmt: skip
    rel = float((got.double() - exact).norm() / exact.norm())
    assert rel < 0.06
    # and it is not the 16-bit kernel's answer in disguise: float8's error is well above bf16 rounding
    assert rel > 2**-9


def test_fp8_kernel_rejects_bad_inputs():
    q = randn((1, 2, 64, 32), 1)
    _, kv_count, kv_indices = selection(1, 2, 64, 64, 32, causal=False, seed=1)
    with pytest.raises(ValueError, match="block_size must be a power of two in \\[32, 256\\]"):
        block_sparse_attention_fp8(q, q, q, kv_count, kv_indices, block_size=16, causal=False)
    with pytest.raises(ValueError, match="kv_count must be an int32 tensor of shape"):
        block_sparse_attention_fp8(q, q, q, kv_count.long(), kv_indices, block_size=32, causal=False)
    with pytest.raises(ValueError, match="block_n must be >= 32"):
        block_sparse_attention_fp8(q, q, q, kv_count, kv_indices, block_size=32, causal=False, block_n=16)


@pytest.mark.gpu
def test_triton_quantisation_equals_the_torch_one():
    from xattn_video.kernels.block_sparse_attention_fp8 import quantize_for_attention

    q = randn((2, 4, 1000, 96), 1, scale=3.0, device="cuda").transpose(1, 2).contiguous().transpose(1, 2)
    k = randn((2, 2, 777, 96), 2, device="cuda")
    v = randn((2, 2, 777, 96), 3, scale=0.1, device="cuda")
    got = quantize_for_attention(q, k, v, block_size=128, scale=0.1, block_d=128)
    want = quantize_for_attention(q.cpu(), k.cpu(), v.cpu(), block_size=128, scale=0.1, block_d=128)
    for name, a, b in zip(("q8", "qs", "k8", "sk", "v8t", "sv"), got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        a, b = a.cpu(), b
        if a.dtype == torch.float8_e4m3fn:
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        assert torch.equal(a, b), name
