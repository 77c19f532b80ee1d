"""Advice from a config and (optionally) a measured run: what to change, one sentence each."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from lightning_dsv3.config import ModelConfig, ParallelConfig
from lightning_dsv3.pipeline.schedules import make_schedule
from lightning_dsv3.pipeline.simulate import Costs, simulate
from lightning_dsv3.plan.cluster import CHEAPEST_FIRST
from lightning_dsv3.plan.memory import GIB, memory_plan
from lightning_dsv3.plan.timing import OVERLAPPED


def _bubble(schedule: str, pp: int, n_micro: int) -> float:
    """The largest per-rank bubble as a fraction of the step, with backward = 2 x forward, W = forward."""
    result = simulate(make_schedule(schedule, pp, n_micro), Costs(f=1.0, b=2.0, w=1.0))
    return result.max_bubble / result.makespan


def _valid_microbatches(schedule: str, pp: int, n_micro: int) -> bool:
    try:
        make_schedule(schedule, pp, n_micro)
    except ValueError:
        return False
    return True


def recommend(
    model_config: ModelConfig,
    parallel_config: ParallelConfig,
    measured: dict | None = None,
    memory_budget_bytes: float | None = None,
) -> list[str]:
    """What to change, one sentence each: checkpointing or layout to fit memory, micro-batches or a
    schedule to shrink the bubble, a different ep or overlap for the all-to-all.

    `measured` (all keys optional): "peak_bytes" or "peak_mib" (the busiest rank's peak), "micro_batch_size",
    "seq_len", "precision", "device" ("cuda" or "cpu"), "bubble_fraction", "a2a_fraction" (share of the
    step spent in the all-to-all), "expert_load_imbalance" (busiest expert / mean). What is not measured is
    predicted by `memory_plan`; a measured peak rescales the predictions of the alternatives.
    """
    measured = dict(measured or {})
    config = model_config
    parallel = (
        parallel_config if parallel_config.dp is not None else dataclasses.replace(parallel_config, dp=1)
    )
    batch = int(measured.get("micro_batch_size", 1))
    seq = int(measured.get("seq_len", config.max_seq_len))
    precision = measured.get("precision", "bf16-mixed")
    device = measured.get("device", "cuda")
    current = config.activation_checkpointing

    def peak_with(option: str, layout: ParallelConfig = parallel, micro: int = batch) -> float:
        return memory_plan(config, layout, micro, seq, precision, option, device).worst.peak_bytes

    predicted = peak_with(current)
    peak = float(measured.get("peak_bytes", measured.get("peak_mib", 0) * 2**20)) or predicted
    calibration = peak / predicted  # carry a measured/predicted gap over to the alternatives
    advice: list[str] = []
    budget = memory_budget_bytes
    if budget is not None and peak > budget:
        advice += _fit_advice(config, parallel, batch, current, peak, budget, calibration, peak_with)
    elif budget is not None and current != "none":
        lighter = [
            o
            for o in CHEAPEST_FIRST[: CHEAPEST_FIRST.index(current)]
            if peak_with(o) * calibration <= 0.9 * budget
        ]
        if lighter:
            advice.append(
                f"memory: {peak / GIB:.1f} GiB of {budget / GIB:.1f} GiB used; activation_checkpointing="
                f"'{lighter[0]}' also fits (predicted {peak_with(lighter[0]) * calibration / GIB:.1f} GiB) "
                "and recomputes less"
            )
    if parallel.pp > 1:
        advice += _bubble_advice(parallel, measured.get("bubble_fraction"))
    if config.n_moe_layers and parallel.ep > 1:
        advice += _expert_advice(config, parallel, measured)
    imbalance = measured.get("expert_load_imbalance")
    if imbalance is not None and imbalance > 1.5:
        advice.append(
            f"experts: the busiest expert gets {imbalance:.1f}x the mean load; raise bias_update_speed "
            f"(now {config.bias_update_speed}) so aux-loss-free balancing catches up, or add a small "
            "aux_loss_alpha"
        )
    return advice


def _fit_advice(
    config: ModelConfig,
    parallel: ParallelConfig,
    batch: int,
    current: str,
    peak: float,
    budget: float,
    calibration: float,
    peak_with: Callable[..., float],
) -> list[str]:
    """Ways to bring the peak under the budget: checkpointing first, then the layout and the batch."""
    head = f"memory: peak {peak / GIB:.1f} GiB exceeds the {budget / GIB:.1f} GiB budget; "
    for option in CHEAPEST_FIRST[CHEAPEST_FIRST.index(current) + 1 :]:
        if peak_with(option) * calibration <= budget:
            return [
                head + f"activation_checkpointing='{option}' brings it to "
                f"{peak_with(option) * calibration / GIB:.1f} GiB"
            ]
    tries: list[tuple[str, ParallelConfig, int]] = []
    if not parallel.zero:
        tries.append(
            ("zero=True (shard the optimizer state)", dataclasses.replace(parallel, zero=True), batch)
        )
    if parallel.schedule == "dualpipe":
        tries.append(
            (
                "schedule='dualpipev' (one copy of each stage)",
                dataclasses.replace(parallel, schedule="dualpipev"),
                batch,
            )
        )
    micro = batch // 2
    while micro >= 1:  # smaller micro-batches (more of them for the same batch)
        tries.append((f"micro_batch_size={micro}", parallel, micro))
        micro //= 2
    n_experts = config.n_routed_experts
    if n_experts % (2 * parallel.ep) == 0 and parallel.dp % 2 == 0:
        wider = dataclasses.replace(parallel, ep=2 * parallel.ep, dp=parallel.dp // 2)
        tries.append((f"ep={2 * parallel.ep}, dp={parallel.dp // 2} (fewer experts per rank)", wider, batch))
    for what, layout, micro in tries:
        value = peak_with("layer", layout, micro) * calibration
        if value <= budget:
            return [
                head + f"with activation_checkpointing='layer', {what} brings it to {value / GIB:.1f} GiB"
            ]
    return [head + "no checkpointing option or single layout change fits; add pipeline stages or GPUs"]


def _bubble_advice(parallel: ParallelConfig, measured_bubble: float | None) -> list[str]:
    """More micro-batches, or a schedule with a smaller bubble, when the bubble exceeds 10% of the step."""
    n = parallel.microbatches
    bubble = measured_bubble if measured_bubble is not None else _bubble(parallel.schedule, parallel.pp, n)
    if bubble <= 0.1:
        return []
    advice = []
    for more in (2 * n, 4 * n, 8 * n):
        if (
            _valid_microbatches(parallel.schedule, parallel.pp, more)
            and _bubble(parallel.schedule, parallel.pp, more) <= 0.1
        ):
            advice.append(
                f"pipeline: the bubble is {bubble:.0%} of the step; n_microbatches={more} (smaller "
                f"micro-batches, same batch) brings it to {_bubble(parallel.schedule, parallel.pp, more):.0%}"
            )
            break
    if parallel.schedule in ("gpipe", "1f1b", "interleaved_1f1b"):
        better = [s for s in ("zb1p", "dualpipev") if _valid_microbatches(s, parallel.pp, n)]
        if better:
            options = ", ".join(f"{s} {_bubble(s, parallel.pp, n):.0%}" for s in better)
            advice.append(f"pipeline: at n_microbatches={n} a zero-bubble schedule idles less ({options})")
    return advice or [
        f"pipeline: the bubble is {bubble:.0%} of the step; use more micro-batches or fewer stages"
    ]


def _expert_advice(config: ModelConfig, parallel: ParallelConfig, measured: dict) -> list[str]:
    """All-to-all exposure and expert placement."""
    advice = []
    share = measured.get("a2a_fraction")
    if share is not None and share > 0.25:
        fixes = []
        if not (parallel.pipelined and parallel.schedule in OVERLAPPED):
            at_pp1 = " (at pp=1, schedule='dualpipev': two half-model chunks on each rank)"
            fixes.append(
                "a DualPipe schedule, whose FB pairs hide one micro-batch's all-to-all behind another's "
                f"compute{at_pp1 if parallel.pp == 1 else ''}"
            )
        if parallel.ep > 8:
            fixes.append("ep=8 to keep the exchange inside a node (NVLink), spreading the rest over dp")
        if parallel.dispatch_codec is None:
            fixes.append("dispatch_codec='fp8' to halve the dispatch payload")
        if fixes:
            advice.append(
                f"experts: the all-to-all takes {share:.0%} of the step; try " + "; or ".join(fixes)
            )
    if parallel.ep > 8 and parallel.max_nodes_per_token is None:
        advice.append(
            f"experts: ep={parallel.ep} spans nodes; max_nodes_per_token=4 (DeepSeek's node-limited routing) "
            "caps each token's InfiniBand traffic"
        )
    return advice
