"""The ``xattn`` diffusers backend on a GPU: correctness first, then a short table.

1. op level, bf16 on CUDA (Triton kernels), 24 heads x 128: threshold 1.0 against diffusers' native backend,
   without a mask and with HunyuanVideo's / HunyuanVideo 1.5's masks; sparse valid rows against
   ``xattn_attention`` on the valid segment;
2. tiny pipelines on CUDA (Wan 2.1, Wan 2.2 A14B, HunyuanVideo 1.5) at threshold 1.0 against stock;
3. a tiny Wan transformer compiled with Inductor: equal to eager, no recompilation after step 1;
4. timing: native SDPA vs the backend at threshold 0.9 (sparse step) and on a dense step, at several token
   counts (where ``min_len`` should sit).

    python bench/backend_check.py [--quick] [--device cuda]

(``--device cpu --quick`` runs the checks on the CPU, with the torch reference backend, to try the script.)
"""

from __future__ import annotations

import argparse
import time

import torch

import xattn_video
from xattn_video import xattn_attention
from xattn_video.diffusion import _diffusers_private as private
from xattn_video.diffusion.attention_op import ForwardState, activate, deactivate
from xattn_video.diffusion.backend import XAttnSession, xattn_backend
from xattn_video.diffusion.steps import StepPosition
from xattn_video.testing.synthetic import video_like_qkv

DEVICE = "cuda"


def op(session, q, k, v, mask=None, dense=False):
    activate(ForwardState(session, StepPosition(0, 1, 900.0), dense))
    try:
        return xattn_backend(q, k, v, attn_mask=mask)
    finally:
        deactivate()


def native(q, k, v, mask=None):
    return private.native_backend()(query=q, key=k, value=v, attn_mask=mask)


def qkv(frames, height, width, text=0, seed=0):
    q, k, v = video_like_qkv(frames=frames, height=height, width=width, text_tokens=text, heads=24, head_dim=128,
                             dtype=torch.bfloat16, device=DEVICE, seed=seed)
    return [t.transpose(1, 2) for t in (q, k, v)]  # [B, S, H, D] as diffusers passes them


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def check_op():
    q, k, v = qkv(8, 24, 32, text=64)  # 6,208 tokens
    n = q.shape[1]
    length = n - 40
    valid = torch.arange(n, device=DEVICE) < length
    masks = {"none": None, "key_padding": valid[None, None, None, :],
             "outer": (valid[:, None] & valid[None, :])[None, None]}
    session = XAttnSession(threshold=1.0, min_len=1024)
    for name, mask in masks.items():
        for dense in (False, True):
            out, ref = op(session, q, k, v, mask, dense), native(q, k, v, mask)
            rows = slice(None) if name != "outer" else slice(0, length)
            err = rel(out[:, rows], ref[:, rows])
            print(f"op t=1.0 mask={name:12s} dense={dense!s:5s}: rel err {err:.2e}")
            assert err < 2e-2, err
    session = XAttnSession(threshold=0.9, min_len=1024)
    out = op(session, q, k, v, masks["key_padding"])
    seg = [t[:, :length].transpose(1, 2) for t in (q, k, v)]
    expected = xattn_attention(*seg, threshold=0.9, stride=8).transpose(1, 2)
    err = rel(out[:, :length], expected)
    pad = rel(out[:, length:], native(q, k, v, masks["key_padding"])[:, length:])
    print(f"op t=0.9 key_padding: valid rows vs xattn_attention {err:.2e}, padded rows vs native {pad:.2e}, "
          f"density {session.stats['totals']['density']:.3f}")
    assert err < 1e-2 and pad < 2e-2


def check_pipelines():
    from xattn_video.testing.tiny_pipelines import build_tiny_pipeline, tiny_call_kwargs

    for family in ("wan21", "wan22_a14b", "hunyuan15"):
        pipe = build_tiny_pipeline(family, seed=0, device=DEVICE)
        kw = dict(prompt="a cat walks", **tiny_call_kwargs(family, steps=3), output_type="latent")
        ref = pipe(**kw, generator=torch.Generator(DEVICE).manual_seed(0)).frames
        session = xattn_video.enable(pipe, threshold=1.0, stride=4, block_size=16, min_len=16)
        out = pipe(**kw, generator=torch.Generator(DEVICE).manual_seed(0)).frames
        modes = [s["mode"] for g in session.stats["generations"] for s in g["steps"]]
        err = float((out - ref).abs().max())
        print(f"pipeline {family}: threshold 1.0 vs stock max abs diff {err:.2e}, steps {modes}")
        assert err < 1e-3 and modes == ["sparse"] * 3
        session.disable()


def check_compile():
    from diffusers import WanTransformer3DModel

    from xattn_video.testing.tiny_wan import TINY_WAN_TRANSFORMER_CONFIG

    torch.manual_seed(0)
    t = WanTransformer3DModel(**TINY_WAN_TRANSFORMER_CONFIG).eval().to(DEVICE)
    x, text = torch.randn(1, 4, 3, 16, 24, device=DEVICE), torch.randn(1, 7, 16, device=DEVICE)
    xattn_video.enable(t, threshold=0.3, stride=4, block_size=16, min_len=16, warmup_steps=1)

    def run():
        outs = []
        with torch.no_grad():
            for ts in (999.0, 900.0, 700.0):
                with t.cache_context("cond"):
                    outs.append(t(hidden_states=x, timestep=torch.tensor([ts], device=DEVICE),
                                  encoder_hidden_states=text, return_dict=False)[0])
        t._reset_stateful_cache()
        return outs

    eager = run()
    t.compile()
    start = time.perf_counter()
    first = run()
    print(f"compile (inductor): first generation {time.perf_counter() - start:.1f} s")
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = run()
    err = max(float((a - b).abs().max()) for a, b in zip(eager + eager, first + second, strict=True))
    print(f"compiled vs eager max abs diff {err:.2e}, no recompilation in generation 2")
    assert err < 1e-4


def bench(quick: bool):
    def timed(fn, *args, reps=5, **kwargs):
        fn(*args, **kwargs)
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn(*args, **kwargs)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps

    print("\n| tokens | native SDPA ms | xattn dense step ms | xattn t=0.9 ms | density | sparse / native |")
    print("|---|---|---|---|---|---|")
    shapes = [(4, 16, 32), (8, 16, 32), (8, 32, 32), (16, 32, 32), (16, 32, 64), (32, 32, 64)]
    for frames, h, w in shapes[: 4 if quick else None]:
        q, k, v = qkv(frames, h, w)
        dense_s = XAttnSession(threshold=0.9, min_len=0)
        sparse_s = XAttnSession(threshold=0.9, min_len=0)
        t_native = timed(native, q, k, v)
        t_dense = timed(op, dense_s, q, k, v, dense=True)
        t_sparse = timed(op, sparse_s, q, k, v)
        density = sparse_s.stats["totals"]["density"]
        print(f"| {q.shape[1]:,} | {t_native:.2f} | {t_dense:.2f} | {t_sparse:.2f} | {density:.3f} | "
              f"{t_sparse / t_native:.2f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    print(torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE, "torch", torch.__version__)
    check_op()
    check_pipelines()
    if DEVICE == "cuda":  # Inductor on two CPU cores takes minutes
        check_compile()
        bench(args.quick)


if __name__ == "__main__":
    main()
