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
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.dim))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts))
        # tokens routed to each expert since the last bias update (summed over ranks by the strategy)
        self.register_buffer("expert_load", torch.zeros(self.n_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> Routing:
        """x: (T, dim) -> Routing for T tokens."""
        scores = F.linear(x.float(), self.weight.float())
        scores = scores.sigmoid() if self.score_func == "sigmoid" else scores.softmax(dim=-1)
        choice = scores.detach() + self.e_score_correction_bias  # selection only: no gradient path
        if self.n_groups > 1:
            grouped = choice.unflatten(-1, (self.n_groups, -1))  # (T, groups, experts per group)
            top = min(2, grouped.shape[-1])
            group_score = grouped.topk(top, dim=-1).values.sum(-1)  # (T, groups)
            chosen = group_score.topk(self.n_limited_groups, dim=-1).indices
            keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, chosen, True)
            choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(1)
        indices = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.score_func == "sigmoid":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.training:  # only training tokens drive the bias update
            with torch.no_grad():
                self.expert_load += tokens_per_expert(indices, self.n_experts).float()
        return Routing(weights * self.route_scale, indices, scores)

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
    def update_bias(self, load: torch.Tensor | None = None) -> None:
        """Apply the aux-loss-free update from `load` (default: this rank's counts) and reset the counts."""
        load = self.expert_load if load is None else load
        self.e_score_correction_bias += self.gamma * torch.sign(load.mean() - load)
        self.expert_load.zero_()


def tokens_per_expert(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(n_experts,) counts of `indices`; unlike torch.bincount on CUDA, no host synchronisation."""
    flat = indices.flatten()
    return torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat)
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
        if x.is_cuda and torch.is_autocast_enabled("cuda"):  # the grouped GEMM takes bf16 operands
            x = x.to(torch.get_autocast_dtype("cuda"))
        if grouped_mm_available(x):
            offs = counts.cumsum(0).to(torch.int32)
            w1, w2, w3 = (w.to(x.dtype).transpose(-2, -1) for w in (self.w1, self.w2, self.w3))
            h = F.silu(torch._grouped_mm(x, w1, offs=offs)) * torch._grouped_mm(x, w3, offs=offs)
            return torch._grouped_mm(h, w2, offs=offs)
        return self._padded_bmm(x, counts)

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
        if n_tokens == 0:
            return x.new_zeros(0, self.w2.shape[1])
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

    def dispatch(self, tokens: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """tokens: (N, dim) sorted by global expert; counts: (n_routed_experts,).

        Returns the tokens this rank's experts must process, sorted by local expert, their counts
        (n_local_experts,), and a context for `combine`.
        """

    def combine(self, expert_out: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Inverse of dispatch: (tokens received, dim) -> (N, dim) in the original sorted order."""


class LocalDispatcher:
    """All experts live on this rank: dispatch and combine are identities."""

    def dispatch(self, tokens: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
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
