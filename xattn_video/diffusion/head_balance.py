"""Head balancing under Ulysses: give each rank heads of about equal XAttention cost.

Under Ulysses rank r attends heads ``r*H/P .. (r+1)*H/P - 1``, and every rank waits for the slowest at the next
all-to-all. Heads differ in density (kept blocks), so a rank that draws the densest heads sets the pace. With
balancing on, the first sparse call of each layer measures every head's kept blocks (each rank its own, then
all-gathered in the group: a tiny tensor, once per layer), and from then on that layer's heads are permuted before
the all-to-all (and the output back after) so that each rank's heads add up to about the same kept blocks (greedy:
densest head first, to the rank with the least so far that still has room). Heads are independent, so the output
is the same up to the order of floating-point operations; only which rank attends which head changes.

The assignment is measured once per session and kept (also for later generations); Wan 2.2 A14B's two experts
share the session's layer indices, so the second expert uses the first's assignment (exact, maybe less even).
"""

from __future__ import annotations

import torch

__all__ = ["HeadBalance", "assign_heads"]


def assign_heads(cost: torch.Tensor, ranks: int) -> torch.Tensor:
    """A permutation of the heads (``cost``: one number a head, H divisible by ``ranks``) whose consecutive
    groups of H/ranks have about equal total cost: heads by cost descending, each to the rank with the least total
    that still has room. Returns the head indices in rank order (rank r gets ``perm[r*H/ranks:(r+1)*H/ranks]``)."""
    heads = cost.numel()
    per_rank = heads // ranks
    loads = [0.0] * ranks
    members: list[list[int]] = [[] for _ in range(ranks)]
    for head in torch.argsort(cost.double(), descending=True, stable=True).tolist():
        open_ranks = [r for r in range(ranks) if len(members[r]) < per_rank]
        r = min(open_ranks, key=lambda i: (loads[i], i))
        members[r].append(head)
        loads[r] += float(cost[head])
    return torch.tensor([h for m in members for h in sorted(m)], dtype=torch.long)


class HeadBalance:
    """Per layer: the head permutation in use (None until that layer's first sparse call is measured)."""

    def __init__(self) -> None:
        from .parallel import _BALANCING

        _BALANCING[0] += 1  # from now on the parallel path looks for a permutation (a graph break under compile)
        self.perms: dict[int, torch.Tensor] = {}
        self.measured: dict[int, torch.Tensor] = {}  # layer -> kept blocks per head, in the original head order
        self.ranks = 1

    def permutation(self, layer: int) -> torch.Tensor | None:
        return self.perms.get(layer)

    def measure(self, layer: int, kept_per_head: torch.Tensor, group, ranks: int) -> None:
        """All-gather this rank's heads' kept blocks (``[H/P]``, current order) and set the layer's permutation."""
        import torch.distributed as dist

        parts = [torch.empty_like(kept_per_head) for _ in range(ranks)]
        dist.all_gather(parts, kept_per_head.contiguous(), group=group)
        cost = torch.cat(parts).cpu()
        self.ranks = ranks
        self.measured[layer] = cost
        self.perms[layer] = assign_heads(cost, ranks)

    def summary(self) -> dict:
        """Per measured layer: each rank's kept blocks before (heads in order) and after the assignment."""
        out = {}
        for layer, cost in sorted(self.measured.items()):
            per = len(cost) // self.ranks
            before = [float(cost[i : i + per].sum()) for i in range(0, len(cost), per)]
            after = [float(cost[self.perms[layer][i : i + per]].sum()) for i in range(0, len(cost), per)]
            out[layer] = {"before": before, "after": after}
        return out
