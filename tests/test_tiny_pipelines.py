"""The tiny offline pipelines of every family: they build without the hub, generate deterministically, feed
the transformer the video tokens their geometry promises, and exercise each family's particular path (Wan
2.2 A14B's two experts, TI2V's per-token timestep, HunyuanVideo 1.5's cropped chat template)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import format_text_input

from xattn_video.testing.tiny_pipelines import FAMILIES, build_tiny_pipeline, tiny_call_kwargs

PROMPT = "a cat walks on the grass"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def generate(pipe, family: str, seed: int = 0, steps: int = 2) -> np.ndarray:
    out = pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(seed), output_type="np",
               **tiny_call_kwargs(family, steps=steps))
    return out.frames[0]


def expected_video_tokens(pipe, family: str) -> int:
    """Video tokens from the pipeline's own compression factors and the transformer's patch size."""
    f = FAMILIES[family]
    config = pipe.transformer.config
    p_t, p_h, p_w = (config.patch_size if isinstance(config.patch_size, (list, tuple))
                     else (config.patch_size_t, config.patch_size, config.patch_size))
    latent_frames = (f.frames - 1) // pipe.vae_scale_factor_temporal + 1
    return (latent_frames // p_t) * (f.height // pipe.vae_scale_factor_spatial // p_h) * (
        f.width // pipe.vae_scale_factor_spatial // p_w)


def first_attention(transformer):
    """The self-attention module of the first transformer block (the one XAttention replaces)."""
    blocks = getattr(transformer, "blocks", None) or transformer.transformer_blocks
    return blocks[0].attn1 if hasattr(blocks[0], "attn1") else blocks[0].attn


@pytest.mark.parametrize("family", list(FAMILIES))
def test_builds_offline_generates_deterministically(family):
    pipe = build_tiny_pipeline(family, seed=0)
    seen: list[int] = []
    handle = first_attention(pipe.transformer).register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[1]),
        with_kwargs=True,
    )
    try:
        a = generate(pipe, family)
    finally:
        handle.remove()
    f = FAMILIES[family]
    assert a.shape == (f.frames, f.height, f.width, 3)
    assert np.isfinite(a).all() and a.std() > 0
    # the first block's attention gets the video tokens the geometry promises (text comes separately)
    tokens = expected_video_tokens(pipe, family)
    assert tokens >= 192 and tokens % 16 == 0
    assert set(seen) == {tokens}
    # same seeds -> bitwise the same frames, from a freshly built pipeline too
    assert np.array_equal(a, generate(pipe, family))
    assert np.array_equal(a, generate(build_tiny_pipeline(family, seed=0), family))
    # the weights' seed and the noise's seed both matter
    assert not np.array_equal(a, generate(build_tiny_pipeline(family, seed=1), family))
    assert not np.array_equal(a, generate(pipe, family, seed=1))


@pytest.mark.parametrize("family", ["wan21", "hunyuan15"])
def test_dtype_and_device_arguments(family):
    pipe = build_tiny_pipeline(family, seed=0, dtype=torch.bfloat16, device="cpu")
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            dtypes = {p.dtype for p in module.parameters()}
            assert dtypes == {torch.bfloat16}, (name, dtypes)
            assert {p.device.type for p in module.parameters()} == {"cpu"}
    ref = build_tiny_pipeline(family, seed=0)
    w = ref.transformer.proj_out.weight
    torch.testing.assert_close(pipe.transformer.proj_out.weight, w.to(torch.bfloat16), rtol=0, atol=0)


def test_unknown_family_one_line_error():
    with pytest.raises(ValueError, match=r"^family = 'wan3' is not allowed: one of hunyuan, hunyuan15, wan21"):
        build_tiny_pipeline("wan3")


def test_a14b_runs_both_experts_split_at_the_boundary():
    pipe = build_tiny_pipeline("wan22_a14b", seed=0)
    assert pipe.transformer is not pipe.transformer_2
    assert not torch.equal(pipe.transformer.proj_out.weight, pipe.transformer_2.proj_out.weight)
    timesteps: dict[str, list[float]] = {"transformer": [], "transformer_2": []}
    handles = [
        getattr(pipe, name).register_forward_pre_hook(
            lambda module, args, kwargs, name=name: timesteps[name].append(float(kwargs["timestep"][0])),
            with_kwargs=True)
        for name in timesteps
    ]
    steps = 4
    try:
        generate(pipe, "wan22_a14b", steps=steps)
    finally:
        for h in handles:
            h.remove()
    # independent schedule: the scheduler's timesteps, split at boundary_ratio * num_train_timesteps
    pipe.scheduler.set_timesteps(steps)
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    high = [float(t) for t in pipe.scheduler.timesteps if t >= boundary]
    low = [float(t) for t in pipe.scheduler.timesteps if t < boundary]
    assert high and low  # both experts have steps
    # classifier-free guidance (guidance_scale 5 > 1): two calls a step, conditional then unconditional
    assert timesteps["transformer"] == [t for t in high for _ in range(2)]
    assert timesteps["transformer_2"] == [t for t in low for _ in range(2)]


def test_ti2v_per_token_timestep_is_zero_on_the_image_frame():
    pipe = build_tiny_pipeline("wan22_ti2v", seed=0)
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((kwargs["timestep"].clone(), kwargs["hidden_states"].clone())),
        with_kwargs=True)
    try:
        generate(pipe, "wan22_ti2v", steps=2)
    finally:
        handle.remove()
    f = FAMILIES["wan22_ti2v"]
    tokens = expected_video_tokens(pipe, "wan22_ti2v")
    per_frame = tokens // ((f.frames - 1) // pipe.vae_scale_factor_temporal + 1)
    pipe.scheduler.set_timesteps(2)
    assert len(calls) == 2 * 2  # 2 steps, CFG
    first_latent = calls[0][1][:, :, :1]
    for i, (timestep, hidden) in enumerate(calls):
        t = float(pipe.scheduler.timesteps[i // 2])
        assert timestep.shape == (1, tokens)
        assert torch.all(timestep[0, :per_frame] == 0)  # the image's frame is clean
        assert torch.all(timestep[0, per_frame:] == t) and t > 0
        # the image's latent frame is held fixed through the denoising
        assert torch.equal(hidden[:, :, :1], first_latent)
    # and it is the VAE encoding of the input image (independent encode here)
    image = tiny_call_kwargs("wan22_ti2v")["image"]
    pixels = pipe.video_processor.preprocess(image, height=f.height, width=f.width).unsqueeze(2)
    encoded = pipe.vae.encode(pixels).latent_dist.mode()
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(first_latent, (encoded - mean) / std)


def test_hunyuan15_crop_leaves_exactly_the_prompt_first():
    pipe = build_tiny_pipeline("hunyuan15", seed=0)
    conversation = format_text_input([PROMPT], pipe.system_message)
    ids = pipe.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"][0]
    prompt_ids = pipe.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    crop = pipe.prompt_template_encode_start_idx
    assert ids[crop:crop + len(prompt_ids)] == prompt_ids
    assert pipe.tokenizer.convert_ids_to_tokens(ids[crop - 1]) == "\n"  # the user header ends right before
    _, mask, _, mask_2 = pipe.encode_prompt(PROMPT, device="cpu")
    assert int(mask.sum()) == len(ids) - crop  # prompt, <|im_end|>, generation header
    assert int(mask_2.sum()) == 0  # no quoted glyph text: the ByT5 slots are all padding
