"""Scale planner: memory, communication, bubble and step time of a layout, from one model of the code.

    python -m lightning_dsv3.plan --preset v3-671b --gpus 2048 --gpu h800 --pp 16 --ep 64 \\
        --schedule dualpipe --precision fp8          # DeepSeek's layout on 2,048 H800s
    python -m lightning_dsv3.plan --preset v3-671b --gpus 2048 --gpu h800 --search   # rank layouts

Memory per rank (`memory_plan`) is what this code allocates, counted from what it keeps:

- parameters: the rank's chunks (DualPipe holds two stages, so two copies; the last stage keeps its
  own embedding for MTP), routed experts split over ep;
- gradients: one per parameter in its dtype, alive from the first backward to the reduction;
- optimizer (ZeRO-1 as `parallel/zero.py` does it): fp32 master shards of 1/(dp*ep) of the dense and
  1/dp of the expert parameters, AdamW's two moments beside them, and the masters' fp32 gradients
  (Lightning zeroes those only in the next step, so they stay). Without ZeRO, AdamW holds two moments
  of every parameter in its own dtype;
- activations: what autograd saves per micro-batch (`layer_activation_bytes`, item by item as the
  model code saves it), times the micro-batches alive at once: the rank's schedule is replayed, each
  forward adding its chunk's bytes and each backward freeing them (a B whose W is pending keeps all:
  the split backward retains the graph). Pipelines also keep the tensors cut between a layer's
  parts (`pipeline/overlap.py`'s tapes);
- transients: the peak is the largest of forward/backward (static + activations + the recomputed
  region or the loss gradient), the gradient reduction (fp32 flat buffers) and the optimizer step.

Assumptions, stated where they are used: RMSNorm on GPUs is torch's fused kernel (it keeps its input
and 1/rms), the attention kernel is a fused one (flash / memory-efficient / cuDNN: it keeps q, k, v,
the output and the log-sum-exp), routed experts run as torch._grouped_mm in bf16 on Hopper and as
the padded bmm elsewhere (capacity = the busiest expert, `expert_imbalance` x the mean). CPUs run the
composite RMSNorm and the math attention (unless the head dims match) and are checked exactly by the
tests. "fp8" is DeepSeek-V3's recipe, for planning (this code trains in bf16 or fp32): bf16 weights,
fp32 gradients and master weights, bf16 AdamW moments, and FP8-cached inputs of the output projection
and of the routed experts' SwiGLU.

Communication per step and rank (`comm_plan`): pipeline P2P (each SEND of the schedule), the expert
all-to-all (dispatch and combine, forward and backward, top-k rows per token, the share that leaves
the rank), and the data-parallel reduce-scatter + all-gather (ZeRO-1) or all-reduce of the gradients
over dp x ep (dense) and dp (experts), in bytes each rank sends (ring algorithms).

Step time (`step_time`): forward/backward/weight-gradient times from the FLOP model
(`lightning_dsv3.flops`) at an assumed fraction of the GPU's peak (the kernel efficiency: an
assumption, printed), exposed all-to-all where the schedule does not overlap it, the pipeline
bubble from the simulator, the data-parallel reduction and the optimizer step.

Two memory profiles (`IMPLEMENTATIONS`): "this" is this code, exact against torch's saved tensors on
CPU; "deepseek" models the techniques of the DeepSeek-V3 report (FP8 activation caching, no tensors
kept between parts, ...) and is not run here. The 671B plan prints both: DeepSeek's layout fits 80 GB
with their techniques, not with this code's activations, and the plan lists where those go.

Modules: `activations` (what one micro-batch keeps), `memory` (bytes per rank), `timing` (GPUs,
communication, step time), `cluster` (one layout of a cluster, and the search), `recommend` (advice
for the memory callback), `__main__` (the command).
"""

from lightning_dsv3.plan.activations import (
    IMPLEMENTATIONS,
    PRECISIONS,
    Kernels,
    PrecisionBytes,
    chunk_activation_bytes,
    layer_activation_bytes,
)
from lightning_dsv3.plan.cluster import (
    PUBLISHED_GPU_HOURS_PER_T_TOKENS,
    Candidate,
    ClusterPlan,
    efficiency_for,
    format_plan,
    format_search,
    plan_cluster,
    plan_runnable,
    published_hours,
    search_layouts,
)
from lightning_dsv3.plan.memory import (
    GIB,
    ChunkParams,
    MemoryPlan,
    RankMemory,
    chunk_params,
    memory_plan,
    peak_live_bytes,
    stage_plan,
)
from lightning_dsv3.plan.recommend import recommend
from lightning_dsv3.plan.timing import GPU, GPUS, CommPlan, Efficiency, StepTime, comm_plan, step_time

__all__ = [
    "GIB",
    "GPU",
    "GPUS",
    "IMPLEMENTATIONS",
    "PRECISIONS",
    "PUBLISHED_GPU_HOURS_PER_T_TOKENS",
    "Candidate",
    "ChunkParams",
    "ClusterPlan",
    "CommPlan",
    "Efficiency",
    "Kernels",
    "MemoryPlan",
    "PrecisionBytes",
    "RankMemory",
    "StepTime",
    "chunk_activation_bytes",
    "chunk_params",
    "comm_plan",
    "efficiency_for",
    "format_plan",
    "format_search",
    "layer_activation_bytes",
    "memory_plan",
    "peak_live_bytes",
    "plan_cluster",
    "plan_runnable",
    "published_hours",
    "recommend",
    "search_layouts",
    "stage_plan",
    "step_time",
]
