"""The video fixture: a small pixel-space HunyuanVideo transformer trained on procedural clips, shipped here.

Every other model of the tests has random weights, whose attention has no structure to learn; this one was
trained (``bench/train_fixture.py``, flow matching, a few minutes on one GPU) on the captioned clips of
:mod:`xattn_video.testing.procedural`, so its attention follows moving objects and XAttention's quality can
be measured and regression-tested on it (``bench/fixture_quality.py``, ``docs/quality.md``).

- ``fixture_model/transformer``: a diffusers :class:`~diffusers.HunyuanVideoTransformer3DModel` (6 heads of 32
  channels, 2 double-stream + 3 single-stream blocks, pixel space: 3 channels, patch 4x4x1), weights stored in
  float16, loaded with ``from_pretrained``;
- ``fixture_model/caption_encoder``: :class:`CaptionEncoder`, learned word and position embeddings over the
  fixed vocabulary of the procedural captions; it gives the transformer its ``encoder_hidden_states``, their
  mask and ``pooled_projections``.

:func:`generate` samples videos with Euler steps of the flow-matching ODE and classifier-free guidance
(conditional and unconditional halves in one batch), calling the transformer directly, so
``xattn_video.enable(transformer, ...)`` (whose step tracker reads each call's timestep) works on it.
Videos are pixels in [0, 1]; the model works on ``2 * pixels - 1``. Trained at 16 frames of 64x64 pixels
(4,096 video tokens, 32 blocks of 128) and at 8 frames of 32x32 (512 tokens); RoPE admits other sizes.

A Wan family of the same size (:data:`WAN_TRANSFORMER_CONFIG`, a diffusers :class:`~diffusers.WanTransformer3DModel`
with the same caption encoder) trains with ``bench/train_fixture.py --family wan``; none is shipped yet.
:func:`load_fixture` picks the class from the saved transformer's ``config.json`` (``_class_name``) and
:func:`generate` calls either family. Wan's transformer takes no text mask and no pooled embedding: its captions
are the encoder's ``max_length`` tokens with zero vectors after the caption's words (as Wan's pipelines pad their
T5 embeddings with zeros), and its cross-attention sees those zero tokens too.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .procedural import VOCABULARY

__all__ = [
    "FAMILIES",
    "FIXTURE_DIR",
    "WAN_FIXTURE_DIR",
    "TRANSFORMER_CONFIG",
    "WAN_TRANSFORMER_CONFIG",
    "CaptionEncoder",
    "Fixture",
    "family_of",
    "generate",
    "load_fixture",
    "sigmas",
    "transformer_inputs",
]

FIXTURE_DIR = Path(__file__).resolve().parent / "fixture_model"
# the Wan fixture (bench/train_fixture.py --family wan, 280 s on one H100; docs/fixture.md)
WAN_FIXTURE_DIR = Path(__file__).resolve().parent / "fixture_wan_model"

TRANSFORMER_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    num_attention_heads=6,
    attention_head_dim=32,
    num_layers=2,
    num_single_layers=3,
    num_refiner_layers=1,
    mlp_ratio=3.0,
    patch_size=4,
    patch_size_t=1,
    qk_norm="rms_norm",
    guidance_embeds=False,
    text_embed_dim=64,
    pooled_projection_dim=64,
    rope_theta=256.0,
    rope_axes_dim=(8, 12, 12),
)

# The Wan family at the HunyuanVideo fixture's size: 6 heads x 32, 5 blocks (self-attention, cross-attention to the
# caption, MLP ratio 3), pixel space with 4x4x1 patches, the caption encoder's 64 channels as text.
WAN_TRANSFORMER_CONFIG = dict(
    patch_size=(1, 4, 4),
    num_attention_heads=6,
    attention_head_dim=32,
    in_channels=3,
    out_channels=3,
    text_dim=64,
    freq_dim=256,
    ffn_dim=576,
    num_layers=5,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=None,
    added_kv_proj_dim=None,
    rope_max_seq_len=1024,
)

# family -> (diffusers transformer class name, its fixture config)
FAMILIES = {
    "hunyuan": ("HunyuanVideoTransformer3DModel", TRANSFORMER_CONFIG),
    "wan": ("WanTransformer3DModel", WAN_TRANSFORMER_CONFIG),
}

PAD, NULL = "<pad>", "<null>"  # padding; the empty (unconditional) caption


class CaptionEncoder(nn.Module):
    """Word + position embeddings of a caption over a fixed vocabulary, and their masked mean projected as
    the pooled embedding. Unknown words are an error (the vocabulary is that of the procedural captions)."""

    def __init__(
        self, vocabulary: tuple[str, ...] = VOCABULARY, max_length: int = 24, dim: int = 64, pooled_dim: int = 64
    ):
        super().__init__()
        self.vocabulary = (PAD, NULL, *vocabulary)
        self.index = {w: i for i, w in enumerate(self.vocabulary)}
        self.max_length, self.dim, self.pooled_dim = max_length, dim, pooled_dim
        self.words = nn.Embedding(len(self.vocabulary), dim)
        self.positions = nn.Embedding(max_length, dim)
        self.pool = nn.Linear(dim, pooled_dim)
        with torch.no_grad():
            self.words.weight.normal_(0, 1.0)
            self.positions.weight.normal_(0, 0.3)

    def config(self) -> dict:
        return {
            "vocabulary": list(self.vocabulary[2:]),
            "max_length": self.max_length,
            "dim": self.dim,
            "pooled_dim": self.pooled_dim,
        }

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask [B, max_length] (int64; mask 1 on the caption's words). An empty caption is the
        single ``<null>`` token."""
        ids = torch.zeros(len(captions), self.max_length, dtype=torch.long)
        mask = torch.zeros(len(captions), self.max_length, dtype=torch.long)
        for row, caption in enumerate(captions):
            words = caption.split() or [NULL]
            unknown = sorted({w for w in words if w not in self.index or w in (PAD,)})
            if unknown:
                raise ValueError(
                    f"caption has words outside the fixture vocabulary: {unknown}; accepted words: "
                    f"{' '.join(self.vocabulary[2:])}"
                )
            if len(words) > self.max_length:
                raise ValueError(f"caption has {len(words)} words; at most max_length={self.max_length}")
            ids[row, : len(words)] = torch.tensor([self.index[w] for w in words])
            mask[row, : len(words)] = 1
        return ids, mask

    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(encoder_hidden_states [B, L, dim], encoder_attention_mask [B, L] int64, pooled_projections [B, pooled])."""
        device = self.words.weight.device
        ids, mask = (t.to(device) for t in self.tokenize(captions))
        hidden = self.words(ids) + self.positions.weight.unsqueeze(0)
        hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)
        mean = hidden.sum(1) / mask.sum(1, keepdim=True).to(hidden.dtype)
        return hidden, mask, self.pool(mean)

    def save(self, folder: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config(), indent=1) + "\n")
        save_file(
            {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in self.state_dict().items()},
            str(folder / "model.safetensors"),
        )

    @classmethod
    def load(cls, folder: str | os.PathLike) -> CaptionEncoder:
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg = json.loads((folder / "config.json").read_text())
        encoder = cls(tuple(cfg["vocabulary"]), cfg["max_length"], cfg["dim"], cfg["pooled_dim"])
        state = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}
        encoder.load_state_dict(state)
        return encoder.eval()


@dataclass
class Fixture:
    """The loaded fixture: the diffusers transformer and its caption encoder, on one device and dtype."""

    transformer: nn.Module
    encoder: CaptionEncoder

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        # diffusers' dtype: the first parameter outside the modules a model keeps in float32 (Wan's
        # scale_shift_table is one, and comes first)
        return self.transformer.dtype

    @property
    def family(self) -> str:
        return family_of(self.transformer)


def family_of(transformer: nn.Module) -> str:
    """The fixture family ("hunyuan" or "wan") of a transformer, from its class."""
    names = {cls.__name__ for cls in type(transformer).__mro__}
    for family, (class_name, _) in FAMILIES.items():
        if class_name in names:
            return family
    raise TypeError(f"transformer must be one of {[c for c, _ in FAMILIES.values()]}, got {type(transformer).__name__}")


def transformer_inputs(
    transformer: nn.Module, text: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The caption arguments of one transformer call, from :class:`CaptionEncoder`'s outputs: HunyuanVideo gets
    the text, its mask and the pooled embedding; Wan (no mask or pooled argument) the text alone, all
    ``max_length`` tokens, zero after the caption's words."""
    if family_of(transformer) == "wan":
        return {"encoder_hidden_states": text}
    return {"encoder_hidden_states": text, "encoder_attention_mask": mask, "pooled_projections": pooled}


def load_fixture(
    folder: str | os.PathLike | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Fixture:
    """Load the shipped fixture (or the one in ``folder``) with its transformer class's ``from_pretrained``
    (``HunyuanVideoTransformer3DModel`` or ``WanTransformer3DModel``, named by ``transformer/config.json``'s
    ``_class_name``); the transformer in ``dtype``, the caption encoder in float32, both on ``device``."""
    import diffusers

    folder = Path(folder) if folder is not None else FIXTURE_DIR
    if not (folder / "transformer" / "config.json").is_file():
        raise FileNotFoundError(
            f"no fixture transformer under {folder}: expected transformer/config.json (train "
            "one with bench/train_fixture.py)"
        )
    class_name = json.loads((folder / "transformer" / "config.json").read_text()).get("_class_name")
    accepted = [c for c, _ in FAMILIES.values()]
    if class_name not in accepted:
        raise ValueError(
            f"{folder / 'transformer' / 'config.json'} has _class_name={class_name!r}; accepted: {', '.join(accepted)}"
        )
    transformer = getattr(diffusers, class_name).from_pretrained(folder / "transformer", torch_dtype=dtype)
    encoder = CaptionEncoder.load(folder / "caption_encoder")
    return Fixture(transformer.to(device).eval(), encoder.to(device))


def sigmas(steps: int, shift: float = 2.0) -> list[float]:
    """Noise levels 1 -> 0 of ``steps`` Euler steps (``steps + 1`` values): uniform, then shifted towards the
    noisy end by ``shift`` (``shift * s / (1 + (shift - 1) * s)``), as diffusers' flow-matching scheduler."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    out = []
    for i in range(steps + 1):
        s = 1.0 - i / steps
        out.append(shift * s / (1 + (shift - 1) * s))
    return out


@torch.no_grad()
def generate(
    fixture: Fixture,
    captions: list[str],
    seeds: list[int],
    *,
    frames: int = 16,
    height: int = 64,
    width: int = 64,
    steps: int = 24,
    guidance_scale: float = 4.0,
    shift: float = 2.0,
) -> torch.Tensor:
    """Videos for ``captions`` (one seed each): float32 [B, frames, height, width, 3] in [0, 1] on the CPU.

    The starting noise of video b is drawn on the CPU from ``torch.Generator().manual_seed(seeds[b])``, so a
    seed gives the same noise on every device. Each step is one transformer call on the batch
    [conditional videos, unconditional videos] (``guidance_scale`` 1: conditional only) at timestep
    ``1000 * sigma``; the velocity is ``v_uncond + guidance_scale * (v_cond - v_uncond)``.
    """
    if len(captions) != len(seeds) or not captions:
        raise ValueError(
            f"captions and seeds must be non-empty lists of one length, got {len(captions)} and {len(seeds)}"
        )
    config = fixture.transformer.config
    if fixture.family == "wan":
        pt, p, pw = config.patch_size
    else:
        pt, p, pw = config.patch_size_t, config.patch_size, config.patch_size
    if frames < 1 or frames % pt or height % p or width % pw or height < p or width < pw:
        raise ValueError(
            f"height and width must be positive multiples of the patch size {p} and frames >= 1, got "
            f"{frames}x{height}x{width}"
        )
    device, dtype = fixture.device, fixture.dtype
    noise = [torch.randn(3, frames, height, width, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    x = torch.stack(noise).to(device)
    guided = guidance_scale != 1.0
    text, mask, pooled = fixture.encoder(list(captions) + ([""] * len(captions) if guided else []))
    text, pooled = text.to(dtype), pooled.to(dtype)
    levels = sigmas(steps, shift)
    for sigma, sigma_next in zip(levels[:-1], levels[1:], strict=True):
        model_in = torch.cat([x, x]) if guided else x
        t = torch.full((model_in.shape[0],), 1000.0 * sigma, device=device)
        v = fixture.transformer(
            hidden_states=model_in.to(dtype),
            timestep=t,
            return_dict=False,
            **transformer_inputs(fixture.transformer, text, mask, pooled),
        )[0]
        v = v.float()
        if guided:
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + guidance_scale * (v_cond - v_uncond)
        x = x + (sigma_next - sigma) * v
    video = ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1)
    return video.cpu()


def video_tokens(frames: int, height: int, width: int, patch: int = 4) -> int:
    """Video tokens of a clip for the fixture transformer (patch ``patch`` x ``patch`` x 1)."""
    return frames * math.ceil(height / patch) * math.ceil(width / patch)
