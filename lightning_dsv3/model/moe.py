"""DeepSeekMoE: a router with aux-loss-free balancing, routed experts as one grouped GEMM, shared experts.

The model stays free of parallelism: routed experts exchange tokens through a `Dispatcher`, which is
the identity here and an all-to-all over the expert-parallel group once the strategy installs one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lightning_dsv3.config import ModelConfig


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x): the dense MLP and the shared experts."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


@dataclass
class Routing:
    """What the router decided for T tokens choosing k experts each."""

    weights: torch.Tensor  # (T, k) gate values, normalised over the chosen experts, times route_scale
    indices: torch.Tensor  # (T, k) global expert ids
    scores: torch.Tensor  # (T, n_routed_experts) affinities before the bias, fp32


class Router(nn.Module):
    """Sigmoid affinities, group-limited top-k, and the selection bias of aux-loss-free balancing.

    The bias (`e_score_correction_bias`) shifts which experts are chosen but never the gate values,
    so balancing does not distort the function the experts compute. After each optimizer step the
    bias moves by `bias_update_speed` against each expert's load: bias += gamma * sign(mean - load).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.top_k = config.n_activated_experts
        self.n_groups = config.n_expert_groups
        self.n_limited_groups = config.n_limited_groups
        self.score_func = config.score_func
        self.route_scale = config.route_scale
        self.gamma = config.bias_update_speed
        self.alpha = config.aux_loss_alpha
        self.n_nodes = 1  # node-limited routing, off until `limit_nodes`
        self.max_nodes = 1
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.dim))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts))
        # tokens routed to each expert since the last bias update (summed over ranks by the strategy)
        self.register_buffer("expert_load", torch.zeros(self.n_experts), persistent=False)
        # the counts the last bias update moved against (global where the strategy reduced them), for
        # monitors that read them after the update; None until then
        self.last_load: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> Routing:
        """x: (T, dim) -> Routing for T tokens."""
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores.detach() + self.e_score_correction_bias  # selection only: no gradient path
        for n_sets, keep, top in self._limits():
            choice = _keep_best_sets(choice, n_sets, keep, top)
        indices = choice.topk(self.top_k, dim=-1).indices
        if self.score_func == "sigmoid":
            # s_i / sum of the chosen s_j, in log space: sigmoids of logits below about -88 underflow
            # to 0 in fp32, and 0 / 0 would make the gates NaN
            weights = F.logsigmoid(logits).gather(1, indices).softmax(dim=-1)
        else:
            weights = scores.gather(1, indices)
        if self.training:  # only training tokens drive the bias update
            with torch.no_grad():
                self.expert_load += tokens_per_expert(indices, self.n_experts).float()
        return Routing(weights * self.route_scale, indices, scores)

    def limit_nodes(self, n_nodes: int, max_nodes: int) -> None:
        """Node-limited routing (DeepSeek-V3 report, 2.1.2): the experts form `n_nodes` equal contiguous
        sets (the nodes that hold them); each token picks its experts within the `max_nodes` sets with
        the highest sum of their top ceil(top_k / max_nodes) selection scores, so its dispatch crosses
        to at most `max_nodes` nodes (no limit when max_nodes >= n_nodes). The strategy sets it from its
        layout; the model stays unaware of nodes."""
        check_node_limit(self.n_experts, self.top_k, self.n_groups, self.n_limited_groups, n_nodes, max_nodes)
        self.n_nodes, self.max_nodes = n_nodes, max_nodes

    def _limits(self) -> list[tuple[int, int, int]]:
        """(sets, sets kept, top scores summed per set) of group- and node-limited routing.

        The coarser partition goes first, so the finer one chooses among whole unmasked sets.
        """
        limits = []
        if self.n_groups > 1:
            limits.append((self.n_groups, self.n_limited_groups, min(2, self.n_experts // self.n_groups)))
        if self.max_nodes < self.n_nodes:
            per_node = self.n_experts // self.n_nodes
            limits.append((self.n_nodes, self.max_nodes, min(per_node, -(-self.top_k // self.max_nodes))))
        return sorted(limits)

    def balance_loss(self, routing: Routing, batch: int) -> torch.Tensor:
        """Sequence-wise balance loss alpha * sum_i f_i P_i, averaged over the `batch` sequences.

        f_i = n_experts / (top_k * seq) * (tokens of the sequence sent to expert i);
        P_i = mean over the sequence of the normalised affinity s_i / sum_j s_j.
        """
        scores = routing.scores.unflatten(0, (batch, -1))  # (batch, seq, experts)
        seq = scores.shape[1]
        probs = (scores / scores.sum(-1, keepdim=True)).mean(1)  # (batch, experts)
        picks = F.one_hot(routing.indices.unflatten(0, (batch, seq)), self.n_experts).sum((1, 2))
        f = picks.float() * self.n_experts / (self.top_k * seq)
        return self.alpha * (f * probs).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor | None = None, weight: torch.Tensor | float = 1.0) -> None:
        """Apply the aux-loss-free update from `load` (default: this rank's counts) and reset the counts;
        `last_load` keeps `load`.

        weight: scales the update; a 0-dim tensor of 0 skips it on the device, without the host deciding.
        """
        load = self.expert_load.clone() if load is None else load
        self.e_score_correction_bias += self.gamma * torch.sign(load.mean() - load) * weight
        self.last_load = load
        self.expert_load.zero_()


def tokens_per_expert(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(n_experts,) counts of `indices`; unlike torch.bincount on CUDA, no host synchronisation."""
    flat = indices.flatten()
    return torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )


def _keep_best_sets(choice: torch.Tensor, n_sets: int, keep: int, top: int) -> torch.Tensor:
    """choice (T, E) -> the same with every expert outside each token's `keep` best of `n_sets`
    contiguous sets masked to -inf; a set scores the sum of its `top` highest entries."""
    sets = choice.unflatten(-1, (n_sets, -1))  # (T, sets, experts per set)
    set_score = sets.topk(top, dim=-1).values.sum(-1)  # (T, sets)
    chosen = set_score.topk(keep, dim=-1).indices
    kept = torch.zeros_like(set_score, dtype=torch.bool).scatter_(1, chosen, True)
    return sets.masked_fill(~kept.unsqueeze(-1), float("-inf")).flatten(1)


def check_node_limit(
    n_experts: int, top_k: int, n_groups: int, n_limited_groups: int, n_nodes: int, max_nodes: int
) -> None:
    """Raise ValueError unless node-limited routing over `n_nodes` can always pick `top_k` experts.

    Expert groups and nodes must nest (one a union of the other), so that whichever limit is finer
    chooses among whole sets the coarser one kept; then the experts left are counted exactly.
    """
    if n_nodes < 1 or n_experts % n_nodes:
        raise ValueError(
            f"node-limited routing: {n_experts} experts do not split over {n_nodes} nodes; pick an ep and "
            "ranks_per_node whose number of nodes divides n_routed_experts"
        )
    if max_nodes < 1:
        raise ValueError(f"max_nodes_per_token={max_nodes} must be >= 1")
    if max_nodes >= n_nodes:
        return  # no limit: every node may be chosen
    per_node, per_group = n_experts // n_nodes, n_experts // n_groups
    if n_groups > 1 and per_node % per_group and per_group % per_node:
        raise ValueError(
            f"node-limited routing needs expert groups ({per_group} experts each) and nodes ({per_node} "
            "experts each) to nest; change n_expert_groups, ep or ranks_per_node"
        )
    kept_groups = n_limited_groups if n_groups > 1 else 1
    if per_node >= per_group:  # groups inside nodes
        left = min(kept_groups * per_group, max_nodes * per_node)
    else:  # nodes inside groups
        left = min(max_nodes, kept_groups * (per_group // per_node)) * per_node
    if left < top_k:
        raise ValueError(
            f"max_nodes_per_token={max_nodes} leaves {left} experts to choose from, fewer than "
            f"n_activated_experts={top_k}; raise max_nodes_per_token (or n_limited_groups)"
        )


def grouped_mm_available(x: torch.Tensor) -> bool:
    """torch._grouped_mm runs on Hopper-class GPUs in bf16; elsewhere we fall back to a padded bmm."""
    return (
        hasattr(torch, "_grouped_mm")
        and x.is_cuda
        and x.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device)[0] >= 9
    )


class GroupedExperts(nn.Module):
    """`n_experts` SwiGLU experts whose weights are stacked, applied as one grouped GEMM.

    Weights follow nn.Linear's (out, in) layout per expert: w1, w3 (E, hidden, dim); w2 (E, dim, hidden).
    """

    def __init__(self, n_experts: int, dim: int, hidden_dim: int, impl: str = "grouped") -> None:
        super().__init__()
        self.n_experts = n_experts
        self.impl = impl
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: (N, dim) tokens sorted by expert; counts: (E,) tokens per expert -> (N, dim)."""
        if self.impl == "loop":
            return self._loop(x, counts)
        x = self._operand(x)
        if grouped_mm_available(x):
            offs = counts.cumsum(0).to(torch.int32)
            w1, w2, w3 = (w.to(x.dtype).transpose(-2, -1) for w in (self.w1, self.w2, self.w3))
            h = F.silu(torch._grouped_mm(x, w1, offs=offs)) * torch._grouped_mm(x, w3, offs=offs)
            return torch._grouped_mm(h, w2, offs=offs)
        return self._padded_bmm(x, counts)

    def reads_counts_on_host(self) -> bool:
        """Whether a forward here, in the current autocast state, takes a path that reads the expert
        counts on the host (the loop, or the padded bmm where the grouped GEMM cannot run), as a CUDA
        graph cannot. The activations are taken to have the weights' dtype, as they do without autocast."""
        return self.impl == "loop" or not grouped_mm_available(self._operand(self.w1.detach()[:0]))

    @staticmethod
    def _operand(x: torch.Tensor) -> torch.Tensor:
        """x as the grouped GEMM takes it: in autocast's dtype under autocast (bf16 operands)."""
        if x.is_cuda and torch.is_autocast_enabled("cuda"):
            return x.to(torch.get_autocast_dtype("cuda"))
        return x

    def _loop(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The plain way, one small GEMM chain per expert (a baseline for the grouped GEMM)."""
        outs = []
        for e, rows in enumerate(x.split(counts.tolist())):
            h = F.silu(rows @ self.w1[e].T) * (rows @ self.w3[e].T)
            outs.append(h @ self.w2[e].T)
        return torch.cat(outs) if outs else x.new_zeros(0, self.w2.shape[1])

    def _padded_bmm(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Scatter tokens into an (E, capacity, dim) buffer, run three bmms, gather back."""
        n_tokens = x.shape[0]
        if n_tokens == 0:  # still a function of x: the dispatch's backward is a collective every rank joins
            return x[:, :1].expand(-1, self.w2.shape[1]).clone()
        starts = counts.cumsum(0) - counts
        expert = torch.repeat_interleave(
            torch.arange(self.n_experts, device=x.device), counts, output_size=n_tokens
        )
        slot = torch.arange(n_tokens, device=x.device) - starts[expert]
        capacity = int(counts.max())  # host sync: the CPU/pre-Hopper path needs a static shape
        buf = x.new_zeros(self.n_experts, capacity, x.shape[1]).index_put((expert, slot), x)
        h = F.silu(torch.bmm(buf, self.w1.transpose(1, 2))) * torch.bmm(buf, self.w3.transpose(1, 2))
        out = torch.bmm(h, self.w2.transpose(1, 2))  # (E, capacity, dim)
        return out[expert, slot]


class Dispatcher(Protocol):
    """Moves expert-sorted tokens to the ranks that own their experts, and the results back."""

    def dispatch(
        self, tokens: torch.Tensor, counts: torch.Tensor, token_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """tokens: (N, dim) sorted by global expert; counts: (n_routed_experts,); token_ids: (N,) which
        token each row copies (rows of one token are identical), so a dispatcher can send a token once
        per destination instead of once per expert.

        Returns the tokens this rank's experts must process, sorted by local expert, their counts
        (n_local_experts,), and a context for `combine`.
        """

    def combine(self, expert_out: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Inverse of dispatch: (tokens received, dim) -> (N, dim) in the original sorted order."""


class LocalDispatcher:
    """All experts live on this rank: dispatch and combine are identities."""

    def dispatch(
        self, tokens: torch.Tensor, counts: torch.Tensor, token_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        return tokens, counts, None

    def combine(self, expert_out: torch.Tensor, ctx: Any) -> torch.Tensor:
        return expert_out


class MoE(nn.Module):
    """Shared experts plus routed experts; `n_local_experts` of them live here, from `expert_offset`.

    The strategy shrinks `experts` to this rank's slice and swaps `dispatcher` for an all-to-all one.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_routed_experts = config.n_routed_experts
        self.top_k = config.n_activated_experts
        self.router = Router(config)
        self.experts = GroupedExperts(
            config.n_routed_experts, config.dim, config.moe_inter_dim, config.expert_impl
        )
        self.shared_experts = (
            SwiGLU(config.dim, config.n_shared_experts * config.moe_inter_dim)
            if config.n_shared_experts > 0
            else None
        )
        self.dispatcher: Dispatcher = LocalDispatcher()
        self.expert_offset = 0  # global id of the first routed expert held here
