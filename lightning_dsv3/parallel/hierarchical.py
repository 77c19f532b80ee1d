"""Hierarchical expert dispatch for an ep group that spans nodes: across nodes first, then within.

The flat all-to-all sends a token once per chosen expert, so a token whose two experts live on one
remote node crosses the slow inter-node links twice. Here ep rank r = node * ranks_per_node + local
(ep is the innermost mesh dim, so a node's ranks are consecutive) and two subgroups split the trip:
- inter ("rail"): the ranks of every node with this rank's local index;
- intra: the ranks of this node.

Dispatch of rows sorted by global expert, where row i copies token `token_ids[i]`:
1. over the rail, each (token, destination node) pair once, with a uint8 mask of the node's experts
   the token chose (experts-per-node bytes, tiny next to a row of activations);
2. within the node, the receiving ("forwarding") rank expands each row to one row per chosen expert
   and sends those to the ranks that hold the experts.
With a codec the sender encodes once, the forwarding rank moves packed rows without decoding them,
and the expert's rank decodes. Node-limited routing (`Router.limit_nodes`) bounds the number of
destination nodes per token. The two hops need two rounds of split sizes, hence two host
synchronisations per layer (the flat dispatch has one); everything else keeps off the host.

The backward of the dispatch runs the two hops in reverse and sums a token's expert gradients on
the forwarding rank, so gradients also cross the rail once per (token, node); a packed gradient
(`grad_codec`) is therefore encoded on each hop, around that sum. The combine runs the
hops in reverse with one row per (token, expert) on both: the gate weights are applied by the layer
after the combine, so the forwarding rank cannot pre-sum a token's expert outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from lightning_dsv3.model.transformer import Transformer
from lightning_dsv3.parallel.compression import BlockCodec
from lightning_dsv3.parallel.expert import (
    CodecPolicy,
    choose_codec,
    decode_rows,
    encode_rows,
    sort_by_local_expert,
)
from lightning_dsv3.parallel.mesh import ParallelMesh
from lightning_dsv3.parallel.telemetry import Link


@dataclass(frozen=True)
class NodeGroups:
    """This rank's intra-node and inter-node (rail) subgroups of its ep group."""

    intra: dist.ProcessGroup
    inter: dist.ProcessGroup
    n_nodes: int
    ranks_per_node: int


def build_node_groups(
    mesh: ParallelMesh, ranks_per_node: int, timeout: timedelta | None = None
) -> NodeGroups:
    """Create the subgroups of every ep group (collective: every rank creates every group, in one order),
    with the strategy's collective `timeout` (None: torch's default), like the mesh's own groups.

    The ep group of mesh coordinates (pp, dp) is the global ranks [base, base + ep), base = (pp * dp_size
    + dp) * ep, because ep is the innermost mesh dim.
    """
    ep, rpn = mesh.ep, ranks_per_node
    n_nodes = ep // rpn
    me = dist.get_rank()
    mine: dict[str, dist.ProcessGroup] = {}
    for base in range(0, mesh.pp * mesh.dp * ep, ep):
        for node in range(n_nodes):
            ranks = [base + node * rpn + local for local in range(rpn)]
            group = dist.new_group(ranks, timeout=timeout)
            if me in ranks:
                mine["intra"] = group
        for local in range(rpn):
            ranks = [base + node * rpn + local for node in range(n_nodes)]
            group = dist.new_group(ranks, timeout=timeout)
            if me in ranks:
                mine["inter"] = group
    return NodeGroups(mine["intra"], mine["inter"], n_nodes, rpn)


@dataclass
class _Plan:
    """Split sizes and row maps of one dispatch, for its backward and the matching combine."""

    to_node: list[int]  # rows this rank sends over the rail, per destination node
    from_node: list[int]  # rows it receives over the rail, per source node
    forward_rows: torch.Tensor  # (P,) which received row each intra-node row copies
    to_rank: list[int]  # intra-node rows sent per local rank
    from_rank: list[int]  # intra-node rows received per local rank
    by_expert: torch.Tensor  # (P,) intra-node send order among the (received row, expert) pairs
    back_to_node: list[int]  # combine: rows the forwarding rank returns per source node
    back_from_node: list[int]  # combine: rows this rank gets back per destination node


@dataclass
class _HierarchicalContext:
    plan: _Plan
    order: torch.Tensor  # received rows sorted by local expert
    back_order: torch.Tensor  # (N,) the original row of each row the combine brings back


class _TwoHopDispatch(torch.autograd.Function):
    """(token, node) rows -> over the rail -> expanded per expert -> within the node (see module doc)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        links: tuple[Link, Link],
        plan: _Plan,
        codec: BlockCodec | None,
        grad_codec: BlockCodec | None,
    ) -> torch.Tensor:
        ctx.args = (links, plan, grad_codec)
        inter, intra = links
        row_bytes = x.shape[1] * x.element_size()
        buf = inter.all_to_all(
            encode_rows(codec, x), plan.from_node, plan.to_node, "dispatch", nbytes=x.shape[0] * row_bytes
        )
        fwd = buf[plan.forward_rows]  # still encoded: the forwarding rank never decodes
        buf = intra.all_to_all(fwd, plan.from_rank, plan.to_rank, "dispatch", nbytes=fwd.shape[0] * row_bytes)
        return decode_rows(codec, buf, x.shape[1], x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (inter, intra), plan, codec = ctx.args
        dim, dtype = grad.shape[1], grad.dtype
        row_bytes = dim * grad.element_size()
        g = intra.all_to_all(
            encode_rows(codec, grad.contiguous()), plan.to_rank, plan.from_rank, "dispatch_backward",
            nbytes=grad.shape[0] * row_bytes,
        )  # fmt: skip
        g = decode_rows(codec, g, dim, dtype)
        # a token's expert gradients on this node, summed before they cross back over the rail
        summed = g.new_zeros(sum(plan.from_node), dim).index_add_(0, plan.forward_rows, g)
        g = inter.all_to_all(
            encode_rows(codec, summed), plan.to_node, plan.from_node, "dispatch_backward",
            nbytes=summed.shape[0] * row_bytes,
        )  # fmt: skip
        return decode_rows(codec, g, dim, dtype), None, None, None, None


class _TwoHopCombine(torch.autograd.Function):
    """Expert outputs back: within the node, then over the rail, one row per (token, expert)."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, links: tuple[Link, Link], plan: _Plan) -> torch.Tensor:
        ctx.args = (links, plan)
        inter, intra = links
        x = intra.all_to_all(y, plan.to_rank, plan.from_rank, "combine")  # (P, dim) in by_expert order
        x = torch.empty_like(x).index_copy_(0, plan.by_expert, x)  # grouped by source node again
        return inter.all_to_all(x, plan.back_from_node, plan.back_to_node, "combine")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (inter, intra), plan = ctx.args
        g = inter.all_to_all(grad.contiguous(), plan.back_to_node, plan.back_from_node, "combine_backward")
        g = g[plan.by_expert]
        return intra.all_to_all(g, plan.from_rank, plan.to_rank, "combine_backward"), None, None


@dataclass(eq=False)
class HierarchicalDispatcher:
    """Dispatch and combine over an ep group of `n_nodes` x `ranks_per_node` ranks in two hops.

    Args:
        inter, intra: the rail and the node subgroups, with their telemetry.
        codec, grad_codec, policy: as for `AllToAllDispatcher` (the policy is asked about the
            uncompressed size of the rows, which every rank of the ep group agrees on).
    """

    inter: Link
    intra: Link
    n_nodes: int
    ranks_per_node: int
    n_local_experts: int  # per ep rank
    codec: BlockCodec | None = None
    grad_codec: BlockCodec | None = None
    policy: CodecPolicy | None = None

    def __post_init__(self) -> None:
        self.links = (self.inter, self.intra)
        self.per_node = self.ranks_per_node * self.n_local_experts  # experts per node

    def dispatch(
        self, tokens: torch.Tensor, counts: torch.Tensor, token_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """tokens: (N, dim) sorted by global expert; counts: (n_experts,); token_ids: (N,) the token each
        row copies -> tokens for the local experts sorted by local expert, their counts, ctx."""
        if token_ids is None:
            raise ValueError(
                "hierarchical dispatch sends a token once per node and needs token_ids (the token each row "
                "copies); the MoE layer passes them, a direct caller must too"
            )
        inter, intra = self.links
        rpn = self.ranks_per_node
        n_rows, n_experts, dev = tokens.shape[0], counts.numel(), tokens.device
        expert = torch.repeat_interleave(torch.arange(n_experts, device=dev), counts, output_size=n_rows)
        node = expert // self.per_node
        # unique (destination node, token) pairs, numbered in (node, token) order
        by_pair = (node * n_rows + token_ids).argsort(stable=True)
        key = (node * n_rows + token_ids)[by_pair]
        first = torch.ones_like(key, dtype=torch.bool)
        first[1:] = key[1:] != key[:-1]
        pair_of_row = torch.empty_like(by_pair).scatter_(0, by_pair, first.cumsum(0) - 1)
        to_node = torch.zeros(self.n_nodes, dtype=torch.long, device=dev).index_add_(
            0, node[by_pair], first.long()
        )
        from_node = inter.all_to_all_equal(to_node, "dispatch_counts")
        rail = torch.cat([to_node, from_node]).tolist()  # host sync 1: the rail's split sizes
        to_node_l, from_node_l = rail[: self.n_nodes], rail[self.n_nodes :]
        n_pairs = sum(to_node_l)
        first_row = by_pair[torch.nonzero_static(first, size=n_pairs).squeeze(1)]
        mask = torch.zeros(n_pairs, self.per_node, dtype=torch.uint8, device=dev)
        mask[pair_of_row, expert % self.per_node] = 1
        received_mask = inter.all_to_all(mask, from_node_l, to_node_l, "dispatch_meta")  # (R1, per_node)
        # forwarding rank: one row per (received row, chosen expert), sent in expert order
        to_expert = received_mask.sum(0, dtype=torch.long)  # (rpn * n_local,)
        from_expert = intra.all_to_all_equal(to_expert, "dispatch_counts")
        matrix = from_expert.view(rpn, self.n_local_experts)  # (source local rank, local expert)
        source_node = torch.repeat_interleave(
            torch.arange(self.n_nodes, device=dev), from_node, output_size=sum(from_node_l)
        )
        back_to_node = torch.zeros(self.n_nodes, dtype=torch.long, device=dev).index_add_(
            0, source_node, received_mask.sum(1, dtype=torch.long)
        )
        back_from_node = counts.view(self.n_nodes, self.per_node).sum(1)
        splits = torch.cat(
            [to_expert.view(rpn, self.n_local_experts).sum(1), matrix.sum(1), back_to_node, back_from_node]
        ).tolist()  # host sync 2: every other split size at once
        r, n = rpn, self.n_nodes
        to_rank = splits[:r]
        hits = torch.nonzero_static(received_mask, size=sum(to_rank))  # (P, 2) by received row, expert
        by_expert = hits[:, 1].argsort(stable=True)
        plan = _Plan(
            to_node=to_node_l,
            from_node=from_node_l,
            forward_rows=hits[by_expert, 0],
            to_rank=to_rank,
            from_rank=splits[r : 2 * r],
            by_expert=by_expert,
            back_to_node=splits[2 * r : 2 * r + n],
            back_from_node=splits[2 * r + n :],
        )
        codec = choose_codec(self.codec, self.policy, tokens)
        received = _TwoHopDispatch.apply(tokens[first_row], self.links, plan, codec, self.grad_codec)
        order = sort_by_local_expert(matrix, sum(plan.from_rank))
        back_order = (pair_of_row * n_experts + expert).argsort()
        ctx = _HierarchicalContext(plan=plan, order=order, back_order=back_order)
        return received[order], matrix.sum(0), ctx

    def combine(self, expert_out: torch.Tensor, ctx: _HierarchicalContext) -> torch.Tensor:
        """(received rows, dim) sorted by local expert -> (N, dim) in the sender's original order."""
        by_source = torch.zeros_like(expert_out).index_copy(0, ctx.order, expert_out)
        returned = _TwoHopCombine.apply(by_source, self.links, ctx.plan)
        return torch.zeros_like(returned).index_copy(0, ctx.back_order, returned)


def limit_nodes(model: Transformer, n_nodes: int, max_nodes: int) -> None:
    """Turn on node-limited routing in every router of `model` (see `Router.limit_nodes`)."""
    for _, router in model.routers():
        router.limit_nodes(n_nodes, max_nodes)
