"""Research on the trained fixture (issue 12): which block-selection lever brings XAttention to 30 dB at
sparse-step density <= 0.30. Exact: every sparse call computes full attention alongside, in float32, so the
oracle, the exact block mass, is available (CPU float32, or a GPU with ``--device cuda --dtype bfloat16``).
Results and conclusions: docs/quality.md, "Levers".

Modes (``time``: one dense generation, timed):

- ``probe``: one dense generation per video (the reference trajectory); at every step, every joint attention
  call is also evaluated under each (token order, selection) candidate: its density and the relative error
  of its attention output (video queries) against dense attention. Cheap ranking of many levers at once.
- ``gen``: full generations with one candidate on the sparse steps (dense warmup first), PSNR/SSIM against
  the dense generation of the same caption and seed.

Token orders (``--orders``): ``raster``; ``tiled:T,H,W`` (3D tiles); ``kmeans:C`` (per head, k-means of the
video queries and, separately, of the video keys into C clusters each, tokens sorted by cluster: queries by
their q cluster, keys and values by their k cluster, Sparse VideoGen 2's idea with fixed 128-token blocks);
``bisect`` (per head, balanced: recursive median splits along the principal axis until every group is one
block, for q and for k separately). Text tokens stay after the video tokens.

Selections (``--selections``): ``oracle:t`` (exact block mass, smallest set per (head, query block) reaching
t), ``otopk:d`` (exact mass, top ceil(d * blocks) per row), ``obudget:d`` (exact mass normalised per row, the
d share of all (head, row, block) entries with the most mass, at least one per row: the budget spent where
mass is), ``xattn:t:s`` (the antidiagonal estimate with stride s, threshold t), ``xtopk:d:s``,
``xbudget:d:s`` (the estimate with top-k / budget selection). A suffix ``+o`` or ``+p`` compensates the dropped
blocks instead of ignoring them: each stands in by its mean value vector, weighted by its exact mass (``+o``,
oracle) or by n_b * exp(q . k_mean * scale) (``+p``, its pooled key). ``+c``, ``+f`` and ``+m`` (``gen`` only) fix
the mask at the last dense warmup step and cache the dropped blocks' part of the attention there: ``+c`` merges it
into every sparse step by its softmax sum, ``+f`` at its cached share of the mass, ``+m`` ignores it (the fixed mask
alone). ``gen --settings ORDER@SELECTION@WARMUP ...`` runs explicit triples.

    python bench/levers.py probe --videos 2 --out docs/results/levers_probe.json
    python bench/levers.py gen --videos 4 --orders raster --selections oracle:0.9 otopk:0.3 --out ...

Another fixture (``--fixture``, a folder with transformer/ and caption_encoder/, e.g. one trained by
``bench/train_fixture.py``) at another size (``--frames``, ``--size``): the dense references are then cached
next to ``--out`` (``<out stem>_refs.npz``) instead of the shared ``levers_refs.npz``. Results record the setup
and the dense generation time of every reference (``dense_seconds``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from xattn_video.core.attention import XAttnStats
from xattn_video.core.reference import block_scores_torch, select_blocks_torch
from xattn_video.core.token_order import grid_from_latents, tile_permutation
from xattn_video.diffusion.hunyuan import XAttnProcessor

BLOCK = 128
PROMPT_SEED = 77_000


# ------------------------------------------------------------------------------------------ token orders


def kmeans(x: torch.Tensor, clusters: int, iters: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched k-means: x [H, N, D] -> (assignment [H, N], centroids [H, C, D]); init: C tokens evenly spaced."""
    h, n, d = x.shape
    idx = torch.linspace(0, n - 1, clusters, device=x.device).round().long()
    c = x[:, idx].clone()
    x2 = (x * x).sum(-1, keepdim=True)
    for _ in range(iters):
        dist = x2 - 2 * x @ c.transpose(1, 2) + (c * c).sum(-1).unsqueeze(1)
        a = dist.argmin(-1)
        sums = x.new_zeros(h, clusters, d).scatter_add_(1, a.unsqueeze(-1).expand(-1, -1, d), x)
        counts = x.new_zeros(h, clusters).scatter_add_(1, a, x.new_ones(h, n))
        c = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp_min(1).unsqueeze(-1), c)
    return a, c


def cluster_order(x: torch.Tensor, clusters: int) -> torch.Tensor:
    """Per head, video tokens sorted by k-means cluster (clusters ordered along their centroids' first principal
    axis, so a block that straddles two clusters holds similar ones), raster order inside a cluster. [H, N]."""
    a, c = kmeans(x, clusters)
    centred = c - c.mean(1, keepdim=True)
    axis = torch.linalg.svd(centred, full_matrices=False).Vh[:, 0]  # [H, D]
    rank = (centred @ axis.unsqueeze(-1)).squeeze(-1).argsort(-1).argsort(-1)  # cluster -> position
    n = x.shape[1]
    key = rank.gather(1, a) * n + torch.arange(n, device=x.device)
    return key.argsort(-1)


def principal_axis(xs: torch.Tensor, iters: int = 8) -> torch.Tensor:
    """Top principal direction of centred rows xs [..., n, D] by power iteration on the covariance: [..., D]."""
    cov = xs.transpose(-1, -2) @ xs
    v = torch.ones(*cov.shape[:-1], 1, device=xs.device, dtype=xs.dtype)
    for _ in range(iters):
        v = cov @ v
        v = v / v.norm(dim=-2, keepdim=True).clamp_min(1e-30)
    return v.squeeze(-1)


def bisect_order(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Per head, balanced: split the tokens at the median of their principal axis, recursively, until each group
    is one block (group sizes are whole blocks, the remainder in the last). [H, N] (ragged N allowed)."""
    h, n, d = x.shape
    perm = torch.arange(n, device=x.device).expand(h, n).clone()
    if n % block == 0 and (n // block) & (n // block - 1) == 0:  # power-of-two blocks: whole levels batched
        groups = 1
        while groups < n // block:
            seg = perm.view(h, groups, -1)
            xs = x.gather(1, perm.unsqueeze(-1).expand(-1, -1, d)).view(h, groups, -1, d)
            xs = xs - xs.mean(2, keepdim=True)
            proj = (xs @ principal_axis(xs).unsqueeze(-1)).squeeze(-1)
            perm = seg.gather(2, proj.argsort(dim=-1, stable=True)).view(h, n)
            groups *= 2
        return perm
    groups = [(0, n)]
    while any(e - s > block for s, e in groups):
        new = []
        for s, e in groups:
            if e - s <= block:
                new.append((s, e))
                continue
            blocks = math.ceil((e - s) / block)
            mid = s + (blocks // 2) * block
            seg = perm[:, s:e]
            xs = x.gather(1, seg.unsqueeze(-1).expand(-1, -1, d))
            xs = xs - xs.mean(1, keepdim=True)
            v = principal_axis(xs)
            proj = (xs @ v.unsqueeze(-1)).squeeze(-1)
            perm[:, s:e] = seg.gather(1, proj.argsort(dim=-1, stable=True))
            new += [(s, mid), (mid, e)]
        groups = new
    return perm


def orders_for(spec: str, q: torch.Tensor, k: torch.Tensor, grid, n_video: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather indices [H, L] for queries and for keys/values of the valid segment (video tokens permuted)."""
    h, length, _ = q.shape
    base = torch.arange(length, device=q.device).expand(h, length).clone()
    if spec == "raster":
        return base, base
    kind, _, arg = spec.partition(":")
    if kind == "tiled":
        tile = tuple(int(x) for x in arg.split(","))
        base[:, :n_video] = tile_permutation(grid, tile).to(q.device)
        return base, base
    qv, kv = q[:, :n_video], k[:, :n_video]
    if kind == "kmeans":
        pq, pk = cluster_order(qv, int(arg)), cluster_order(kv, int(arg))
    elif kind == "bisect":
        pq, pk = bisect_order(qv), bisect_order(kv)
    else:
        raise ValueError(f"unknown order {spec!r}")
    bq, bk = base.clone(), base.clone()
    bq[:, :n_video], bk[:, :n_video] = pq, pk
    return bq, bk


# ------------------------------------------------------------------------------------------ selections


def select(spec: str, mass_blocks: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Mask [H, nqb, nkb] of one call. ``mass_blocks``: exact block mass [H, nqb, nkb]; q/k [H, L, D] permuted."""
    kind, *args = spec.split(":")
    vals = [float(a) for a in args]
    if kind.startswith("x"):
        stride = int(vals[1])
        scores = block_scores_torch(q.unsqueeze(0), k.unsqueeze(0), stride=stride, block_size=BLOCK, causal=False)[0]
        kind = {"xattn": "oracle", "xtopk": "otopk", "xbudget": "obudget"}[kind]
    else:
        scores = mass_blocks
    h, nqb, nkb = scores.shape
    if kind == "oracle":
        return select_blocks_torch(scores.unsqueeze(0), threshold=vals[0], causal=False)[0][0]
    if kind == "otopk":
        keep = max(1, math.ceil(vals[0] * nkb - 1e-9))
        idx = scores.topk(keep, dim=-1).indices
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)
    if kind == "obudget":
        norm = scores / scores.sum(-1, keepdim=True)
        keep = max(h * nqb, round(vals[0] * norm.numel()))
        flat = norm.reshape(-1)
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[flat.topk(keep).indices] = True
        mask = mask.view_as(norm)
        top = norm.argmax(-1, keepdim=True)
        return mask.scatter_(-1, top, True)
    raise ValueError(f"unknown selection {spec!r}")


# ------------------------------------------------------------------------------------------ exact parts


def exact_parts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Heads [H, L, D], float32: per (head, query row, key block) the softmax mass [H, L, nkb] and the partial
    numerator P[i, block] @ V[block] [H, L, nkb, D]; any block mask's exact output is a ratio of their masked
    sums. Chunked over heads on the CPU (memory), all heads at once on a GPU."""
    heads, length, dim = q.shape
    nkb = math.ceil(length / BLOCK)
    pad = nkb * BLOCK - length
    step = heads if q.is_cuda else 1
    masses, nums, lses = [], [], []
    for h0 in range(0, heads, step):
        sl = slice(h0, h0 + step)
        logits = q[sl] @ k[sl].transpose(1, 2) * dim**-0.5
        lses.append(torch.logsumexp(logits, -1))
        p = torch.softmax(logits, dim=-1)
        del logits
        pk = F.pad(p, (0, pad)).view(-1, length, nkb, BLOCK)
        masses.append(pk.sum(-1))
        vb = F.pad(v[sl], (0, 0, 0, pad)).view(-1, nkb, BLOCK, dim)
        nums.append(torch.einsum("hljb,hjbd->hljd", pk, vb))
        del p, pk
    return torch.cat(masses), torch.cat(nums), torch.cat(lses)


def block_rows(mass: torch.Tensor) -> torch.Tensor:
    """[H, L, nkb] -> [H, nqb, nkb]: rows summed per query block."""
    heads, length, nkb = mass.shape
    nqb = math.ceil(length / BLOCK)
    return F.pad(mass, (0, 0, 0, nqb * BLOCK - length)).view(heads, nqb, BLOCK, nkb).sum(2)


def masked_out(
    mask: torch.Tensor, mass: torch.Tensor, num: torch.Tensor, lse=None, comp: str = "", q=None, k=None, v=None
) -> torch.Tensor:
    """Exact block-sparse attention output [H, L, D] from the parts and a mask [H, nqb, nkb].

    ``comp``: the dropped blocks are not ignored but approximated by their mean value vector v_b weighted by
    their mass: "o" the exact mass (oracle), "p" the mass of the block's mean key, n_b * exp(q.k_b * scale)
    (one pooled key and value per block: a coarse attention over 1/128 of the keys)."""
    rows = mask.repeat_interleave(BLOCK, 1)[:, : mass.shape[1]].to(mass.dtype)
    numer = torch.einsum("hlj,hljd->hld", rows, num)
    denom = (rows * mass).sum(-1, keepdim=True)
    if comp:
        heads, length, dim = q.shape
        nkb = mass.shape[-1]
        pad = nkb * BLOCK - length
        counts = torch.full((nkb,), float(BLOCK), device=q.device)
        counts[-1] = BLOCK - pad
        vbar = F.pad(v, (0, 0, 0, pad)).view(heads, nkb, BLOCK, dim).sum(2) / counts[:, None]
        if comp == "o":
            approx = mass
        else:
            kbar = F.pad(k, (0, 0, 0, pad)).view(heads, nkb, BLOCK, dim).sum(2) / counts[:, None]
            approx = counts * torch.exp(q @ kbar.transpose(1, 2) * dim**-0.5 - lse.unsqueeze(-1))
        dropped = (1 - rows) * approx
        numer = numer + dropped @ vbar
        denom = denom + dropped.sum(-1, keepdim=True)
    return numer / denom


CACHED = ("c", "f", "m")  # selection suffixes whose mask is fixed at the last dense step


def complement_part(mask: torch.Tensor, mass: torch.Tensor, num: torch.Tensor, lse: torch.Tensor) -> tuple:
    """At the last dense step: the mask, and its dropped blocks' numerator [H, L, D], mass [H, L, 1] (both
    normalised by that step's softmax sum) and that sum's log [H, L, 1]."""
    dropped = 1 - mask.repeat_interleave(BLOCK, 1)[:, : mass.shape[1]].to(mass.dtype)
    return mask, torch.einsum("hlj,hljd->hld", dropped, num), (dropped * mass).sum(-1, keepdim=True), lse[..., None]


def cached_out(comp: str, cache: tuple, mass: torch.Tensor, num: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """A sparse step's output with the mask fixed at the last dense step. The kept blocks are exact; the dropped
    ones: "c" their cached part merged by its softmax sum (the cached numerator and mass rescaled by
    exp(lse_then - lse_now), as two partial softmaxes merge), "f" their cached normalised output at their cached
    share of the mass, "m" ignored (the fixed mask alone, the control)."""
    mask, num_d, mass_d, lse_d = cache
    rows = mask.repeat_interleave(BLOCK, 1)[:, : mass.shape[1]].to(mass.dtype)
    num_k = torch.einsum("hlj,hljd->hld", rows, num)
    mass_k = (rows * mass).sum(-1, keepdim=True)
    if comp == "m":
        return num_k / mass_k
    if comp == "c":
        w = torch.exp(lse_d - lse[..., None])
        return (num_k + w * num_d) / (mass_k + w * mass_d)
    share = mass_d.clamp(max=1.0)
    return (1 - share) * num_k / mass_k + share * num_d / mass_d.clamp(min=1e-30)


# ------------------------------------------------------------------------------------------ processors


class LeverProcessor(XAttnProcessor):
    """The processor with its sparse step replaced by an exact CPU computation under one (order, selection);
    in ``probe`` mode the output is dense and every candidate is scored on the side."""

    def __init__(self, candidates: list[tuple[str, str]], probe: bool, lever_warmup: int = 0, **kwargs):
        super().__init__(backend="torch", **kwargs)
        self.candidates, self.probe = candidates, probe
        self.records: list[dict] = []
        self._call_info = None
        self._sample = 0
        # Cached-complement selections (+c, +f, +m): the processor itself runs every step through
        # sparse_attention (warmup_steps=0) and the first ``lever_warmup`` steps are computed dense here, the
        # last of them also fixing the mask and caching its dropped blocks' part (per layer and sample).
        self.lever_warmup = lever_warmup
        self.cache: dict[tuple, tuple] = {}
        self.fixed_orders: dict[tuple, tuple] = {}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        self._call_info = (self._layers.get(attn, (None,))[0], hidden_states.shape[1])
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    def sparse_attention(self, q, k, v, out=None):
        t0 = time.perf_counter()
        layer, n_video = self._call_info
        grid = grid_from_latents(self._tracker.latents_shape, *self._patch)
        length, n = k.shape[2], q.shape[2]
        if q.shape[0] > 1:  # one sample at a time
            outs = []
            for b in range(q.shape[0]):
                self._sample = b
                outs.append(self.sparse_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1]))
            self._sample = 0
            result = torch.cat([o for o, _ in outs])
            kept, total = sum(s.kept_blocks for _, s in outs), sum(s.total_blocks for _, s in outs)
            if out is not None:
                result = out.copy_(result)
            return result, XAttnStats(
                kept / total, torch.full((1, q.shape[1]), kept / total), kept, total, 0.0, 0.0, "torch"
            )
        q32, k32, v32 = (t[0].float() for t in (q, k, v))
        qv = q32[:, :length]
        result = torch.empty_like(q32)
        if n > length:  # padded text queries: dense over the valid keys (the transformer drops them)
            result[:, length:] = F.scaled_dot_product_attention(q32[:, length:], k32, v32)
        heads = q32.shape[0]
        step = self._tracker.position.step
        kept = total = 0
        order_cache: dict[str, tuple] = {}
        vp_all: dict[str, torch.Tensor] = {}
        for order, selection in self.candidates if self.probe else self.candidates[:1]:
            if order not in order_cache:
                okey = (layer, length, self._sample, order)
                if self.lever_warmup and step >= self.lever_warmup and okey in self.fixed_orders:
                    pq, pk = self.fixed_orders[okey]  # a cached complement holds for the order it was made in
                else:
                    pq, pk = orders_for(order, qv, k32, grid, n_video)
                if self.lever_warmup and step == self.lever_warmup - 1:
                    self.fixed_orders[okey] = (pq, pk)
                qp = qv.gather(1, pq.unsqueeze(-1).expand(-1, -1, qv.shape[-1]))
                kp = k32.gather(1, pk.unsqueeze(-1).expand(-1, -1, k32.shape[-1]))
                vp = v32.gather(1, pk.unsqueeze(-1).expand(-1, -1, v32.shape[-1]))
                parts = exact_parts(qp, kp, vp)
                mass_blocks = block_rows(parts[0])
                dense = masked_out(torch.ones_like(mass_blocks, dtype=torch.bool), *parts)
                order_cache[order] = (pq, qp, kp, parts, mass_blocks, dense)
                vp_all[order] = vp
            pq, qp, kp, parts, mass_blocks, dense = order_cache[order]
            sel_spec, _, comp = selection.partition("+")
            if comp in CACHED:
                key = (layer, length, self._sample, order, selection)  # groups differ in valid length
                if step < self.lever_warmup:  # a dense step; the last one fixes the mask and caches
                    if step == self.lever_warmup - 1:
                        mask = select(sel_spec, mass_blocks, qp, kp)
                        self.cache[key] = complement_part(mask, *parts)
                    result[:, :length].scatter_(1, pq.unsqueeze(-1).expand(-1, -1, dense.shape[-1]), dense)
                    kept = total = 1
                    continue
                mask = self.cache[key][0]
                sparse = cached_out(comp, self.cache[key], *parts)
            else:
                mask = select(sel_spec, mass_blocks, qp, kp)
                sparse = masked_out(mask, *parts, comp=comp, q=qp, k=kp, v=vp_all[order])
            kept_mass = (mass_blocks * mask).sum() / mass_blocks.sum()
            video_rows = pq < n_video  # [H, L] permuted rows that are video tokens
            err = ((sparse - dense)[video_rows].norm() / dense[video_rows].norm()).item()
            if self.probe:
                self.records.append(
                    {
                        "step": step,
                        "layer": layer,
                        "order": order,
                        "selection": selection,
                        "density": mask.float().mean().item(),
                        "kept_mass": kept_mass.item(),
                        "rel_err": err,
                    }
                )
                result[:, :length].scatter_(1, pq.unsqueeze(-1).expand(-1, -1, dense.shape[-1]), dense)
                kept, total = mask.numel(), mask.numel()
            else:
                result[:, :length].scatter_(1, pq.unsqueeze(-1).expand(-1, -1, sparse.shape[-1]), sparse)
                kept, total = int(mask.sum()), mask.numel()
                self.records.append(
                    {
                        "step": step,
                        "layer": layer,
                        "density": kept / total,
                        "kept_mass": kept_mass.item(),
                        "rel_err": err,
                    }
                )
        if out is not None:
            out.copy_(result.unsqueeze(0).to(out.dtype))
            result = out
        else:
            result = result.unsqueeze(0).to(q.dtype)
        ms = (time.perf_counter() - t0) * 1e3
        return result, XAttnStats(kept / total, torch.full((1, heads), kept / total), kept, total, 0.0, ms, "torch")


# ------------------------------------------------------------------------------------------ runs


def u8(video: torch.Tensor) -> np.ndarray:
    return (video.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def main(argv=None) -> int:
    from xattn_video.pipelines.metrics import mse_per_frame, ssim_per_frame, video_psnr
    from xattn_video.testing.fixture import generate, load_fixture
    from xattn_video.testing.procedural import sample_specs

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["probe", "gen", "time"])
    parser.add_argument("--videos", type=int, default=2, help="first N of (caption i, seed 0), i = 0..7")
    parser.add_argument("--video-list", nargs="+", default=None, help="caption:seed pairs, e.g. 0:0 3:1")
    parser.add_argument("--orders", nargs="+", default=["raster"])
    parser.add_argument("--selections", nargs="+", default=["oracle:0.9"])
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--probe-steps", type=int, nargs="+", default=None, help="steps probed (default: all)")
    parser.add_argument(
        "--settings",
        nargs="+",
        default=None,
        help="gen: explicit ORDER@SELECTION@WARMUP triples instead of orders x selections",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max-seconds", type=float, default=float("inf"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fixture", type=Path, default=None, help="fixture folder (default: the shipped one)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="height and width in pixels")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    captions = [s.caption for s in sample_specs(8, PROMPT_SEED)]
    pairs = (
        [tuple(int(x) for x in p.split(":")) for p in args.video_list]
        if args.video_list
        else [(i, 0) for i in range(args.videos)]
    )
    fixture = load_fixture(args.fixture, device=args.device, dtype=getattr(torch, args.dtype))
    t_start = time.perf_counter()
    transformer = fixture.transformer
    stock = dict(transformer.attn_processors)
    kw = dict(frames=args.frames, height=args.size, width=args.size, steps=args.steps, guidance_scale=4.0)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": []}
    setup = {
        "fixture": str(args.fixture or "shipped"),
        "frames": args.frames,
        "size": args.size,
        "device": args.device,
        "dtype": args.dtype,
    }
    model_keys = ("fixture", "frames", "size")
    old = results.setdefault("setup", setup)
    if any(old[k] != setup[k] for k in model_keys):
        raise SystemExit(f"--out {args.out} holds results of another fixture or size {old}; this run: {setup}")
    shipped_size = args.fixture is None and (args.frames, args.size) == (16, 64)
    ref_cache = args.out.parent / "levers_refs.npz" if shipped_size else args.out.with_name(args.out.stem + "_refs.npz")
    refs = dict(np.load(ref_cache)) if ref_cache.is_file() else {}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def reference(ci: int, seed: int) -> np.ndarray:
        key = f"{ci}_{seed}_{args.steps}"
        if key not in refs:
            t0 = time.perf_counter()
            refs[key] = u8(generate(fixture, [captions[ci]], [seed], **kw))[0]
            seconds = time.perf_counter() - t0
            print(f"dense {key}: {seconds:.1f} s", flush=True)
            results.setdefault("dense_seconds", {})[key] = seconds
            np.savez_compressed(ref_cache, **refs)
        return refs[key]

    if args.mode == "time":
        reference(*pairs[0])
        return 0
    if args.mode == "probe":
        cands = [(o, s) for o in args.orders for s in args.selections]
        for ci, seed in pairs:
            if time.perf_counter() - t_start > args.max_seconds:
                print(f"skipped (time): probe video {ci}:{seed}", flush=True)
                continue
            proc = LeverProcessor(cands, probe=True, warmup_steps=0)
            transformer.set_attn_processor(proc)
            proc.attach(transformer)
            if args.probe_steps is not None:
                probe_steps = set(args.probe_steps)
                proc.warmup_steps = 0
                orig = proc.sparse_attention

                def sparse_or_dense(q, k, v, out=None, _orig=orig, _proc=proc, _steps=probe_steps):
                    if _proc._tracker.position.step in _steps:
                        return _orig(q, k, v, out)
                    o = F.scaled_dot_product_attention(q, k, v)
                    if out is not None:
                        out.copy_(o)
                    n = math.ceil(k.shape[2] / BLOCK) ** 2 * q.shape[1]
                    return (out if out is not None else o), XAttnStats(
                        1.0, torch.ones(1, q.shape[1]), n, n, 0, 0, "torch"
                    )

                proc.sparse_attention = sparse_or_dense
            t0 = time.perf_counter()
            try:
                generate(fixture, [captions[ci]], [seed], **kw)
            finally:
                proc.detach()
                transformer.set_attn_processor(dict(stock))
            seconds = time.perf_counter() - t0
            print(f"probe video {ci}:{seed} {seconds:.0f} s", flush=True)
            results["runs"].append({"video": [ci, seed], "seconds": seconds, "records": proc.records})
            args.out.write_text(json.dumps(results) + "\n")
        summarize_probe(results)
        return 0
    settings = (
        [tuple(x.split("@")) for x in args.settings]
        if args.settings
        else [(o, s, args.warmup) for o in args.orders for s in args.selections]
    )
    for order, selection, warmup in settings:
        warmup = int(warmup)
        if time.perf_counter() - t_start > args.max_seconds:
            print(f"skipped (time): {order}@{selection}@{warmup}", flush=True)
            continue
        per: list[dict] = []
        row = {"order": order, "selection": selection, "warmup": warmup, "steps": args.steps, "videos": per}
        results["runs"].append(row)
        for ci, seed in pairs:
            if per and time.perf_counter() - t_start > args.max_seconds:
                print(f"skipped (time): {order}@{selection}@{warmup} from video {ci}:{seed}", flush=True)
                break
            ref = reference(ci, seed)
            cached = selection.partition("+")[2] in CACHED
            proc = LeverProcessor(
                [(order, selection)],
                probe=False,
                warmup_steps=0 if cached else warmup,
                lever_warmup=warmup if cached else 0,
            )
            transformer.set_attn_processor(proc)
            proc.attach(transformer)
            t0 = time.perf_counter()
            try:
                vid = u8(generate(fixture, [captions[ci]], [seed], **kw))[0]
            finally:
                proc.detach()
                transformer.set_attn_processor(dict(stock))
            recs = proc.records
            per.append(
                {
                    "video": [ci, seed],
                    "psnr": video_psnr(mse_per_frame(ref, vid)),
                    "ssim": float(np.mean(ssim_per_frame(ref, vid))),
                    "density": float(np.mean([r["density"] for r in recs])),
                    "kept_mass": float(np.mean([r["kept_mass"] for r in recs])),
                    "rel_err": float(np.mean([r["rel_err"] for r in recs])),
                    "seconds": time.perf_counter() - t0,
                }
            )
            print(
                f"  {order} {selection} {ci}:{seed} PSNR {per[-1]['psnr']:.2f} density "
                f"{per[-1]['density']:.3f} [{per[-1]['seconds']:.0f} s]",
                flush=True,
            )
            ps = [p["psnr"] for p in per]
            row.update(
                psnr_mean=float(np.mean(ps)),
                psnr_std=float(np.std(ps)),
                psnr_min=float(np.min(ps)),
                psnr_max=float(np.max(ps)),
                density=float(np.mean([p["density"] for p in per])),
            )
            args.out.write_text(json.dumps(results, indent=1) + "\n")  # after every video: a timeout keeps them
        print(
            f"{order} {selection} w={warmup}: PSNR {row['psnr_mean']:.2f} (std {row['psnr_std']:.2f}, "
            f"{row['psnr_min']:.2f}..{row['psnr_max']:.2f}) density {row['density']:.3f}",
            flush=True,
        )
    return 0


def summarize_probe(results: dict) -> None:
    rows: dict[tuple, list] = {}
    for run in results["runs"]:
        for r in run["records"]:
            rows.setdefault((r["order"], r["selection"]), []).append(r)
    print(f"{'order':<14} {'selection':<16} {'density':>8} {'kept mass':>9} {'rel err':>8}  per layer rel err")
    for (order, selection), recs in rows.items():
        layers = sorted({r["layer"] for r in recs})
        per_layer = " ".join(f"{np.mean([r['rel_err'] for r in recs if r['layer'] == lay]):.3f}" for lay in layers)
        per_layer_d = " ".join(f"{np.mean([r['density'] for r in recs if r['layer'] == lay]):.2f}" for lay in layers)
        print(
            f"{order:<14} {selection:<16} {np.mean([r['density'] for r in recs]):8.3f} "
            f"{np.mean([r['kept_mass'] for r in recs]):9.4f} {np.mean([r['rel_err'] for r in recs]):8.4f}  "
            f"{per_layer} | d {per_layer_d}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
