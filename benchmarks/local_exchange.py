"""A stand-in for the expert all-to-all that moves the same bytes without leaving the rank.

Benchmarks that ask what the exchange costs a step (`overlap.py`, `exposed_exchange.py`) run the same
step twice, once with each MoE layer's dispatcher replaced by `CopyExchange`. The stand-in must leave
the rest of the step as it was: the same rows reach the experts' grouped GEMM, sorted by local expert
as a real dispatch lays them out, and every rank does the same amount of work without waiting for
another (a stand-in that dropped the rows of remote experts would give each rank a different,
smaller share). So every rank keeps all the (token, expert) rows it routed and hands them to its own
experts as if each peer had sent back what this rank sends it: global expert e goes to local expert
e mod n_local. On one device (all experts local) the rows are already in order and are copied.
"""

from __future__ import annotations

from typing import Any

import torch


class CopyExchange:
    """A `Dispatcher` that copies the payload on this rank (see the module docstring).

    Args:
        n_local_experts: the experts each rank holds (None: all of them, one device).
    """

    def __init__(self, n_local_experts: int | None = None) -> None:
        self.n_local_experts = n_local_experts

    def dispatch(
        self, tokens: torch.Tensor, counts: torch.Tensor, token_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """tokens: (N, dim) sorted by global expert; counts: (n_experts,) -> (N, dim) sorted by local
        expert, (n_local,) counts, and the permutation for `combine`."""
        n_local = self.n_local_experts or counts.numel()
        if n_local == counts.numel():
            return _Permute.apply(tokens, None, None), counts, None
        order = _by_local_expert(counts, n_local, tokens.shape[0])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        local_counts = counts.view(-1, n_local).sum(0)
        return _Permute.apply(tokens, order, inverse), local_counts, (order, inverse)

    def combine(self, expert_out: torch.Tensor, ctx: Any) -> torch.Tensor:
        """(N, dim) sorted by local expert -> (N, dim) in the dispatch's input order."""
        order, inverse = ctx if ctx is not None else (None, None)
        return _Permute.apply(expert_out, inverse, order)


def _by_local_expert(counts: torch.Tensor, n_local: int, n_rows: int) -> torch.Tensor:
    """The stable order of `n_rows` rows sorted by global expert (counts per expert) that sorts them by
    local expert e mod n_local, then by the block e // n_local they came from, as a receiver lays out
    rows by local expert, then source rank. Computed on the device: no host sync."""
    n_experts = counts.numel()
    expert = torch.repeat_interleave(
        torch.arange(n_experts, device=counts.device), counts, output_size=n_rows
    )
    key = (expert % n_local) * (n_experts // n_local) + expert // n_local
    return key.argsort(stable=True)


class _Permute(torch.autograd.Function):
    """x[index] (a copy of x when index is None); the backward gathers with the inverse permutation."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, index: torch.Tensor | None, inverse: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.inverse = inverse
        return x.clone() if index is None else x[index]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return (grad.clone() if ctx.inverse is None else grad[ctx.inverse]), None, None
