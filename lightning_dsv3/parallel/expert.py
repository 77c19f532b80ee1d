"""Expert parallelism: routed experts split over the ep group, tokens moved by all-to-all.

Dropless: every token reaches every expert it chose (no capacity factor), so the split sizes of
the exchange vary per step; the per-expert counts are exchanged first (one small all-to-all per
layer, the only host synchronisation of the layer) and the payload follows with variable splits.
Both directions are differentiable: the backward of a dispatch is a combine of the gradients and
vice versa. Works on NCCL and gloo alike.

The dispatch payload can travel packed by a block codec (fp8 or int8 codes with one fp32 scale per
128 channels, as DeepSeek-V3 dispatches): one uint8 row per token row, so one all_to_all_single
carries codes and scales, decoded on arrival. Its backward sends the gradients unquantized
(straight-through: the quantizer's derivative is taken as the identity) unless a gradient codec is
given. The combine always travels in the compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_dsv3.model.moe import Dispatcher, MoE
from lightning_dsv3.parallel.compression import BlockCodec
from lightning_dsv3.parallel.telemetry import Link

# (uncompressed bytes, packed bytes) of a dispatch payload -> whether to send it packed; the same
# answer on every rank for the same sizes (see probe.DispatchCodecPolicy)
CodecPolicy = Callable[[int, int], bool]


def encode_rows(codec: BlockCodec | None, x: torch.Tensor) -> torch.Tensor:
    """(rows, dim) -> what goes on the wire: x itself, or (rows, bytes_per_row) uint8.

    No NaN/Inf check (a host sync per layer): a non-finite value would cross an uncompressed
    exchange just the same, and here it stays within its block of 128 channels.
    """
    return x if codec is None else codec.pack(x, check_finite=False)


def decode_rows(codec: BlockCodec | None, buf: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `encode_rows`: (rows, bytes_per_row) uint8 or (rows, dim) -> (rows, dim) in `dtype`."""
    return buf if codec is None else codec.unpack(buf, (buf.shape[0], dim), dtype)


def payload_nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


def choose_codec(codec: BlockCodec | None, policy: CodecPolicy | None, x: torch.Tensor) -> BlockCodec | None:
    """The codec for payload x (rows, dim): `codec` unless the policy says compression does not pay."""
    if codec is None or policy is None:
        return codec
    return codec if policy(payload_nbytes(x), codec.nbytes(x.shape)) else None


class _Exchange(torch.autograd.Function):
    """all_to_all_single of rows with variable splits, optionally packed by a block codec.

    Forward: encode -> exchange -> decode. Backward: the reverse exchange of the gradient, encoded by
    `grad_codec` (None: exact), whatever the forward used.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        link: Link,
        out_splits: list[int],
        in_splits: list[int],
        codec: BlockCodec | None,
        grad_codec: BlockCodec | None,
        op: str,
    ) -> torch.Tensor:
        ctx.args = (link, out_splits, in_splits, grad_codec, op)
        return _send(x, link, out_splits, in_splits, codec, op)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        link, out_splits, in_splits, grad_codec, op = ctx.args
        back = _send(grad.contiguous(), link, in_splits, out_splits, grad_codec, f"{op}_backward")
        return back, None, None, None, None, None, None


def _send(
    x: torch.Tensor,
    link: Link,
    out_splits: list[int],
    in_splits: list[int],
    codec: BlockCodec | None,
    op: str,
) -> torch.Tensor:
    payload = encode_rows(codec, x)
    buf = link.all_to_all(payload, out_splits, in_splits, op, nbytes=payload_nbytes(x))
    return decode_rows(codec, buf, x.shape[1], x.dtype)


@dataclass
class _DispatchContext:
    order: torch.Tensor  # received rows sorted by local expert (a permutation of the received rows)
    send_splits: list[int]
    recv_splits: list[int]


@dataclass(eq=False)
class AllToAllDispatcher:
    """Moves expert-sorted tokens to the ep ranks owning their experts and the outputs back.

    Tokens arrive sorted by global expert, so the rows for ep rank r are one contiguous block
    (experts [r * n_local, (r + 1) * n_local)). After the exchange the rows are grouped by source
    rank, then expert; `dispatch` re-sorts them by local expert for the grouped GEMM.

    Args:
        link: the ep group and its telemetry.
        codec: packs the dispatch payload (None: sent in the compute dtype).
        grad_codec: packs the gradient of the dispatch in its backward (None: exact).
        policy: decides per payload size whether `codec` pays (None: always use it).
    """

    link: Link
    ep_size: int
    n_local_experts: int  # per ep rank
    codec: BlockCodec | None = None
    grad_codec: BlockCodec | None = None
    policy: CodecPolicy | None = None

    def dispatch(
        self, tokens: torch.Tensor, counts: torch.Tensor, token_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """tokens: (N, dim) sorted by global expert; counts: (ep * n_local,) -> local tokens, counts, ctx.

        `token_ids` (which token each row copies) is not needed here: every (token, expert) row travels.
        """
        recv_counts = self.link.all_to_all_equal(counts, "dispatch_counts")  # (source rank, local expert)
        shape = (self.ep_size, self.n_local_experts)
        matrix = recv_counts.view(shape)
        send_splits = counts.view(shape).sum(1).tolist()  # host sync: split sizes
        recv_splits = matrix.sum(1).tolist()
        codec = choose_codec(self.codec, self.policy, tokens)
        received = _Exchange.apply(
            tokens, self.link, recv_splits, send_splits, codec, self.grad_codec, "dispatch"
        )
        order = sort_by_local_expert(matrix, sum(recv_splits))
        ctx = _DispatchContext(order=order, send_splits=send_splits, recv_splits=recv_splits)
        return received[order], matrix.sum(0), ctx

    def combine(self, expert_out: torch.Tensor, ctx: _DispatchContext) -> torch.Tensor:
        """(received rows, dim) sorted by local expert -> (N, dim) in the sender's original order."""
        by_source = torch.zeros_like(expert_out).index_copy(0, ctx.order, expert_out)
        return _Exchange.apply(by_source, self.link, ctx.send_splits, ctx.recv_splits, None, None, "combine")


def sort_by_local_expert(matrix: torch.Tensor, n_rows: int) -> torch.Tensor:
    """The permutation that sorts `n_rows` received rows, grouped by source then local expert with
    counts `matrix` (sources, n_local), by local expert (stable: by source within an expert)."""
    n_sources, n_local = matrix.shape
    expert_of_row = torch.repeat_interleave(
        torch.arange(n_local, device=matrix.device).repeat(n_sources), matrix.flatten(), output_size=n_rows
    )
    return expert_of_row.argsort(stable=True)


def shard_experts(model: nn.Module, ep_size: int, ep_rank: int, dispatcher: Dispatcher | None) -> None:
    """Keep this ep rank's slice of every MoE layer's routed experts and install `dispatcher`.

    Rank r keeps experts [r * E / ep, (r + 1) * E / ep); the weights are sliced from the initialised
    full tensors, so the shards equal the single-process model's experts. One dispatcher serves every
    layer (it keeps no state between calls); with ep = 1 it is not needed and may be None.
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
        if dispatcher is None:
            raise ValueError(
                f"ep={ep_size} splits the experts over ranks: pass the dispatcher that moves tokens"
            )
        experts = moe.experts
        for name in ("w1", "w2", "w3"):
            full = getattr(experts, name)
            setattr(
                experts,
                name,
                nn.Parameter(full.detach()[moe.expert_offset : moe.expert_offset + n_local].clone()),
            )
        experts.n_experts = n_local
        moe.dispatcher = dispatcher


def _moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def is_expert_param(name: str) -> bool:
    """Routed-expert weights: split over ep, reduced over dp only."""
    return ".experts.w" in name
