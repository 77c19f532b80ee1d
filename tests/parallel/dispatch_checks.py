"""Functions the process pools run for the flat dispatcher's exactness test: every rank builds every
rank's rows, computes in one process where each row must land and what its gradient must be, and
compares that with what `AllToAllDispatcher` delivered, bit for bit."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from lightning_dsv3.parallel.compression import BlockCodec, get_codec
from lightning_dsv3.parallel.expert import AllToAllDispatcher
from lightning_dsv3.parallel.telemetry import CommTelemetry, Link

N_LOCAL, DIM = 3, 200  # 200 channels: a full and a partial codec block of 128


def routed_counts(world: int, scenario: str) -> list[torch.Tensor]:
    """(n_experts,) rows per global expert for every source rank: uneven, with empty chunks on purpose.

    "uneven": rank 0's local expert 1 gets no rows from anyone and rank 0 sends nothing to rank 1.
    "idle": as uneven, and the last rank's experts get no rows at all.
    """
    n_experts = N_LOCAL * world
    out = []
    for source in range(world):
        counts = torch.randint(0, 4, (n_experts,), generator=torch.Generator().manual_seed(100 + source))
        counts[1] = 0
        if source == 0:
            counts[N_LOCAL : 2 * N_LOCAL] = 0
        if scenario == "idle":
            counts[(world - 1) * N_LOCAL :] = 0
        out.append(counts)
    return out


def _rows(source: int, n_rows: int, seed: int) -> torch.Tensor:
    return torch.randn(n_rows, DIM, generator=torch.Generator().manual_seed(seed * 1000 + source))


def _expert_fn(received: torch.Tensor, local_counts: torch.Tensor, rank: int) -> torch.Tensor:
    """A different function per expert, built from correctly rounded ops only (same bits in any layout)."""
    expert = (
        torch.repeat_interleave(torch.arange(N_LOCAL, device=received.device), local_counts) + rank * N_LOCAL
    )
    return received.square() * ((expert + 1) * 0.375).unsqueeze(1)


def _loss(received: torch.Tensor, back: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank `rank`'s loss: both the rows its experts received and what its combine returned feed it."""
    return (received * _rows(rank, received.shape[0], 2)).sum() + (back * _rows(rank, back.shape[0], 3)).sum()


def _roundtrip(codec: BlockCodec | None, x: torch.Tensor) -> torch.Tensor:
    return x if codec is None else codec.unpack(codec.pack(x), x.shape, x.dtype)


def reference(
    world: int, scenario: str, codec: BlockCodec | None, grad_codec: BlockCodec | None
) -> list[dict]:
    """Per rank, in one process: what its experts receive (by local expert, then source), their
    counts, what its combine returns and its tokens' gradient, for the loss of `exchange_check`."""
    counts = routed_counts(world, scenario)
    tokens = [_rows(s, int(c.sum()), 1) for s, c in enumerate(counts)]
    starts = [(torch.cumsum(c, 0) - c).tolist() for c in counts]
    # where chunk (source s -> rank r, local expert e) lies on rank r: (offset, rows)
    at: dict[tuple[int, int, int], tuple[int, int]] = {}
    for r in range(world):
        offset = 0
        for e in range(N_LOCAL):
            for s in range(world):
                at[s, r, e] = (offset, int(counts[s][r * N_LOCAL + e]))
                offset += at[s, r, e][1]

    def chunk(s: int, r: int, e: int) -> torch.Tensor:
        return tokens[s].narrow(0, starts[s][r * N_LOCAL + e], at[s, r, e][1])

    def gather(per_rank: list[torch.Tensor], s: int) -> torch.Tensor:
        """Rank s's rows in its own order (by global expert) from where they lie on the experts' ranks."""
        return torch.cat([per_rank[r].narrow(0, *at[s, r, e]) for r in range(world) for e in range(N_LOCAL)])

    received = [
        _roundtrip(
            codec, torch.cat([chunk(s, r, e) for e in range(N_LOCAL) for s in range(world)])
        ).requires_grad_()
        for r in range(world)
    ]
    local = [sum(c.view(world, N_LOCAL)[r] for c in counts) for r in range(world)]
    outputs = [_expert_fn(received[r], local[r], r) for r in range(world)]
    back = [gather(outputs, s) for s in range(world)]
    sum(_loss(received[r], back[r], r) for r in range(world)).backward()
    grads = [_roundtrip(grad_codec, x.grad) for x in received]
    return [
        {
            "received": received[s].detach(),
            "local": local[s],
            "back": back[s].detach(),
            "grad": gather(grads, s),
        }
        for s in range(world)
    ]


def exchange_check(scenario: str, codec_name: str | None, grad_codec_name: str | None) -> dict[str, Any]:
    """This rank's dispatch + expert + combine + backward against `reference`: torch.equal everywhere."""
    world, rank = dist.get_world_size(), dist.get_rank()
    codec, grad_codec = get_codec(codec_name), get_codec(grad_codec_name)
    telemetry = CommTelemetry(torch.device("cpu"))
    dispatcher = AllToAllDispatcher(Link(None, "ep", telemetry), world, N_LOCAL, codec, grad_codec)
    counts = routed_counts(world, scenario)[rank]
    tokens = _rows(rank, int(counts.sum()), 1).requires_grad_()
    received, local, ctx = dispatcher.dispatch(tokens, counts)
    back = dispatcher.combine(_expert_fn(received, local, rank), ctx)
    _loss(received, back, rank).backward()
    expected = reference(world, scenario, codec, grad_codec)[rank]
    got = {"received": received.detach(), "local": local, "back": back.detach(), "grad": tokens.grad}
    for key, want in expected.items():
        assert got[key].shape == want.shape and torch.equal(got[key], want), f"rank {rank}: {key} differs"
    telemetry.end_step()
    return {"sent_rows": tokens.shape[0], "received_rows": received.shape[0], "stats": telemetry.stats()}
