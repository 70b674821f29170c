"""3D-tiled token order: video tokens regrouped so that each attention block holds a compact neighbourhood.

Video DiTs flatten a (frames, height, width) token grid in raster order, so a 128-token block holds one or two
image rows (e.g. 128 of the 80-token rows of HunyuanVideo 720p). Local attention then spreads over many blocks,
and the block estimate must keep many of them to reach its mass threshold. Regrouping the tokens into 3D tiles
of ``tile = (t, h, w)`` (t * h * w = block_size, e.g. 2 x 8 x 8 = 128) makes every block a small space-time
box, so the same mass sits in fewer blocks. Attention itself is permutation-equivariant: gathering q, k and v
(or the token-wise inputs they come from, with the rotary embedding gathered alike) into the tiled order and
scattering the output back is exact; only the block choice changes.

The order. The grid is split, per axis, into the part covered by whole tiles and the remainder (``size % tile``),
which gives up to 8 boxes: the core of whole tiles first, then the remainder boxes (lexicographic in
(frames, height, width) remainder flags). A box's tile is the full tile clipped to the box (a remainder box of
5 rows has tiles of 5 rows); inside a tile, tokens go in raster order. So with ``t * h * w == block_size`` every
block of the core is exactly one tile, whatever the grid's raggedness: partial tiles sit in the boxes after the
core and cannot shift its alignment. Inside a box the tiles go in snake order (columns reversed on every other
tile row, rows on every other tile frame), so consecutive tiles are neighbours and a block of a remainder box,
which spans a few partial tiles, stays compact. HunyuanVideo 720p (33 x 45 x 80 after 2x2 patches, tile
2 x 8 x 8): 800 of its 928.1 video blocks are whole tiles.

Use (any layout; ``dim`` is the token axis; tokens after the video tokens, e.g. text, stay in place)::

    order = tiled_order((T, H, W), (2, 8, 8), device=q.device)   # cached per (grid, tile, device)
    q, k, v = (order.permute(x, dim=1) for x in (q, k, v))       # [B, N, H, D]; dim=2 for [B, H, N, D]
    out = order.unpermute(attention(q, k, v), dim=1)

or ``attend_in_order(attention, q, k, v, order, dim=1)``. ``order.index`` gathers (tiled position i holds raster
token ``index[i]``); ``order.inverse`` undoes it. :func:`grid_from_latents` turns the transformer's input shape
and patch sizes into the grid (a forward pre-hook sees it; :class:`~xattn_video.diffusion.steps.StepTracker`
keeps it as ``latents_shape``).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "TOKEN_ORDERS",
    "TokenOrder",
    "attend_in_order",
    "check_tile",
    "check_token_order",
    "default_tile",
    "grid_from_latents",
    "tile_permutation",
    "tiled_order",
]

TOKEN_ORDERS = ("raster", "tiled")


def check_token_order(token_order: str) -> str:
    """``token_order`` if it is one of :data:`TOKEN_ORDERS`, else a ValueError naming it."""
    if token_order not in TOKEN_ORDERS:
        raise ValueError(f"token_order must be one of {list(TOKEN_ORDERS)}, got {token_order!r}")
    return token_order


def check_tile(tile: Sequence[int]) -> tuple[int, int, int]:
    """``tile`` as a (frames, height, width) tuple of three positive ints, else an error naming it."""
    ok = (
        isinstance(tile, Sequence)
        and not isinstance(tile, str)
        and len(tile) == 3
        and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in tile)
    )
    if not ok:
        raise ValueError(f"tile must be three positive ints (frames, height, width) such as (2, 8, 8), got {tile!r}")
    return tuple(int(x) for x in tile)


def check_grid(grid: Sequence[int]) -> tuple[int, int, int]:
    """``grid`` as a (frames, height, width) tuple of three positive ints, else an error naming it."""
    ok = (
        isinstance(grid, Sequence)
        and len(grid) == 3
        and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in grid)
    )
    if not ok:
        raise ValueError(f"grid must be three positive ints (frames, height, width) of video tokens, got {grid!r}")
    return tuple(int(x) for x in grid)


def default_tile(block_size: int = 128) -> tuple[int, int, int]:
    """The tile of exactly ``block_size`` tokens (a power of two) used when none is given: the largest square
    s x s with s * s <= block_size, times block_size / s^2 frames: 16 -> (1, 4, 4), 32 -> (2, 4, 4),
    64 -> (1, 8, 8), 128 -> (2, 8, 8), 256 -> (1, 16, 16)."""
    side = 1 << (int(math.log2(block_size)) // 2)
    return (block_size // (side * side), side, side)


def grid_from_latents(
    latent_shape: Sequence[int], patch_size: int | Sequence[int], patch_size_t: int = 1
) -> tuple[int, int, int]:
    """The video token grid (frames, height, width) of latents [B, C, T, H, W] after a patch embedding with
    stride = kernel (floor division, as HunyuanVideo's and Wan's convolutions): ``patch_size`` is the spatial
    patch with ``patch_size_t`` the temporal one (HunyuanVideo's config), or a (t, h, w) tuple (Wan's)."""
    if len(latent_shape) != 5:
        raise ValueError(f"latent_shape must be [batch, channels, frames, height, width], got {tuple(latent_shape)}")
    if isinstance(patch_size, Sequence):
        if len(patch_size) != 3:
            raise ValueError(f"patch_size must be an int or a (t, h, w) tuple, got {patch_size!r}")
        pt, ph, pw = patch_size
    else:
        pt, ph, pw = patch_size_t, patch_size, patch_size
    _, _, t, h, w = latent_shape
    return check_grid((t // pt, h // ph, w // pw))


def _segments(size: int, tile: int) -> list[tuple[int, int, int]]:
    """An axis of ``size`` as (start, length, tile length) segments: the whole tiles, then the remainder."""
    tile = min(tile, size)
    whole = size - size % tile
    segments = [(0, whole, tile)] if whole else []
    if size > whole:
        segments.append((whole, size - whole, size - whole))
    return segments


def _snake(counts: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tile indices (frame, row, column) of a box's tiles in visiting order, [nT * nH * nW] each: frames in
    order, rows reversed on odd frames, columns reversed on odd tile rows (counted in visiting order), so
    consecutive tiles are always neighbours and a block spanning several partial tiles stays compact."""
    n_t, n_h, n_w = counts
    f, r, c = torch.meshgrid(torch.arange(n_t), torch.arange(n_h), torch.arange(n_w), indexing="ij")
    row = torch.where(f % 2 == 1, n_h - 1 - r, r)
    col = torch.where((f * n_h + r) % 2 == 1, n_w - 1 - c, c)
    return f.reshape(-1), row.reshape(-1), col.reshape(-1)


def tile_permutation(grid: Sequence[int], tile: Sequence[int]) -> torch.Tensor:
    """Raster index of each token in tiled order (int64, CPU): tiled token i is raster token ``result[i]``.

    Raster index of (frame f, row y, column x) is ``(f * H + y) * W + x``. See the module docstring for the
    order: the core of whole tiles first, then the remainder boxes with their tiles clipped to them; inside a
    box, tiles in snake order (each next to the one before), tokens in raster order inside a tile."""
    T, H, W = check_grid(grid)
    tile = check_tile(tile)
    pieces = []
    for box in itertools.product(*(_segments(n, t) for n, t in zip((T, H, W), tile, strict=True))):
        tiles = _snake(tuple(length // t for _, length, t in box))
        coords = []
        for axis, ((start, _, t), which) in enumerate(zip(box, tiles, strict=True)):
            # [tile, offset inside the tile along this axis], broadcast over [tile, dt, dh, dw]
            c = start + which.view(-1, 1) * t + torch.arange(t).view(1, -1)
            shape = [c.shape[0], 1, 1, 1]
            shape[1 + axis] = t
            coords.append(c.view(shape))
        f, y, x = coords
        pieces.append(((f * H + y) * W + x).reshape(-1))
    return torch.cat(pieces)


class TokenOrder:
    """The tiled order of one (grid, tile) on one device: gather (:meth:`permute`) and scatter back
    (:meth:`unpermute`) along a tensor's token axis. Get one from :func:`tiled_order` (cached)."""

    def __init__(self, grid: Sequence[int], tile: Sequence[int], device: torch.device | str = "cpu"):
        self.grid = check_grid(grid)
        self.tile = check_tile(tile)
        index = tile_permutation(self.grid, self.tile)
        inverse = torch.empty_like(index)
        inverse[index] = torch.arange(index.numel())
        self.device = torch.device(device)
        self.index = index.to(self.device)
        self.inverse = inverse.to(self.device)
        self._full: dict[tuple, torch.Tensor] = {}

    @property
    def n_video(self) -> int:
        return self.index.numel()

    def __repr__(self) -> str:
        return f"TokenOrder(grid={self.grid}, tile={self.tile}, device={self.device})"

    def permute(self, x: torch.Tensor, dim: int = 1, offset: int = 0) -> torch.Tensor:
        """``x`` with its video tokens (``offset`` .. ``offset + T*H*W`` along ``dim``) in tiled order; tokens
        before and after them stay in place. A new tensor (one gather pass), contiguous like ``index_select``'s."""
        return self._apply(x, dim, offset, inverse=False)

    def unpermute(self, x: torch.Tensor, dim: int = 1, offset: int = 0) -> torch.Tensor:
        """Undo :meth:`permute`: the video tokens back in raster order."""
        return self._apply(x, dim, offset, inverse=True)

    def _apply(self, x: torch.Tensor, dim: int, offset: int, inverse: bool) -> torch.Tensor:
        dim = dim % x.dim()
        n = x.shape[dim]
        if offset < 0 or offset + self.n_video > n:
            raise ValueError(
                f"x has {n} tokens along dim {dim}, fewer than offset {offset} + {self.n_video} video tokens of "
                f"grid {self.grid}"
            )
        if x.device != self.device:
            raise ValueError(f"x is on {x.device}, this TokenOrder on {self.device}: use tiled_order(..., device=)")
        return x.index_select(dim, self._index(n, offset, inverse))

    def _index(self, n: int, offset: int, inverse: bool) -> torch.Tensor:
        base = self.inverse if inverse else self.index
        if offset == 0 and n == self.n_video:
            return base
        key = (n, offset, inverse)
        full = self._full.get(key)
        if full is None:
            full = torch.arange(n, device=self.device)
            full[offset : offset + self.n_video] = base + offset
            if len(self._full) > 16:
                self._full.clear()
            self._full[key] = full
        return full


def attend_in_order(
    attend: Callable[..., torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    order: TokenOrder | None,
    *,
    dim: int = 1,
    offset: int = 0,
    **kwargs,
) -> torch.Tensor:
    """``attend(q, k, v, **kwargs)`` with the video tokens of q, k and v gathered into ``order`` and the output
    scattered back: exact for any attention that treats tokens alike (no positional mask), only a block-sparse
    choice sees the order. ``dim`` is the token axis (1 for [B, N, H, D] as diffusers' dispatcher passes, 2 for
    [B, H, N, D]); ``order=None`` calls ``attend`` unchanged. For self-attention (q, k and v over the same
    tokens); the output must have q's token axis at ``dim``."""
    if order is None:
        return attend(q, k, v, **kwargs)
    q, k, v = (order.permute(t, dim=dim, offset=offset) for t in (q, k, v))
    return order.unpermute(attend(q, k, v, **kwargs), dim=dim, offset=offset)


@functools.lru_cache(maxsize=32)
def _cached_order(grid: tuple, tile: tuple, device: torch.device) -> TokenOrder:
    return TokenOrder(grid, tile, device)


def tiled_order(
    grid: Sequence[int], tile: Sequence[int] | None = None, device: torch.device | str = "cpu", block_size: int = 128
) -> TokenOrder:
    """The :class:`TokenOrder` of a (frames, height, width) video token grid and ``tile`` (default: one
    ``block_size``-token tile, :func:`default_tile`), with its indices on ``device``; cached per
    (grid, tile, device), so calling it every layer costs a dictionary look-up."""
    tile = default_tile(block_size) if tile is None else check_tile(tile)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _cached_order(check_grid(grid), tile, device)
