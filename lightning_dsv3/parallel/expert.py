"""Expert parallelism: routed experts split over the ep group, tokens moved by all-to-all.

Dropless: every token reaches every expert it chose (no capacity factor), so the split sizes of
the exchange vary per step; the per-expert counts are exchanged first (one small all-to-all per
layer, the only host synchronisation of the layer) and the payload follows with variable splits.
Both directions are differentiable: the backward of a dispatch is a combine of the gradients and
vice versa. Works on NCCL and gloo alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_dsv3.model.moe import MoE


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits whose backward is the reverse exchange."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup
    ) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


def _all_to_all(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


@dataclass
class _DispatchContext:
    order: torch.Tensor  # received rows sorted by local expert (a permutation of the received rows)
    send_splits: list[int]
    recv_splits: list[int]


class AllToAllDispatcher:
    """Moves expert-sorted tokens to the ep ranks owning their experts and the outputs back.

    Tokens arrive sorted by global expert, so the rows for ep rank r are one contiguous block
    (experts [r * n_local, (r + 1) * n_local)). After the exchange the rows are grouped by source
    rank, then expert; `dispatch` re-sorts them by local expert for the grouped GEMM.
    """

    def __init__(self, group: dist.ProcessGroup, ep_size: int, n_local_experts: int) -> None:
        self.group = group
        self.ep_size = ep_size
        self.n_local = n_local_experts

    def dispatch(self, tokens: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """tokens: (N, dim) sorted by global expert; counts: (ep * n_local,) -> local tokens, counts, ctx."""
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)  # (source rank, local expert) counts
        matrix = recv_counts.view(self.ep_size, self.n_local)
        send_splits = counts.view(self.ep_size, self.n_local).sum(1).tolist()  # host sync: split sizes
        recv_splits = matrix.sum(1).tolist()
        received = _AllToAll.apply(tokens, recv_splits, send_splits, self.group)
        expert_of_row = torch.repeat_interleave(
            torch.arange(self.n_local, device=counts.device).repeat(self.ep_size), matrix.flatten()
        )
        order = expert_of_row.argsort(stable=True)
        ctx = _DispatchContext(order=order, send_splits=send_splits, recv_splits=recv_splits)
        return received[order], matrix.sum(0), ctx

    def combine(self, expert_out: torch.Tensor, ctx: _DispatchContext) -> torch.Tensor:
        """(received rows, dim) sorted by local expert -> (N, dim) in the sender's original order."""
        by_source = torch.zeros_like(expert_out).index_copy(0, ctx.order, expert_out)
        return _AllToAll.apply(by_source, ctx.send_splits, ctx.recv_splits, self.group)


def shard_experts(model: nn.Module, group: dist.ProcessGroup | None, ep_size: int, ep_rank: int) -> None:
    """Keep this ep rank's slice of every MoE layer's routed experts and install the all-to-all.

    Rank r keeps experts [r * E / ep, (r + 1) * E / ep); the weights are sliced from the initialised
    full tensors, so the shards equal the single-process model's experts.
    """
    for _, moe in _moe_layers(model):
        n_experts = moe.n_routed_experts
        if n_experts % ep_size != 0:
            raise ValueError(
                f"ep={ep_size} does not divide n_routed_experts={n_experts}; choose an ep among "
                f"{[d for d in range(1, n_experts + 1) if n_experts % d == 0]}"
            )
        n_local = n_experts // ep_size
        moe.expert_offset = ep_rank * n_local
        if ep_size == 1:
            continue
        experts = moe.experts
        for name in ("w1", "w2", "w3"):
            full = getattr(experts, name)
            setattr(
                experts,
                name,
                nn.Parameter(full.detach()[moe.expert_offset : moe.expert_offset + n_local].clone()),
            )
        experts.n_experts = n_local
        moe.dispatcher = AllToAllDispatcher(group, ep_size, n_local)


def _moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def is_expert_param(name: str) -> bool:
    """Routed-expert weights: split over ep, reduced over dp only."""
    return ".experts.w" in name
