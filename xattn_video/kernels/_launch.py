"""Launch plumbing shared by the kernels: interpreter detection and a shared-memory fallback for stages."""

from __future__ import annotations

import os

from triton.runtime.errors import OutOfResources

LOG2E = 1.4426950408889634
# Under TRITON_INTERPRET=1 (CPU tests) the kernels take a few interpreter-only paths. The main one: Triton
# 3.9's interpreter multiplies bfloat16 tiles as their raw uint16 bits, so there the kernels widen bf16
# operands to float32 (bf16 x bf16 products are exact in float32, as on the tensor cores; P is rounded to
# bf16 first). Compiled kernels never take these paths.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# (kernel name, config key) -> num_stages that compiled after an out-of-resources retry.
_STAGES_THAT_FIT: dict[tuple, int] = {}


def is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def launch_fitting_stages(kernel, grid, args: tuple, kwargs: dict, *, key: tuple, num_stages: int) -> None:
    """Launch ``kernel[grid](*args, **kwargs, num_stages=...)``, lowering num_stages by one while the
    configuration does not fit in shared memory; the stages that fit are remembered per ``key``."""
    cache_key = (kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel), key)
    stages = _STAGES_THAT_FIT.get(cache_key, num_stages)
    while True:
        try:
            kernel[grid](*args, **kwargs, num_stages=stages)
            return
        except OutOfResources:
            if stages <= 1:
                raise
            stages -= 1
            _STAGES_THAT_FIT[cache_key] = stages
