"""Train the video fixture (xattn_video/testing/fixture_model) with flow matching on procedural clips.

    python bench/train_fixture.py --out outputs/fixture --seconds 330          # one GPU, about 5 minutes

Each step draws fresh clips (:func:`xattn_video.testing.procedural.sample_specs`, rendered on the device),
mostly 16 frames of 64x64 pixels (4,096 video tokens), every fourth step 8 frames of 32x32 with four times
the clips (the size of the CPU tests). Flow matching: ``x_t = (1 - s) x_0 + s noise`` with ``s`` logit-normal,
the transformer predicts ``noise - x_0`` (mean squared error); 10% of captions are dropped to the empty
caption for classifier-free guidance. AdamW, linear warmup then cosine decay over the time budget, bf16
autocast, float32 master weights; the weights are stored in float16 (under 10 MB).

Writes under --out: ``fixture_model/`` (transformer/ and caption_encoder/, rewritten every --save-every
seconds and at the end), ``checkpoint.pt`` (float32 weights, optimiser and random states, step and seconds
trained; written with them), ``train_log.json`` (loss per step, validation loss at fixed noise levels),
``samples.npz`` (uint8 videos of held-out captions, made through :func:`xattn_video.testing.fixture.load_fixture`
and :func:`~xattn_video.testing.fixture.generate`).

Variant fixtures (research, not the shipped one): ``--config-json '{"num_attention_heads": 4, "num_layers": 3}'``
overrides fields of the shipped ``TRANSFORMER_CONFIG``; with --frames/--size (the main size, also that of the
validation and samples), --small-frames/--small-size and a separate --out (``bench/fixture_v2_probe.py``).

Families: ``--family hunyuan`` (default, the shipped fixture's ``HunyuanVideoTransformer3DModel``) or ``--family wan``
(a ``WanTransformer3DModel`` of the same size, ``WAN_TRANSFORMER_CONFIG``; --config-json overrides that family's
fields). The saved ``fixture_model/transformer/config.json`` names the class (``_class_name``), which is what
``load_fixture`` loads.

    python bench/train_fixture.py --family wan --out outputs/fixture_wan --seconds 320   # one GPU

A run into an --out that holds a checkpoint resumes it: training goes on until the seconds trained in all runs
reach --seconds (the learning-rate schedule runs on those seconds, so a run cut by a time limit, or one per
device call, continues where it stopped; raise --seconds to train an ended run longer). --restart starts over.

    python bench/train_fixture.py --out outputs/fixture_long --seconds 1200   # call 1: stopped by its time limit
    python bench/train_fixture.py --out outputs/fixture_long --seconds 1200   # call 2: resumes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils import logging as diffusers_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xattn_video.testing.fixture import (  # noqa: E402
    FAMILIES,
    CaptionEncoder,
    generate,
    load_fixture,
    transformer_inputs,
)
from xattn_video.testing.procedural import render, sample_specs  # noqa: E402

EVAL_SEED = 90_000  # held-out specs: training draws specs from seeds of its own generator
VAL_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)


def save_fixture(transformer, encoder, folder: Path) -> None:
    """Write the fixture (float16 weights) to ``folder`` through a temporary folder renamed over it."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    state_dtype = next(transformer.parameters()).dtype
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # the float16 cast is for storage only: no "keep in float32" notice
    try:
        transformer.to(torch.float16).save_pretrained(tmp / "transformer", safe_serialization=True)
        transformer.to(state_dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    encoder.save(tmp / "caption_encoder")
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


CHECKPOINT = "checkpoint.pt"


def save_checkpoint(path: Path, transformer, encoder, opt, *, step: int, seconds: float, rng, log: dict) -> None:
    """Everything a later run needs to go on training (float32 weights, optimiser, random states, step, seconds
    trained, the log so far), through a temporary file renamed over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    state = {
        "transformer": transformer.state_dict(),
        "encoder": encoder.state_dict(),
        "optimizer": opt.state_dict(),
        "step": step,
        "seconds": seconds,
        "python_rng": rng.getstate(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "log": log,
    }
    torch.save(state, tmp)
    os.replace(tmp, path)


def flow_loss(transformer, encoder, x0, captions, sigma, noise) -> torch.Tensor:
    s = sigma.view(-1, 1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    text, mask, pooled = encoder(captions)
    pred = transformer(
        hidden_states=xt,
        timestep=sigma * 1000,
        return_dict=False,
        **transformer_inputs(transformer, text, mask, pooled),
    )[0]
    return F.mse_loss(pred.float(), (noise - x0).float())


def transformer_config(overrides: str | None, family: str = "hunyuan") -> dict:
    """The fixture config of ``family`` (``TRANSFORMER_CONFIG`` or ``WAN_TRANSFORMER_CONFIG``) with the fields of
    the JSON object ``overrides`` replaced."""
    config = dict(FAMILIES[family][1])
    if not overrides:
        return config
    try:
        extra = json.loads(overrides)
    except json.JSONDecodeError as exc:
        raise SystemExit(
            f"--config-json is not valid JSON ({exc}); expected an object such as '{{\"num_layers\": 3}}'"
        ) from None
    if not isinstance(extra, dict):
        raise SystemExit(f"--config-json must be a JSON object, got {type(extra).__name__}")
    unknown = sorted(set(extra) - set(config))
    if unknown:
        raise SystemExit(f"--config-json has unknown fields {unknown}; accepted: {', '.join(config)}")
    for name, value in extra.items():  # JSON lists where the config holds tuples (rope_axes_dim, patch_size)
        if isinstance(config[name], tuple) and isinstance(value, list):
            extra[name] = tuple(value)
    return config | extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=330.0, help="training time budget (the LR schedule's)")
    parser.add_argument("--batch", type=int, default=32, help="clips per step at the large size")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--small-frames", type=int, default=8)
    parser.add_argument("--small-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--warmup", type=int, default=150, help="LR warmup steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=float, default=90.0)
    parser.add_argument("--samples", type=int, default=8, help="held-out captions to sample at the end")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--family", choices=sorted(FAMILIES), default="hunyuan", help="transformer class: HunyuanVideo or Wan"
    )
    parser.add_argument(
        "--config-json", default=None, help="JSON object of the family's config fields to override (variant fixtures)"
    )
    parser.add_argument("--restart", action="store_true", help="start over even if --out holds a checkpoint")
    parser.add_argument(
        "--init",
        type=Path,
        default=None,
        help="a fixture_model folder whose weights start a new run (fine-tuning, e.g. the shipped fixture at "
        "another size; fresh optimiser and schedule); its transformer config must be this run's",
    )
    args = parser.parse_args(argv)
    config = transformer_config(args.config_json, args.family)

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    import diffusers

    transformer = getattr(diffusers, FAMILIES[args.family][0])(**config).to(device).train()
    encoder = CaptionEncoder().to(device).train()
    params = list(transformer.parameters()) + list(encoder.parameters())
    n_params = sum(p.numel() for p in params)
    print(f"parameters: {n_params / 1e6:.2f} M ({2 * n_params / 1e6:.1f} MB in float16)", flush=True)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    # fixed validation batch: held-out specs, fixed noise, each at the VAL_SIGMAS
    val_specs = sample_specs(8, EVAL_SEED + 1)
    val_x0 = render(val_specs, args.frames, args.size, args.size, device) * 2 - 1
    gen = torch.Generator(device="cpu").manual_seed(1)
    val_noise = torch.randn(val_x0.shape, generator=gen).to(device)
    val_captions = [s.caption for s in val_specs]

    def validate() -> dict:
        transformer.eval()
        out = {}
        with torch.no_grad(), autocast:
            for sig in VAL_SIGMAS:
                sigma = torch.full((len(val_specs),), sig, device=device)
                out[str(sig)] = float(flow_loss(transformer, encoder, val_x0, val_captions, sigma, val_noise))
        transformer.train()
        return out

    log = {
        "config": vars(args) | {"out": str(args.out), "init": args.init and str(args.init)},
        "family": args.family,
        "transformer_config": config,
        "parameters": n_params,
        "steps": [],
        "validation": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = args.out / "fixture_model"
    checkpoint = args.out / CHECKPOINT
    step, before = 0, 0.0  # steps and seconds trained by earlier runs into --out
    if checkpoint.exists() and not args.restart:
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        trained_config = json.dumps(state["log"]["transformer_config"], sort_keys=True)
        trained = (state["log"].get("family", "hunyuan"), trained_config)
        if trained != (args.family, json.dumps(config, sort_keys=True)):
            raise SystemExit(
                f"{checkpoint} was trained with another transformer config (--family {trained[0]}, --config-json); "
                "use --restart or another --out"
            )
        transformer.load_state_dict(state["transformer"])
        encoder.load_state_dict(state["encoder"])
        opt.load_state_dict(state["optimizer"])
        step, before = state["step"], state["seconds"]
        rng.setstate(state["python_rng"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        log = state["log"] | {"config": log["config"]}
        log.setdefault("resumed", []).append({"step": step, "seconds": round(before, 2)})
        print(f"resuming {checkpoint}: step {step}, {before:.0f} of {args.seconds:.0f} s trained", flush=True)
    elif args.init is not None:
        start = load_fixture(args.init, device=device, dtype=torch.float32)
        try:
            transformer.load_state_dict(start.transformer.state_dict())
        except RuntimeError as exc:
            raise SystemExit(f"--init {args.init}: its transformer is not this run's config ({exc})") from None
        encoder.load_state_dict(start.encoder.state_dict())
        log["init"] = str(args.init)
        print(f"starting from the weights of {args.init}", flush=True)
    t0 = time.perf_counter() - before  # the clock counts the seconds trained in all runs
    last_save = time.perf_counter()

    def save_all() -> None:
        save_fixture(transformer, encoder, model_dir)
        save_checkpoint(
            checkpoint, transformer, encoder, opt, step=step, seconds=time.perf_counter() - t0, rng=rng, log=log
        )
        (args.out / "train_log.json").write_text(json.dumps(log) + "\n")

    while True:
        elapsed = time.perf_counter() - t0
        if elapsed >= args.seconds:
            break
        frac = elapsed / args.seconds
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        small = step % 4 == 3
        frames, size, batch = (
            (args.small_frames, args.small_size, 4 * args.batch) if small else (args.frames, args.size, args.batch)
        )
        specs = sample_specs(batch, rng.getrandbits(32))
        captions = [s.caption if rng.random() >= 0.1 else "" for s in specs]
        x0 = render(specs, frames, size, size, device) * 2 - 1
        sigma = torch.sigmoid(torch.randn(batch, device=device))
        noise = torch.randn_like(x0)
        with autocast:
            loss = flow_loss(transformer, encoder, x0, captions, sigma, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % 10 == 0 or step < 10:
            entry = {
                "step": step,
                "seconds": round(time.perf_counter() - t0, 2),
                "loss": loss.item(),
                "lr": lr,
                "grad_norm": float(grad_norm),
                "size": f"{frames}x{size}x{size}",
            }
            log["steps"].append(entry)
            if step % 100 == 0:
                print(json.dumps(entry), flush=True)
        if step % 250 == 0:
            log["validation"].append({"step": step, "seconds": round(time.perf_counter() - t0, 2), **validate()})
            print("validation", json.dumps(log["validation"][-1]), flush=True)
        if time.perf_counter() - last_save > args.save_every:
            save_all()
            last_save = time.perf_counter()

    log["validation"].append({"step": step, "seconds": round(time.perf_counter() - t0, 2), **validate()})
    log["total_steps"] = step
    log["train_seconds"] = time.perf_counter() - t0
    print(f"trained {step} steps in {log['train_seconds']:.0f} s; validation {log['validation'][-1]}", flush=True)
    save_all()

    # samples of held-out captions, through the shipped loading code and sampler
    fixture = load_fixture(model_dir, device=device, dtype=torch.float32)
    specs = sample_specs(args.samples, EVAL_SEED)
    captions = [s.caption for s in specs]
    t1 = time.perf_counter()
    videos = generate(
        fixture, captions, list(range(len(captions))), frames=args.frames, height=args.size, width=args.size
    )
    n_small = min(4, len(captions))
    small = generate(
        fixture,
        captions[:n_small],
        list(range(n_small)),
        frames=args.small_frames,
        height=args.small_size,
        width=args.small_size,
    )
    truth = render(specs, args.frames, args.size, args.size).permute(0, 2, 3, 4, 1)
    print(f"sampled {len(captions)} videos in {time.perf_counter() - t1:.1f} s", flush=True)
    to_u8 = lambda v: (v.clamp(0, 1) * 255).round().to(torch.uint8).numpy()  # noqa: E731
    tmp = args.out / "samples.tmp.npz"
    np.savez_compressed(tmp, videos=to_u8(videos), small=to_u8(small), truth=to_u8(truth), captions=np.array(captions))
    os.replace(tmp, args.out / "samples.npz")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
