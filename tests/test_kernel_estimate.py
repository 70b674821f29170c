"""xattn_video/kernels/estimate.py: the Triton block estimate against block_scores_torch, and block_scores_torch against
a float64 reference written here from the definition (antidiagonal sums of the token logit matrix)."""

from __future__ import annotations

import math

import pytest
import torch

from xattn_video.core.reference import block_scores_torch
from xattn_video.kernels.estimate import _pick_chunk, block_scores_triton


def randn(shape, dtype, device, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype)


def scores_from_definition(q, k, *, stride, block_size, causal, scale=None):
    """Float64 block scores. Strided logit (i, j) = sum over s of the token logit (i*S + S-1-s, j*S + s): the
    antidiagonal of the S x S tile of Q K^T, tokens past the end count 0. Softmax over the ceil(Nk/S) strided
    keys (causal: j <= i), then sums over (B/S x B/S) tiles; strided rows past ceil(Nq/S) do not exist."""
    q, k = q.cpu().double(), k.cpu().double()
    batch, heads, n_q, dim = q.shape
    n_k = k.shape[2]
    k = k.repeat_interleave(heads // k.shape[1], dim=1)
    rows_q, rows_k = math.ceil(n_q / stride), math.ceil(n_k / stride)
    tokens = torch.zeros(batch, heads, rows_q * stride, rows_k * stride, dtype=torch.float64)
    tokens[:, :, :n_q, :n_k] = q @ k.transpose(-1, -2)
    logits = torch.zeros(batch, heads, rows_q, rows_k, dtype=torch.float64)
    for s in range(stride):
        logits += tokens[:, :, stride - 1 - s :: stride, s::stride]
    logits *= (dim**-0.5 if scale is None else scale) / stride
    if causal:
        logits.masked_fill_(torch.ones(rows_q, rows_k, dtype=torch.bool).triu(1), float("-inf"))
    probs = logits.softmax(-1)
    per = block_size // stride
    n_qb, n_kb = math.ceil(n_q / block_size), math.ceil(n_k / block_size)
    out = torch.zeros(batch, heads, n_qb, n_kb, dtype=torch.float64)
    for qb in range(n_qb):
        for kb in range(n_kb):
            tile = probs[:, :, qb * per : (qb + 1) * per, kb * per : (kb + 1) * per]
            out[:, :, qb, kb] = tile.sum((-1, -2))
    return out


def valid_rows_per_block(n_q, stride, block_size):
    rows_q, per = math.ceil(n_q / stride), block_size // stride
    return torch.tensor([min(per, rows_q - qb * per) for qb in range(math.ceil(n_q / block_size))])


def tolerance(dtype, device):
    # bf16/fp16 products are exact in float32; float32 inputs use TF32 products on the GPU (about 1e-3
    # relative error on the logits): loose, since a wrong kernel is off by O(1).
    if dtype == torch.float32 and device == "cuda":
        return {"atol": 5e-3, "rtol": 1e-2}
    return {"atol": 2e-5, "rtol": 1e-4}


# ------------------------------------------------------------ the torch reference against the definition


@pytest.mark.parametrize(
    "n_q,n_k,heads,kv_heads,dim,stride,block_size,causal",
    [
        (200, 200, 4, 2, 32, 4, 32, False),
        (333, 333, 4, 4, 40, 8, 64, True),
        (200, 333, 4, 2, 64, 16, 128, False),
        (333, 333, 4, 2, 32, 16, 128, True),
        (150, 97, 2, 1, 16, 2, 16, False),
    ],
)
def test_torch_reference_matches_definition(n_q, n_k, heads, kv_heads, dim, stride, block_size, causal):
    q = randn((2, heads, n_q, dim), torch.float32, "cpu", 1, scale=2.0)
    k = randn((2, kv_heads, n_k, dim), torch.float32, "cpu", 2)
    got = block_scores_torch(q, k, stride=stride, block_size=block_size, causal=causal)
    want = scores_from_definition(q, k, stride=stride, block_size=block_size, causal=causal)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    # each query block's scores add up to its number of strided rows
    rows = valid_rows_per_block(n_q, stride, block_size).double()
    torch.testing.assert_close(want.sum(-1), rows.expand_as(want.sum(-1)), atol=1e-9, rtol=0)
    torch.testing.assert_close(got.sum(-1).double(), rows.expand_as(want.sum(-1)), atol=1e-4, rtol=0)


def test_torch_reference_custom_scale_and_chunks():
    q = randn((1, 2, 200, 32), torch.float32, "cpu", 3)
    k = randn((1, 2, 200, 32), torch.float32, "cpu", 4)
    got = block_scores_torch(q, k, stride=4, block_size=32, causal=True, scale=0.5, chunk_elements=1000)
    want = scores_from_definition(q, k, stride=4, block_size=32, causal=True, scale=0.5)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------- the Triton kernel against the reference

# (n_q, n_k, heads, kv_heads, dim, stride, block_size, causal, dtype, launch keywords)
CASES = [
    (200, 200, 4, 2, 64, 4, 32, False, torch.float32, {}),
    (333, 333, 4, 2, 64, 8, 64, True, torch.bfloat16, {}),
    (333, 333, 4, 4, 32, 16, 128, False, torch.float16, {}),
    (200, 200, 4, 2, 40, 8, 64, True, torch.float32, {}),
    (333, 200, 4, 4, 64, 4, 64, False, torch.bfloat16, {}),
    (200, 333, 4, 2, 32, 4, 128, False, torch.float32, {"block_n": 16}),  # block_n raised to B/S = 32
    # several row and key tiles: the online softmax rescales across tiles; causal diagonal tiles
    (333, 333, 4, 2, 32, 4, 32, True, torch.float16, {"block_m": 32, "block_n": 32}),
    (333, 333, 4, 2, 40, 8, 64, False, torch.bfloat16, {"block_m": 16, "block_n": 32, "flatten": False}),
    (200, 200, 4, 2, 32, 4, 32, True, torch.float32, {"block_m": 64, "block_n": 16, "flatten": False}),
    # TMA descriptors for whole strided rows; the partial last strided rows of q (333 % 4) and k: pointers
    (333, 333, 4, 2, 64, 4, 32, True, torch.bfloat16, {"block_m": 32, "block_n": 32, "use_tma": True}),
    (256, 331, 4, 4, 40, 8, 64, False, torch.float16, {"block_m": 16, "block_n": 16, "use_tma": True}),
]


@pytest.mark.parametrize("n_q,n_k,heads,kv_heads,dim,stride,block_size,causal,dtype,kwargs", CASES)
def test_triton_matches_torch(
    n_q, n_k, heads, kv_heads, dim, stride, block_size, causal, dtype, kwargs, device
):
    q = randn((2, heads, n_q, dim), dtype, device, 10, scale=1.5)
    k = randn((2, kv_heads, n_k, dim), dtype, device, 11)
    got = block_scores_triton(q, k, stride=stride, block_size=block_size, causal=causal, **kwargs)
    want = block_scores_torch(q, k, stride=stride, block_size=block_size, causal=causal)
    assert got.dtype == torch.float32 and got.shape == want.shape and got.device == q.device
    torch.testing.assert_close(got, want, **tolerance(dtype, device))
    rows = valid_rows_per_block(n_q, stride, block_size).to(device=device, dtype=torch.float32)
    torch.testing.assert_close(got.sum(-1), rows.expand_as(got.sum(-1)), atol=1e-3, rtol=0)


def test_triton_large_logits_many_tiles(device):
    """Peaked rows whose maximum moves from tile to tile: rescaling by the max each tile used."""
    q = randn((1, 2, 333, 32), torch.float32, device, 20, scale=6.0)
    k = randn((1, 2, 333, 32), torch.float32, device, 21, scale=6.0)
    for causal in (False, True):
        got = block_scores_triton(
            q, k, stride=4, block_size=32, causal=causal, block_m=16, block_n=16, input_precision="ieee"
        )
        want = block_scores_torch(q, k, stride=4, block_size=32, causal=causal)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_triton_strided_views_and_custom_scale(device):
    """[B, N, H, D] tensors seen as [B, H, N, D] (diffusers' layout); a last dim that is not contiguous."""
    q_bnhd = randn((2, 200, 4, 32), torch.bfloat16, device, 30)
    k_bnhd = randn((2, 200, 2, 32), torch.bfloat16, device, 31)
    q, k = q_bnhd.transpose(1, 2), k_bnhd.transpose(1, 2)
    assert not q.is_contiguous() and q.stride(-1) == 1
    want = block_scores_torch(q, k, stride=8, block_size=64, causal=True, scale=0.3)
    got = block_scores_triton(q, k, stride=8, block_size=64, causal=True, scale=0.3)
    torch.testing.assert_close(got, want, **tolerance(torch.bfloat16, device))
    q_t = q.contiguous().transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, last-dim stride != 1
    assert q_t.stride(-1) != 1
    got_t = block_scores_triton(q_t, k, stride=8, block_size=64, causal=True, scale=0.3)
    torch.testing.assert_close(got_t, got, atol=0, rtol=0)


def test_triton_scratch_chunks(device):
    """A scratch bound that fits one (batch, head) at a time gives the same scores as one launch."""
    q = randn((2, 4, 200, 32), torch.float16, device, 40)
    k = randn((2, 2, 200, 32), torch.float16, device, 41)
    one = block_scores_triton(q, k, stride=4, block_size=32, causal=False)
    chunked = block_scores_triton(q, k, stride=4, block_size=32, causal=False, scratch_bytes=1)
    torch.testing.assert_close(chunked, one, atol=0, rtol=0)


def test_pick_chunk_balances_waves():
    assert _pick_chunk(24, 4, 117, 132) == 4  # every chunk size gives 24 waves: fewest launches
    assert _pick_chunk(24, 9, 117, 132) == 9  # 3 launches, 22 waves instead of 24
    assert _pick_chunk(5, 8, 3, 1) == 5
    assert _pick_chunk(7, 1, 3, 1) == 1


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "q_shape,k_shape,kwargs,match",
    [
        ((2, 4, 64, 32)[1:], (2, 2, 64, 32), {}, "q must be 4-D"),
        ((2, 4, 64, 32), (2, 2, 64), {}, "k must be 4-D"),
        ((2, 4, 64, 32), (1, 2, 64, 32), {}, "batch and head_dim"),
        ((2, 4, 64, 32), (2, 2, 64, 16), {}, "batch and head_dim"),
        ((2, 4, 64, 32), (2, 3, 64, 32), {}, "heads"),
        ((2, 4, 64, 32), (2, 2, 96, 32), {"causal": True}, "causal"),
        ((2, 4, 64, 32), (2, 2, 64, 32), {"stride": 3}, "stride"),
        ((2, 4, 64, 32), (2, 2, 64, 32), {"block_size": 48}, "block_size"),
        ((2, 4, 64, 32), (2, 2, 64, 32), {"scale": -1.0}, "scale"),
        ((2, 4, 64, 32), (2, 2, 64, 32), {"block_m": 24}, "block_m"),
        ((2, 4, 64, 32), (2, 2, 64, 32), {"block_n": 8}, "block_n"),
    ],
)
def test_launcher_rejects_bad_input(q_shape, k_shape, kwargs, match, device):
    q = torch.zeros(q_shape, device=device)
    k = torch.zeros(k_shape, device=device)
    args = {"stride": 4, "block_size": 32, "causal": False} | kwargs
    with pytest.raises(ValueError, match=match):
        block_scores_triton(q, k, **args)


# ---------------------------------------------------------------- float8 estimate


def fp8_values64(x: torch.Tensor) -> torch.Tensor:
    """Float64 values of x rounded to float8 e4m3 under one scale amax/448, written out from the definition
    (torch's float8 cast rounds to nearest even)."""
    x = x.cpu().double()
    amax = x.abs().max()
    scale = amax / 448.0 if amax > 0 else torch.tensor(1.0, dtype=torch.float64)
    return (x / scale).to(torch.float8_e4m3fn).double() * scale


@pytest.mark.parametrize("causal", [False, True])
def test_fp8_estimate_equals_the_definition_on_float8_values(causal, device):
    q = randn((1, 4, 300, 32), torch.bfloat16, device, seed=11, scale=3.0)
    k = randn((1, 2, 300, 32), torch.bfloat16, device, seed=12, scale=3.0)
    got = block_scores_triton(q, k, stride=4, block_size=32, causal=causal, fp8=True).cpu().double()
    want = scores_from_definition(fp8_values64(q), fp8_values64(k), stride=4, block_size=32, causal=causal)
    exact = scores_from_definition(q, k, stride=4, block_size=32, causal=causal)
    if device == "cpu":  # the interpreter multiplies the float8 values exactly in float32
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    else:  # Hopper's float8 tensor cores accumulate with fewer bits than float32 (Triton's default for float8)
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
    # float8 values really were used: the result is nearer their scores than the exact ones
    assert float((got - want).abs().max()) < 0.5 * float((got - exact).abs().max())


def test_fp8_scores_stay_close_to_the_exact_ones_at_video_scale(device):
    """At head_dim 128 and stride 8 the logits are divided by 8 * sqrt(128): float8 rounding barely moves them."""
    from xattn_video.testing.synthetic import video_like_qkv

    q, k, _ = video_like_qkv(frames=4, height=8, width=16, text_tokens=64, heads=2, head_dim=128,
                             dtype=torch.bfloat16, device=device)  # fmt: skip
    exact = block_scores_triton(q, k, stride=8, block_size=128, causal=False)
    fp8 = block_scores_triton(q, k, stride=8, block_size=128, causal=False, fp8=True)
    row_mass = exact.sum(-1, keepdim=True)
    assert float(((fp8 - exact).abs() / row_mass).max()) < 0.02


@pytest.mark.gpu
def test_quantize_kernel_rounds_like_torch():
    from xattn_video.kernels.quantize import quantize_fp8

    x = randn((2, 3, 1000, 128), torch.bfloat16, "cuda", seed=5, scale=4.0).transpose(1, 2).contiguous()
    x = x.transpose(1, 2)  # token-major storage, as diffusers makes it
    y, scale = quantize_fp8(x)
    assert y.is_contiguous() and y.dtype == torch.float8_e4m3fn
    amax = x.abs().max().float()
    torch.testing.assert_close(scale, (amax / 448).reshape(1))
    want = (x.float() * (448 / amax)).to(torch.float8_e4m3fn)  # torch's cast: round to nearest even
    assert torch.equal(y.view(torch.uint8), want.view(torch.uint8))
