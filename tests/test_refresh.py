"""``refresh_every``: one sparse step's kept blocks reused for the next k-1 steps, on the HunyuanVideo processor
(one forward a step, true CFG, per-sample groups) and the ``xattn`` backend (Wan 2.2 A14B's transformer swap
with true CFG); the attention of reused steps against the float64 block-sparse reference with the estimating
step's mask; statistics; bad values."""

from __future__ import annotations

import pytest
import torch
from backend_helpers import LOW_THRESHOLD, SPARSE
from backend_helpers import generate as generate_wan
from backend_helpers import pipeline as wan_pipeline

import xattn_video
from reference64 import antidiagonal_block_scores64, block_sparse_attention64, select_blocks64
from xattn_video import XAttnProcessor
from xattn_video.core import attention as core_attention
from xattn_video.diffusion import attention_op
from xattn_video.diffusion import hunyuan as hunyuan_module
from xattn_video.diffusion.backend import XAttnSession
from xattn_video.diffusion.refresh import BlockReuse
from xattn_video.diffusion.steps import StepPosition
from xattn_video.testing.tiny import build_tiny_hunyuan_pipeline

GEN = dict(height=128, width=128, num_frames=9)  # 768 video tokens: six blocks of 128
THRESHOLD = 0.5  # random tiny weights give flat attention: a low threshold makes steps clearly sparse
STRIDE = 8
NEGATIVE = "blurry, low quality"

pytestmark = pytest.mark.usefixtures("one_thread")


def _latents(batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _hunyuan(pipe, prompt="a cat walks on the grass", *, steps, batch=1, **kw) -> torch.Tensor:
    return pipe(prompt, latents=_latents(batch), num_inference_steps=steps, output_type="latent", **GEN, **kw).frames


def _blocks(stats, generation=0) -> list:
    return [s["blocks"] for s in stats["generations"][generation]["steps"]]


class _Recorder:
    """Wraps the sparse attention function a module looks up: records each call's inputs, kept-block mask and
    output, with ``where()``'s answer (forward, layer) at the time of the call."""

    def __init__(self, monkeypatch, module, where):
        self.calls: list[dict] = []
        real = module._sparse_attention

        def wrapped(backend, **options):
            attend = real(backend, **options)

            def run(q, k, v, sel, **kw):
                out = attend(q, k, v, sel, **kw)
                self.calls.append(
                    dict(where(), q=q.clone(), k=k.clone(), v=v.clone(), mask=sel.mask.clone(), out=out.clone())
                )
                return out

            return run

        monkeypatch.setattr(module, "_sparse_attention", wrapped)


def _processor_recorder(monkeypatch, proc):
    layer_calls = {}

    def where():
        pos = proc.tracker.position
        key = (pos.generation, pos.step, pos.forward)
        layer_calls[key] = layer_calls.get(key, -1) + 1
        return dict(generation=pos.generation, step=pos.step, forward=pos.forward, call=layer_calls[key])

    return _Recorder(monkeypatch, hunyuan_module, where)


def _estimate64(q, k, block_size=128):
    return select_blocks64(
        antidiagonal_block_scores64(q, k, stride=STRIDE, block_size=block_size, causal=False),
        threshold=THRESHOLD,
        causal=False,
    )


def _check_reference(call, block_size=128):
    """The call's output equals the float64 block-sparse reference over its own mask (rows past the mask's query
    blocks are the processor's padded rows, dense over the valid keys)."""
    q, k, v, mask = call["q"], call["k"], call["v"], call["mask"]
    ref = block_sparse_attention64(q.double(), k.double(), v.double(), mask, block_size=block_size, causal=False)
    torch.testing.assert_close(call["out"].double(), ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- processor


def test_processor_refresh_every_one_is_today_and_k_reuses_the_estimating_steps_blocks(monkeypatch):
    pipe = build_tiny_hunyuan_pipeline(seed=0)
    today = xattn_video.enable(pipe, threshold=THRESHOLD, stride=STRIDE, warmup_steps=1)
    ref = _hunyuan(pipe, steps=6)
    proc = xattn_video.enable(pipe, threshold=THRESHOLD, stride=STRIDE, warmup_steps=1, refresh_every=1)
    torch.testing.assert_close(_hunyuan(pipe, steps=6), ref, rtol=0, atol=0)
    assert _blocks(proc.stats) == _blocks(today.stats) == [None] + ["estimated"] * 5
    assert len(proc._reuse) == 0  # nothing kept

    proc = xattn_video.enable(pipe, threshold=THRESHOLD, stride=STRIDE, warmup_steps=1, refresh_every=3)
    rec = _processor_recorder(monkeypatch, proc)
    out = _hunyuan(pipe, steps=6)
    stats = proc.stats
    # the first sparse step after warmup estimates; then every third sparse step
    assert _blocks(stats) == [None, "estimated", "reused", "reused", "estimated", "reused"]
    steps = stats["generations"][0]["steps"]
    n_layers = len(steps[0]["layers"])
    for s in steps[1:]:
        reused = s["blocks"] == "reused"
        assert (s["estimated_calls"], s["reused_calls"]) == ((0, n_layers) if reused else (n_layers, 0))
        assert (s["estimate_ms"] == 0) == reused
    assert stats["totals"]["reused_calls"] == 3 * n_layers
    calls = {(c["step"], c["call"]): c for c in rec.calls}
    assert sorted({s for s, _ in calls}) == [1, 2, 3, 4, 5]
    for layer in range(n_layers):
        for step in (1, 4):  # estimating steps: the estimate of their own q/k, by the float64 reference
            c = calls[(step, layer)]
            estimate = _estimate_now(c)
            assert torch.equal(c["mask"][:, :, : estimate.shape[2]], estimate)
        for step, source in ((2, 1), (3, 1), (5, 4)):  # reused steps: exactly the estimating step's blocks
            assert torch.equal(calls[(step, layer)]["mask"], calls[(source, layer)]["mask"])
        for step in (1, 2, 3, 4, 5):
            _check_reference(calls[(step, layer)])
    # the blocks do change from step to step, so reusing them changes the video
    assert any(not torch.equal(calls[(2, i)]["mask"], _estimate_now(calls[(2, i)])) for i in range(n_layers))
    assert (out - ref).abs().max() > 0


def _estimate_now(call):
    length = call["k"].shape[2]
    return _estimate64(call["q"][:, :, :length], call["k"])


def test_processor_true_cfg_reuses_per_forward_and_generations_start_fresh(monkeypatch):
    pipe = build_tiny_hunyuan_pipeline(seed=0)
    proc = xattn_video.enable(pipe, threshold=THRESHOLD, stride=STRIDE, warmup_steps=1, refresh_every=2)
    rec = _processor_recorder(monkeypatch, proc)
    for _ in range(2):  # two generations: the second starts with an estimate again
        _hunyuan(pipe, steps=4, negative_prompt=NEGATIVE, true_cfg_scale=3.0)
    stats = proc.stats
    assert _blocks(stats, 0) == _blocks(stats, 1) == [None, "estimated", "reused", "estimated"]
    assert all(layer["calls"] == 2 for s in stats["generations"][0]["steps"] for layer in s["layers"])
    calls = {(c["generation"], c["step"], c["forward"], c["call"]): c for c in rec.calls}
    n_layers = len(stats["generations"][0]["steps"][0]["layers"])
    for layer in range(n_layers):
        for forward in (0, 1):  # cond reuses cond's blocks, uncond uncond's
            same = calls[(0, 2, forward, layer)]["mask"]
            assert torch.equal(same, calls[(0, 1, forward, layer)]["mask"])
            _check_reference(calls[(0, 2, forward, layer)])
        # the second generation's first sparse step estimates its own blocks
        c = calls[(1, 1, 0, layer)]
        assert torch.equal(c["mask"][:, :, : _estimate_now(c).shape[2]], _estimate_now(c))
    differs = [not torch.equal(calls[(0, 1, 0, i)]["mask"], calls[(0, 1, 1, i)]["mask"]) for i in range(n_layers)]
    assert any(differs)  # cond and uncond keep different blocks: one shared selection would be wrong


def test_processor_per_sample_groups_reuse_their_own_blocks(monkeypatch):
    """A batch whose prompts have different lengths attends per sample: each sample keeps its own blocks."""
    pipe = build_tiny_hunyuan_pipeline(seed=0)
    prompts = ["a cat", "a red fox runs across a wide green field at dusk, slow motion"]
    proc = xattn_video.enable(pipe, threshold=THRESHOLD, stride=STRIDE, warmup_steps=0, refresh_every=2)
    rec = _processor_recorder(monkeypatch, proc)
    _hunyuan(pipe, prompts, steps=2, batch=2)
    assert _blocks(proc.stats) == ["estimated", "reused"]
    by_step = {s: [c for c in rec.calls if c["step"] == s] for s in (0, 1)}
    assert len(by_step[0]) == len(by_step[1]) == 2 * len(proc.stats["generations"][0]["steps"][0]["layers"])
    for a, b in zip(by_step[0], by_step[1], strict=True):  # same layer and sample, in call order
        assert a["k"].shape == b["k"].shape and torch.equal(a["mask"], b["mask"])
        _check_reference(b)
    assert any(a["k"].shape != b["k"].shape for a, b in zip(by_step[1][::2], by_step[1][1::2], strict=True))


@pytest.mark.gpu
def test_processor_reuse_on_cuda_with_the_triton_backend(monkeypatch):
    """The GPU path (Triton estimate and kernel, padded text rows appended as dense rows): the reused step
    attends over the estimating step's blocks, as the float64 reference does with that mask."""
    pipe = build_tiny_hunyuan_pipeline(seed=0).to("cuda")
    proc = xattn_video.enable(pipe, threshold=THRESHOLD, stride=STRIDE, warmup_steps=0, refresh_every=2)
    rec = _processor_recorder(monkeypatch, proc)
    _hunyuan(pipe, steps=2)
    assert _blocks(proc.stats) == ["estimated", "reused"]
    calls = {(c["step"], c["call"]): c for c in rec.calls}
    for layer in range(len(proc.stats["generations"][0]["steps"][0]["layers"])):
        assert torch.equal(calls[(1, layer)]["mask"], calls[(0, layer)]["mask"])
        _check_reference({key: t.cpu() if torch.is_tensor(t) else t for key, t in calls[(1, layer)].items()})


def test_processor_refresh_needs_the_step():
    proc = XAttnProcessor(threshold=THRESHOLD, refresh_every=2)
    pipe = build_tiny_hunyuan_pipeline(seed=0)
    pipe.transformer.set_attn_processor(proc)
    with pytest.raises(RuntimeError, match="refresh_every=2"):
        _hunyuan(pipe, steps=1)


# ---------------------------------------------------------------------------------------------- backend


def test_backend_a14b_true_cfg_reuse_per_transformer_and_forward(monkeypatch):
    pipe = wan_pipeline("wan22_a14b")
    steps = 5
    pipe.scheduler.set_timesteps(steps)
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    high = [bool(t >= boundary) for t in pipe.scheduler.timesteps]
    assert high == [True, True, False, False, False]  # the swap to transformer_2 comes after step 1

    def where():
        state = attention_op.active()
        return dict(step=state.position.step, kind=state.kind, layer=state.self_calls - 1)

    session = xattn_video.enable(pipe, threshold=LOW_THRESHOLD, warmup_steps=1, refresh_every=2, **SPARSE)
    rec = _Recorder(monkeypatch, core_attention, where)
    generate_wan(pipe, "wan22_a14b", steps=steps)
    # step 1 estimates on transformer; step 2, the first on transformer_2, estimates though it is within k of
    # step 1 (its layers have blocks of their own); 3 reuses, 4 estimates
    assert _blocks(session.stats) == [None, "estimated", "estimated", "reused", "estimated"]
    calls = {(c["step"], c["kind"], c["layer"]): c for c in rec.calls}
    kinds = {step: sorted({c["kind"] for c in rec.calls if c["step"] == step}, key=str) for step in range(1, 5)}
    assert len(kinds[1]) == len(kinds[2]) == 2 and kinds[2] == kinds[3] == kinds[4]  # cond and uncond
    assert {k[0] for k in kinds[1]} != {k[0] for k in kinds[2]}  # another transformer
    n_layers = session.num_layers
    for kind in kinds[2]:
        for layer in range(n_layers):
            c3 = calls[(3, kind, layer)]
            assert torch.equal(c3["mask"], calls[(2, kind, layer)]["mask"])
            _check_reference(c3, block_size=SPARSE["block_size"])
    cond, uncond = kinds[2]
    assert any(not torch.equal(calls[(2, cond, i)]["mask"], calls[(2, uncond, i)]["mask"]) for i in range(n_layers))
    assert len(session.reuse) == 0  # the end of the pipeline call frees the kept blocks
    session.disable()


def test_backend_refresh_every_one_equals_today():
    pipe = wan_pipeline("wan21")
    session = xattn_video.enable(pipe, threshold=LOW_THRESHOLD, warmup_steps=1, **SPARSE)
    ref = generate_wan(pipe, "wan21", steps=3)
    session = xattn_video.enable(pipe, threshold=LOW_THRESHOLD, warmup_steps=1, refresh_every=1, **SPARSE)
    torch.testing.assert_close(generate_wan(pipe, "wan21", steps=3), ref, rtol=0, atol=0)
    assert _blocks(session.stats) == [None, "estimated", "estimated"]
    session = xattn_video.enable(pipe, threshold=LOW_THRESHOLD, warmup_steps=1, refresh_every=4, **SPARSE)
    assert (generate_wan(pipe, "wan21", steps=3) - ref).abs().max() > 0
    assert _blocks(session.stats) == [None, "estimated", "reused"]
    session.disable()


# ---------------------------------------------------------------------------------------------- unit and errors


def _qk(batch=1, heads=2, n=256, n_k=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, n, 16, generator=gen), torch.randn(batch, heads, n_k or n, 16, generator=gen)


def test_block_reuse_window_shapes_and_generations():
    reuse = BlockReuse(3)
    q, k = _qk()
    sel = object()

    def at(gen, step, q=q, k=k, key="a"):
        return reuse.slot(key, StepPosition(gen, step, 1000.0 - step), q, k)

    slot = at(0, 4)
    assert slot.selection is None
    slot.store(sel)
    assert at(0, 4).selection is None  # the same step again (another forward of that kind) estimates
    assert at(0, 5).selection is sel and at(0, 6).selection is sel
    assert at(0, 6, key="b").selection is None  # another call kind keeps its own
    q2, k2 = _qk(n=250)  # same block count, other token count: never reused
    assert at(0, 6, q2, k2).selection is None and reuse.mismatches == 1
    assert at(0, 6, *_qk(batch=2)).selection is None and at(0, 6, *_qk(heads=3)).selection is None
    assert at(0, 7).selection is None and len(reuse) == 0  # past the window: dropped
    at(0, 8).store(sel)
    assert at(1, 9).selection is None and len(reuse) == 0  # a new generation forgets everything
    at(1, 9).store(sel)
    assert at(1, 3).selection is None and len(reuse) == 0  # the count went back (tracker reset)
    assert BlockReuse(1).slot("a", StepPosition(0, 1, 1.0), q, k) is None
    assert BlockReuse(2).slot("a", None, q, k) is None


@pytest.mark.parametrize(
    "value, error", [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError), ("2", TypeError)]
)
def test_bad_refresh_every_is_a_one_line_error(value, error):
    for make in (lambda: XAttnProcessor(refresh_every=value), lambda: XAttnSession(refresh_every=value)):
        with pytest.raises(error, match="refresh_every must be an int >= 1") as info:
            make()
        assert "\n" not in str(info.value)
    with pytest.raises(error, match="refresh_every"):
        xattn_video.enable(build_tiny_hunyuan_pipeline(seed=0), refresh_every=value)


def test_generate_config_refresh_every():
    from xattn_video.pipelines.generate import apply_variant
    from xattn_video.pipelines.generate_config import ConfigError, load_config

    default = {v.name: v for v in load_config().variants}
    assert default["xattn"].refresh_every == 1 and default["dense"].refresh_every is None
    assert "refresh_every" not in default["xattn"].settings()  # the default leaves video fingerprints as they were
    cfg = load_config(
        None, ["attention.refresh_every=3", "attention.variants.k5.mode=xattn", "attention.variants.k5.refresh_every=5"]
    )
    variants = {v.name: v for v in cfg.variants}
    assert (variants["xattn"].refresh_every, variants["k5"].refresh_every) == (3, 5)
    assert variants["k5"].settings()["refresh_every"] == 5
    for bad in ("0", "-1", "1.5", "true", "two"):
        with pytest.raises(ConfigError, match=r"^attention\.refresh_every = .* an integer >= 1") as info:
            load_config(None, [f"attention.refresh_every={bad}"])
        assert "\n" not in str(info.value)
    pipe = build_tiny_hunyuan_pipeline(seed=0)
    handle = apply_variant(pipe, variants["k5"], steps=4)
    assert handle.refresh_every == 5 and handle.settings()["refresh_every"] == 5
    handle.detach()
