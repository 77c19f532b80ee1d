"""Hardware, communication volume per group, and the step time of a layout."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lightning_dsv3.config import ModelConfig, ParallelConfig
from lightning_dsv3.flops import head_flops, layer_flops
from lightning_dsv3.pipeline.schedules import Op
from lightning_dsv3.pipeline.simulate import Costs, simulate
from lightning_dsv3.pipeline.stages import ChunkSpec
from lightning_dsv3.plan.activations import PrecisionBytes
from lightning_dsv3.plan.memory import (
    RankMemory,
    chunk_params,
    chunks_of,
    memory_plan,
    stage_plan,
)


@dataclass(frozen=True)
class GPU:
    """Peak dense throughputs, memory and links of one GPU (per GPU, one direction)."""

    name: str
    bf16_tflops: float
    fp8_tflops: float
    memory_bytes: int
    hbm_gbps: float
    nvlink_gbps: float
    ib_gbps: float
    gpus_per_node: int
    source: str


_HOPPER = "NVIDIA H100 SXM5 datasheet: 989 TFLOP/s dense bf16, 1979 dense fp8, 3.35 TB/s HBM3; "
GPUS: dict[str, GPU] = {
    "h800": GPU(
        "H800 SXM5 80GB", 989.0, 1979.0, 81559 * 2**20, 3350.0, 160.0, 50.0, 8,
        _HOPPER + "the H800 has the H100's SMs and HBM with NVLink cut to 400 GB/s; NVLink 160 GB/s and "
        "InfiniBand 50 GB/s are the per-GPU figures the DeepSeek-V3 report gives for its cluster",
    ),
    "h100": GPU(
        "H100 SXM5 80GB", 989.0, 1979.0, 81559 * 2**20, 3350.0, 450.0, 50.0, 8,
        _HOPPER + "NVLink 4 at 900 GB/s both ways (450 one way, nominal); one 400 Gb/s NDR port per GPU",
    ),
    "h200": GPU(
        "H200 SXM 141GB", 989.0, 1979.0, 143771 * 2**20, 4800.0, 450.0, 50.0, 8,
        "NVIDIA H200 datasheet (H100 compute, 141 GB HBM3e at 4.8 TB/s); links as the H100",
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Efficiency:
    """Assumed fractions of peak the kernels reach (not measured here: printed with every plan).

    `gemm`: matrix multiplications (DeepGEMM reports 70-80% of FP8 peak on large shapes; MoE GEMMs
    are smaller); `attention`: the attention kernel (FlashAttention-3 reaches 50-75% of bf16 peak);
    `overlap_sm_share`: the share of SMs left to compute while an overlapped all-to-all runs
    (DeepSeek-V3 gives 20 of 132 SMs to communication); `link`: achieved share of link bandwidth.
    """

    gemm: float = 0.6
    attention: float = 0.5
    overlap_sm_share: float = 112 / 132
    link: float = 0.8


def _moe_layers(config: ModelConfig, specs: Sequence[ChunkSpec]) -> int:
    """MoE layers the chunks run (MTP layers included)."""
    layers = [i for s in specs for i in s.layer_ids]
    layers += [config.n_layers + d for s in specs if s.with_head for d in range(config.mtp_depth)]
    return sum(config.is_moe_layer(i) for i in layers)


@dataclass(frozen=True)
class Exchange:
    """One all-to-all of one layer and micro-batch for one rank: bytes over NVLink and over IB."""

    nvlink_bytes: float
    ib_bytes: float

    def ms(self, gpu: GPU, eff: Efficiency) -> float:
        return (
            1e3
            * max(self.nvlink_bytes / (gpu.nvlink_gbps * 1e9), self.ib_bytes / (gpu.ib_gbps * 1e9))
            / eff.link
        )


def expert_exchange(
    config: ModelConfig, parallel: ParallelConfig, tokens: int, payload_bytes: float, gpus_per_node: int
) -> Exchange:
    """Bytes one rank sends in one dispatch (or combine) of `tokens` tokens, top-k rows each.

    Flat all-to-all: every (token, expert) row whose expert lives on another rank leaves, (ep-1)/ep of
    them under balanced routing. With node-limited routing (`max_nodes_per_token`) across nodes, as in
    DeepSeek-V3, a token crosses IB once per remote node it visits and fans out over NVLink there.
    """
    ep, k, d = parallel.ep, config.n_activated_experts, config.dim
    if ep == 1:
        return Exchange(0.0, 0.0)
    row = d * payload_bytes
    in_node = min(ep, gpus_per_node)
    n_nodes = ep // in_node
    remote_rows = tokens * k * (ep - in_node) / ep
    local_rows = tokens * k * (in_node - 1) / ep
    if n_nodes > 1 and parallel.max_nodes_per_token:
        m = min(parallel.max_nodes_per_token, n_nodes)
        visited = m * (1 - (1 - 1 / m) ** k)  # distinct nodes among k experts spread over m nodes
        ib_rows = tokens * visited * (n_nodes - 1) / n_nodes
        return Exchange((local_rows + remote_rows) * row, ib_rows * row)
    return Exchange(local_rows * row, remote_rows * row)


@dataclass
class CommPlan:
    """Bytes one rank sends per optimizer step, per group, and over which link."""

    pp_bytes: float
    ep_bytes: float  # all-to-all: dispatch and combine, forward and backward
    ep_ib_bytes: float
    dp_ep_bytes: float  # dense gradients (reduce-scatter + all-gather, or all-reduce)
    dp_bytes: float  # routed-expert gradients
    exchange: Exchange  # one dispatch of one layer and micro-batch

    def as_dict(self) -> dict[str, float]:
        return {"pp": self.pp_bytes, "ep": self.ep_bytes, "dp_ep": self.dp_ep_bytes, "dp": self.dp_bytes}


def comm_plan(
    config: ModelConfig,
    parallel: ParallelConfig,
    micro_batch_size: int,
    seq_len: int,
    precision: str = "bf16-mixed",
    gpus_per_node: int = 8,
    pp_rank: int | None = None,
) -> CommPlan:
    """Per-step bytes of the busiest pipeline rank (or of `pp_rank`), by group (module docstring)."""
    if parallel.dp is None:
        raise ValueError("comm_plan needs parallel.dp; call parallel.resolve(world_size) first")
    pb = PrecisionBytes.of(precision, parallel.zero)
    plan = stage_plan(config, parallel)
    n_micro = parallel.microbatches
    tokens = micro_batch_size * seq_len
    dispatch_payload = 1 + 4 / 128 if (precision == "fp8" or parallel.dispatch_codec) else pb.compute
    exchange = expert_exchange(config, parallel, tokens, dispatch_payload, gpus_per_node)
    other = expert_exchange(config, parallel, tokens, pb.compute, gpus_per_node)  # combine and gradients
    best: CommPlan | None = None
    for rank in range(parallel.pp) if pp_rank is None else [pp_rank]:
        specs = chunks_of(config, plan, rank)
        sends = 0
        if plan is not None:
            sends = sum(a.op in (Op.SEND_ACT, Op.SEND_GRAD) for a in plan.schedule.actions[rank])
        pp = sends * tokens * config.dim * pb.stream
        per_layer = exchange.nvlink_bytes + exchange.ib_bytes + 3 * (other.nvlink_bytes + other.ib_bytes)
        per_layer_ib = exchange.ib_bytes + 3 * other.ib_bytes
        moe = _moe_layers(config, specs) * n_micro
        params = [chunk_params(config, s, parallel.ep) for s in specs]
        dense, experts = sum(p.dense for p in params), sum(p.experts for p in params)
        plan_r = CommPlan(
            pp_bytes=pp,
            ep_bytes=moe * per_layer,
            ep_ib_bytes=moe * per_layer_ib,
            dp_ep_bytes=_reduction_bytes(dense, parallel.dp * parallel.ep, parallel.zero, pb),
            dp_bytes=_reduction_bytes(experts, parallel.dp, parallel.zero, pb),
            exchange=exchange,
        )
        if best is None or sum(plan_r.as_dict().values()) > sum(best.as_dict().values()):
            best = plan_r
    assert best is not None
    return best


def _reduction_bytes(numel: int, group: int, zero: bool, pb: PrecisionBytes) -> float:
    """Ring bytes one rank sends to reduce `numel` gradients over `group` ranks: ZeRO-1 reduce-scatters
    fp32 gradients and all-gathers fp32 masters, else one all-reduce in the gradients' dtype."""
    if group == 1:
        return 0.0
    share = (group - 1) / group
    return 2 * share * numel * (4 if zero else pb.grad)


OVERLAPPED = ("dualpipe", "dualpipev")  # schedules whose FB hides one micro-batch's all-to-all
SPLIT_BACKWARD = ("zb1p", "dualpipe", "dualpipev")  # schedules with W actions (recompute runs twice)


@dataclass
class StepTime:
    """Predicted time of one optimizer step, per part, on the busiest pipeline rank."""

    f_ms: float  # one micro-batch through one chunk: compute, then exposed all-to-all
    b_ms: float  # full backward (input and weight gradients, recomputation included)
    w_ms: float  # its weight-gradient part
    a2a_ms: float  # all-to-all of one micro-batch's forward and backward through one chunk
    pipeline_ms: float  # the simulated schedule (compute, all-to-all, P2P, bubbles)
    bubble_fraction: float
    dp_ms: float  # gradient reduction after the last backward
    optimizer_ms: float
    step_ms: float
    tokens_per_step: int
    gpus: int

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_step / (self.step_ms / 1e3) / self.gpus

    @property
    def gpu_hours_per_trillion_tokens(self) -> float:
        return 1e12 / self.tokens_per_s_per_gpu / 3600


def _chunk_flops(config: ModelConfig, spec: ChunkSpec, seq: int) -> tuple[float, float, float]:
    """Forward FLOPs per token of one chunk: (matmuls with weights, the attention kernel, MLA's
    projections). The kernel has no weights, so a split backward puts all of its gradient in B."""
    # a dense layer without its MLP: MLA's projections alone (layer 0 may be an MoE layer otherwise)
    mla_per_layer = layer_flops(config.replace(inter_dim=0, n_dense_layers=config.n_layers), 0, 0)
    gemm = attention = mla = 0.0
    layers = list(spec.layer_ids)
    if spec.with_head:
        layers += [config.n_layers + d for d in range(config.mtp_depth)]
    for i in layers:
        full = layer_flops(config, i, seq)
        kernel = full - layer_flops(config, i, 0)
        gemm += full - kernel
        attention += kernel
        mla += mla_per_layer
    if spec.with_head:
        gemm += head_flops(config, seq) - sum(
            layer_flops(config, config.n_layers + d, seq) for d in range(config.mtp_depth)
        )
    return gemm, attention, mla


def _recomputed_flops(config: ModelConfig, spec: ChunkSpec, seq: int, option: str) -> float:
    """Forward FLOPs per token that checkpointing `option` runs again in one backward."""
    if option == "none":
        return 0.0
    gemm, attention, mla = _chunk_flops(config, spec, seq)
    ffn = gemm - mla
    out_proj = 2 * config.n_heads * config.v_head_dim * config.dim * len(spec.layer_ids)
    return {
        "attention": mla + attention,
        "mlp": ffn,
        "layer": gemm + attention,
        "selective": mla - out_proj,  # norms and the projections ahead of the kernel
    }[option]


def step_time(
    config: ModelConfig,
    parallel: ParallelConfig,
    micro_batch_size: int,
    seq_len: int,
    gpu: GPU,
    precision: str = "bf16-mixed",
    checkpointing: str | None = None,
    efficiency: Efficiency | None = None,
    implementation: str = "this",
    memory: RankMemory | None = None,
) -> StepTime:
    """The step's time from the FLOP model at `efficiency` x peak, all-to-all and P2P from the links,
    the schedule simulated (module docstring)."""
    if parallel.dp is None:
        raise ValueError("step_time needs parallel.dp; call parallel.resolve(world_size) first")
    eff = efficiency or Efficiency()
    option = config.activation_checkpointing if checkpointing is None else checkpointing
    plan = stage_plan(config, parallel)
    n_micro = parallel.microbatches
    tokens = micro_batch_size * seq_len
    gemm_peak = (gpu.fp8_tflops if precision == "fp8" else gpu.bf16_tflops) * 1e12 * eff.gemm
    attn_peak = gpu.bf16_tflops * 1e12 * eff.attention
    if precision == "32-true":
        gemm_peak, attn_peak = gemm_peak / 16, attn_peak / 16  # fp32 without tensor cores (TF32 off)
    overlap = plan is not None and parallel.schedule in OVERLAPPED and parallel.ep > 1
    if overlap:
        gemm_peak, attn_peak = gemm_peak * eff.overlap_sm_share, attn_peak * eff.overlap_sm_share
    split = plan is not None and parallel.schedule in SPLIT_BACKWARD
    runs = 1 + (implementation == "this" and option == "selective")  # the refill rebuilds q, k, v too
    comm = comm_plan(config, parallel, micro_batch_size, seq_len, precision, gpu.gpus_per_node)
    exchange_ms = comm.exchange.ms(gpu, eff)
    pb = PrecisionBytes.of(precision)
    combine_ms = exchange_ms * pb.compute / (1 + 4 / 128) if precision == "fp8" else exchange_ms
    f = b = w = a2a = 0.0
    for rank in range(parallel.pp):
        for spec in chunks_of(config, plan, rank):
            gemm, attention, _ = _chunk_flops(config, spec, seq_len)
            redo = _recomputed_flops(config, spec, seq_len, option) * tokens / gemm_peak
            fc = tokens * (gemm / gemm_peak + attention / attn_peak)
            wc = tokens * gemm / gemm_peak + (redo if split and implementation == "this" else 0.0)
            bc = tokens * (gemm / gemm_peak + 2 * attention / attn_peak) + runs * redo + wc
            moe = _moe_layers(config, [spec])
            f, b, w = max(f, fc * 1e3), max(b, bc * 1e3), max(w, wc * 1e3)
            a2a = max(a2a, moe * (exchange_ms + 3 * combine_ms))
    a2a_f = a2a * (exchange_ms + combine_ms) / (exchange_ms + 3 * combine_ms) if a2a else 0.0
    a2a_b = a2a - a2a_f
    p2p_ms = 1e3 * tokens * config.dim * pb.stream / (gpu.ib_gbps * 1e9 * eff.link)
    if plan is None:
        pipeline_ms, bubble = n_micro * (f + b + a2a), 0.0
    else:
        fb = max(f + b, a2a) if overlap else None
        costs = Costs(f=f + a2a_f, b=b + a2a_b, w=w, fb=fb, p2p_latency=p2p_ms)
        result = simulate(plan.schedule, costs)
        pipeline_ms = result.makespan
        bubble = result.max_bubble / result.makespan
    link_gbps = gpu.ib_gbps if parallel.dp * parallel.ep > gpu.gpus_per_node else gpu.nvlink_gbps
    dp_ms = 1e3 * (comm.dp_ep_bytes + comm.dp_bytes) / (link_gbps * 1e9 * eff.link)
    if memory is None:
        memory = memory_plan(
            config, parallel, micro_batch_size, seq_len, precision, option, implementation=implementation
        ).worst
    touched = memory.master_bytes + memory.moments_bytes + memory.master_grads_bytes + memory.params_bytes
    optimizer_ms = 1e3 * 2 * touched / (gpu.hbm_gbps * 1e9)  # read and write, memory-bound
    step_ms = pipeline_ms + dp_ms + optimizer_ms
    data_slices = parallel.dp * parallel.ep
    return StepTime(
        f_ms=f, b_ms=b, w_ms=w, a2a_ms=a2a, pipeline_ms=pipeline_ms, bubble_fraction=bubble, dp_ms=dp_ms,
        optimizer_ms=optimizer_ms, step_ms=step_ms, tokens_per_step=n_micro * tokens * data_slices,
        gpus=parallel.pp * data_slices,
    )  # fmt: skip
