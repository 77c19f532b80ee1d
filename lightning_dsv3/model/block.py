"""One decoder layer, exposed as four parts: attention, dispatch, mlp, combine.

Running the four in order is the layer's forward. The pipeline's overlapped forward&backward calls
them one by one on two micro-batches, so that one micro-batch's all-to-all (dispatch, combine)
runs while the other computes (attention, mlp). Dense layers have identity dispatch and combine.

Activation checkpointing (`ModelConfig.activation_checkpointing`) recomputes regions inside a part,
never across parts: the all-to-all lives in dispatch and combine, so a recomputation never repeats a
collective. "attention" recomputes the attention part up to the router (norms, MLA, residual),
"mlp" the routed and shared experts (or the dense MLP), "layer" both; "selective" is MLA's own
(see `MLA.forward`). The router stays outside every region: it counts expert loads as a side effect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_dsv3.config import ModelConfig
from lightning_dsv3.model.mla import MLA
from lightning_dsv3.model.moe import MoE, Routing, SwiGLU, tokens_per_expert
from lightning_dsv3.model.norm import RMSNorm


class _AddAuxLoss(torch.autograd.Function):
    """Identity on `x` whose backward also seeds `aux_loss` with `scale`.

    The balance loss is then optimised where it is computed, on whichever pipeline stage holds the
    layer, without travelling to the last stage with the main loss.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_shape, ctx.aux_dtype = aux_loss.shape, aux_loss.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        aux_grad = torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=grad.device)
        return grad, aux_grad, None


class _PermuteRows(torch.autograd.Function):
    """rows = x[index // k]: each row of x copied k times, in the order `index` (a permutation of
    range(len(x) * k)); `inverse` is the inverse permutation, made on the stream that runs the backward.

    Autograd's backward of a gather scatters, adding into zeros (on the GPU, atomic adds in fp32 and a
    cast: two passes over every routed row). Knowing the permutation, the backward is a gather too:
    grad_x[t] = sum over the k copies of grad_rows[inverse[t * k + j]], deterministic and one pass.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, k: int
    ) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x[index // k] if k > 1 else x[index]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (inverse,) = ctx.saved_tensors
        out = grad[inverse]
        return (out.unflatten(0, (-1, ctx.k)).sum(1) if ctx.k > 1 else out), None, None, None


@dataclass
class LayerState:
    """Tensors that flow between the four parts of one layer for one micro-batch."""

    h: torch.Tensor  # (batch, seq, dim) residual stream after attention
    x: torch.Tensor  # (tokens, dim) normalised feed-forward input, tokens = batch * seq
    routing: Routing | None = None
    order: torch.Tensor | None = None  # (tokens * k,) flat (token, slot) positions sorted by expert
    routed: torch.Tensor | None = None  # (tokens * k, dim) inputs sorted by expert, before dispatch
    counts: torch.Tensor | None = None  # (n_routed_experts,) tokens per expert
    received: torch.Tensor | None = None  # tokens for this rank's experts, sorted by local expert
    received_counts: torch.Tensor | None = None
    dispatch_ctx: Any = None
    expert_out: torch.Tensor | None = None  # (received tokens, dim)
    ffn_out: torch.Tensor | None = None  # (tokens, dim) dense MLP or shared experts


class Block(nn.Module):
    """Pre-norm decoder layer: h = x + MLA(norm(x)); out = h + FFN(norm(h)), FFN dense or MoE."""

    def __init__(self, layer_id: int, config: ModelConfig) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.attn = MLA(config)
        self.recompute_attention = config.activation_checkpointing in ("attention", "layer")
        self.recompute_mlp = config.activation_checkpointing in ("mlp", "layer")
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.is_moe = config.is_moe_layer(layer_id)
        self.ffn: MoE | SwiGLU = MoE(config) if self.is_moe else SwiGLU(config.dim, config.inter_dim)
        self.aux_loss_scale = (
            1.0  # gradient weight of the balance loss (1 / micro-batches), set by the trainer
        )
        self.last_aux_loss: torch.Tensor | None = None

    def _attend(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (batch, seq, dim) -> h = x + MLA(norm(x)) (batch, seq, dim), norm(h) (tokens, dim)."""
        h = x + self.attn(x, cos, sin, norm=self.attn_norm)
        return h, self.ffn_norm(h).flatten(0, 1)

    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> LayerState:
        """Attention, the residual add, the feed-forward norm and (MoE) routing and sorting by expert."""
        h, x_ffn = _maybe_checkpoint(self.recompute_attention, self._attend, x, cos, sin)
        state = LayerState(h=h, x=x_ffn)
        if not self.is_moe:
            return state
        moe: MoE = self.ffn  # type: ignore[assignment]
        routing = moe.router(state.x)
        if moe.router.alpha > 0 and self.training:
            aux = moe.router.balance_loss(routing, batch=x.shape[0])
            self.last_aux_loss = aux.detach()
            state.h = _AddAuxLoss.apply(h, aux, self.aux_loss_scale)
        flat = routing.indices.flatten()
        state.routing = routing
        state.order = flat.argsort(stable=True)
        inverse = torch.empty_like(state.order)
        inverse[state.order] = torch.arange(state.order.numel(), device=inverse.device)
        state.routed = _PermuteRows.apply(state.x, state.order, inverse, moe.top_k)
        state.counts = tokens_per_expert(flat, moe.n_routed_experts)
        return state

    def dispatch(self, state: LayerState) -> LayerState:
        """Send routed tokens to the ranks owning their experts (identity without expert parallelism)."""
        if self.is_moe:
            moe: MoE = self.ffn  # type: ignore[assignment]
            state.received, state.received_counts, state.dispatch_ctx = moe.dispatcher.dispatch(
                state.routed, state.counts, token_ids=state.order // moe.top_k
            )
        return state

    def mlp(self, state: LayerState) -> LayerState:
        """Local experts on received tokens and shared experts (or the dense MLP) on local tokens."""
        recompute = self.recompute_mlp
        if not self.is_moe:
            state.ffn_out = _maybe_checkpoint(recompute, self.ffn, state.x)
            return state
        moe: MoE = self.ffn  # type: ignore[assignment]
        state.expert_out = _maybe_checkpoint(recompute, moe.experts, state.received, state.received_counts)
        if moe.shared_experts is not None:
            state.ffn_out = _maybe_checkpoint(recompute, moe.shared_experts, state.x)
        return state

    def combine(self, state: LayerState) -> torch.Tensor:
        """Bring expert outputs back, weight them by the gates, add shared experts and the residual."""
        if not self.is_moe:
            return state.h + state.ffn_out.view_as(state.h)
        moe: MoE = self.ffn  # type: ignore[assignment]
        back = moe.dispatcher.combine(state.expert_out, state.dispatch_ctx)  # (tokens * k, dim) by expert
        # under the pipeline's overlap this part runs on the communication stream, and its backward must
        # only read indices made on that stream (the compute stream's `state.order` could be freed and
        # its memory reused there while the backward is still queued): a copy of the order, made here
        order = state.order.clone()
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        unsorted = _PermuteRows.apply(back, inverse, order, 1)  # (tokens * k, dim) by (token, slot)
        weights = state.routing.weights.to(back.dtype).unsqueeze(-1)  # (tokens, k, 1)
        y = (unsorted.unflatten(0, (-1, moe.top_k)) * weights).sum(1)  # (tokens, dim)
        if state.ffn_out is not None:
            y = y + state.ffn_out
        return state.h + y.view_as(state.h)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (batch, seq, dim) -> (batch, seq, dim)."""
        return self.combine(self.mlp(self.dispatch(self.attention(x, cos, sin))))


def _maybe_checkpoint(recompute: bool, fn: Any, *args: Any) -> Any:
    """fn(*args), keeping only its inputs for backward when `recompute` (torch's non-reentrant checkpoint:
    it tolerates the part-wise graphs and the split input/weight backward of the pipeline)."""
    if recompute and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
