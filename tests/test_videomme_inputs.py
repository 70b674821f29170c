"""Qwen2-VL video inputs without torchvision: frame sampling, patches, prompt tokens, the tiny tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xattn_video.llm.qwen_inputs import (
    QwenVideoGeometry,
    load_qwen_processor,
    patchify_video,
    read_frames,
    sample_frame_indices,
    video_messages,
)
from xattn_video.pipelines.video_io import write_video
from xattn_video.testing.tiny_qwen import build_tiny_qwen_processor, build_tiny_qwen_tokenizer, save_tiny_qwen


def test_frame_sampling_rate_cap_and_spread():
    # 10 s at 30 fps, 1 frame a second: 10 frames, first and last included, evenly spaced
    idx = sample_frame_indices(300, 30.0, fps=1.0, max_frames=768)
    assert len(idx) == 10 and idx[0] == 0 and idx[-1] == 299
    assert np.allclose(np.diff(idx), 299 / 9, atol=1)
    # an hour at 1 fps hits the cap; counts are multiples of the temporal patch
    assert len(sample_frame_indices(3600 * 25, 25.0, fps=1.0, max_frames=768)) == 768
    assert len(sample_frame_indices(3600 * 25, 25.0, fps=1.0, max_frames=33)) == 32
    assert len(sample_frame_indices(7 * 30, 30.0, fps=1.0, max_frames=768)) == 6
    # short clips get min_frames, but never more than they hold (rounded to the temporal patch)
    assert len(sample_frame_indices(90, 30.0, fps=1.0, max_frames=768, min_frames=4)) == 4
    assert sample_frame_indices(3, 30.0, fps=1.0, max_frames=768) == [0, 2]
    with pytest.raises(ValueError, match="max_frames"):
        sample_frame_indices(100, 30.0, fps=1.0, max_frames=1)


def test_read_frames_decodes_exactly_the_sampled_frames(tmp_path):
    # the frame number in two grey levels (lossless H.264, steps far above YUV rounding): each decoded frame
    # tells exactly which one ffmpeg handed over
    idx = np.arange(250)
    frames = np.zeros((250, 32, 48, 3), dtype=np.uint8)
    frames[:, :, :24] = ((idx % 64) * 4)[:, None, None, None]
    frames[:, :, 24:] = ((idx // 64) * 40)[:, None, None, None]
    path = write_video(tmp_path / "v.mp4", frames, fps=25, crf=0)
    for fps, max_frames in ((1.0, 768), (2.5, 768), (25.0, 768), (25.0, 64), (0.01, 768)):
        got, info = read_frames(path, fps=fps, max_frames=max_frames)
        assert info["indices"] == sample_frame_indices(250, 25.0, fps=fps, max_frames=max_frames)
        assert got.shape == (len(info["indices"]), 32, 48, 3) and info["missing"] == 0
        decoded = np.round(got[:, 16, 8, 1] / 4).astype(int) + 64 * np.round(got[:, 16, 40, 1] / 40).astype(int)
        assert decoded.tolist() == info["indices"]
    assert info["times_s"][1] == pytest.approx(info["indices"][1] / 25.0)
    assert info["sampled_fps"] == pytest.approx(len(info["indices"]) / 10.0)
    with pytest.raises(FileNotFoundError):
        read_frames(tmp_path / "missing.mp4", fps=1.0, max_frames=8)
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="bad.mp4"):
        read_frames(tmp_path / "bad.mp4", fps=1.0, max_frames=8)


def test_patchify_matches_transformers_qwen2vl_image_processor():
    """Two identical frames make one temporal patch, which is how Qwen2-VL's image processor treats an image:
    a video [a, a, b, b] must equal the image processor's output for a then b (resize, normalise, order), but
    for resampling: the builtin path resizes with torch's kernel (that of the real video processor, see
    test_qwen_real_processor.py), this processor with PIL's, which rounds some pixels one level apart when
    both sides shrink, as here."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (90, 150, 3), dtype=np.uint8) for _ in range(2))
    geometry = QwenVideoGeometry(min_pixels=56 * 56, max_pixels=112 * 168)
    pixels, grid = patchify_video(np.stack([a, a, b, b]), geometry)
    image_proc = Qwen2VLImageProcessorPil(size={"shortest_edge": geometry.min_pixels,
                                                "longest_edge": geometry.max_pixels})
    ref = image_proc(images=[a, b], return_tensors="pt")
    assert grid.tolist() == [[2, *ref["image_grid_thw"][0, 1:].tolist()]]
    assert grid[0, 1:].tolist() == ref["image_grid_thw"][1, 1:].tolist()
    level = 1 / (255 * min(geometry.image_std))  # one uint8 level after normalisation: 0.0150
    torch.testing.assert_close(pixels, ref["pixel_values"].float(), atol=level * 1.001, rtol=0)
    assert ((pixels - ref["pixel_values"].float()).abs() > 1e-5).float().mean() < 0.02


def test_odd_frame_count_repeats_the_last_frame():
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (3, 56, 56, 3), dtype=np.uint8)
    geometry = QwenVideoGeometry(min_pixels=56 * 56, max_pixels=56 * 56)
    odd, grid = patchify_video(frames, geometry)
    even, _ = patchify_video(np.concatenate([frames, frames[-1:]]), geometry)
    assert grid.tolist() == [[2, 4, 4]]
    assert torch.equal(odd, even)


def test_tiny_tokenizer_chat_template_has_qwen2vl_structure():
    tok = build_tiny_qwen_tokenizer()
    text = tok.apply_chat_template(video_messages("Is it red?"), tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|video_pad|><|vision_end|>Is it red?<|im_end|>\n<|im_start|>assistant\n")
    with_system = tok.apply_chat_template(video_messages("x", system="Be brief."), tokenize=False,
                                          add_generation_prompt=False)
    assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert not with_system.endswith("assistant\n")
    for special in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|video_pad|>", "<|image_pad|>"):
        assert tok.tokenize(special) == [special]
    ids = tok("The answer is (B).", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids).replace(" ", "") == "Theansweris(B)."


def test_processor_expands_video_tokens_and_marks_types():
    proc = build_tiny_qwen_processor()
    frames = np.random.default_rng(2).integers(0, 256, (6, 112, 112, 3), dtype=np.uint8)
    prompt = proc.chat_prompt(video_messages("Which one?"))
    inputs = proc(prompt, frames)
    assert inputs["video_grid_thw"].tolist() == [[3, 8, 8]]
    n_video = int((inputs["input_ids"] == proc.video_token_id).sum())
    assert n_video == 3 * 8 * 8 // 4 == inputs["pixel_values_videos"].shape[0] // 4
    assert torch.equal(inputs["mm_token_type_ids"] == 2, inputs["input_ids"] == proc.video_token_id)
    assert int(inputs["mm_token_type_ids"].sum()) == 2 * n_video
    with pytest.raises(ValueError, match="exactly one"):
        proc("no video here", frames)


def test_builtin_processor_from_a_model_folder(tmp_path):
    folder = save_tiny_qwen(tmp_path / "tiny")
    proc = load_qwen_processor(str(folder), mode="builtin")
    assert proc.kind == "builtin" and proc.geometry == build_tiny_qwen_processor().geometry
    proc = load_qwen_processor(str(folder), mode="builtin", max_pixels=56 * 56)
    assert proc.geometry.max_pixels == 56 * 56
    with pytest.raises(ValueError, match="processor mode"):
        load_qwen_processor(str(folder), mode="fast")
