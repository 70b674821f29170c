"""``torch.compile`` of a transformer running the ``xattn`` backend: the ``xattn_video::attention`` custom op (with
its fake implementation) keeps the step and layer bookkeeping out of the graph, so a compiled tiny Wan
transformer matches eager across dense and sparse steps with no recompilation after the first step.

CI compiles with ``backend="aot_eager"`` (Dynamo's tracing, the fake implementation and AOT functionalization,
without Inductor's code generation, which takes minutes on two CPU cores); ``pipe.transformer.compile()`` with
Inductor was checked by hand the same way (see the README)."""

from __future__ import annotations

import pytest
import torch
from backend_helpers import LOW_THRESHOLD, SPARSE
from diffusers import WanTransformer3DModel

import xattn_video
from xattn_video.diffusion.attention_op import ForwardState, activate, deactivate
from xattn_video.diffusion.backend import XAttnSession
from xattn_video.diffusion.steps import StepPosition
from xattn_video.testing.tiny_wan import TINY_WAN_TRANSFORMER_CONFIG

TIMESTEPS = (999.0, 900.0, 700.0, 500.0)


def _run(transformer, x, text, generations=1):
    outs = []
    with torch.no_grad():
        for _ in range(generations):
            for t in TIMESTEPS:
                for name in ("cond", "uncond"):
                    with transformer.cache_context(name):
                        outs.append(
                            transformer(
                                hidden_states=x, timestep=torch.tensor([t]), encoder_hidden_states=text[name],
                                return_dict=False,
                            )[0]
                        )
            transformer._reset_stateful_cache()  # what the pipeline does at the end of a call
    return outs


def _counts(stats):
    """Steps, modes and block counts of every layer (not the times, nor the generation numbers)."""
    keys = ("mode", "kept_blocks", "total_blocks", "calls")
    return [
        (s["step"], s["timestep"], [(layer["layer"], *(layer[k] for k in keys)) for layer in s["layers"]])
        for g in stats["generations"]
        for s in g["steps"]
    ]


def test_compiled_transformer_matches_eager_without_recompiling():
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(**TINY_WAN_TRANSFORMER_CONFIG).eval()
    x = torch.randn(1, 4, 3, 16, 24)
    text = {"cond": torch.randn(1, 7, 16), "uncond": torch.randn(1, 7, 16)}
    session = xattn_video.enable(transformer, threshold=LOW_THRESHOLD, warmup_steps=1, **SPARSE)
    eager = _run(transformer, x, text, generations=2)
    eager_stats = session.stats
    session.reset_stats()

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    transformer.compile(backend="aot_eager")
    try:
        with torch.no_grad(), transformer.cache_context("cond"):  # step 0 compiles
            first = transformer(hidden_states=x, timestep=torch.tensor([TIMESTEPS[0]]),
                                encoder_hidden_states=text["cond"], return_dict=False)[0]
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 1
        transformer._reset_stateful_cache()
        session.reset_stats()
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled = _run(transformer, x, text, generations=2)
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(first, eager[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the bookkeeping ran at run time inside the op: the same steps, modes and densities as eager
    assert _counts(session.stats) == _counts(eager_stats)
    modes = [s["mode"] for g in session.stats["generations"] for s in g["steps"]]
    assert modes == ["dense", "sparse", "sparse", "sparse"] * 2
    session.disable()


@pytest.mark.parametrize("masked", [False, True])
def test_custom_op_passes_opcheck(masked):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 64, 2, 16, generator=g) for _ in range(3))
    mask = (torch.arange(64)[None, :] < torch.tensor([64, 40])[:, None])[:, None, None, :] if masked else None
    session = XAttnSession(threshold=LOW_THRESHOLD, **SPARSE)
    activate(ForwardState(session, StepPosition(0, 1, 900.0), False))
    try:
        torch.library.opcheck(torch.ops.xattn_video.attention.default, (q, k, v, mask, None, False))
    finally:
        deactivate()
