"""xattn_attention and estimate_block_mask: behaviour against float64 and SDPA references, and bad input."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from reference64 import antidiagonal_block_scores64, block_sparse_attention64, select_blocks64
from xattn_video import XAttnConfig, estimate_block_mask, xattn_attention
from xattn_video.core.inputs import resolve_estimate_fp8
from xattn_video.testing.synthetic import video_like_qkv

BACKENDS = ["torch", "triton", "flex"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def random_qkv(batch, heads, kv_heads, n, dim, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, n, dim), (batch, kv_heads, n, dim), (batch, kv_heads, n, dim)]
    return [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]


TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "n,causal,heads,kv_heads,dim,dtype",
    [
        (200, False, 2, 2, 64, torch.float32),
        (333, True, 4, 2, 64, torch.bfloat16),
        (129, False, 2, 1, 32, torch.float16),
        (256, True, 2, 2, 128, torch.float32),
    ],
)
def test_threshold_one_equals_sdpa(backend, n, causal, heads, kv_heads, dim, dtype, device):
    q, k, v = random_qkv(2, heads, kv_heads, n, dim, dtype, device)
    out, stats = xattn_attention(
        q, k, v, threshold=1.0, stride=8, block_size=64, causal=causal, backend=backend, return_stats=True
    )
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal, enable_gqa=True)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, ref) < TOL[dtype]
    assert stats.density == 1.0


def test_default_block_size_128_threshold_one(device):
    q, k, v = random_qkv(1, 2, 2, 300, 64, torch.float32, device)
    for backend in BACKENDS:
        out = xattn_attention(q, k, v, threshold=1.0, stride=16, backend=backend)
        assert rel_err(out, F.scaled_dot_product_attention(q, k, v)) < 1e-5, backend


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_estimate_block_mask_matches_float64_definition(backend, causal, device):
    q, k, _ = random_qkv(2, 4, 2, 300, 32, torch.float32, device, seed=1)
    q = q * 3  # sharper attention: blocks differ clearly, so no selection lands on a rounding tie
    mask = estimate_block_mask(q, k, threshold=0.6, stride=4, block_size=64, causal=causal, backend=backend)
    scores64 = antidiagonal_block_scores64(q.cpu(), k.cpu(), stride=4, block_size=64, causal=causal)
    expected = select_blocks64(scores64, threshold=0.6, causal=causal)
    assert mask.dtype == torch.bool and mask.shape == (2, 4, 5, 5)
    assert torch.equal(mask.cpu(), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_output_matches_float64_on_the_kept_blocks(backend, device):
    q, k, v = video_like_qkv(frames=4, height=8, width=8, text_tokens=17, batch=2, heads=3, head_dim=32, device=device)
    mask = estimate_block_mask(q, k, threshold=0.8, stride=8, block_size=32, backend=backend)
    assert mask.float().mean() < 1
    out = xattn_attention(q, k, v, threshold=0.8, stride=8, block_size=32, backend=backend)
    ref = block_sparse_attention64(q.cpu(), k.cpu(), v.cpu(), mask.cpu(), block_size=32, causal=False)
    assert rel_err(out.cpu(), ref) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_error_against_dense_shrinks_as_threshold_rises(backend, device):
    q, k, v = video_like_qkv(frames=6, height=8, width=16, text_tokens=20, heads=3, head_dim=64, device=device)
    dense = F.scaled_dot_product_attention(q, k, v)
    densities, errors = [], []
    for threshold in (0.5, 0.8, 0.95, 0.999):
        out, stats = xattn_attention(
            q, k, v, threshold=threshold, stride=8, block_size=64, backend=backend, return_stats=True
        )
        densities.append(stats.density)
        errors.append(rel_err(out, dense))
    assert densities[0] < 0.5 and all(d < 1 for d in densities)
    assert densities == sorted(densities)
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.02


def test_causal_gqa_video_llm_prefill(device):
    """Causal, grouped-query (4 query heads per kv head): what a Qwen2-VL prefill does."""
    q, k, v = video_like_qkv(
        frames=8, height=6, width=8, text_tokens=30, heads=8, kv_heads=2, head_dim=64, device=device
    )
    out, stats = xattn_attention(q, k, v, threshold=0.9, stride=16, block_size=64, causal=True,
                                 return_stats=True)
    assert stats.density < 1
    mask = estimate_block_mask(q, k, threshold=0.9, stride=16, block_size=64, causal=True)
    n_qb = mask.shape[-1]
    assert not mask.triu(1).any(), "no block above the diagonal in causal mode"
    assert mask.diagonal(dim1=-2, dim2=-1).all() and mask[..., 0].all()
    assert stats.kept_blocks == int(mask.sum()) and stats.total_blocks == 8 * n_qb * (n_qb + 1) // 2
    ref = block_sparse_attention64(q.cpu(), k.cpu(), v.cpu(), mask.cpu(), block_size=64, causal=True)
    assert rel_err(out.cpu(), ref) < 1e-5


def test_stats_are_consistent(device):
    q, k, v = video_like_qkv(frames=4, height=8, width=8, batch=2, heads=3, head_dim=32, device=device)
    _, stats = xattn_attention(q, k, v, threshold=0.7, stride=4, block_size=32, return_stats=True)
    mask = estimate_block_mask(q, k, threshold=0.7, stride=4, block_size=32)
    assert stats.density_per_head.shape == (2, 3)
    assert torch.allclose(stats.density_per_head, mask.float().mean((-1, -2)).cpu())
    assert stats.density == pytest.approx(mask.float().mean().item())
    assert stats.estimate_ms >= 0 and stats.attention_ms > 0
    assert set(stats.to_dict()) >= {"density", "density_per_head", "estimate_ms", "attention_ms"}


def test_transposed_views_are_accepted(device):
    """diffusers produces [B, N, H, D] and transposes: strided views must give the same result."""
    q, k, v = random_qkv(1, 2, 2, 200, 32, torch.float32, device)
    views = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    assert not views[0].is_contiguous()
    for backend in ("torch", "triton"):
        a = xattn_attention(*views, threshold=0.7, stride=4, block_size=32, backend=backend)
        b = xattn_attention(q, k, v, threshold=0.7, stride=4, block_size=32, backend=backend)
        assert torch.allclose(a, b, atol=1e-6), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_receives_the_result_in_any_layout(backend, device):
    """``out`` laid out [B, N, H, D] (what diffusers' output projection reads) gets the same numbers."""
    q, k, v = video_like_qkv(frames=4, height=8, width=8, text_tokens=17, heads=3, head_dim=32, device=device)
    params = dict(threshold=0.8, stride=8, block_size=32, backend=backend)
    expected, stats = xattn_attention(q, k, v, **params, return_stats=True)
    assert stats.density < 1
    out = torch.full((q.shape[0], q.shape[2], q.shape[1], q.shape[3]), float("nan"), device=device).transpose(1, 2)
    result = xattn_attention(q, k, v, **params, out=out)
    assert result is out
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="out must have q's shape"):
        xattn_attention(q, k, v, **params, out=out[:, :, 1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_with_a_non_contiguous_last_dim_receives_the_result(backend, device):
    """``out`` takes any strides, as documented: a last dim of stride != 1 (a transposed [B, H, D, N] buffer)
    gets the same numbers as a fresh output."""
    q, k, v = video_like_qkv(frames=4, height=8, width=8, text_tokens=17, heads=3, head_dim=32, device=device)
    params = dict(threshold=0.8, stride=8, block_size=32, backend=backend)
    expected = xattn_attention(q, k, v, **params)
    out = torch.full((q.shape[0], q.shape[1], q.shape[3], q.shape[2]), float("nan"), device=device).transpose(2, 3)
    assert out.stride(-1) != 1
    result = xattn_attention(q, k, v, **params, out=out)
    assert result is out and torch.equal(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threshold", [0.8, 1.0])
def test_empty_batch_returns_empty_like_sdpa(backend, threshold, device):
    """Batch 0: an empty output shaped like SDPA's, stats over no blocks (density NaN, as the mean of nothing),
    an empty block mask, and ``out`` handed back."""
    q, k, v = random_qkv(0, 4, 2, 300, 16, torch.float32, device)
    sdpa = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    params = dict(threshold=threshold, stride=8, block_size=64, backend=backend)
    out, stats = xattn_attention(q, k, v, **params, return_stats=True)
    assert out.shape == sdpa.shape == (0, 4, 300, 16) and out.dtype == sdpa.dtype
    assert stats.kept_blocks == stats.total_blocks == 0 and stats.density != stats.density  # NaN
    assert stats.density_per_head.shape == (0, 4)
    mask = estimate_block_mask(q, k, **params)
    assert mask.shape == (0, 4, 5, 5) and mask.dtype == torch.bool
    target = torch.empty_like(q)
    assert xattn_attention(q, k, v, **params, out=target) is target


def test_autocast_casts_inputs_as_sdpa_does():
    """Under CPU autocast (bfloat16) float32 q/k beside bfloat16 v run, as SDPA does, in bfloat16: at threshold 1
    the result equals SDPA's under the same autocast, and a sparse call runs and stays close to it."""
    q, k, v = random_qkv(1, 2, 2, 200, 32, torch.float32)
    v = v.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.scaled_dot_product_attention(q, k, v)
        dense = xattn_attention(q, k, v, threshold=1.0, stride=8, block_size=64, backend="torch")
        sparse, stats = xattn_attention(q, k, v, threshold=0.6, stride=8, block_size=64, backend="torch",
                                        return_stats=True)
        mask = estimate_block_mask(q, k, threshold=0.6, stride=8, block_size=64)
    assert ref.dtype == dense.dtype == sparse.dtype == torch.bfloat16
    assert rel_err(dense, ref) < 1e-2  # bfloat16 rounding, summed in another order
    assert stats.density < 1 and stats.density == pytest.approx(mask.float().mean().item())
    expected = block_sparse_attention64(q.bfloat16(), k.bfloat16(), v, mask, block_size=64, causal=False)
    assert rel_err(sparse, expected) < 1e-2
    with pytest.raises(ValueError, match="v has dtype"):  # without autocast mixed dtypes stay an error
        xattn_attention(q, k, v, threshold=0.6, stride=8, block_size=64)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 1.5}, "threshold"),
        ({"stride": 3}, "stride"),
        ({"stride": 256}, "stride"),
        ({"block_size": 100}, "block_size"),
        ({"backend": "cuda"}, "backend"),
    ],
)
def test_bad_parameters_name_themselves(kwargs, match):
    q, k, v = random_qkv(1, 2, 2, 64, 32)
    args = {"threshold": 0.9, "stride": 8, "block_size": 64} | kwargs
    with pytest.raises(ValueError, match=match):
        xattn_attention(q, k, v, **args)
    with pytest.raises(ValueError, match=match):
        XAttnConfig(**args)


def test_bad_tensors_are_clear_errors():
    q, k, v = random_qkv(1, 4, 2, 64, 32)
    call = dict(threshold=0.9, stride=8, block_size=32)
    with pytest.raises(ValueError, match="4-D"):
        xattn_attention(q[0], k[0], v[0], **call)
    with pytest.raises(ValueError, match="head_dim"):
        xattn_attention(q, k[..., :16], v[..., :16], **call)
    with pytest.raises(ValueError, match="v shape"):
        xattn_attention(q, k, v[:, :, :10], **call)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        xattn_attention(q[:, :3], k, v, **call)
    with pytest.raises(ValueError, match="dtype"):
        xattn_attention(q.double(), k.double(), v.double(), **call)
    with pytest.raises(ValueError, match="dtype"):
        xattn_attention(q, k.half(), v.half(), **call)
    with pytest.raises(ValueError, match="causal"):
        xattn_attention(q, k[:, :, :32], v[:, :, :32], causal=True, **call)
    big = torch.randn(1, 1, 16, 512)
    with pytest.raises(ValueError, match="head_dim"):
        xattn_attention(big, big, big, **call)


def test_nan_in_q_or_k_is_an_error_and_nan_in_v_propagates():
    q, k, v = random_qkv(1, 2, 2, 128, 32)
    call = dict(threshold=0.9, stride=8, block_size=32)
    for name, t in (("q", q), ("k", k)):
        bad = t.clone()
        bad[0, 1, 5, 3] = float("nan")
        args = {"q": q, "k": k, "v": v, name: bad}
        with pytest.raises(ValueError, match="NaN"):
            xattn_attention(args["q"], args["k"], args["v"], **call)
    bad_v = v.clone()
    bad_v[0, 0, 5, 3] = float("nan")
    out = xattn_attention(q, k, bad_v, threshold=1.0, stride=8, block_size=32)
    assert out[0, 0].isnan().any() and not out[0, 1].isnan().any()


def test_triton_without_cuda_or_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = random_qkv(1, 2, 2, 64, 32)
    with pytest.raises(RuntimeError, match="backend='triton' needs CUDA"):
        xattn_attention(q, k, v, threshold=0.9, stride=8, backend="triton")


def test_random_block_selection_has_the_asked_density_in_compact_form():
    from xattn_video.testing.synthetic import random_block_selection

    sel = random_block_selection(2, 3, 10, 0.3, seed=5)
    assert torch.equal(sel.mask.sum(-1), torch.full((2, 3, 10), 3))
    assert torch.equal(sel.kv_count, sel.mask.sum(-1, dtype=torch.int32))
    kept = sel.kv_indices[..., :3]
    assert (kept[..., 1:] > kept[..., :-1]).all() and (sel.kv_indices[..., 3:] == -1).all()
    assert torch.equal(sel.mask.gather(-1, kept.long()), torch.ones_like(kept, dtype=torch.bool))
    with pytest.raises(ValueError, match="density"):
        random_block_selection(1, 1, 4, 0.0)


def test_estimate_fp8_agrees_across_backends_and_with_the_exact_estimate(device):
    q, k, v = video_like_qkv(frames=4, height=8, width=16, text_tokens=64, heads=2, head_dim=128, device=device)
    params = dict(threshold=0.9, stride=8, block_size=128)
    exact = estimate_block_mask(q, k, **params, backend="torch")
    masks = [estimate_block_mask(q, k, **params, backend=b, estimate_fp8=True) for b in ("torch", "triton")]
    assert torch.equal(masks[0].cpu(), masks[1].cpu())
    assert abs(float(masks[0].float().mean()) - float(exact.float().mean())) < 0.02
    out, stats = xattn_attention(q, k, v, **params, estimate_fp8=True, return_stats=True)
    ref = block_sparse_attention64(q.cpu(), k.cpu(), v.cpu(), masks[0].cpu(), block_size=128, causal=False)
    assert stats.density < 1 and rel_err(out.cpu(), ref) < 1e-5  # the attention itself stays exact
    with pytest.raises(TypeError, match="estimate_fp8 must be a bool or 'auto', got 'yes'"):
        XAttnConfig(estimate_fp8="yes")


@pytest.mark.parametrize(
    "setting,is_cuda,backend,capability,expected",
    [
        ("auto", True, "triton", (9, 0), True),  # Hopper: float8 tensor cores
        ("auto", True, "fa4", (9, 0), True),
        ("auto", True, "triton", (8, 9), True),  # Ada
        ("auto", True, "triton", (8, 0), False),  # Ampere: no float8 tensor cores
        ("auto", True, "torch", (9, 0), False),  # the torch estimate would only add a quantisation
        ("auto", False, "torch", None, False),  # CPU
        (True, False, "torch", None, True),  # explicit settings are kept
        (False, True, "triton", (9, 0), False),
    ],
)
def test_estimate_fp8_auto_resolves_by_gpu(monkeypatch, setting, is_cuda, backend, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    q = SimpleNamespace(is_cuda=is_cuda, device=torch.device("cuda" if is_cuda else "cpu"))
    assert resolve_estimate_fp8(setting, q, backend) is expected

