"""Context-parallel plans and set-up: one video's sequence across P GPUs (Ulysses), through diffusers' own mechanism.

:func:`enable_parallelism` is ``transformer.enable_parallelism(config=..., cp_plan=...)`` with the plan for the
model: Wan and LTX-Video (the video models with a ``_cp_plan`` in diffusers 0.42) use their own; HunyuanVideo,
which has none in diffusers 0.42, uses :func:`hunyuan_video_cp_plan` from here. Call it *after* selecting the
attention backend (``xattn_video.enable(pipe, integration="backend", ...)`` or ``set_attention_backend``):
diffusers checks the backend of the processors when parallelism is enabled.

HunyuanVideo's plan shards video tokens and text tokens separately (both split across the ranks at the first
block; the output gathered at ``proj_out``). Each rank's attention sequence is then ``[video_r, text_r]``, and the
sequence the all-to-all gathers is interleaved: ``[video_0, text_0, video_1, text_1, ...]``. Two hooks (diffusers
``ModelHook``\\ s) keep that exact:

- on the transformer: the text length, declared to the ``xattn`` backend (:func:`.parallel.sequence_layout`),
  which puts q/k/v back in video-then-text order before the estimate and the output back after;
- on every block: the key-padding mask the transformer builds in video-then-text order is handed to the attention
  in the interleaved order, so diffusers' other backends (native SDPA) are exact under this plan too.

The token-replace image-to-video variant of HunyuanVideo (first-frame tokens treated apart) is refused.
"""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook

from . import _diffusers_private as private
from .parallel import _TAIL, check_parallel_config, to_natural_order

__all__ = ["enable_parallelism", "hunyuan_video_cp_plan", "restamp_parallel_config", "ulysses_config"]

_TRANSFORMER_HOOK = "xattn_video_sequence_layout"
_BLOCK_HOOK = "xattn_video_interleaved_mask"


def hunyuan_video_cp_plan(transformer: torch.nn.Module) -> dict:
    """A ``_cp_plan`` for ``HunyuanVideoTransformer3DModel``: RoPE tables split, video and text split at the first
    block, the video gathered after ``proj_out``."""
    first = "transformer_blocks.0" if len(transformer.transformer_blocks) else "single_transformer_blocks.0"
    split_seq = private.context_parallel_input(split_dim=1, expected_dims=3)
    rope = private.context_parallel_input(split_dim=0, expected_dims=2, split_output=True)
    return {
        "rope": {0: rope, 1: rope},
        first: {"hidden_states": split_seq, "encoder_hidden_states": split_seq},
        "proj_out": private.context_parallel_output(gather_dim=1, expected_dims=3),
    }


class _SequenceLayoutHook(ModelHook):
    """On the transformer: declares the text length of each forward to the backend (and to the block hooks)."""

    def __init__(self, parts: int = 1, uneven: bool = False) -> None:
        super().__init__()
        self.masks: dict = {}
        self._previous = None
        self.parts, self.uneven = parts, uneven

    def pre_forward(self, module, *args, **kwargs):
        text = kwargs.get("encoder_hidden_states")
        if text is None:
            text = args[2]
        if text.shape[1] % self.parts and not self.uneven:
            raise ValueError(
                f"the text has {text.shape[1]} tokens, which ulysses_degree={self.parts} does not divide: use a "
                f"max_sequence_length that {self.parts} divides, or ulysses_anything=True"
            )
        self._previous = _TAIL[0]
        _TAIL[0] = int(text.shape[1])
        self.masks.clear()
        return args, kwargs

    def post_forward(self, module, output):
        _TAIL[0] = self._previous
        self.masks.clear()
        return output


class _InterleavedMaskHook(ModelHook):
    """On a block: its ``attention_mask`` (video-then-text order, full length) in the gathered, interleaved order."""

    _MASK_INDEX = 3  # HunyuanVideo blocks: (hidden_states, encoder_hidden_states, temb, attention_mask, ...)

    def __init__(self, layout_hook: _SequenceLayoutHook, parts: int) -> None:
        super().__init__()
        self.layout_hook = layout_hook
        self.parts = parts

    def pre_forward(self, module, *args, **kwargs):
        in_kwargs = "attention_mask" in kwargs
        mask = kwargs["attention_mask"] if in_kwargs else (args[self._MASK_INDEX] if len(args) > 3 else None)
        tail = _TAIL[0]
        if mask is None or tail == 0:
            return args, kwargs
        cache = self.layout_hook.masks
        if cache.get("source") is not mask:
            n = mask.shape[-1]
            order = torch.argsort(to_natural_order(n, tail, self.parts, device=mask.device))
            cache["source"], cache["mask"] = mask, mask.index_select(-1, order)
        if in_kwargs:
            kwargs["attention_mask"] = cache["mask"]
        else:
            args = (*args[: self._MASK_INDEX], cache["mask"], *args[self._MASK_INDEX + 1 :])
        return args, kwargs


def _names(obj) -> set[str]:
    return {cls.__name__ for cls in type(obj).__mro__}


def _context_config(config):
    return config if hasattr(config, "ulysses_degree") else getattr(config, "context_parallel_config", None)


def enable_parallelism(transformer: torch.nn.Module, config, *, balance_heads: bool = False) -> None:
    """``transformer.enable_parallelism(config=config, cp_plan=...)`` with the model's plan (see the module).

    ``config``: a diffusers ``ContextParallelConfig(ulysses_degree=P)`` (or a ``ParallelConfig`` holding one);
    ``torch.distributed`` must be initialised. Ring attention, a head count P does not divide (without
    ``ulysses_anything``), HunyuanVideo's own XAttention processor and its token-replace variant are refused in
    one line. ``balance_heads``: assign heads to ranks by the density measured at each layer's first sparse call
    (:mod:`.head_balance`); needs XAttention enabled on the transformer first."""
    cp = _context_config(config)
    if cp is None:
        raise ValueError(f"config must be a diffusers ContextParallelConfig, got {type(config).__name__}")
    heads = getattr(transformer.config, "num_attention_heads", None)
    check_parallel_config(cp, heads)
    processors = getattr(transformer, "attn_processors", {}).values()
    if any("XAttnProcessor" in _names(p) for p in processors):
        raise ValueError(
            "HunyuanVideo's XAttention processor does not run under context parallelism: enable XAttention with "
            "xattn_video.enable(pipe, integration='backend', ...) before enable_parallelism"
        )
    is_hunyuan = "HunyuanVideoTransformer3DModel" in _names(transformer)
    if is_hunyuan:
        if getattr(transformer.config, "image_condition_type", None) == "token_replace":
            raise ValueError(
                "HunyuanVideo's token-replace image-to-video variant is not supported under context parallelism "
                "(its first-frame tokens are handled apart from the sharded sequence)"
            )
        plan = hunyuan_video_cp_plan(transformer)
    else:
        plan = getattr(transformer, "_cp_plan", None)
        if plan is None:
            raise ValueError(
                f"{type(transformer).__name__} has no context-parallel plan (_cp_plan) in diffusers "
                f"{private.check_diffusers_version()}; supported: Wan and LTX-Video (their own plans), "
                "HunyuanVideo (ours)"
            )
    session = None
    if balance_heads:
        from .backend import _hook_of

        hook = _hook_of(transformer)
        if hook is None:
            raise ValueError(
                "balance_heads=True needs XAttention on the transformer first: "
                "xattn_video.enable(pipe, integration='backend', ...) before enable_parallelism"
            )
        if cp.ulysses_anything:
            raise ValueError("balance_heads=True needs equal head counts per rank: not with ulysses_anything=True")
        session = hook.session
    with private.cpu_device_index():
        transformer.enable_parallelism(config=config, cp_plan=plan)
    if session is not None:
        from .head_balance import HeadBalance

        session.head_balance = HeadBalance()
    if is_hunyuan:
        layout_hook = _SequenceLayoutHook(cp.ulysses_degree, cp.ulysses_anything)
        HookRegistry.check_if_exists_or_initialize(transformer).register_hook(layout_hook, _TRANSFORMER_HOOK)
        for block in list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks):
            hook = _InterleavedMaskHook(layout_hook, cp.ulysses_degree)
            HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, _BLOCK_HOOK)


def ulysses_config(degree: int, *, device_type: str | None = None, **options):
    """``ContextParallelConfig(ulysses_degree=degree)`` for a world of ``N`` processes in groups of ``degree``
    consecutive ranks (each group one video): its device mesh is ``(N / degree, 1, degree)`` named
    ``("group", "ring", "ulysses")``. ``torch.distributed`` must be initialised; ``degree`` must divide ``N``."""
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    world = dist.get_world_size()
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 2 or world % degree:
        raise ValueError(
            f"parallel.ulysses must be an int >= 2 that divides the number of processes ({world}), got {degree!r}"
        )
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = torch.distributed.device_mesh.init_device_mesh(
        device_type, (world // degree, 1, degree), mesh_dim_names=("group", "ring", "ulysses")
    )
    return ContextParallelConfig(ulysses_degree=degree, mesh=mesh, **options)


def restamp_parallel_config(transformer: torch.nn.Module) -> None:
    """Give attention processors set after ``enable_parallelism`` (a variant's processors put back) the
    transformer's parallel config, as ``enable_parallelism`` gave the ones it found."""
    config = getattr(transformer, "_parallel_config", None)
    if config is None:
        return
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = config
