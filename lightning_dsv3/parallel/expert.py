"""Expert parallelism: routed experts split over the ep group, tokens moved by all-to-all.

Dropless: every token reaches every expert it chose (no capacity factor), so the split sizes of
the exchange vary per step; the per-expert counts are exchanged first (one small all-to-all per
layer, the only host synchronisation of the layer) and the payload follows with variable splits.
Both directions are differentiable: the backward of a dispatch is a combine of the gradients and
vice versa. Works on NCCL and gloo alike.

The dispatch payload can travel packed by a block codec (fp8 or int8 codes with one fp32 scale per
128 channels, as DeepSeek-V3 dispatches): one uint8 row per token row, so one all_to_all_single
carries codes and scales, regrouped while packed and decoded on arrival. Its backward sends the
gradients unquantized (straight-through: the quantizer's derivative is taken as the identity) unless
a gradient codec is given. The combine always travels in the compute dtype.
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


def _transpose_blocks(x: torch.Tensor, sizes: list[int], n_rows: int, n_cols: int) -> torch.Tensor:
    """x: (sum(sizes), ...) cut into an n_rows x n_cols grid of blocks laid out row by row, block (i, j)
    holding sizes[i * n_cols + j] rows -> the same blocks laid out column by column.

    The rows move in one pass (torch's multi-tensor copy, as the optimizers use: a kernel or two on a
    GPU, however many blocks), with no index tensor to build or sort: both places of a block follow
    from the sizes the host already holds.
    """
    if n_rows == 1 or n_cols == 1:  # a single row or column of blocks reads the same both ways
        return x
    out = torch.empty_like(x)
    transposed = [sizes[i * n_cols + j] for j in range(n_cols) for i in range(n_rows)]
    source, dest = x.split(sizes), out.split(transposed)
    blocks = [(i, j) for i in range(n_rows) for j in range(n_cols) if sizes[i * n_cols + j]]
    if blocks:
        torch._foreach_copy_(
            [dest[j * n_rows + i] for i, j in blocks], [source[i * n_cols + j] for i, j in blocks]
        )
    return out


@dataclass(frozen=True)
class _Plan:
    """The split sizes of one dispatch, read on the host once, for its backward and the matching combine."""

    send_splits: list[int]  # rows this rank sends to each ep rank
    recv_splits: list[int]  # rows it receives from each ep rank
    matrix: list[int]  # (ep, n_local) flattened: rows received per (source rank, local expert)
    ep: int
    n_local: int

    def by_expert(self, rows: torch.Tensor) -> torch.Tensor:
        """Received rows, by source rank then local expert -> by local expert then source rank."""
        return _transpose_blocks(rows, self.matrix, self.ep, self.n_local)

    def by_source(self, rows: torch.Tensor) -> torch.Tensor:
        """Inverse of `by_expert`."""
        expert_major = [
            self.matrix[s * self.n_local + e] for e in range(self.n_local) for s in range(self.ep)
        ]
        return _transpose_blocks(rows, expert_major, self.n_local, self.ep)


class _Exchange(torch.autograd.Function):
    """The ep exchange of rows, to the experts' ranks (`to_experts`) or back, optionally packed by a block
    codec. Backward: the exchange of the gradient the other way, encoded by `grad_codec` (None: exact),
    whatever the forward used."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        link: Link,
        plan: _Plan,
        to_experts: bool,
        codec: BlockCodec | None,
        grad_codec: BlockCodec | None,
        op: str,
    ) -> torch.Tensor:
        ctx.args = (link, plan, to_experts, grad_codec, op)
        return move_rows(x, link, plan, to_experts, codec, op)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        link, plan, to_experts, grad_codec, op = ctx.args
        back = move_rows(grad.contiguous(), link, plan, not to_experts, grad_codec, f"{op}_backward")
        return back, None, None, None, None, None, None


def move_rows(
    x: torch.Tensor, link: Link, plan: _Plan, to_experts: bool, codec: BlockCodec | None, op: str
) -> torch.Tensor:
    """To the experts: x (N, dim) sorted by global expert -> (received rows, dim) sorted by local expert.
    Back: the inverse. The rows are regrouped on the expert's side while packed (fewer bytes to move)."""
    payload, nbytes = encode_rows(codec, x), payload_nbytes(x)
    if to_experts:
        buf = plan.by_expert(link.all_to_all(payload, plan.recv_splits, plan.send_splits, op, nbytes=nbytes))
    else:
        buf = link.all_to_all(plan.by_source(payload), plan.send_splits, plan.recv_splits, op, nbytes=nbytes)
    return decode_rows(codec, buf, x.shape[1], x.dtype)


@dataclass(eq=False)
class AllToAllDispatcher:
    """Moves expert-sorted tokens to the ep ranks owning their experts and the outputs back.

    Tokens arrive sorted by global expert, so the rows for ep rank r are one contiguous block
    (experts [r * n_local, (r + 1) * n_local)), ordered by local expert. One all_to_all_single moves
    them (NCCL sends one message per peer); they arrive grouped by source rank, then expert, and one
    block transpose lays them out by local expert for the grouped GEMM. The combine transposes the
    expert outputs back and returns them in one all_to_all_single.

    Why not land each (source, expert) chunk in place with a batch of point-to-point messages and
    skip the transpose? That takes one message per (peer, local expert) instead of one per peer, and
    on 2 H100s (torch 2.11, NCCL 2.28) each cost about 20 us of host time before NCCL could start:
    with 8 experts per rank it was slower than this design at every size up to 256 MiB, and the count
    of messages grows with ep x n_local. The transpose is one pass at memory bandwidth.

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
        ep, n_local = self.ep_size, self.n_local_experts
        recv_counts = self.link.all_to_all_equal(counts, "dispatch_counts")  # (source rank, local expert)
        local_counts = recv_counts.view(ep, n_local).sum(0)  # launched before the host waits
        sizes = torch.cat([counts, recv_counts]).tolist()  # the one host sync: both sides' counts at once
        sent, matrix = sizes[: ep * n_local], sizes[ep * n_local :]
        plan = _Plan(
            send_splits=[sum(sent[r * n_local : (r + 1) * n_local]) for r in range(ep)],
            recv_splits=[sum(matrix[r * n_local : (r + 1) * n_local]) for r in range(ep)],
            matrix=matrix,
            ep=ep,
            n_local=n_local,
        )
        codec = choose_codec(self.codec, self.policy, tokens)
        received = _Exchange.apply(tokens, self.link, plan, True, codec, self.grad_codec, "dispatch")
        return received, local_counts, plan

    def combine(self, expert_out: torch.Tensor, ctx: _Plan) -> torch.Tensor:
        """(received rows, dim) sorted by local expert -> (N, dim) in the sender's original order."""
        return _Exchange.apply(expert_out, self.link, ctx, False, None, None, "combine")


def sort_by_local_expert(matrix: torch.Tensor, n_rows: int) -> torch.Tensor:
    """The permutation that sorts `n_rows` received rows, grouped by source then local expert with
    counts `matrix` (sources, n_local), by local expert (stable: by source within an expert). The two-hop
    dispatch sorts its second hop's rows with it; the flat one regroups by a block transpose."""
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
