"""XAttnProcessor on HunyuanVideo: against stock diffusers processors on a tiny offline pipeline, and against
xattn_attention / SDPA on the valid segment at the processor level; the step tracker on its own."""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

import xattn_video
from reference64 import block_sparse_attention64
from xattn_video import XAttnProcessor, estimate_block_mask, xattn_attention
from xattn_video.core.config import BACKENDS
from xattn_video.diffusion.steps import StepTracker
from xattn_video.testing.synthetic import video_like_qkv
from xattn_video.testing.tiny import build_tiny_hunyuan_pipeline

GEN = dict(height=128, width=128, num_frames=9)  # 3 x 16 x 16 = 768 video tokens (six 128-token blocks)
PROMPT = "a cat walks on the grass"
PROMPTS = ["a cat", "a red fox runs across a wide green field at dusk, slow motion"]
NEGATIVE = "blurry, low quality"
THRESHOLD = 0.5  # random tiny weights give flat attention: a low threshold makes steps clearly sparse


def latents(batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def generate(pipe, prompt=PROMPT, *, steps=2, batch=1, output_type="latent", **kw) -> torch.Tensor:
    out = pipe(prompt, latents=latents(batch), num_inference_steps=steps, output_type=output_type, **GEN, **kw)
    return out.frames


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same up to float rounding (the dense path and stock's masked SDPA sum in different orders)."""
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stock(one_thread):
    """The stock pipeline (diffusers' own processors) and a cache of its outputs."""
    pipe = build_tiny_hunyuan_pipeline(seed=0)
    procs = {type(p) for p in pipe.transformer.attn_processors.values()}
    assert procs == {HunyuanVideoAttnProcessor2_0, AttnProcessor2_0}
    return pipe, {}


def stock_output(stock, key, **kw) -> torch.Tensor:
    pipe, cache = stock
    if key not in cache:
        cache[key] = generate(pipe, **kw)
    return cache[key]


def step_table(proc: XAttnProcessor) -> list[tuple]:
    """(generation, step, mode, calls per layer) for every recorded step."""
    return [
        (g["generation"], s["step"], s["mode"], sorted({layer["calls"] for layer in s["layers"]}))
        for g in proc.stats["generations"]
        for s in g["steps"]
    ]


# ---------------------------------------------------------------------------------------------- tiny pipeline


def test_tiny_pipeline_offline_deterministic_and_template_aligned():
    a, b = build_tiny_hunyuan_pipeline(seed=0), build_tiny_hunyuan_pipeline(seed=0)
    for (name, pa), pb in zip(a.transformer.state_dict().items(), b.transformer.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    c = build_tiny_hunyuan_pipeline(seed=1)
    assert not torch.equal(a.transformer.proj_out.weight, c.transformer.proj_out.weight)
    # The template's fixed prefix is exactly crop_start tokens: after the crop, the prompt comes first.
    ids = a.tokenizer(DEFAULT_PROMPT_TEMPLATE["template"].format("a cat"))["input_ids"]
    tokens = a.tokenizer.convert_ids_to_tokens(ids[DEFAULT_PROMPT_TEMPLATE["crop_start"] :])
    assert tokens == ["a", "c", "##a", "##t", "<|eot_id|>"]
    assert a.tokenizer_2("a cat")["input_ids"][-1] == a.text_encoder_2.config.eos_token_id


def test_dense_warmup_covering_all_steps_equals_stock_frames(stock):
    """warmup_steps >= steps: decoded frames equal stock's; every step is dense with density exactly 1."""
    ref = stock_output(stock, "frames", output_type="pt")
    pipe = build_tiny_hunyuan_pipeline(seed=0)
    proc = xattn_video.enable(pipe, threshold=THRESHOLD, stride=8, warmup_steps=2)
    out = generate(pipe, output_type="pt")
    assert out.shape == ref.shape == (1, 9, 3, 128, 128)
    close(out, ref)
    assert step_table(proc) == [(0, 0, "dense", [1]), (0, 1, "dense", [1])]
    for step in proc.stats["generations"][0]["steps"]:
        assert step["density"] == 1.0 and all(layer["density"] == 1.0 for layer in step["layers"])
    # The refiner's attention kept its stock processor's behaviour (it is not joint video attention).
    assert len(pipe.transformer.attn_processors) == 5 and len(proc.stats["generations"][0]["steps"][0]["layers"]) == 4


def test_sparse_after_warmup_differs_and_records_density(stock):
    ref = stock_output(stock, "latents3", steps=3)
    pipe = build_tiny_hunyuan_pipeline(seed=0)
    proc = xattn_video.enable(pipe, threshold=THRESHOLD, stride=8, warmup_steps=1)
    out = generate(pipe, steps=3)
    assert rel_err(out, ref) > 1e-3  # sparse steps change the result (dense paths agree to ~1e-7)
    steps = proc.stats["generations"][0]["steps"]
    assert [s["mode"] for s in steps] == ["dense", "sparse", "sparse"]
    assert steps[0]["density"] == 1.0 and all(layer["density"] == 1.0 for layer in steps[0]["layers"])
    for step in steps[1:]:
        assert 0 < step["density"] < 1
        assert all(0 < layer["density"] < 1 for layer in step["layers"])
        assert step["estimate_ms"] > 0 and step["attention_ms"] > 0
    assert [layer["block"] for layer in steps[1]["layers"]] == ["double", "double", "single", "single"]
    # Warmup covering every step on the same pipeline gives stock back: the difference came from sparsity alone.
    xattn_video.enable(pipe, threshold=THRESHOLD, stride=8, warmup_steps=3)
    close(generate(pipe, steps=3), ref)


def test_autocast_bfloat16_runs_like_stock_and_sparse_steps_run(stock):
    """Under torch.autocast (bfloat16) the RMS-normed q/k come out float32 beside a bfloat16 v; SDPA casts them,
    and so must the processor. Threshold 1 gives stock diffusers' result under the same autocast (up to the
    bfloat16 rounding of another summation order, well below what autocast itself changes), and a sparse step
    runs."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = stock_output(stock, "autocast_latents2", steps=2)
    fp32 = stock_output(stock, "latents2", steps=2)
    autocast_effect = rel_err(ref, fp32)
    assert autocast_effect > 1e-3  # autocast really ran the model in bfloat16
    pipe = build_tiny_hunyuan_pipeline(seed=0)
    xattn_video.enable(pipe, threshold=1.0, stride=8, warmup_steps=0)  # every step through xattn_attention
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense = generate(pipe, steps=2)
    assert dense.dtype == ref.dtype and rel_err(dense, ref) < autocast_effect / 3
    proc = xattn_video.enable(pipe, threshold=THRESHOLD, stride=8, warmup_steps=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sparse = generate(pipe, steps=2)
    steps = proc.stats["generations"][0]["steps"]
    assert [s["mode"] for s in steps] == ["dense", "sparse"] and steps[1]["density"] < 1
    assert torch.isfinite(sparse).all() and rel_err(sparse, ref) > rel_err(dense, ref)


@pytest.mark.gpu
def test_autocast_bfloat16_on_cuda_with_the_triton_backend():
    """The case the issue met: CUDA autocast (bfloat16), the processor on its default (Triton) backend. Threshold 1
    gives stock diffusers' result under the same autocast; a sparse step runs."""
    pipe = build_tiny_hunyuan_pipeline(seed=0).to("cuda")
    fp32 = generate(pipe)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = generate(pipe)
    autocast_effect = rel_err(ref, fp32)
    xattn_video.enable(pipe, threshold=1.0, stride=8, warmup_steps=0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        dense = generate(pipe)
    assert rel_err(dense, ref) < autocast_effect / 3
    proc = xattn_video.enable(pipe, threshold=THRESHOLD, stride=8, warmup_steps=1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        sparse = generate(pipe)
    steps = proc.stats["generations"][0]["steps"]
    assert [s["mode"] for s in steps] == ["dense", "sparse"] and steps[1]["density"] < 1
    assert torch.isfinite(sparse).all()


def test_step_counting_consecutive_calls_and_true_cfg(stock):
    """Two pipeline calls in a row with true CFG (two forwards per step): generations 0 and 1, steps 0..1,
    each layer called twice per step; dense-warmup output with CFG equals stock's."""
    kw = dict(negative_prompt=NEGATIVE, true_cfg_scale=3.0)
    ref = stock_output(stock, "cfg", **kw)
    pipe = build_tiny_hunyuan_pipeline(seed=0)
    proc = xattn_video.enable(pipe, threshold=THRESHOLD, stride=8, warmup_steps=1)
    generate(pipe, **kw)
    generate(pipe, **kw)
    assert step_table(proc) == [
        (0, 0, "dense", [2]),
        (0, 1, "sparse", [2]),
        (1, 0, "dense", [2]),
        (1, 1, "sparse", [2]),
    ]
    proc = xattn_video.enable(pipe, threshold=THRESHOLD, stride=8, warmup_steps=2)
    close(generate(pipe, **kw), ref)
    assert step_table(proc) == [(0, 0, "dense", [2]), (0, 1, "dense", [2])]


def test_runs_under_inference_mode():
    """Inference tensors have no version counter: tracking and the mask cache must not need one."""
    pipe = build_tiny_hunyuan_pipeline(seed=0)
    proc = xattn_video.enable(pipe, threshold=THRESHOLD, stride=8, warmup_steps=1)
    with torch.inference_mode():
        generate(pipe, steps=2, negative_prompt=NEGATIVE, true_cfg_scale=3.0)
    assert step_table(proc) == [(0, 0, "dense", [2]), (0, 1, "sparse", [2])]


def test_step_counting_one_step_generations_and_batched_cfg():
    """One-step generations in a row (the same top timestep each time) are separate generations; a batch of
    two is one forward per step."""
    pipe = build_tiny_hunyuan_pipeline(seed=0)
    proc = xattn_video.enable(pipe, threshold=THRESHOLD, stride=8, warmup_steps=1)
    for _ in range(2):
        pipe(PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=3.0, num_inference_steps=1, output_type="latent", **GEN)
    pipe(PROMPTS, num_inference_steps=3, output_type="latent", **GEN)
    assert step_table(proc) == [
        (0, 0, "dense", [2]),
        (1, 0, "dense", [2]),
        (2, 0, "dense", [1]),
        (2, 1, "sparse", [1]),
        (2, 2, "sparse", [1]),
    ]


def test_batch_of_prompts_with_different_lengths_matches_stock_in_dense_mode(stock):
    ref = stock_output(stock, "batch", prompt=PROMPTS, batch=2)
    pipe = build_tiny_hunyuan_pipeline(seed=0)
    mask = pipe.encode_prompt(PROMPTS, device="cpu")[2]
    lengths = mask.sum(1).tolist()
    assert lengths[0] < lengths[1] < mask.shape[1]  # both padded, by different amounts
    proc = xattn_video.enable(pipe, threshold=THRESHOLD, stride=8, warmup_steps=2)
    close(generate(pipe, PROMPTS, batch=2), ref)
    # Dense density counts the blocks of each sample's own valid segment.
    layer = proc.stats["generations"][0]["steps"][0]["layers"][0]
    heads = pipe.transformer.config.num_attention_heads
    assert layer["total_blocks"] == heads * sum(math.ceil((768 + n) / 128) ** 2 for n in lengths)
    # Sparse steps on that batch run per sample and differ from stock.
    proc = xattn_video.enable(pipe, threshold=THRESHOLD, stride=8, warmup_steps=0)
    assert rel_err(generate(pipe, PROMPTS, batch=2), ref) > 1e-3
    assert proc.stats["totals"]["density"] < 1


def test_dense_layers_stay_dense_at_every_step():
    pipe = build_tiny_hunyuan_pipeline(seed=0)
    proc = xattn_video.enable(pipe, threshold=THRESHOLD, stride=8, dense_layers=(0, 3))
    generate(pipe, steps=1)
    (step,) = proc.stats["generations"][0]["steps"]
    assert step["mode"] == "mixed"
    modes = [(layer["layer"], layer["mode"], layer["density"] == 1.0) for layer in step["layers"]]
    assert modes == [(0, "dense", True), (1, "sparse", False), (2, "sparse", False), (3, "dense", True)]


def test_refiner_attention_keeps_stock_behaviour():
    pipe = build_tiny_hunyuan_pipeline(seed=0)
    refiner = pipe.transformer.context_embedder
    gen = torch.Generator().manual_seed(0)
    text = torch.randn(2, 12, 16, generator=gen)
    mask = torch.tensor([[1] * 5 + [0] * 7, [1] * 9 + [0] * 3])
    t = torch.tensor([900.0, 900.0])
    ref = refiner(text, t, mask)
    proc = xattn_video.enable(pipe, threshold=THRESHOLD, stride=8, warmup_steps=3)
    assert all(p is proc for p in pipe.transformer.attn_processors.values())
    assert torch.equal(refiner(text, t, mask), ref)
    assert proc.stats["generations"] == []  # not joint video attention: nothing recorded


def test_projections_equal_stock_before_the_attention_call(monkeypatch):
    """Up to the attention call the processor computes bit for bit what stock does (QKV, QK-norm, RoPE on video
    tokens only, text after video), in double- and single-stream blocks; the layer outputs then agree."""
    import diffusers.models.transformers.transformer_hunyuan_video as hv

    from xattn_video.diffusion.hunyuan import _project

    pipe = build_tiny_hunyuan_pipeline(seed=0)
    model = pipe.transformer
    calls = {}
    joint = [b.attn for b in model.transformer_blocks] + [b.attn for b in model.single_transformer_blocks]

    def capture(module, args, kwargs):
        calls.setdefault(module, kwargs)

    hooks = [attn.register_forward_pre_hook(capture, with_kwargs=True) for attn in joint]
    generate(pipe, PROMPTS, batch=2, steps=1)
    for h in hooks:
        h.remove()
    seen = {}
    real = hv.dispatch_attention_fn

    def spy(query, key, value, attn_mask=None, **kw):
        seen.update(q=query, k=key, v=value)
        return real(query, key, value, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(hv, "dispatch_attention_fn", spy)
    proc = XAttnProcessor(threshold=THRESHOLD, stride=8, warmup_steps=1).attach(model)
    proc.tracker.observe(1000.0)  # step 0: a dense warmup step
    for attn in joint:
        kw = calls[attn]
        stock_out = HunyuanVideoAttnProcessor2_0()(attn, **kw)
        q, k, v = _project(attn, kw["hidden_states"], kw["encoder_hidden_states"], kw["image_rotary_emb"])
        assert torch.equal(q, seen["q"]) and torch.equal(k, seen["k"]) and torch.equal(v, seen["v"])
        ours = proc(attn, **kw)
        for a, b in zip(ours, stock_out, strict=True):
            close(a, b)


# ---------------------------------------------------------------------------------------------- errors


def test_processor_without_tracker_explains_the_fix():
    pipe = build_tiny_hunyuan_pipeline(seed=0)
    proc = XAttnProcessor(threshold=THRESHOLD, stride=8, warmup_steps=2)
    pipe.transformer.set_attn_processor(proc)
    with pytest.raises(RuntimeError, match=r"warmup_steps=2.*no step tracker.*xattn_video\.enable.*proc\.attach"):
        generate(pipe, steps=1)
    # Attaching fixes it.
    proc.attach(pipe.transformer)
    generate(pipe, steps=2)
    assert [s["mode"] for s in proc.stats["generations"][0]["steps"]] == ["dense", "dense"]
    # A processor that needs no step runs unattached; its calls are counted apart.
    free = XAttnProcessor(threshold=THRESHOLD, stride=8)
    pipe.transformer.set_attn_processor(free)
    generate(pipe, steps=1)
    assert free.stats["generations"] == [] and free.stats["untracked"]["calls"] == 4


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(threshold=0.0), ValueError, "threshold"),
        (dict(threshold=1.5), ValueError, "threshold"),
        (dict(stride=3), ValueError, "stride"),
        (dict(block_size=100), ValueError, "block_size"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(warmup_steps=-1), ValueError, "warmup_steps"),
        (dict(warmup_steps=1.5), TypeError, "warmup_steps"),
        (dict(dense_layers=3), TypeError, "dense_layers"),
        (dict(dense_layers=(0, -2)), ValueError, "dense_layers"),
    ],
)
def test_parameter_validation_names_the_parameter(kwargs, error, match):
    with pytest.raises(error, match=match):
        XAttnProcessor(**kwargs)


def test_attach_checks_transformer_and_dense_layers():
    pipe = build_tiny_hunyuan_pipeline(seed=0)
    with pytest.raises(ValueError, match=r"dense_layers \[4, 9\].*4 joint attention layers"):
        xattn_video.enable(pipe, dense_layers=(1, 4, 9))
    with pytest.raises(TypeError, match="HunyuanVideo transformer"):
        XAttnProcessor().attach(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="pipeline or its transformer"):
        xattn_video.enable(object())


# ---------------------------------------------------------------------------------------------- statistics


def test_stats_dict_json_and_debug_log(tmp_path, caplog):
    pipe = build_tiny_hunyuan_pipeline(seed=0)
    replaced = xattn_video.enable(pipe, threshold=THRESHOLD, stride=8, warmup_steps=1)
    generate(pipe, steps=2)
    proc = xattn_video.enable(pipe, threshold=THRESHOLD, stride=8, warmup_steps=1)
    with caplog.at_level(logging.DEBUG, logger="xattn_video.diffusion.hunyuan"):
        generate(pipe, steps=2)
    # One line per forward, from the processor in use only (the replaced one keeps its old statistics).
    lines = [r.getMessage() for r in caplog.records if r.name == "xattn_video.diffusion.hunyuan"]
    assert len(lines) == 2 and "step 0" in lines[0] and "dense" in lines[0] and "sparse" in lines[1]
    assert replaced.stats["totals"]["calls"] == 8
    stats = proc.stats
    assert stats["settings"] == {
        "threshold": THRESHOLD,
        "stride": 8,
        "block_size": 128,
        "warmup_steps": 1,
        "dense_layers": [],
        "backend": "auto",
        "estimate_fp8": "auto",
        "token_order": "raster",
        "tile": [2, 8, 8],
        "attention_fp8": False,
        "refresh_every": 1,
        "density": None,
    }
    # "auto" as resolved on this machine: float8 estimate only on a GPU with float8 tensor cores
    fp8_gpu = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
    assert stats["resolved"]["estimate_fp8"] is fp8_gpu and stats["resolved"]["backend"] in BACKENDS
    path = proc.save_stats(tmp_path / "sub" / "stats.json")
    assert json.loads(open(path).read()) == json.loads(json.dumps(stats))
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["stats.json"]  # no temporary file left
    totals = stats["totals"]
    assert totals["calls"] == 8 and 0 < totals["density"] < 1
    proc.reset_stats()
    assert proc.stats["generations"] == [] and proc.stats["totals"]["calls"] == 0


# ---------------------------------------------------------------------------------------------- processor level


def _padded_video_qkv(lengths, n_text=40, seed=0):
    """Video-like q/k/v [B, H, 768 + n_text, D]; sample b valid on its first lengths[b] tokens, garbage after."""
    q, k, v = video_like_qkv(frames=3, height=16, width=16, text_tokens=n_text, batch=len(lengths), heads=3, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for b, n in enumerate(lengths):
        for t in (q, k, v):
            t[b, :, n:] = 50 * torch.randn(t[b, :, n:].shape, generator=gen)  # must not leak into valid rows
    return q, k, v


@pytest.mark.parametrize(
    "lengths, n_text",
    [([768 + 13, 768 + 29], 40), ([768 + 20, 768 + 20], 40), ([808, 808], 40), ([768 + 13, 900], 160)],
)
def test_processor_sparse_step_matches_xattn_on_valid_segment(lengths, n_text):
    q, k, v = _padded_video_qkv(lengths, n_text=n_text)
    proc = XAttnProcessor(threshold=0.8, stride=8, backend="torch")
    out = proc.attention(q, k, v, lengths)
    n = q.shape[2]
    densities = []
    for b, length in enumerate(lengths):
        qb, kb, vb = q[b : b + 1, :, :length], k[b : b + 1, :, :length], v[b : b + 1, :, :length]
        ref, st = xattn_attention(qb, kb, vb, threshold=0.8, stride=8, backend="torch", return_stats=True)
        densities.append(st.density)
        torch.testing.assert_close(out[b : b + 1, :, :length], ref, rtol=1e-5, atol=1e-6)
        if length < n:
            # padded query rows: the kept blocks of the block where padding starts, every key block past it
            mask = estimate_block_mask(qb, kb, threshold=0.8, stride=8, backend="torch")
            n_qb = -(-n // 128)
            mask = torch.cat([mask, mask.new_ones(1, mask.shape[1], n_qb - mask.shape[2], mask.shape[3])], 2)
            pad_ref = block_sparse_attention64(q[b : b + 1], kb, vb, mask, block_size=128, causal=False)
            # (their q is 50x larger than the valid ones: sharp softmax, float32 rounding shows at 1e-5)
            torch.testing.assert_close(out[b : b + 1, :, length:], pad_ref[:, :, length:].float(), rtol=1e-4, atol=2e-4)
    assert all(d < 0.9 for d in densities)  # video-like attention is genuinely sparse here


def test_processor_dense_step_matches_stock_masked_sdpa():
    lengths = [768 + 13, 768 + 29]
    q, k, v = _padded_video_qkv(lengths, seed=3)
    n = q.shape[2]
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]  # what HunyuanVideo's transformer builds
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    out = XAttnProcessor(threshold=0.8, stride=8).attention(q, k, v, lengths, dense=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="valid_lengths"):
        XAttnProcessor().attention(q, k, v, [n + 1, 5])


# ---------------------------------------------------------------------------------------------- step tracker


def _observe(tracker, seq):
    return [(p.generation, p.step, p.forward) for p in (tracker.observe(t, x) for t, x in seq)]


def test_step_tracker_rules():
    a, b, c = torch.zeros(2), torch.ones(2), torch.full((2,), 2.0)
    tracker = StepTracker()
    seq = [(1000, a), (1000, a), (900, a), (900, a), (800, b)]  # true CFG: two forwards per step
    seq += [(1000, c), (500, c)]  # timestep rises: a new generation
    assert _observe(tracker, seq) == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 2, 0), (1, 0, 0), (1, 1, 0)]
    tracker.reset()
    # One-step generations in a row: same timestep, fresh latents.
    assert _observe(tracker, [(1000, a), (1000, a.clone()), (1000, b), (1000, c)]) == [
        (0, 0, 0),
        (0, 0, 1),  # equal content counts as the same latents
        (1, 0, 0),
        (2, 0, 0),
    ]
    tracker.reset()
    # A second-order scheduler (Heun) evaluates twice at one timestep with different latents: the same step.
    assert _observe(tracker, [(1000, a), (900, a), (900, b), (800, c)]) == [(0, 0, 0), (0, 1, 0), (0, 1, 1), (0, 2, 0)]
    tracker.reset()
    x = torch.zeros(3)
    tracker.observe(torch.tensor([1000.0, 1000.0]), x)
    x.add_(1)  # changed in place: not the same latents any more
    assert tracker.observe(torch.tensor([1000.0, 1000.0]), x).generation == 1
    tracker.new_generation()
    assert tracker.observe(10, x).generation == 2


def test_deepcopy_of_an_enabled_transformer_tracks_on_its_own():
    pipe = build_tiny_hunyuan_pipeline(seed=0)
    proc = xattn_video.enable(pipe, threshold=THRESHOLD, stride=8, warmup_steps=1)
    generate(pipe, steps=2)
    clone = copy.deepcopy(pipe.transformer)
    clone_proc = clone.transformer_blocks[0].attn.processor
    assert clone_proc is not proc and clone_proc.tracker is StepTracker.of(clone) is not proc.tracker
    pipe.register_modules(transformer=clone)
    generate(pipe, steps=2)
    assert [g["generation"] for g in clone_proc.stats["generations"]] == [0, 1]
    assert [g["generation"] for g in proc.stats["generations"]] == [0]


def test_step_tracker_hook_attach_detach():
    model = build_tiny_hunyuan_pipeline(seed=0).transformer
    tracker = StepTracker.attach(model)
    assert StepTracker.attach(model) is tracker and StepTracker.of(model) is tracker
    seen = []
    tracker.add_listener(seen.append)
    inputs = dict(
        hidden_states=torch.randn(1, 4, 1, 4, 4),
        encoder_hidden_states=torch.randn(1, 6, 16),
        encoder_attention_mask=torch.ones(1, 6),
        pooled_projections=torch.randn(1, 8),
        guidance=torch.tensor([6000.0]),
    )
    for t in (1000.0, 700.0):
        model(timestep=torch.tensor([t]), **inputs)
    assert [(p.generation, p.step, p.timestep) for p in seen] == [(0, 0, 1000.0), (0, 1, 700.0)]
    tracker.detach()
    assert StepTracker.of(model) is None
    model(timestep=torch.tensor([100.0]), **inputs)
    assert len(seen) == 2 and tracker.position is None
