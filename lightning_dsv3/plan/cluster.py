"""Plans for a whole cluster: one layout in full (`plan_cluster`, `format_plan`) or every layout ranked
(`search_layouts`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lightning_dsv3.config import ModelConfig, ParallelConfig
from lightning_dsv3.pipeline.costs import as_layer_costs
from lightning_dsv3.pipeline.schedules import dualpipe_min_microbatches, dualpipev_min_microbatches
from lightning_dsv3.plan.activations import IMPLEMENTATIONS, PrecisionBytes
from lightning_dsv3.plan.memory import (
    GIB,
    MemoryPlan,
    RankMemory,
    chunk_params,
    chunks_of,
    master_bytes_per_element,
    memory_plan,
    stage_plan,
)
from lightning_dsv3.plan.timing import GPU, OVERLAPPED, CommPlan, Efficiency, StepTime, comm_plan, step_time

PUBLISHED_GPU_HOURS_PER_T_TOKENS = 180_000  # DeepSeek-V3 technical report, H800s, per trillion tokens


@dataclass
class ClusterPlan:
    """One layout on one cluster: its memory (this code and, modelled, DeepSeek's techniques),
    communication and step time."""

    config: ModelConfig
    parallel: ParallelConfig
    gpu: GPU
    micro_batch_size: int
    seq_len: int
    precision: str
    checkpointing: str
    memory: dict[str, MemoryPlan]  # by implementation
    comm: CommPlan
    time: StepTime
    efficiency: Efficiency
    timed_implementation: str

    def fits(self, implementation: str) -> bool:
        return self.memory[implementation].worst.peak_bytes <= self.gpu.memory_bytes

    @property
    def model_flops_per_token(self) -> float:
        from lightning_dsv3.flops import train_flops

        return train_flops(self.config, 1, self.seq_len) / self.seq_len

    def mfu(self, peak_tflops: float) -> float:
        return self.time.tokens_per_s_per_gpu * self.model_flops_per_token / (peak_tflops * 1e12)


def plan_cluster(
    config: ModelConfig,
    gpus: int,
    gpu: GPU,
    pp: int,
    ep: int,
    schedule: str,
    precision: str,
    global_batch: int,
    seq_len: int,
    micro_batch_size: int = 1,
    checkpointing: str = "selective",
    zero: bool = True,
    max_nodes_per_token: int | None = None,
    efficiency: Efficiency | None = None,
    timed_implementation: str = "this",
    layer_costs: Any = None,
) -> ClusterPlan:
    """Plan `gpus` GPUs as pp x dp x ep with dp inferred; every dp x ep rank reads its own slice of
    the `global_batch` sequences, in micro-batches of `micro_batch_size`. `layer_costs` cuts the
    stages as `DSV3Strategy(layer_costs=...)` does (None: the FLOP model)."""
    parallel = ParallelConfig(
        pp=pp, ep=ep, schedule=schedule, zero=zero, max_nodes_per_token=max_nodes_per_token,
        layer_costs=as_layer_costs(layer_costs),
    ).resolve(gpus)  # fmt: skip
    slices = parallel.dp * parallel.ep
    if global_batch % (slices * micro_batch_size):
        raise ValueError(
            f"a global batch of {global_batch} sequences does not split into {slices} data slices of "
            f"micro-batches of {micro_batch_size}; use a multiple of {slices * micro_batch_size}"
        )
    parallel = dataclasses.replace(parallel, n_microbatches=global_batch // (slices * micro_batch_size))
    eff = efficiency or Efficiency()
    memory = {
        impl: memory_plan(
            config, parallel, micro_batch_size, seq_len, precision, checkpointing, implementation=impl
        )
        for impl in IMPLEMENTATIONS
    }
    comm = comm_plan(config, parallel, micro_batch_size, seq_len, precision, gpu.gpus_per_node)
    time = step_time(
        config, parallel, micro_batch_size, seq_len, gpu, precision, checkpointing, eff, timed_implementation,
        memory[timed_implementation].worst,
    )  # fmt: skip
    return ClusterPlan(
        config, parallel, gpu, micro_batch_size, seq_len, precision, checkpointing, memory, comm, time, eff,
        timed_implementation,
    )  # fmt: skip


def plan_runnable(implementation: str = "auto", **kwargs: Any) -> ClusterPlan:
    """`plan_cluster(**kwargs)` timed with `implementation`'s memory profile; "auto" times this code's
    where it fits and DeepSeek's techniques otherwise (time what could run)."""
    if implementation != "auto":
        return plan_cluster(**kwargs, timed_implementation=implementation)
    plan = plan_cluster(**kwargs, timed_implementation="this")
    return plan if plan.fits("this") else plan_cluster(**kwargs, timed_implementation="deepseek")


def published_hours(preset: str, gpu: str) -> float | None:
    """DeepSeek's published GPU hours per trillion tokens where the plan is of their run, else None."""
    return PUBLISHED_GPU_HOURS_PER_T_TOKENS if (preset, gpu) == ("v3-671b", "h800") else None


def activation_shares(rank: RankMemory) -> list[tuple[str, float]]:
    """A rank's activation items, largest first, as shares of one micro-batch through its chunks."""
    total = sum(rank.activation_items.values())
    return sorted(((n, v / total) for n, v in rank.activation_items.items()), key=lambda item: -item[1])


def efficiency_for(plan: ClusterPlan, gpu_hours_per_trillion_tokens: float) -> float:
    """The factor on the assumed kernel efficiencies that gives `plan` these GPU-hours (bisection)."""

    def hours(scale: float) -> float:
        eff = dataclasses.replace(
            plan.efficiency, gemm=plan.efficiency.gemm * scale, attention=plan.efficiency.attention * scale
        )
        t = step_time(
            plan.config, plan.parallel, plan.micro_batch_size, plan.seq_len, plan.gpu, plan.precision,
            plan.checkpointing, eff, plan.timed_implementation, plan.memory[plan.timed_implementation].worst,
        )  # fmt: skip
        return t.gpu_hours_per_trillion_tokens

    lo, hi = 0.05, 1.0 / max(plan.efficiency.gemm, plan.efficiency.attention)
    for _ in range(12):  # to 0.03% of the range
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if hours(mid) > gpu_hours_per_trillion_tokens else (lo, mid)
    return (lo + hi) / 2


def format_plan(plan: ClusterPlan, published_hours: float | None = None) -> str:
    """The plan as text: memory per GPU, communication, step time, throughput and the assumptions."""
    c, p, g = plan.config, plan.parallel, plan.gpu
    from lightning_dsv3.config import count_parameters

    counts = count_parameters(c)
    t = plan.time
    lines = [
        f"Model: {c.n_layers} layers, {counts['total'] / 1e9:.1f}B parameters "
        f"({counts['activated'] / 1e9:.2f}B activated) + {counts['mtp'] / 1e9:.1f}B MTP",
        f"Cluster: {t.gpus} x {g.name} ({g.gpus_per_node} per node)",
        f"Layout: pp={p.pp} x dp={p.dp} x ep={p.ep}, {p.schedule}, ZeRO-1 {'on' if p.zero else 'off'}, "
        f"{plan.precision}, checkpointing={plan.checkpointing}",
        f"Batch: {t.tokens_per_step // plan.seq_len} sequences of {plan.seq_len} tokens per step "
        f"({t.tokens_per_step / 1e6:.1f}M tokens); each of the {p.dp * p.ep} data slices runs "
        f"{p.n_microbatches} micro-batches of {plan.micro_batch_size}",
        "",
        f"Memory per GPU, busiest pipeline rank (GiB; capacity {g.memory_bytes / GIB:.1f}):",
        f"  {'':34}" + "".join(f"{name:>14}" for name in plan.memory),
    ]
    worst = {name: m.worst for name, m in plan.memory.items()}
    rows = [
        ("parameters", lambda r: r.params_bytes),
        ("gradients", lambda r: r.grads_bytes),
        ("ZeRO-1 fp32 masters (bf16 weights) + grads", lambda r: r.master_bytes + r.master_grads_bytes),
        ("AdamW moments", lambda r: r.moments_bytes),
        ("autocast weight copies", lambda r: r.autocast_bytes),
        ("activations", lambda r: r.activations_bytes),
        ("  micro-batch x chunk in flight", lambda r: r.micro_batches_in_flight * GIB),
        ("peak", lambda r: r.peak_bytes),
    ]
    for label, get in rows:
        lines.append(f"  {label:34}" + "".join(f"{get(r) / GIB:14.2f}" for r in worst.values()))
    lines.append(f"  {'peak phase':34}" + "".join(f"{r.peak_phase:>14.14}" for r in worst.values()))
    fits = "".join(f"{('yes' if plan.fits(n) else 'NO'):>14}" for n in plan.memory)
    lines.append(f"  {'fits in ' + g.name.split()[-1]:34}" + fits)
    for name, text in IMPLEMENTATIONS.items():
        lines.append(f"  {name}: {text}")
    if not plan.fits("this"):
        lines.append(
            f"  where this code's activations go (share of {worst['this'].activations_bytes / GIB:.1f} GiB):"
        )
        lines.append(
            "    " + ", ".join(f"{name} {share:.0%}" for name, share in activation_shares(worst["this"])[:8])
        )
    cm = plan.comm
    lines += [
        "",
        "Communication per GPU per step (GiB sent):",
        f"  pipeline P2P {cm.pp_bytes / GIB:.2f}; expert all-to-all {cm.ep_bytes / GIB:.1f} "
        f"({cm.ep_ib_bytes / GIB:.1f} over InfiniBand); dense gradients over dp x ep "
        f"{cm.dp_ep_bytes / GIB:.2f}; expert gradients over dp {cm.dp_bytes / GIB:.2f}",
        "",
        f"Step time ({plan.timed_implementation} implementation): {t.step_ms / 1e3:.2f} s = pipeline "
        f"{t.pipeline_ms / 1e3:.2f} s (bubble {t.bubble_fraction:.1%}) + gradient reduction {t.dp_ms:.0f} ms "
        f"+ optimizer {t.optimizer_ms:.0f} ms",
        f"  per micro-batch and chunk: forward {t.f_ms:.1f} ms, backward {t.b_ms:.1f} ms "
        f"(weights {t.w_ms:.1f}), "
        f"all-to-all {t.a2a_ms:.1f} ms"
        + (" (overlapped by the FB pairs)" if p.schedule in OVERLAPPED else ""),
        f"Throughput: {t.tokens_per_s_per_gpu:,.0f} tokens/s/GPU; MFU {plan.mfu(g.bf16_tflops):.1%} of bf16 "
        f"peak ({plan.mfu(g.fp8_tflops):.1%} of fp8 peak), "
        f"{plan.model_flops_per_token / 1e9:.0f} GFLOP per token",
        f"GPU-hours per trillion tokens: {t.gpu_hours_per_trillion_tokens / 1e3:,.0f}K predicted",
    ]
    if published_hours:
        scale = efficiency_for(plan, published_hours)
        lines[-1] += f" vs {published_hours / 1e3:,.0f}K published (DeepSeek-V3 report)"
        lines.append(
            f"  the published figure corresponds to kernels at {scale:.2f} x the assumed efficiencies "
            f"(GEMM {plan.efficiency.gemm * scale:.0%}, attention {plan.efficiency.attention * scale:.0%} "
            "of peak)"
        )
    e = plan.efficiency
    lines += [
        "",
        "Assumptions (not measured here):",
        f"  kernels reach {e.gemm:.0%} of peak on GEMMs ({'fp8' if plan.precision == 'fp8' else 'bf16'}) and "
        f"{e.attention:.0%} on attention (bf16); links reach {e.link:.0%} of bandwidth; "
        + (
            f"overlapped all-to-all leaves {e.overlap_sm_share:.0%} of SMs to compute; "
            if p.schedule in OVERLAPPED
            else ""
        )
        + "balanced routing",
        f"  {g.name}: {g.bf16_tflops:.0f} TFLOP/s bf16, {g.fp8_tflops:.0f} fp8, NVLink "
        f"{g.nvlink_gbps:.0f} GB/s, InfiniBand {g.ib_gbps:.0f} GB/s per GPU. Source: {g.source}",
        "  memory: fused attention and RMSNorm kernels, grouped GEMM experts; the gradient reduction and "
        "optimizer step are not overlapped with compute",
    ]
    return "\n".join(lines)


SEARCH_SCHEDULES = ("dualpipe", "dualpipev", "zb1p", "1f1b")
CHEAPEST_FIRST = ("none", "selective", "mlp", "attention", "layer")  # by recomputation cost


@dataclass(frozen=True)
class Candidate:
    """One searched layout: the lightest checkpointing that fits, its peak and its speed."""

    parallel: ParallelConfig
    checkpointing: str
    peak_bytes: float
    time: StepTime


def _schedule_allows(schedule: str, pp: int, ep: int, n_micro: int, n_layers: int) -> bool:
    # pp = 1: the plain step (1f1b), or DualPipeV's one-rank V where it has an all-to-all to hide
    if pp == 1 and schedule != "1f1b" and not (schedule == "dualpipev" and ep > 1):
        return False
    if schedule == "dualpipe":
        return (
            pp % 2 == 0 and n_micro % 2 == 0 and n_micro >= dualpipe_min_microbatches(pp) and pp <= n_layers
        )
    if schedule == "dualpipev":
        return n_micro >= dualpipev_min_microbatches(pp) and 2 * pp <= n_layers
    return pp <= n_layers


def _static_bytes(config: ModelConfig, parallel: ParallelConfig, precision: str) -> float:
    """Parameters, gradients and optimizer state of the busiest rank, without activations (a quick filter)."""
    pb = PrecisionBytes.of(precision, parallel.zero)
    plan = stage_plan(config, parallel)
    worst = 0.0
    for rank in range(parallel.pp):
        params = [chunk_params(config, s, parallel.ep) for s in chunks_of(config, plan, rank)]
        dense, experts = sum(p.dense for p in params), sum(p.experts for p in params)
        local = dense + experts
        shard = dense / (parallel.dp * parallel.ep) + experts / parallel.dp if parallel.zero else 0
        worst = max(
            worst,
            local * (pb.param + pb.grad)
            + shard * (master_bytes_per_element(pb) + 4 + 2 * pb.moment)  # master, its gradient, moments
            + (0 if parallel.zero else 2 * pb.param * local),
        )
    return worst


def search_layouts(
    config: ModelConfig,
    gpus: int,
    gpu: GPU,
    precision: str,
    global_batch: int,
    seq_len: int,
    micro_batch_size: int = 1,
    implementation: str = "this",
    efficiency: Efficiency | None = None,
    max_nodes_per_token: int | None = 4,
    schedules: Sequence[str] = SEARCH_SCHEDULES,
) -> list[Candidate]:
    """Every (pp, ep, schedule) of `gpus` that fits with some checkpointing, fastest first.

    dp is what is left (gpus / (pp * ep)); each layout takes the cheapest checkpointing option that
    fits `gpu`'s memory; node-limited routing applies where ep spans nodes.
    """
    found = []
    n_experts = config.n_routed_experts if config.n_moe_layers else 1
    for pp in [p for p in range(1, gpus + 1) if gpus % p == 0 and p <= config.n_layers]:
        for ep in [e for e in range(1, n_experts + 1) if n_experts % e == 0 and gpus % (pp * e) == 0]:
            dp = gpus // (pp * ep)
            slices = dp * ep
            if global_batch % (slices * micro_batch_size):
                continue
            n_micro = global_batch // (slices * micro_batch_size)
            for schedule in schedules:
                if not _schedule_allows(schedule, pp, ep, n_micro, config.n_layers):
                    continue
                nodes = max_nodes_per_token if ep > gpu.gpus_per_node else None
                parallel = ParallelConfig(
                    pp=pp, dp=dp, ep=ep, schedule=schedule, n_microbatches=n_micro, max_nodes_per_token=nodes
                )
                if _static_bytes(config, parallel, precision) > gpu.memory_bytes:
                    continue
                candidate = _fit(
                    config, parallel, gpu, precision, micro_batch_size, seq_len, implementation, efficiency
                )
                if candidate is not None:
                    found.append(candidate)
    return sorted(found, key=lambda c: -c.time.tokens_per_s_per_gpu)


def _fit(
    config: ModelConfig,
    parallel: ParallelConfig,
    gpu: GPU,
    precision: str,
    micro_batch_size: int,
    seq_len: int,
    implementation: str,
    efficiency: Efficiency | None,
) -> Candidate | None:
    for option in CHEAPEST_FIRST:
        memory = memory_plan(
            config, parallel, micro_batch_size, seq_len, precision, option, implementation=implementation
        ).worst
        if memory.peak_bytes <= gpu.memory_bytes:
            args = (config, parallel, micro_batch_size, seq_len, gpu, precision, option, efficiency)
            time = step_time(*args, implementation, memory)
            return Candidate(parallel, option, memory.peak_bytes, time)
    return None


def format_search(candidates: Sequence[Candidate], top: int) -> str:
    header = (
        f"{'rank':>4} {'pp':>3} {'dp':>4} {'ep':>4} {'schedule':>10} {'checkpointing':>13} {'peak GiB':>9} "
        f"{'bubble':>7} {'step s':>7} {'tok/s/GPU':>10} {'GPU-h/T tok':>11}"
    )
    rows = [header]
    for i, c in enumerate(candidates[:top], start=1):
        p, t = c.parallel, c.time
        rows.append(
            f"{i:>4} {p.pp:>3} {p.dp:>4} {p.ep:>4} {p.schedule:>10} {c.checkpointing:>13} "
            f"{c.peak_bytes / GIB:>9.1f} {t.bubble_fraction:>7.1%} {t.step_ms / 1e3:>7.2f} "
            f"{t.tokens_per_s_per_gpu:>10,.0f} {t.gpu_hours_per_trillion_tokens / 1e3:>10,.0f}K"
        )
    if not candidates:
        rows.append("no layout fits: add GPUs, shorten sequences or use the deepseek memory profile")
    return "\n".join(rows)
