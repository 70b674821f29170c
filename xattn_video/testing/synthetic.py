"""Video-like q/k/v with the attention patterns seen in 3D DiTs, for tests and benchmarks.

Random q/k give nearly uniform attention, which no video model has. Here tokens sit on a (frames, height,
width) grid in frame-major order (as HunyuanVideo flattens them), followed by text tokens, and each head
follows one of three patterns, cycling over heads:

- spatial: a query attends to nearby tokens of its own frame (a local kernel in (y, x) times a frame match);
- temporal: a query attends to the same spatial position in nearby frames;
- global: every query attends strongly to a few "sink" tokens (the text tokens and the first frame), plus
  a weak local kernel.

Locality comes from random Fourier features: for features phi(p) = [cos(w.p), sin(w.p)], phi(p).phi(p')
= sum cos(w.(p - p')), which peaks at p = p' and decays with distance on the scale 1/|w|.
"""

from __future__ import annotations

import math

import torch

PATTERNS = ("spatial", "temporal", "global")


def _fourier(coords: torch.Tensor, n_pairs: int, length_scale: float, gen: torch.Generator) -> torch.Tensor:
    """[N, c] coordinates -> [N, 2 * n_pairs] unit-normalised random Fourier features."""
    freqs = torch.randn(coords.shape[1], n_pairs, generator=gen, dtype=torch.float32, device=gen.device) / length_scale
    phase = coords.float() @ freqs
    return torch.cat([phase.cos(), phase.sin()], dim=1) / math.sqrt(n_pairs)


def _codes(labels: torch.Tensor, n_labels: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """A random unit vector per label, gathered for each token."""
    table = torch.randn(n_labels, dim, generator=gen, dtype=torch.float32, device=gen.device)
    return (table / table.norm(dim=1, keepdim=True))[labels]


def _head_features(pattern: str, grid: torch.Tensor, n_text: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """Shared q/k features [N, dim] (unit scale) for one head; q and k add independent noise to them."""
    frames = int(grid[:, 0].max()) + 1 if len(grid) else 1
    n_video = grid.shape[0]
    quarter = dim // 4
    feats = torch.zeros(n_video + n_text, dim, dtype=torch.float32, device=gen.device)
    if pattern == "spatial":
        local = _fourier(grid[:, 1:], dim // 4, length_scale=2.0, gen=gen)
        feats[:n_video, : 2 * quarter] = local
        feats[:n_video, 2 * quarter : 3 * quarter] = _codes(grid[:, 0].long(), frames, quarter, gen)
    elif pattern == "temporal":
        local = _fourier(grid[:, 1:], dim // 4, length_scale=0.7, gen=gen)
        feats[:n_video, : 2 * quarter] = local
        feats[:n_video, 2 * quarter : 3 * quarter] = _fourier(grid[:, :1], quarter // 2, 3.0, gen)
    elif pattern == "global":
        sink = torch.randn(dim, generator=gen, dtype=torch.float32, device=gen.device)
        sink /= sink.norm()
        feats[:n_video] = 0.5 * _fourier(grid, dim // 2, length_scale=3.0, gen=gen)
        feats += 0.6 * sink
    else:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    return feats


def video_like_qkv(
    *,
    frames: int,
    height: int,
    width: int,
    text_tokens: int = 0,
    batch: int = 1,
    heads: int = 3,
    kv_heads: int | None = None,
    head_dim: int = 64,
    peak_logit: float = 12.0,
    noise: float = 0.3,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v in SDPA layout [batch, heads, frames*height*width + text_tokens, head_dim].

    ``peak_logit`` sets how sharp attention is: matching q/k features give a logit q.k/sqrt(d) of about
    that value. Heads cycle over :data:`PATTERNS`; with ``kv_heads`` (grouped-query) each key head uses
    the pattern of its first query head. Deterministic for a given ``seed`` and device;
    built on ``device`` in float32, so benchmark-sized inputs are made on the GPU in a moment.
    """
    kv_heads = kv_heads or heads
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    axes = [torch.arange(size, device=device) for size in (frames, height, width)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3).float()
    n = grid.shape[0] + text_tokens
    amplitude = math.sqrt(peak_logit * math.sqrt(head_dim))
    group = heads // kv_heads
    q = torch.empty(batch, heads, n, head_dim, dtype=torch.float32, device=gen.device)
    k = torch.empty(batch, kv_heads, n, head_dim, dtype=torch.float32, device=gen.device)

    def noisy(feats: torch.Tensor) -> torch.Tensor:
        jitter = torch.randn(feats.shape, generator=gen, dtype=torch.float32, device=device)
        return amplitude * (feats + noise * jitter / math.sqrt(head_dim))

    for h in range(kv_heads):
        feats = _head_features(PATTERNS[(h * group) % len(PATTERNS)], grid, text_tokens, head_dim, gen)
        for b in range(batch):
            k[b, h] = noisy(feats)
            for g in range(group):
                q[b, h * group + g] = noisy(feats)
    v = torch.randn(batch, kv_heads, n, head_dim, generator=gen, dtype=torch.float32, device=gen.device)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def random_block_selection(
    batch: int, heads: int, n_blocks: int, density: float, *, device: str | torch.device = "cpu", seed: int = 0
):
    """A fixed-density stand-in for the estimate: each query-block row keeps round(density * n_blocks)
    random key blocks (at least one). Returns a :class:`xattn_video.core.estimate.BlockSelection`."""
    from ..core.estimate import BlockSelection
    from ..core.reference import compact_blocks

    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    keep = max(1, round(density * n_blocks))
    gen = torch.Generator(device=device).manual_seed(seed)
    noise = torch.rand(batch, heads, n_blocks, n_blocks, generator=gen, device=device)
    mask = noise.argsort(-1).argsort(-1) < keep
    return BlockSelection(mask, *compact_blocks(mask))


def gaussian_local_qk(
    grid: tuple[int, int, int],
    sigma: tuple[float, float, float] = (1.0, 2.0, 2.0),
    *,
    head_dim: int = 64,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [1, 1, T*H*W, head_dim] (float32, raster order) whose attention is exactly a Gaussian kernel in
    (frame, row, column): softmax(q.k / sqrt(head_dim)) over keys p' is proportional to
    exp(-|(p - p') / sigma|^2 / 2). Built from q.k / sqrt(d) = p.p' - |p'|^2 / 2 (coordinates divided by sigma),
    which differs from -|p - p'|^2 / 2 by a per-query constant. Unlike :func:`video_like_qkv`, whose features
    have side lobes and whose spatial heads never look across frames, this is plain 3D locality: the input on
    which a token order's block compactness shows. Keep it in float32 (the key's |p'|^2 term is large)."""
    device = torch.device(device)
    axes = [torch.arange(n, dtype=torch.float64, device=device) for n in grid]
    p = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    p = (p - p.mean(0)) / torch.tensor(sigma, dtype=torch.float64, device=device)
    scale = head_dim**0.25  # q.k / sqrt(d) with both sides scaled by d^(1/4)
    q = torch.zeros(p.shape[0], head_dim, dtype=torch.float64, device=device)
    k = torch.zeros_like(q)
    q[:, :3], q[:, 3] = p * scale, -0.5 * scale
    k[:, :3], k[:, 3] = p * scale, (p * p).sum(1) * scale
    return q.float()[None, None], k.float()[None, None]
