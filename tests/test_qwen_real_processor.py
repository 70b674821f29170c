"""The builtin (torchvision-free) Qwen2-VL video processor against the model's own transformers processor.

Runs only where torchvision imports (transformers' Qwen2-VL video processor needs it; CI has none, so this
module is skipped there). Both processors get the same frames read by ``read_frames`` and must give equal
model inputs, tensor by tensor (same dtype, same shape, bitwise equal values), and the tiny models must
generate the same tokens from either. The processors' settings are those of Qwen2-VL-7B-Instruct's and
Qwen2.5-VL-7B-Instruct's preprocessor_config.json (written here: no hub is reachable), with the tiny
tokenizer and chat template.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from xattn_video.llm.qwen_inputs import (
    BuiltinQwenProcessor,
    RealQwenProcessor,
    load_qwen_processor,
    read_frames,
    torchvision_usable,
    video_messages,
)
from xattn_video.pipelines.video_io import write_video
from xattn_video.testing.tiny_qwen import (
    build_tiny_qwen2_5_vl,
    build_tiny_qwen2vl,
    build_tiny_qwen_tokenizer,
    tiny_qwen2_5_vl_config,
    tiny_qwen2vl_config,
)

pytestmark = pytest.mark.skipif(not torchvision_usable(),
                                reason="torchvision does not import: transformers' Qwen2-VL video processor needs it")

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# preprocessor_config.json of Qwen/Qwen2-VL-7B-Instruct and Qwen/Qwen2.5-VL-7B-Instruct: 4 to 16384 tokens an image
PREPROCESSOR_7B = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": CLIP_MEAN,
    "image_std": CLIP_STD,
    "image_processor_type": "Qwen2VLImageProcessor",
}
FAMILIES = {
    "qwen2_vl": ("Qwen2VLProcessor", tiny_qwen2vl_config, build_tiny_qwen2vl),
    "qwen2_5_vl": ("Qwen2_5_VLProcessor", tiny_qwen2_5_vl_config, build_tiny_qwen2_5_vl),
}
# (frame height, width, pixel range, the video grid expected): with the checkpoints' range, 90x160 becomes 84x168
# (height shrinks, width grows: the resize whose pass order matters); with the Video-MME config's range
# (configs/qwen2vl_7b_videomme.yaml), 360x640 becomes 168x280 (both shrink, by about 2.2)
CASES = {
    "mixed-resize": (90, 160, (None, None), [3, 6, 12]),
    "videomme-range": (360, 640, (3136, 50176), [3, 12, 20]),
}


def _frames(height: int, width: int, count: int) -> np.ndarray:
    """Smooth colour ramps that move from frame to frame, plus noise: content where resampling shows."""
    rng = np.random.default_rng(height + width)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    t = np.arange(count, dtype=np.float32)[:, None, None, None]
    ramps = 127.5 + 100 * np.sin(np.stack([x / 7, y / 11, (x + y) / 13], -1)[None] + t / 3)
    noise = rng.normal(0, 20, (count, height, width, 3))
    return np.clip(ramps + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """One video a case: 43 frames at 7 fps (6.14 s; frame count / fps is not the container's duration, so
    the sampling rate is defined one way only), sampled at 1 fps: 6 frames."""
    folder = tmp_path_factory.mktemp("videos")
    out = {}
    for name, (height, width, _, _) in CASES.items():
        path = write_video(folder / f"{name}.mp4", _frames(height, width, 43), fps=7, crf=0)
        out[name] = read_frames(path, fps=1.0, max_frames=64)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A processor folder per family (tiny tokenizer and chat template, model config, the 7B preprocessor
    settings) and its tiny model."""
    out = {}
    for family, (processor_class, config_fn, build) in FAMILIES.items():
        folder = tmp_path_factory.mktemp(family)
        build_tiny_qwen_tokenizer().save_pretrained(folder)
        config_fn().save_pretrained(folder)
        settings = {**PREPROCESSOR_7B, "processor_class": processor_class}
        (folder / "preprocessor_config.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")
        out[family] = (str(folder), build(0))
    return out


def _processors(folder: str, pixels: tuple[int | None, int | None]) -> tuple[RealQwenProcessor, BuiltinQwenProcessor]:
    lo, hi = pixels
    real = load_qwen_processor(folder, mode="real", min_pixels=lo, max_pixels=hi)
    builtin = load_qwen_processor(folder, mode="builtin", min_pixels=lo, max_pixels=hi)
    assert isinstance(real, RealQwenProcessor) and isinstance(builtin, BuiltinQwenProcessor)
    assert load_qwen_processor(folder).kind == "real"  # auto picks the real one where torchvision imports
    return real, builtin


def _assert_same_inputs(real: dict, builtin: dict) -> None:
    assert sorted(real) == sorted(builtin)
    for key, want in real.items():
        got = builtin[key]
        assert isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor), key
        assert (got.dtype, tuple(got.shape)) == (want.dtype, tuple(want.shape)), key
        assert torch.equal(got, want), f"{key}: max difference {(got.double() - want.double()).abs().max()}"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_builtin_and_real_processors_give_equal_inputs_and_tokens(family, case, videos, checkpoints):
    folder, model = checkpoints[family]
    frames, info = videos[case]
    _, _, pixels, grid = CASES[case]
    assert len(info["indices"]) == 6 and info["total_frames"] / info["video_fps"] != info["duration_s"]
    real, builtin = _processors(folder, pixels)
    assert builtin.geometry.min_pixels == (pixels[0] or 3136)
    assert builtin.geometry.max_pixels == (pixels[1] or 12845056)
    assert builtin.seconds_per_grid == (family == "qwen2_5_vl")

    messages = video_messages("Select the best answer. Answer with the letter.")
    prompt = real.chat_prompt(messages)
    assert prompt == builtin.chat_prompt(messages)
    want, got = real(prompt, frames, info), builtin(prompt, frames, info)
    expected = {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values_videos", "video_grid_thw"}
    if family == "qwen2_5_vl":
        expected.add("second_per_grid_ts")
    assert set(want) == expected
    assert want["video_grid_thw"].tolist() == [grid]
    _assert_same_inputs(want, got)
    if family == "qwen2_5_vl":  # 2 frames a temporal patch at 6 of 43 frames at 7 fps
        assert want["second_per_grid_ts"].tolist() == pytest.approx([2 / (6 / 43 * 7)])

    with torch.inference_mode():
        tokens = [model.generate(**inputs, max_new_tokens=6, do_sample=False, num_beams=1, temperature=None,
                                 top_p=None, top_k=None)[0, inputs["input_ids"].shape[1]:]
                  for inputs in (want, got)]
    assert tokens[0].numel() > 0
    assert torch.equal(tokens[0], tokens[1])


def test_odd_frame_count_without_metadata(checkpoints):
    """65 frames (the builtin path resizes 32 at a time), no metadata (Qwen2-VL needs none): both pad the last
    temporal patch with the last frame."""
    folder, _ = checkpoints["qwen2_vl"]
    real, builtin = _processors(folder, (3136, 50176))
    frames = _frames(120, 200, 65)
    prompt = builtin.chat_prompt(video_messages("Which one?"))
    want, got = real(prompt, frames), builtin(prompt, frames)
    assert want["video_grid_thw"].tolist() == [[33, 8, 14]]
    _assert_same_inputs(want, got)
