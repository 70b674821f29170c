"""Procedural captioned videos: moving and spinning shapes over textured, panning backgrounds.

The training data of the video fixture (:mod:`xattn_video.testing.fixture`), made in code so that no data set
is needed. A clip is described by a :class:`ClipSpec` (one to three objects, each a colour, a shape and a
motion; a background texture; a camera pan) and drawn by :func:`render`, vectorised over a batch of clips,
on any device and at any size (positions are in frame units, times in clip units, so a spec draws the same
scene at 32x32 or 64x64 pixels, 8 or 16 frames). Later objects are drawn over earlier ones (occlusion).

The caption names exactly what is drawn, in drawing order, with words of :data:`VOCABULARY`::

    red square spinning and blue circle moving left on stripes camera pans right

Coordinates: ``x`` runs left to right and ``y`` top to bottom over [-1, 1] (x over [-W/H, W/H] when the frame
is not square); "up" is decreasing ``y``. :func:`sample_specs` draws specs deterministically from a seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

__all__ = [
    "COLORS",
    "MOTIONS",
    "SHAPES",
    "TEXTURES",
    "VOCABULARY",
    "ClipSpec",
    "ObjectSpec",
    "render",
    "sample_specs",
]

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.16, 0.14),
    "green": (0.18, 0.80, 0.22),
    "blue": (0.20, 0.38, 0.98),
    "yellow": (0.97, 0.86, 0.12),
    "white": (0.96, 0.96, 0.96),
    "purple": (0.68, 0.22, 0.88),
}
SHAPES = ("circle", "square", "triangle", "cross")
# motion word(s) -> screen displacement (dx, dy) over the clip and spin flag
MOTIONS: dict[str, tuple[float, float, bool]] = {
    "moving left": (-0.9, 0.0, False),
    "moving right": (0.9, 0.0, False),
    "moving up": (0.0, -0.9, False),
    "moving down": (0.0, 0.9, False),
    "spinning": (0.0, 0.0, True),
    "still": (0.0, 0.0, False),
}
TEXTURES = ("plain", "stripes", "checks")
PANS = ("none", "left", "right")
SPIN = 1.4  # radians over the clip
PAN = 0.6  # background displacement over the clip, frame units (the scene moves against the camera)
MAX_OBJECTS = 3
BACKGROUND_MAX = 0.34  # backgrounds stay dark so that every object colour stands out

VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(
        [*COLORS, *SHAPES, *(w for m in MOTIONS for w in m.split()), "and", "on", *TEXTURES, "camera", "pans"]
    )
)


@dataclass(frozen=True)
class ObjectSpec:
    """One object: colour, shape and motion names, start centre (x, y), half size, start angle (radians)."""

    color: str
    shape: str
    motion: str
    x: float
    y: float
    size: float
    angle: float
    spin_sign: float = 1.0

    def position(self, s: float) -> tuple[float, float]:
        """Centre at clip time ``s`` in [0, 1]."""
        dx, dy, _ = MOTIONS[self.motion]
        return self.x + dx * s, self.y + dy * s


@dataclass(frozen=True)
class ClipSpec:
    """A clip: objects in drawing order (later ones occlude earlier ones), background and camera."""

    objects: tuple[ObjectSpec, ...]
    texture: str
    pan: str
    background: tuple[float, float, float]
    texture_phase: float = 0.0

    @property
    def caption(self) -> str:
        parts = [f"{o.color} {o.shape} {o.motion}" for o in self.objects]
        text = " and ".join(parts) + f" on {self.texture}"
        if self.pan != "none":
            text += f" camera pans {self.pan}"
        return text


def _object(rng: random.Random, color: str) -> ObjectSpec:
    shape = rng.choice(SHAPES)
    motions = [m for m in MOTIONS if not (shape == "circle" and m == "spinning")]  # a spinning circle looks still
    motion = rng.choice(motions)
    dx, dy, _ = MOTIONS[motion]
    margin = 0.72

    def start(d: float) -> float:  # the whole path stays within [-margin, margin]
        lo, hi = -margin - min(d, 0.0), margin - max(d, 0.0)
        return rng.uniform(lo, hi)

    return ObjectSpec(color, shape, motion, start(dx), start(dy), rng.uniform(0.17, 0.27),
                      rng.uniform(0.0, 2 * math.pi), rng.choice((-1.0, 1.0)))


def sample_specs(n: int, seed: int) -> list[ClipSpec]:
    """``n`` clip specs drawn from ``seed`` (the same seed gives the same specs): 1-3 objects of distinct
    colours, a texture, a pan (only over a texture, where it shows), a dark background colour."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    specs = []
    for _ in range(n):
        count = rng.randint(1, MAX_OBJECTS)
        colors = rng.sample(list(COLORS), count)
        texture = rng.choice(TEXTURES)
        pan = "none" if texture == "plain" else rng.choice(PANS)
        background = tuple(rng.uniform(0.04, 0.22) for _ in range(3))
        specs.append(ClipSpec(tuple(_object(rng, c) for c in colors), texture, pan, background,
                              rng.uniform(0.0, 1.0)))
    return specs


# ---------------------------------------------------------------------------------------------- drawing


def _shape_distance(shape: torch.Tensor, lx: torch.Tensor, ly: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Signed distance-like value (negative inside) of each clip's shape in object-local coordinates."""
    ax, ay = lx.abs(), ly.abs()
    circle = torch.sqrt(lx * lx + ly * ly) - size
    square = torch.maximum(ax, ay) - 0.8 * size
    # equilateral triangle: the largest projection on its three edge normals
    tri = torch.stack([ly, -ly / 2 + lx * math.sqrt(3) / 2, -ly / 2 - lx * math.sqrt(3) / 2]).amax(0) - 0.5 * size
    arm = 0.32 * size
    cross = torch.minimum(torch.maximum(ax - arm, ay - size), torch.maximum(ay - arm, ax - size))
    values = torch.stack([circle, square, tri, cross])  # [4, B, T, H, W]
    return values.gather(0, shape.view(1, -1, 1, 1, 1).expand(1, *lx.shape)).squeeze(0)


def render(
    specs: list[ClipSpec],
    frames: int,
    height: int,
    width: int,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Draw ``specs``: a float32 tensor [B, 3, frames, height, width] in [0, 1] (anti-aliased edges)."""
    if frames < 1 or height < 4 or width < 4:
        raise ValueError(f"frames >= 1, height >= 4 and width >= 4 required, got {frames}, {height}, {width}")
    b = len(specs)
    f32 = dict(device=device, dtype=torch.float32)
    s = torch.linspace(0.0, 1.0, frames, **f32) if frames > 1 else torch.zeros(1, **f32)
    aspect = width / height
    px = 2.0 / height  # one pixel in frame units
    x = (torch.arange(width, **f32) + 0.5) / width * 2 - 1
    x = x * aspect
    y = (torch.arange(height, **f32) + 0.5) / height * 2 - 1
    gx, gy = x.view(1, 1, 1, -1), y.view(1, 1, -1, 1)

    # background: base colour, brightened on the texture's "on" cells, moving against the camera pan
    base = torch.tensor([c.background for c in specs], **f32).view(b, 3, 1, 1, 1)
    tex = torch.tensor([TEXTURES.index(c.texture) for c in specs], device=device).view(b, 1, 1, 1)
    pan = torch.tensor([{"none": 0.0, "left": -1.0, "right": 1.0}[c.pan] for c in specs], **f32)
    phase = torch.tensor([c.texture_phase for c in specs], **f32)
    shift = (pan.view(b, 1) * PAN * s.view(1, -1) + phase.view(b, 1)).view(b, -1, 1, 1)  # [B, T, 1, 1]
    freq = 2.5  # cycles per frame unit
    stripes = torch.sin(2 * math.pi * freq * (gx + shift) / 2)
    checks = torch.sin(2 * math.pi * freq * (gx + shift) / 2) * torch.sin(2 * math.pi * freq * gy / 2)
    soft = lambda v: torch.clamp(v / (px * 2 * math.pi * freq / 2) + 0.5, 0, 1)  # noqa: E731 - one-line ramp
    pattern = torch.where(tex == 1, soft(stripes), torch.where(tex == 2, soft(checks), torch.zeros_like(checks)))
    video = base + 0.12 * pattern.unsqueeze(1)  # [B, 3, T, H, W]
    video = video.clamp(0, BACKGROUND_MAX)

    for k in range(MAX_OBJECTS):
        present = [k < len(c.objects) for c in specs]
        if not any(present):
            break
        objs = [c.objects[k] if k < len(c.objects) else c.objects[0] for c in specs]
        on = torch.tensor(present, **f32).view(b, 1, 1, 1)
        vel = torch.tensor([MOTIONS[o.motion][:2] for o in objs], **f32)  # [B, 2]
        cx = torch.tensor([o.x for o in objs], **f32).view(b, 1) + vel[:, :1] * s.view(1, -1)
        cy = torch.tensor([o.y for o in objs], **f32).view(b, 1) + vel[:, 1:] * s.view(1, -1)
        spin = torch.tensor([SPIN * o.spin_sign if MOTIONS[o.motion][2] else 0.0 for o in objs], **f32)
        angle = torch.tensor([o.angle for o in objs], **f32).view(b, 1) + spin.view(b, 1) * s.view(1, -1)
        cos, sin = torch.cos(angle).view(b, -1, 1, 1), torch.sin(angle).view(b, -1, 1, 1)
        dx, dy = gx - cx.view(b, -1, 1, 1), gy - cy.view(b, -1, 1, 1)
        lx, ly = cos * dx + sin * dy, -sin * dx + cos * dy
        size = torch.tensor([o.size for o in objs], **f32).view(b, 1, 1, 1)
        shape = torch.tensor([SHAPES.index(o.shape) for o in objs], device=device)
        dist = _shape_distance(shape, lx, ly, size)
        alpha = (torch.clamp(0.5 - dist / px, 0, 1) * on).unsqueeze(1)  # [B, 1, T, H, W]
        color = torch.tensor([COLORS[o.color] for o in objs], **f32).view(b, 3, 1, 1, 1)
        video = video * (1 - alpha) + color * alpha
    return video
