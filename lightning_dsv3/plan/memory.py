"""Bytes per rank: parameters, gradients, ZeRO-1 optimizer state, peak activations, and the peak."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from lightning_dsv3.config import ModelConfig, ParallelConfig
from lightning_dsv3.pipeline.costs import StageCosts, as_layer_costs
from lightning_dsv3.pipeline.runtime import part_wise_forwards
from lightning_dsv3.pipeline.schedules import Op, PipelineSchedule, make_schedule
from lightning_dsv3.pipeline.stages import ChunkSpec, StagePlan
from lightning_dsv3.plan.activations import (
    Kernels,
    PrecisionBytes,
    chunk_activation_bytes,
    layer_activation_bytes,
)

GIB = 2**30


@dataclass(frozen=True)
class _Counts:
    """Parameter counts of the model's pieces (routed experts apart: they split over ep)."""

    embedding: int
    head: int
    layer_dense: tuple[int, ...]  # per decoder layer, then per MTP depth: all but routed experts
    layer_experts: tuple[int, ...]  # per decoder layer, then per MTP depth: routed experts
    mtp_extra: int  # per MTP module: its norms and [embedding; hidden] projection
    autocast_cached: tuple[int, ...]  # per layer: weights autocast casts once per step (not experts)
    head_cached: int
    norms: tuple[int, ...]  # per layer: 1-D weights (no weight decay)


@lru_cache(maxsize=32)
def _counts_of(key: tuple) -> _Counts:
    import torch

    from lightning_dsv3.model.block import Block
    from lightning_dsv3.model.mtp import MTPModule

    config = ModelConfig(*key)
    with torch.device("meta"):
        blocks = [Block(i, config) for i in range(config.n_layers + config.mtp_depth)]
        mtp = MTPModule(config.n_layers, config) if config.mtp_depth else None

    def split(module: torch.nn.Module) -> tuple[int, int, int, int]:
        dense = experts = cached = norms = 0
        for name, p in module.named_parameters():
            if ".experts.w" in f".{name}":
                experts += p.numel()
            else:
                dense += p.numel()
                cached += p.numel() if p.dim() >= 2 else 0
                norms += p.numel() if p.dim() < 2 else 0
        return dense, experts, cached, norms

    parts = [split(b) for b in blocks]
    mtp_extra = sum(p.numel() for n, p in mtp.named_parameters() if not n.startswith("block.")) if mtp else 0
    return _Counts(
        embedding=config.vocab_size * config.dim,
        head=config.dim + config.vocab_size * config.dim,  # final norm and output head
        layer_dense=tuple(p[0] for p in parts),
        layer_experts=tuple(p[1] for p in parts),
        mtp_extra=mtp_extra,
        autocast_cached=tuple(p[2] for p in parts),
        head_cached=config.vocab_size * config.dim,
        norms=tuple(p[3] for p in parts),
    )


def _counts(config: ModelConfig) -> _Counts:
    return _counts_of(dataclasses.astuple(config))


@dataclass(frozen=True)
class ChunkParams:
    """Parameters one chunk holds on one rank: `dense` (replicated over dp x ep) and `experts`
    (this ep rank's slice of the routed experts, replicated over dp)."""

    dense: int
    experts: int
    autocast_cached: int  # matrices autocast casts once per step (bf16-mixed)
    no_decay: int  # 1-D weights, the optimizer's second param-group


def chunk_params(config: ModelConfig, spec: ChunkSpec, ep: int = 1) -> ChunkParams:
    """What `Transformer(config, spec.layer_ids, spec.with_embedding, spec.with_head)` holds, experts / ep."""
    counts = _counts(config)
    dense = sum(counts.layer_dense[i] for i in spec.layer_ids)
    experts = sum(counts.layer_experts[i] for i in spec.layer_ids)
    cached = sum(counts.autocast_cached[i] for i in spec.layer_ids)
    no_decay = sum(counts.norms[i] for i in spec.layer_ids)
    if spec.with_embedding or (spec.with_head and config.mtp_depth):
        dense += counts.embedding
    if spec.with_head:
        dense += counts.head
        cached += counts.head_cached
        no_decay += config.dim
        for depth in range(config.mtp_depth):
            layer = config.n_layers + depth
            dense += counts.layer_dense[layer] + counts.mtp_extra
            experts += counts.layer_experts[layer]
            cached += counts.autocast_cached[layer] + 2 * config.dim * config.dim
            no_decay += counts.norms[layer] + 3 * config.dim
    return ChunkParams(dense, experts // ep, cached, no_decay)


def stage_plan(config: ModelConfig, parallel: ParallelConfig) -> StagePlan | None:
    """The stages the strategy would build (None without a pipeline; pp = 1 dualpipev is one)."""
    if not parallel.pipelined:
        return None
    costs = as_layer_costs(parallel.layer_costs)
    return _stage_plan(
        dataclasses.astuple(config), parallel.schedule, parallel.pp, parallel.microbatches, costs
    )


@lru_cache(maxsize=64)
def _stage_plan(
    key: tuple, schedule: str, pp: int, n_microbatches: int, costs: tuple[float, ...] | StageCosts | None
) -> StagePlan:
    return StagePlan.build(ModelConfig(*key), make_schedule(schedule, pp, n_microbatches), layer_costs=costs)


def chunks_of(config: ModelConfig, plan: StagePlan | None, pp_rank: int) -> list[ChunkSpec]:
    if plan is None:
        return [ChunkSpec(0, tuple(range(config.n_layers)), True, True)]
    return plan.chunks_of(pp_rank)


def _part_wise_forwards(config: ModelConfig, plan: StagePlan, pp_rank: int, ep: int) -> set[tuple[int, int]]:
    """What the runtime would record part by part on `pp_rank` if its chunks ran eager."""
    specs = plan.chunks_of(pp_rank)
    exchanges = [ep > 1 and _has_moe(config, spec) for spec in specs]
    return part_wise_forwards(plan.schedule.actions[pp_rank], [False] * len(specs), exchanges)


def _has_moe(config: ModelConfig, spec: ChunkSpec) -> bool:
    """Whether the chunk holds an MoE layer (its MTP layers included, which run with the head)."""
    mtp = spec.with_head and config.mtp_depth > 0 and config.is_moe_layer(config.n_layers)
    return mtp or any(config.is_moe_layer(i) for i in spec.layer_ids)


def peak_live_bytes(schedule: PipelineSchedule, rank: int, chunk_bytes: Sequence[float]) -> tuple[float, int]:
    """Replay `rank`'s list: the most activation bytes alive at once, and the micro-batches alive then.

    A forward adds its chunk's bytes; a full backward (BW, or FB's backward half) frees them after the
    action's forward is counted; a B keeps them until its W (the split backward retains the graph).
    """
    live, count, peak, peak_count = 0.0, 0, 0.0, 0
    for action in schedule.compute_actions(rank):
        if action.forward_part is not None:
            live += chunk_bytes[action.chunk]
            count += 1
        if live > peak:
            peak, peak_count = live, count
        part = action.backward_part
        if part is not None and action.op is not Op.B:
            live -= chunk_bytes[part[1]]
            count -= 1
        if action.op is Op.W:
            live -= chunk_bytes[action.chunk]
            count -= 1
    return peak, peak_count


@dataclass
class RankMemory:
    """Bytes one rank holds (every dp x ep rank of a pipeline stage holds the same), and its peak."""

    pp_rank: int
    stages: tuple[int, ...]
    params_bytes: float
    grads_bytes: float
    master_bytes: float  # ZeRO-1's fp32 master shards (none where the parameters are fp32)
    moments_bytes: float  # AdamW's two moments
    master_grads_bytes: float
    autocast_bytes: float  # bf16 copies of the weights, cached by autocast for the step
    activations_bytes: float  # the most alive at once over the schedule
    micro_batches_in_flight: int  # micro-batch chunks alive at that moment
    activation_items: dict[str, float]  # per micro-batch, summed over this rank's chunks
    transient_bytes: dict[str, float]  # per phase: what it adds on top of the static bytes
    phase_bytes: dict[str, float] = field(default_factory=dict)

    @property
    def optimizer_bytes(self) -> float:
        return self.master_bytes + self.moments_bytes + self.master_grads_bytes

    @property
    def static_bytes(self) -> float:
        return self.params_bytes + self.master_bytes + self.moments_bytes

    @property
    def peak_bytes(self) -> float:
        return max(self.phase_bytes.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phase_bytes, key=self.phase_bytes.__getitem__)


@dataclass
class MemoryPlan:
    """`memory_plan`'s answer: one RankMemory per pipeline rank."""

    config: ModelConfig
    parallel: ParallelConfig
    micro_batch_size: int
    seq_len: int
    precision: str
    checkpointing: str
    implementation: str
    ranks: list[RankMemory]

    @property
    def worst(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.peak_bytes)

    def table(self) -> str:
        """A fixed-width table, one row per pipeline rank, in GiB."""
        names = ("params", "grads", "optim", "acts")
        head = f"{'pp rank':>7} {'stages':>8} " + " ".join(f"{n:>8}" for n in names)
        rows = [head + f" {'in-flight':>9} {'peak':>8}  phase"]
        for r in self.ranks:
            rows.append(
                f"{r.pp_rank:>7} {','.join(map(str, r.stages)):>8} {r.params_bytes / GIB:8.2f} "
                f"{r.grads_bytes / GIB:8.2f} {r.optimizer_bytes / GIB:8.2f} {r.activations_bytes / GIB:8.2f} "
                f"{r.micro_batches_in_flight:>9} {r.peak_bytes / GIB:8.2f}  {r.peak_phase}"
            )
        return "\n".join(rows)


def memory_plan(
    config: ModelConfig,
    parallel: ParallelConfig,
    micro_batch_size: int,
    seq_len: int,
    precision: str = "bf16-mixed",
    checkpointing: str | None = None,
    device: str = "cuda",
    accumulation: int = 1,
    expert_imbalance: float | Mapping[int, float] = 1.0,
    kernels: Kernels | None = None,
    implementation: str = "this",
) -> MemoryPlan:
    """Bytes per rank of parameters, gradients, optimizer state and peak activations (module docstring).

    `parallel.dp` must be set (use `ParallelConfig.resolve(world_size)`); `accumulation` is
    Lightning's accumulate_grad_batches (gradients then live through the forwards too).
    """
    if parallel.dp is None:
        raise ValueError("memory_plan needs parallel.dp; call parallel.resolve(world_size) first")
    option = config.activation_checkpointing if checkpointing is None else checkpointing
    kernels = kernels or Kernels.for_device(device, precision, config)
    pb = PrecisionBytes.of(precision, parallel.zero)
    plan = stage_plan(config, parallel)
    n_micro = parallel.microbatches
    ranks = []
    for pp_rank in range(parallel.pp):
        specs = chunks_of(config, plan, pp_rank)
        # the runtime records a forward part by part where, under ep > 1, an FB interleaves it (under
        # DualPipe(V) most micro-batches) or, eager, where its W runs apart from its B: counted for
        # every micro-batch of a rank that has any (compiled or not: the plan cannot tell)
        part_wise = plan is not None and bool(_part_wise_forwards(config, plan, pp_rank, parallel.ep))
        per_chunk = [
            chunk_activation_bytes(
                config, spec, micro_batch_size, seq_len, precision, kernels, option, parallel.ep,
                expert_imbalance, plan is not None, implementation, part_wise=part_wise,
            )
            for spec in specs
        ]  # fmt: skip
        chunk_bytes = [sum(items.values()) for items in per_chunk]
        if plan is None:
            acts, in_flight = chunk_bytes[0], 1
        else:
            acts, in_flight = peak_live_bytes(plan.schedule, pp_rank, chunk_bytes)
        items: dict[str, float] = {}
        for chunk_items in per_chunk:
            for name, value in chunk_items.items():
                items[name] = items.get(name, 0.0) + value
        params = [chunk_params(config, spec, parallel.ep) for spec in specs]
        if implementation == "deepseek" and _holds_two_embeddings(config, specs):
            # the first stage's embedding and the MTP modules' copy share storage on one rank
            params.append(ChunkParams(-config.vocab_size * config.dim, 0, 0, 0))
        recompute = max(
            _recompute_bytes(
                config,
                spec,
                micro_batch_size,
                seq_len,
                precision,
                kernels,
                option,
                parallel.ep,
                implementation,
            )
            for spec in specs
        )
        # the loss's backward: the fp32 gradient of the logits, log-softmax's temporary, and under bf16
        # the gradient's cast back to the head's dtype
        per_logit = 8 + (pb.compute if pb.compute < 4 else 0)
        loss = (
            micro_batch_size * seq_len * config.vocab_size * per_logit
            if any(s.with_head for s in specs)
            else 0
        )
        ranks.append(
            _rank_memory(
                pp_rank, specs, params, parallel, pb, acts, in_flight, items, max(recompute, loss),
                single_pass=plan is None and n_micro * accumulation == 1,
            )
        )  # fmt: skip
    return MemoryPlan(config, parallel, micro_batch_size, seq_len, precision, option, implementation, ranks)


def _holds_two_embeddings(config: ModelConfig, specs: list[ChunkSpec]) -> bool:
    return (
        any(s.with_embedding for s in specs)
        and any(s.with_head for s in specs)
        and config.mtp_depth > 0
        and (not any(s.with_embedding and s.with_head for s in specs))
    )


def _recompute_bytes(
    config: ModelConfig,
    spec: ChunkSpec,
    batch: int,
    seq: int,
    precision: str,
    kernels: Kernels,
    option: str,
    ep: int,
    implementation: str,
) -> float:
    """The most one layer's recomputation rebuilds at once in backward (what checkpointing dropped)."""
    if option == "none":
        return 0.0
    worst = 0.0
    for layer_id in spec.layer_ids:
        args = (config, layer_id, batch, seq, precision, kernels)
        full = layer_activation_bytes(*args, "none", ep, implementation=implementation)
        kept = layer_activation_bytes(*args, option, ep, implementation=implementation)
        worst = max(worst, sum(full.values()) - sum(kept.values()))
    return worst


def master_bytes_per_element(pb: PrecisionBytes) -> int:
    """ZeRO-1's fp32 master copy per shard element: none where the parameters are fp32, which are their
    own master (parallel/zero.py)."""
    return 0 if pb.param == 4 else 4


def _rank_memory(
    pp_rank: int,
    specs: list[ChunkSpec],
    params: list[ChunkParams],
    parallel: ParallelConfig,
    pb: PrecisionBytes,
    acts: float,
    in_flight: int,
    items: dict[str, float],
    backward_transient: float,
    single_pass: bool,
) -> RankMemory:
    """Static bytes from the parameter counts and ZeRO-1's sharding, then the peak of each phase."""
    dense = sum(p.dense for p in params)
    experts = sum(p.experts for p in params)
    local = dense + experts
    dense_group, expert_group = parallel.dp * parallel.ep, parallel.dp
    if parallel.zero:
        shard = math.ceil(dense / dense_group) + math.ceil(experts / expert_group)
        own_master = master_bytes_per_element(pb) == 0
        master = master_bytes_per_element(pb) * shard
        master_grads, moments = 4 * shard, 2 * pb.moment * shard
        largest_bucket = 4 * max(dense, experts)  # the fp32 flat of a bucket, before its reduce-scatter
        reduce = 4 * local if max(dense_group, expert_group) > 1 else largest_bucket + 4 * shard
        step = pb.moment * shard  # AdamW's foreach temporaries: one state-sized buffer
        # every bucket's fp32 all-gather buffer in flight; in place, only a copy of the shard is sent
        gather = 4 * shard if own_master else 4 * local
    else:
        master = master_grads = 0.0
        moments = 2 * pb.param * local
        reduce = pb.grad * local  # the flat all-reduce buffer
        step, gather = pb.param * local, 0.0
    params_bytes = pb.param * local
    grads = pb.grad * local
    autocast = pb.compute * sum(p.autocast_cached for p in params) if pb.autocast else 0.0
    static = params_bytes + master + moments
    during_backward = autocast + acts + backward_transient
    phases = {
        "fwd/bwd": static + master_grads + during_backward + (0 if single_pass else grads),
        "grad reduce": static + grads + reduce,
        "optim step": static + master_grads + (0 if parallel.zero else grads) + step,
        "param gather": static + master_grads + gather,
    }
    if single_pass:  # one forward per step: the gradients fill in as the activations are freed
        phases["bwd end"] = static + master_grads + grads + autocast + backward_transient
    return RankMemory(
        pp_rank=pp_rank,
        stages=tuple(s.stage for s in specs),
        params_bytes=params_bytes,
        grads_bytes=grads,
        master_bytes=master,
        moments_bytes=moments,
        master_grads_bytes=master_grads,
        autocast_bytes=autocast,
        activations_bytes=acts,
        micro_batches_in_flight=in_flight,
        activation_items=items,
        transient_bytes={"backward": backward_transient, "reduction": reduce, "step": step, "gather": gather},
        phase_bytes=phases,
    )
