"""Which model chunks each pipeline rank holds, and the parameters held by more than one of them.

Some parameters live in several chunks of one pipeline: DualPipe keeps two copies of every stage
(on rank r and rank pp-1-r), and with MTP the last stage keeps its own copy of the embedding. The
copies must stay identical, so their gradients (and the routers' expert-load counts) are summed
over the holders before the data-parallel reduction; `TiedCopies` does that over one process group
per set of holder ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lightning_dsv3.config import ModelConfig
from lightning_dsv3.model.transformer import Transformer
from lightning_dsv3.pipeline.costs import StageCosts
from lightning_dsv3.pipeline.partition import partition
from lightning_dsv3.pipeline.schedules import PipelineSchedule


@dataclass(frozen=True)
class ChunkSpec:
    """What one chunk holds: a layer range, and the embedding / head ends of the model."""

    stage: int
    layer_ids: tuple[int, ...]
    with_embedding: bool
    with_head: bool


@dataclass
class StagePlan:
    """The schedule and the layer range of every stage."""

    schedule: PipelineSchedule
    layers: list[range]

    @classmethod
    def build(
        cls,
        config: ModelConfig,
        schedule: PipelineSchedule,
        seq_len: int | None = None,
        layer_costs: Sequence[float] | StageCosts | None = None,
    ) -> StagePlan:
        """Stages cut by the FLOP model, or by `layer_costs`: one per layer, or measured `StageCosts`
        (layers, head and embedding)."""
        if isinstance(layer_costs, StageCosts):
            measured = (layer_costs.layers, layer_costs.head, layer_costs.embed)
            return cls(schedule, partition(config, schedule.n_stages, seq_len, *measured))
        return cls(schedule, partition(config, schedule.n_stages, seq_len, layer_costs))

    def chunks_of(self, pp_rank: int) -> list[ChunkSpec]:
        last = self.schedule.n_stages - 1
        specs = []
        for c in range(self.schedule.n_chunks):
            stage = self.schedule.stage_of(pp_rank, c)
            specs.append(ChunkSpec(stage, tuple(self.layers[stage]), stage == 0, stage == last))
        return specs

    def holders(self, config: ModelConfig) -> dict[str, list[tuple[int, int]]]:
        """Tensor name (parameters and router load buffers) -> every (pp rank, chunk) holding it."""
        out: dict[str, list[tuple[int, int]]] = {}
        for rank in range(self.schedule.pp):
            for c, spec in enumerate(self.chunks_of(rank)):
                with torch.device("meta"):
                    chunk = Transformer(config, spec.layer_ids, spec.with_embedding, spec.with_head)
                names = [n for n, _ in chunk.named_parameters()]
                names += [f"{n}.expert_load" for n, _ in chunk.routers()]
                for name in names:
                    out.setdefault(name, []).append((rank, c))
        return out


class TiedCopies:
    """Sums the gradients and expert loads of tensors held by several chunks of one pipeline.

    Creating the groups is collective: every rank of the world builds every holder group, in one
    order, for each (dp, ep) coordinate.
    """

    def __init__(
        self, plan: StagePlan, config: ModelConfig, pp_rank: int, dp: int, ep: int, my_coord: tuple[int, int]
    ) -> None:
        holders = plan.holders(config)
        self.copies = {name: len(h) for name, h in holders.items()}
        by_ranks: dict[tuple[int, ...], list[str]] = {}
        for name, h in holders.items():
            ranks = tuple(sorted({r for r, _ in h}))
            if len(h) > 1:
                by_ranks.setdefault(ranks, []).append(name)
        self.groups: list[tuple[dist.ProcessGroup | None, list[str]]] = []
        for ranks in sorted(by_ranks):
            names = sorted(by_ranks[ranks])
            group = None
            for d in range(dp):
                for e in range(ep):
                    members = [(r * dp + d) * ep + e for r in ranks]
                    g = dist.new_group(members) if len(ranks) > 1 else None
                    if (d, e) == my_coord and pp_rank in ranks:
                        group = g
            if pp_rank in ranks:
                self.groups.append((group, names))

    @torch.no_grad()
    def sync(self, tensors_of: dict[str, list[torch.Tensor]]) -> None:
        """Replace every copy by the sum over all copies (`tensors_of`: name -> this rank's copies)."""
        for group, names in self.groups:
            present = [n for n in names if tensors_of.get(n)]
            if not present:
                continue
            # one copy here (DualPipe: the mirror copy is on the other rank) goes into the flat
            # buffer as it is; several are summed first
            local = [ts[0] if len(ts) == 1 else torch.stack(ts).sum(0) for ts in map(tensors_of.get, present)]
            flat = torch.cat([t.reshape(-1) for t in local])
            if group is not None:
                dist.all_reduce(flat, group=group)
            totals = flat.split([t.numel() for t in local])
            dst = [copy for n in present for copy in tensors_of[n]]
            src = [total.view_as(copy) for n, total in zip(present, totals) for copy in tensors_of[n]]
            torch._foreach_copy_(dst, src)  # one launch for the lot, not one per tensor

    def grads_by_name(self, chunks: list[nn.Module]) -> dict[str, list[torch.Tensor]]:
        """Gradient tensors of this rank's chunks by name (a zero gradient is created where missing)."""
        out: dict[str, list[torch.Tensor]] = {}
        for chunk in chunks:
            for name, p in chunk.named_parameters():
                if self.copies.get(name, 1) > 1:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    out.setdefault(name, []).append(p.grad)
        return out

    def loads_by_name(self, chunks: list[Transformer]) -> dict[str, list[torch.Tensor]]:
        out: dict[str, list[torch.Tensor]] = {}
        for chunk in chunks:
            for name, router in chunk.routers():
                key = f"{name}.expert_load"
                if self.copies.get(key, 1) > 1:
                    out.setdefault(key, []).append(router.expert_load)
        return out
