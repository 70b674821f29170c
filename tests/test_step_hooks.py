"""Denoising steps for the ``xattn`` backend through diffusers' hooks: Wan 2.2 A14B's transformer swap, TI2V's
per-token timestep, true and batched CFG, generations in a row, warmup by fraction, dense layers, and direct
transformer calls (no cache context)."""

from __future__ import annotations

import pytest
import torch
from backend_helpers import LOW_THRESHOLD, SPARSE, generate, pipeline, step_rows

import xattn_video
from xattn_video.diffusion.steps import StepTracker


def _modes(stats, generation=0):
    return [mode for gen, _, mode, _ in step_rows(stats) if gen == generation]


def _forward_counter(module):
    calls = []
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_a14b_swap_does_not_restart_warmup():
    pipe = pipeline("wan22_a14b")
    pipe.scheduler.set_timesteps(3)
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    assert [bool(t >= boundary) for t in pipe.scheduler.timesteps] == [True, False, False]  # swap after step 0
    (high, high_handle), (low, low_handle) = _forward_counter(pipe.transformer), _forward_counter(pipe.transformer_2)
    session = xattn_video.enable(pipe, threshold=LOW_THRESHOLD, warmup_steps=2, **SPARSE)
    for _ in range(2):  # two generations: each starts again on the high-noise expert at step 0
        generate(pipe, "wan22_a14b", steps=3)
    high_handle.remove()
    low_handle.remove()
    assert (len(high), len(low)) == (2 * 2, 2 * 4)  # true CFG: two forwards a step
    # transformer_2 runs steps 1 and 2: step 1 is still warmup, step 2 is sparse (a count per transformer
    # would have made both of its steps warmup)
    assert _modes(session.stats, 0) == _modes(session.stats, 1) == ["dense", "dense", "sparse"]
    # by fraction: 0.75 of 4 steps -> 3 dense, the third on transformer_2
    session = xattn_video.enable(pipe, threshold=LOW_THRESHOLD, warmup_fraction=0.75, **SPARSE)
    generate(pipe, "wan22_a14b", steps=4)
    assert _modes(session.stats) == ["dense", "dense", "dense", "sparse"]
    session.disable()


def test_ti2v_per_token_timestep_counts_steps():
    pipe = pipeline("wan22_ti2v")
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["timestep"].clone()) if kw.get("timestep") is not None else None,
        with_kwargs=True,
    )
    session = xattn_video.enable(pipe, threshold=LOW_THRESHOLD, warmup_steps=1, **SPARSE)
    generate(pipe, "wan22_ti2v", steps=3)
    handle.remove()
    assert seen[0].dim() == 2 and seen[0][0, 0] == 0 and seen[0].max() > 0  # [B, tokens], 0 on the image frame
    steps = session.stats["generations"][0]["steps"]
    assert [s["timestep"] for s in steps] == [float(t) for t in pipe.scheduler.timesteps]
    assert _modes(session.stats) == ["dense", "sparse", "sparse"]
    session.disable()


def test_true_cfg_no_cfg_and_batched_cfg():
    pipe = pipeline("wan21")
    session = xattn_video.enable(pipe, threshold=LOW_THRESHOLD, warmup_steps=1, **SPARSE)
    generate(pipe, "wan21", steps=3)  # guidance 5: cond and uncond forwards each step
    generate(pipe, "wan21", steps=3, guidance_scale=1.0)  # one forward a step
    stats = session.stats
    assert _modes(stats, 0) == _modes(stats, 1) == ["dense", "sparse", "sparse"]
    calls = [[layer["calls"] for layer in s["layers"]] for g in stats["generations"] for s in g["steps"]]
    assert calls == [[2, 2]] * 3 + [[1, 1]] * 3
    # batched CFG (LTX's "cond_uncond"): one forward of batch 2 a step
    transformer = pipe.transformer
    session = xattn_video.enable(transformer, threshold=LOW_THRESHOLD, warmup_steps=1, **SPARSE)
    x, text = torch.randn(2, 4, 3, 16, 24), torch.randn(2, 7, 16)
    with torch.no_grad():
        for t in (999.0, 900.0, 700.0):
            with transformer.cache_context("cond_uncond"):
                transformer(hidden_states=x, timestep=torch.full((2,), t), encoder_hidden_states=text)
    assert _modes(session.stats) == ["dense", "sparse", "sparse"]
    session.disable()


def test_generations_in_a_row_and_warmup_fraction_for_any_step_count():
    pipe = pipeline("wan21")
    session = xattn_video.enable(pipe, threshold=LOW_THRESHOLD, warmup_fraction=0.5, **SPARSE)
    for steps in (2, 4, 5, 1):
        generate(pipe, "wan21", steps=steps)
    stats = session.stats
    assert [_modes(stats, g) for g in range(4)] == [
        ["dense", "sparse"],
        ["dense", "dense", "sparse", "sparse"],
        ["dense", "dense", "dense", "sparse", "sparse"],  # ceil(0.5 * 5) = 3
        ["dense"],
    ]
    session.disable()


def test_dense_layers():
    pipe = pipeline("wan21")
    session = xattn_video.enable(pipe, threshold=LOW_THRESHOLD, dense_layers=(1,), **SPARSE)
    generate(pipe, "wan21", steps=2)
    for step in session.stats["generations"][0]["steps"]:
        assert [(layer["layer"], layer["mode"]) for layer in step["layers"]] == [(0, "sparse"), (1, "dense")]
        assert step["layers"][1]["density"] == 1.0 and step["layers"][0]["density"] < 1.0
    with pytest.raises(ValueError, match=r"dense_layers \[2\] out of range.*2 transformer blocks"):
        xattn_video.enable(pipe, dense_layers=(0, 2))
    session.disable()


def test_direct_calls_fall_back_to_timestep_counting():
    transformer = pipeline("wan21").transformer
    session = xattn_video.enable(transformer, threshold=LOW_THRESHOLD, warmup_steps=1, **SPARSE)
    x, text = torch.randn(1, 4, 3, 16, 24), torch.randn(1, 7, 16)

    def call(t, latents=x):
        with torch.no_grad():
            transformer(hidden_states=latents, timestep=torch.tensor([t]), encoder_hidden_states=text)
        return session.tracker.position

    positions = [call(999.0), call(999.0), call(800.0), call(600.0), call(999.0), call(999.0, torch.randn_like(x))]
    # cond + uncond at 999 (same latents: one step), two lower timesteps, then a rise (a new generation), then
    # the top timestep with fresh latents at step 0 (another new generation)
    assert [(p.generation, p.step) for p in positions] == [(0, 0), (0, 0), (0, 1), (0, 2), (1, 0), (2, 0)]
    assert _modes(session.stats) == ["dense", "sparse", "sparse"]
    # the pipeline's step index, when its cache context carries one (Wan T2V does), is taken as it is
    session = xattn_video.enable(transformer, threshold=LOW_THRESHOLD, warmup_fraction=0.5, **SPARSE)
    with torch.no_grad():
        for i in (4, 5):
            with transformer.cache_context("cond", step_index=i, num_inference_steps=10):
                transformer(hidden_states=x, timestep=torch.tensor([900.0 - i]), encoder_hidden_states=text)
    rows = step_rows(session.stats)
    assert [(step, mode) for _, step, mode, _ in rows] == [(4, "dense"), (5, "sparse")]
    # without a pipeline (no scheduler, no step count in a cache context) warmup_fraction cannot work
    session = xattn_video.enable(transformer, threshold=LOW_THRESHOLD, warmup_fraction=0.5, **SPARSE)
    with pytest.raises(RuntimeError, match="warmup_fraction needs the number of denoising steps"):
        call(999.0)
    session.disable()


def test_tracker_reads_the_highest_timestep_and_context_names():
    tracker = StepTracker()
    per_token = torch.cat([torch.zeros(1, 96), torch.full((1, 192), 950.0)], dim=1)  # TI2V: image frame at 0
    assert tracker.observe(per_token, context="cond").timestep == 950.0
    assert (tracker.observe(per_token, context="uncond").step, tracker.position.forward) == (0, 1)
    assert tracker.observe(per_token, context="cond").generation == 1  # "cond" again at the top timestep
