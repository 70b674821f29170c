"""Ulysses checks on tiny transformers: P processes (gloo on CPU, or any backend torchrun gives) against one.

:func:`run_ranks` spawns ``world`` processes on this machine; :func:`compare_case` runs one case in each of them:
a tiny Wan or HunyuanVideo transformer (``heads`` heads of 16 channels, the same random weights and inputs on every
rank) is called for three denoising steps twice, once as a single process would (no parallelism) and once under
``ContextParallelConfig(ulysses_degree=P)``, and the two outputs and the XAttention statistics are returned. The
tests (tests/test_parallel.py) and the GPU check (bench/ulysses_check.py) both use it.

Cases: ``attention`` is "native" (diffusers' SDPA backend) or "xattn" (the ``xattn`` backend, one dense warmup step
then sparse steps at a low threshold with 16-token blocks, so that sparse steps really skip blocks). HunyuanVideo
gets a text of ``text_tokens`` of which the last ``text_pad`` are padding, so its attention has a key-padding mask
and the interleaved video/text order under Ulysses.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from collections.abc import Callable

import torch

__all__ = ["TIMESTEPS", "build_transformer", "compare_case", "compare_cases", "run_ranks"]

TIMESTEPS = (900.0, 600.0, 300.0)
XATTN = dict(threshold=0.3, stride=4, block_size=16, min_len=16, warmup_steps=1)


def build_transformer(family: str, heads: int, seed: int = 0, device: str = "cpu") -> torch.nn.Module:
    """A tiny random transformer of ``family`` ("wan" or "hunyuan") with ``heads`` heads of 16 channels."""
    torch.manual_seed(seed)
    if family == "wan":
        from diffusers import WanTransformer3DModel

        from .tiny_wan import TINY_WAN_TRANSFORMER_CONFIG

        model = WanTransformer3DModel(**{**TINY_WAN_TRANSFORMER_CONFIG, "num_attention_heads": heads})
    elif family == "hunyuan":
        from diffusers import HunyuanVideoTransformer3DModel

        from .tiny import TINY_TRANSFORMER_CONFIG

        model = HunyuanVideoTransformer3DModel(**{**TINY_TRANSFORMER_CONFIG, "num_attention_heads": heads})
    else:
        raise ValueError(f"family must be 'wan' or 'hunyuan', got {family!r}")
    return model.to(device).eval()


def _inputs(family: str, device: str, frames: int, text_tokens: int, text_pad: int) -> dict:
    g = torch.Generator().manual_seed(1)
    if family == "wan":  # patch 1x2x2: frames x 8 x 12 tokens
        return {
            "hidden_states": torch.randn(1, 4, frames, 16, 24, generator=g).to(device),
            "encoder_hidden_states": torch.randn(1, text_tokens, 16, generator=g).to(device),
        }
    mask = torch.ones(1, text_tokens, dtype=torch.long)
    if text_pad:
        mask[:, -text_pad:] = 0
    return {  # patch 1: frames x 8 x 12 tokens, then the text
        "hidden_states": torch.randn(1, 4, frames, 8, 12, generator=g).to(device),
        "encoder_hidden_states": torch.randn(1, text_tokens, 16, generator=g).to(device),
        "encoder_attention_mask": mask.to(device),
        "pooled_projections": torch.randn(1, 8, generator=g).to(device),
        "guidance": torch.tensor([3500.0], device=device),
    }


def _run(model, inputs: dict, device: str, graphs: list | None = None) -> tuple[list[torch.Tensor], list[float]]:
    outs, times = [], []
    for t in TIMESTEPS:
        start = time.perf_counter()
        with torch.no_grad():
            out = model(**inputs, timestep=torch.tensor([t], device=device), return_dict=False)[0]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        outs.append(out.float().cpu().clone())  # clone: an op, so a gathered output is waited for
        if graphs is not None:  # Dynamo's graphs so far: a recompilation adds one
            graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    return outs, times


def _rows(stats: dict) -> list[tuple]:
    """(step, layer, mode, kept, total) of every recorded self-attention layer."""
    return [
        (s["step"], layer["layer"], layer["mode"], layer["kept_blocks"], layer["total_blocks"])
        for g in stats["generations"]
        for s in g["steps"]
        for layer in s["layers"]
    ]


def compare_case(
    family: str,
    attention: str,
    heads: int,
    *,
    device: str = "cpu",
    frames: int = 3,
    text_tokens: int = 16,
    text_pad: int = 5,
    dtype: torch.dtype = torch.float32,
    direct: bool = False,
    xattn: dict | None = None,
    balance_heads: bool = False,
    compile: bool = False,
    **cp_options,
) -> dict:
    """One case in this process (``torch.distributed`` initialised): outputs and stats, single and parallel.
    ``direct``: call diffusers' ``model.enable_parallelism`` (the model's own plan) instead of ours; ``xattn``:
    XAttention settings over :data:`XATTN`; ``balance_heads``:
    head balancing (:mod:`xattn_video.diffusion.head_balance`); ``compile``: compile the
    transformer (``aot_eager``) and record Dynamo's graph count after each step (``graphs``);
    ``cp_options``: more ``ContextParallelConfig`` arguments (``ring_degree``, ``ulysses_anything``)."""
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    import xattn_video
    from xattn_video.diffusion._diffusers_private import cpu_device_index
    from xattn_video.diffusion.parallel_plans import enable_parallelism

    world = dist.get_world_size()
    inputs = _inputs(family, device, frames, text_tokens, text_pad)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    result = {}
    for mode in ("single", "parallel"):
        model = build_transformer(family, heads, device=device).to(dtype)
        session = None
        if attention == "xattn":
            session = xattn_video.enable(model, integration="backend", **{**XATTN, **(xattn or {})})
        if mode == "parallel":
            degrees = {"ulysses_degree": world} if "ring_degree" not in cp_options else {}
            config = ContextParallelConfig(**degrees, **cp_options)
            if direct:
                with cpu_device_index():
                    model.enable_parallelism(config=config)
            else:
                enable_parallelism(model, config, balance_heads=balance_heads)
        graphs: list[int] = []
        if compile:
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            model.compile(backend="aot_eager")
        outs, times = _run(model, inputs, device, graphs if compile else None)
        result[mode] = {"outputs": outs, "times": times, "graphs": graphs}
        if session is not None:
            stats = session.stats
            result[mode]["rows"] = _rows(stats)
            result[mode]["native_calls"] = stats.get("native_calls", {})
            if mode == "parallel":
                from xattn_video.diffusion.parallel import rank_balance

                result[mode]["balance"] = rank_balance(stats)
                if balance_heads:
                    result[mode]["head_balance"] = session.head_balance.summary()
            session.detach()
    return result


def _worker(rank: int, world: int, init: str, out_dir: str, fn: Callable, args: tuple, kwargs: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:  # returned to the parent: tests assert on refusals
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(world: int, fn: Callable, *args, **kwargs) -> list:
    """``fn(*args, **kwargs)`` in each of ``world`` spawned processes joined by gloo; the list of their results
    (an exception becomes ``{"error": "Type: message", "traceback": ...}``)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        init = "file://" + os.path.join(out_dir, "rendezvous")
        mp.spawn(_worker, args=(world, init, out_dir, fn, args, kwargs), nprocs=world, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def compare_cases(cases: list[dict]) -> list:
    """:func:`compare_case` for each dict of arguments, in one process (a refusal becomes ``{"error": ...}``)."""
    results = []
    for case in cases:
        try:
            results.append(compare_case(**case))
        except Exception as exc:
            results.append({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
    return results
