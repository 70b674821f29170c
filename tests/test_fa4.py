"""The FlashAttention-4 backend: the selection -> block-sparse-tensor conversion against the selection's own mask,
when FA4 can run (one-line reasons), how "auto" resolves; on a GPU with FA4, its results against the torch
reference (ragged token counts, the processor's padded text rows, grouped-query, causal prefill)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from xattn_video import XAttnConfig, xattn_attention
from xattn_video.core import fa4
from xattn_video.core.estimate import BlockSelection, append_dense_rows
from xattn_video.core.inputs import resolve_backend_for
from xattn_video.core.reference import block_sparse_attention_torch, select_blocks_torch


def random_selection(batch, heads, n_qb, n_kb, *, causal, seed, threshold=0.6) -> BlockSelection:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(batch, heads, n_qb, n_kb, generator=gen)
    return BlockSelection(*select_blocks_torch(scores, threshold=threshold, causal=causal))


def mask_from_fa4_fields(fields: fa4.BlockSparseFields, n_kb: int) -> torch.Tensor:
    """The key blocks FA4 visits per query block, read the way its forward reads the fields: the first
    ``mask_block_cnt`` entries of ``mask_block_idx`` and the first ``full_block_cnt`` of ``full_block_idx``."""
    batch, heads, n_qb = fields.full_block_cnt.shape
    mask = torch.zeros(batch, heads, n_qb, n_kb, dtype=torch.bool)
    for cnt, idx in ((fields.mask_block_cnt, fields.mask_block_idx), (fields.full_block_cnt, fields.full_block_idx)):
        for b in range(batch):
            for h in range(heads):
                for qb in range(n_qb):
                    for i in range(int(cnt[b, h, qb])):
                        mask[b, h, qb, int(idx[b, h, qb, i])] = True
    return mask


@pytest.mark.parametrize("causal", [False, True])
def test_fields_visit_exactly_the_kept_blocks(causal):
    sel = random_selection(2, 3, 7, 7, causal=causal, seed=1)
    fields = fa4.block_sparse_fields(sel.kv_count, sel.kv_indices, 128)
    assert torch.equal(mask_from_fa4_fields(fields, 7), sel.mask)
    assert not fields.mask_block_cnt.any()  # no block needs a mask_mod
    assert fields.block_size == (128, 128)
    assert all(t.dtype == torch.int32 for t in fields[:4])
    assert fields.full_block_idx.data_ptr() == sel.kv_indices.data_ptr()  # passed through, not copied


def test_fields_of_the_processors_padded_rows_and_ragged_keys():
    """Query blocks past the keys (padded text rows) keep every key block; FA4 masks the key length only on the
    first block it processes, the last entry of a row, which must be the ragged last key block when it is kept."""
    sel = append_dense_rows(random_selection(1, 2, 5, 5, causal=False, seed=2), 7)
    fields = fa4.block_sparse_fields(sel.kv_count, sel.kv_indices, 128)
    assert torch.equal(mask_from_fa4_fields(fields, 5), sel.mask)
    for b, h, qb in zip(*torch.nonzero(sel.mask[..., -1], as_tuple=True), strict=True):
        assert int(fields.full_block_idx[b, h, qb, fields.full_block_cnt[b, h, qb] - 1]) == 4


def test_fields_reject_wrong_dtypes_and_shapes():
    sel = random_selection(1, 1, 3, 3, causal=False, seed=3)
    with pytest.raises(ValueError, match="must be int32"):
        fa4.block_sparse_fields(sel.kv_count.long(), sel.kv_indices, 128)
    with pytest.raises(ValueError, match="disagree"):
        fa4.block_sparse_fields(sel.kv_count[:, :, :2], sel.kv_indices, 128)


HOPPER = dict(device_type="cuda", capability=(9, 0), version="4.0.0b36", dtype=torch.bfloat16, head_dim=128)


@pytest.mark.parametrize(
    "changes,block_size,reason",
    [
        ({}, 128, None),
        ({}, None, None),
        ({"version": None}, 128, "flash-attn-4 package is not installed"),
        ({"version": "4.0.0b30"}, 128, "supports >=4.0.0b36,<4.1"),
        ({"version": "4.1.0"}, None, "supports >=4.0.0b36,<4.1"),
        ({"device_type": "cpu", "capability": None}, 128, "runs on CUDA tensors, got cpu"),
        ({"capability": (8, 0)}, 128, "needs a Hopper (sm90) or Blackwell (sm100) GPU, this one is sm80"),
        ({"dtype": torch.float32}, 128, "takes bfloat16 or float16 inputs"),
        ({}, 64, "block_size must be 128, got 64"),
        ({"head_dim": 256}, 128, "head_dim a multiple of 8 up to 128, got 256"),
        ({"head_dim": 256}, None, None),  # the dense forward takes 256 on Hopper
        ({"capability": (10, 0)}, 128, "on Blackwell needs 256-row query blocks"),
        ({"capability": (10, 0)}, None, None),
    ],
)
def test_problem_names_why_fa4_cannot_run(changes, block_size, reason):
    got = fa4.problem(**{**HOPPER, **changes}, block_size=block_size)
    if reason is None:
        assert got is None
    else:
        assert reason in got and "\n" not in got


@pytest.mark.parametrize(
    "version,ok",
    [("4.0.0b36", True), ("4.0.0b40", True), ("4.0.0", True), ("4.0.0b35", False), ("4.1.0", False), ("3.0.0", False)],
)
def test_version_range(version, ok):
    assert fa4.version_supported(version) is ok


def test_asking_for_fa4_where_it_cannot_run_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(fa4, "installed_version", lambda: None)
    q = torch.randn(1, 2, 256, 64)
    with pytest.raises(RuntimeError, match=r"^backend='fa4' cannot run here: the flash-attn-4 package is not") as err:
        xattn_attention(q, q, q, threshold=0.9, stride=8, backend="fa4")
    assert "\n" not in str(err.value)
    monkeypatch.setattr(fa4, "installed_version", lambda: "4.0.0b36")
    with pytest.raises(RuntimeError, match="runs on CUDA tensors, got cpu"):
        xattn_attention(q, q, q, threshold=0.9, stride=8, backend="fa4")
    with pytest.raises(RuntimeError, match="runs on CUDA tensors, got cpu"):
        fa4.use_fa4_dense("fa4", q)


def test_auto_prefers_fa4_only_where_it_runs(monkeypatch):
    q = torch.randn(1, 2, 256, 64)
    monkeypatch.setattr(fa4, "problem_for", lambda q, block_size: None)  # as on a Hopper GPU with FA4
    assert resolve_backend_for("auto", q, block_size=128) == "fa4"
    assert fa4.use_fa4_dense("auto", q) and not fa4.use_fa4_dense("triton", q)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend_for("auto", q, block_size=128, attention_fp8=True) == "triton"  # float8 is Triton's
    monkeypatch.setattr(fa4, "problem_for", lambda q, block_size: "no GPU")
    assert resolve_backend_for("auto", q, block_size=128) == "torch"
    assert not fa4.use_fa4_dense("auto", q)


def test_an_fa4_install_that_does_not_import_is_not_chosen_and_is_named(monkeypatch):
    """Package metadata present but ``flash_attn.cute`` failing to import (its CuTe DSL packages off the path):
    "auto" runs the other kernels with one warning naming the cause, "fa4" is a one-line error naming it."""
    real_import = fa4.importlib.import_module

    def failing_import(name, *args):
        if name == "flash_attn.cute":
            raise ModuleNotFoundError("No module named 'cutlass'")
        return real_import(name, *args)

    q = torch.randn(1, 2, 256, 64)
    monkeypatch.setattr(fa4, "problem", lambda **facts: None)  # everything else as on a Hopper GPU
    monkeypatch.setattr(fa4, "installed_version", lambda: "4.0.0b36")
    monkeypatch.setattr(fa4.importlib, "import_module", failing_import)
    fa4.import_problem.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"does not import \(ModuleNotFoundError: No module named 'cutlass'\)"):
            assert resolve_backend_for("auto", q, block_size=128) == "torch"
        assert not fa4.use_fa4_dense("auto", q)
        with pytest.raises(
            RuntimeError,
            match=r"^backend='fa4' cannot run here: flash-attn-4 4.0.0b36 is installed "
            "but does not import",
        ) as err:
            xattn_attention(q, q, q, threshold=0.9, stride=8, backend="fa4")
        assert "\n" not in str(err.value)
    finally:
        fa4.import_problem.cache_clear()


def test_attention_fp8_needs_the_triton_kernel():
    with pytest.raises(ValueError, match="attention_fp8=True runs on the Triton kernel"):
        XAttnConfig(backend="fa4", attention_fp8=True)
    with pytest.raises(TypeError, match="attention_fp8 must be a bool"):
        XAttnConfig(attention_fp8=1)


# ---------------------------------------------------------------------------------------------- on a GPU


def fa4_runs() -> bool:
    if not torch.cuda.is_available():
        return False
    return fa4.problem_for(torch.empty(1, 1, 1, 128, device="cuda", dtype=torch.bfloat16), block_size=128) is None


def bf16_qkv(batch, heads, kv_heads, n_q, n_k, dim, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(batch, heads, n_q, dim), (batch, kv_heads, n_k, dim), (batch, kv_heads, n_k, dim)]
    return [torch.randn(s, generator=gen, device="cuda").to(torch.bfloat16) for s in shapes]


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize(
    "n_q,n_k,heads,kv_heads,dim,causal",
    [
        (1000, 1000, 4, 4, 128, False),  # ragged last block
        (333, 333, 4, 2, 64, True),  # grouped-query causal prefill (the Video-MME path)
        (1300, 1000, 2, 1, 128, False),  # the processor's padded text rows: query blocks past the keys
        (128 * 6, 128 * 6, 2, 2, 96, False),
    ],
)
@pytest.mark.gpu
def test_fa4_block_sparse_equals_the_torch_reference(n_q, n_k, heads, kv_heads, dim, causal):
    if not fa4_runs():
        pytest.skip("needs FlashAttention-4 on a Hopper GPU")
    q, k, v = bf16_qkv(2, heads, kv_heads, n_q, n_k, dim, seed=n_q)
    n_qb, n_kb = math.ceil(n_q / 128), math.ceil(n_k / 128)
    sel = random_selection(2, heads, n_kb if n_q > n_k else n_qb, n_kb, causal=causal, seed=7)
    if n_q > n_k:
        sel = append_dense_rows(sel, n_qb)
    sel = BlockSelection(*(t.cuda() for t in sel))
    got = fa4.fa4_block_sparse_attention(q, k, v, sel.kv_count, sel.kv_indices, block_size=128, causal=causal)
    ref = block_sparse_attention_torch(q.float(), k.float(), v.float(), sel.mask, block_size=128, causal=causal)
    assert got.shape == q.shape and got.dtype == q.dtype
    assert rel_err(got, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_fa4_dense_and_threshold_one_equal_sdpa(causal):
    if not fa4_runs():
        pytest.skip("needs FlashAttention-4 on a Hopper GPU")
    q, k, v = bf16_qkv(1, 4, 2, 777, 777, 128, seed=3)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal, enable_gqa=True)
    assert rel_err(fa4.fa4_dense_attention(q, k, v, causal=causal), ref) < 1e-2
    out, stats = xattn_attention(q, k, v, threshold=1.0, stride=8, causal=causal, backend="auto", return_stats=True)
    assert stats.backend == "fa4" and rel_err(out, ref) < 1e-2


@pytest.mark.gpu
def test_fa4_sparse_through_xattn_attention_matches_triton():
    if not fa4_runs():
        pytest.skip("needs FlashAttention-4 on a Hopper GPU")
    from xattn_video.testing.synthetic import video_like_qkv

    q, k, v = video_like_qkv(frames=4, height=16, width=16, text_tokens=77, heads=4, head_dim=128,
                             dtype=torch.bfloat16, device="cuda")  # fmt: skip
    a = xattn_attention(q, k, v, threshold=0.9, stride=8, backend="fa4")
    b = xattn_attention(q, k, v, threshold=0.9, stride=8, backend="triton")
    assert rel_err(a, b) < 1e-2


@pytest.mark.gpu
def test_processor_on_fa4_matches_the_triton_backend():
    """The HunyuanVideo processor (padded text rows, dense warmup then a sparse step) on FA4 against the same
    processor on the Triton kernel, under bfloat16 autocast."""
    if not fa4_runs():
        pytest.skip("needs FlashAttention-4 on a Hopper GPU")
    import xattn_video
    from xattn_video.testing.tiny import build_tiny_hunyuan_pipeline

    pipe = build_tiny_hunyuan_pipeline(seed=0).to("cuda")
    latents = torch.randn(1, 4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    outs, procs = {}, {}
    for backend in ("fa4", "triton"):
        procs[backend] = xattn_video.enable(pipe, threshold=0.5, stride=8, warmup_steps=1, backend=backend)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs[backend] = pipe("a cat walks on the grass", latents=latents, num_inference_steps=2,
                                 output_type="latent", height=128, width=128, num_frames=9).frames  # fmt: skip
    steps = procs["fa4"].stats["generations"][0]["steps"]
    assert [s["mode"] for s in steps] == ["dense", "sparse"] and steps[1]["density"] < 1
    assert torch.isfinite(outs["fa4"]).all()
    assert rel_err(outs["fa4"], outs["triton"]) < 2e-2


# ------------------------------------------------------- the adapter's plumbing on the CPU, FA4 stood in for


def fake_flash_attn_func(q, k, v, softmax_scale=None, causal=False, block_sparse_tensors=None):
    """FA4's ``flash_attn_func`` contract in torch ([B, S, H, D] in and out, blocks read from the fields as FA4
    reads them), so that the adapter's layouts, fields and ``out`` handling can run where FA4 cannot."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if block_sparse_tensors is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale, enable_gqa=True)
    else:
        mask = mask_from_fa4_fields(block_sparse_tensors, math.ceil(k.shape[2] / 128))
        out = block_sparse_attention_torch(q, k, v, mask, block_size=128, causal=causal, scale=softmax_scale)
    return out.transpose(1, 2).contiguous(), None


@pytest.fixture
def fake_fa4(monkeypatch):
    monkeypatch.setattr(fa4, "problem_for", lambda q, block_size: None)
    monkeypatch.setattr(fa4, "_flash_attn_func", lambda: fake_flash_attn_func)
    monkeypatch.setattr(fa4, "_block_sparse_tensors", lambda fields: fields)


@pytest.mark.parametrize("causal", [False, True])
def test_adapter_layouts_match_the_torch_backend(fake_fa4, causal):
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 700, 32, generator=gen) * 2
    k, v = torch.randn(1, 2, 700, 32, generator=gen), torch.randn(1, 2, 700, 32, generator=gen)
    args = dict(threshold=0.5, stride=4, causal=causal)
    got, stats = xattn_attention(q, k, v, **args, backend="fa4", return_stats=True)
    want = xattn_attention(q, k, v, **args, backend="torch")
    assert stats.backend == "fa4" and stats.density < 1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    out = torch.empty(1, 700, 4, 32).transpose(1, 2)  # the processor's [B, N, H, D]-backed output
    xattn_attention(q, k, v, **args, backend="fa4", out=out)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_processor_padded_rows_and_dense_path_on_the_adapter(fake_fa4):
    from xattn_video import XAttnProcessor

    gen = torch.Generator().manual_seed(6)
    q = torch.randn(1, 2, 700, 32, generator=gen)
    k, v = torch.randn(1, 2, 460, 32, generator=gen), torch.randn(1, 2, 460, 32, generator=gen)
    got, _ = XAttnProcessor(threshold=0.8, backend="fa4").sparse_attention(q, k, v)
    want, _ = XAttnProcessor(threshold=0.8, backend="torch").sparse_attention(q, k, v)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    dense = XAttnProcessor(backend="fa4").dense_attention(q, k, v)
    torch.testing.assert_close(dense, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
