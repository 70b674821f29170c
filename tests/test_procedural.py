"""The procedural clips of the video fixture: deterministic, and the caption names what is drawn."""

import math
from dataclasses import replace

import pytest
import torch

from xattn_video.testing.fixture import CaptionEncoder
from xattn_video.testing.procedural import COLORS, VOCABULARY, render, sample_specs

H = W = 64
FRAMES = 8


def _mask(video: torch.Tensor, color: str, frame: int) -> torch.Tensor:
    """Pixels of exactly this object colour (anti-aliased edges and other colours excluded)."""
    target = torch.tensor(COLORS[color]).view(3, 1, 1)
    return (video[:, frame] - target).abs().amax(0) < 0.02


def _area(shape: str, size: float) -> float:
    """Shape area in pixels from its geometry (frame units: 2 = H pixels)."""
    r = size * H / 2
    return {"circle": math.pi * r**2, "square": (1.6 * r) ** 2, "triangle": 3 * math.sqrt(3) * (0.5 * r) ** 2,
            "cross": 2 * (2 * r) * (0.64 * r) - (0.64 * r) ** 2}[shape]


def test_specs_and_render_are_deterministic():
    a, b = sample_specs(6, 5), sample_specs(6, 5)
    assert a == b
    assert sample_specs(6, 6) != a
    assert torch.equal(render(a, FRAMES, 32, 32), render(b, FRAMES, 32, 32))


def test_captions_use_the_vocabulary_and_encode():
    specs = sample_specs(50, 1)
    encoder = CaptionEncoder()
    for spec in specs:
        assert set(spec.caption.split()) <= set(VOCABULARY)
    ids, mask = encoder.tokenize([s.caption for s in specs])
    assert mask.sum(1).tolist() == [len(s.caption.split()) for s in specs]
    with pytest.raises(ValueError, match="outside the fixture vocabulary: \\['zebra'\\]"):
        encoder.tokenize(["red zebra"])


def test_the_topmost_object_is_drawn_as_named():
    """The last-drawn object (never occluded) has its colour, its shape's area and moves as its caption says."""
    specs = sample_specs(40, 2)
    video = render(specs, FRAMES, H, W)
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32),
                            indexing="ij")
    for spec, clip in zip(specs, video, strict=True):
        obj = spec.objects[-1]
        assert f"{obj.color} {obj.shape} {obj.motion}" in spec.caption
        first, last = _mask(clip, obj.color, 0), _mask(clip, obj.color, FRAMES - 1)
        # interior pixels only (edges are blended): the area lies between the shape shrunk and grown by a pixel
        assert 0.6 * _area(obj.shape, obj.size) < first.sum() <= 1.05 * _area(obj.shape, obj.size), spec.caption
        dx = (xs[last].mean() - xs[first].mean()).item()
        dy = (ys[last].mean() - ys[first].mean()).item()
        expected = {"moving left": (-1, 0), "moving right": (1, 0), "moving up": (0, -1), "moving down": (0, 1),
                    "spinning": (0, 0), "still": (0, 0)}[obj.motion]
        travel = 0.9 * W / 2  # frame units over the clip, in pixels
        for got, want in ((dx, expected[0]), (dy, expected[1])):
            assert abs(got - want * travel) < 2.0, (spec.caption, dx, dy)


def test_background_texture_and_pan_as_named():
    """Plain backgrounds are flat; stripes vary along x only; a pan moves the stripes against the camera."""
    specs = [s for s in sample_specs(60, 3) if len(s.objects) == 1]
    specs += [replace(specs[0], texture="stripes", pan=pan) for pan in ("left", "right", "none")]
    video = render(specs, FRAMES, H, W)
    seen = set()
    for spec, clip in zip(specs, video, strict=True):
        obj = spec.objects[0]
        # a background row away from the object in frames 0 and last
        ox0, oy0 = obj.position(0.0)
        ox1, oy1 = obj.position(1.0)
        row = next(r for r in range(2, H - 2) if all(abs((r + 0.5) / H * 2 - 1 - y) > 0.35 for y in (oy0, oy1)))
        line0, line1 = clip[:, 0, row], clip[:, 1, row]  # consecutive frames: the shift is under half a period
        if spec.texture == "plain":
            assert line0.std(dim=1).max() < 1e-6
            continue
        assert line0.std(dim=1).max() > 0.02
        if spec.texture == "stripes":
            # the shift (in pixels) that best maps frame 0's row onto frame 1's: the pan's 0.6 frame units over
            # the clip, to the right when the camera pans left
            errors = {s: (torch.roll(line0, s, dims=1) - line1)[:, 8:-8].abs().mean().item() for s in range(-6, 7)}
            best = min(errors, key=errors.get)
            want = {"none": 0, "left": 1, "right": -1}[spec.pan] * 0.6 * W / 2 / (FRAMES - 1)
            assert abs(best - want) <= 1.0, (spec.caption, best, want)
            seen.add(spec.pan)
    assert seen == {"left", "right", "none"}
