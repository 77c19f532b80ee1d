"""Pipeline schedules on the same stages and micro-batches: ours against torch.distributed.pipelining's.

Ours (`lightning_dsv3.pipeline`: 1F1B, ZB1P, DualPipe, DualPipeV, run by `PipelineRuntime`) and torch's
(`Schedule1F1B`, `ScheduleZBVZeroBubble`, `ScheduleDualPipeV`, where the installed torch has them)
run forward and backward of the same global batch through the same stage cuts (the FLOP-balanced
layer ranges of `lightning_dsv3.pipeline.partition`; two stages per rank in a V for ZBV, DualPipeV
and our DualPipeV), from the same initial weights, with one pipeline rank per process. No optimizer
step: this measures the schedule. The first step's loss is printed for each: every row trains the
same model on the same batch. With one GPU per stage and no expert parallelism there is no all-to-all
for DualPipe's FB step to hide, so our runtime runs an FB's forward and backward whole, one after the
other; what DualPipe(V) can still hide is the pipeline's own idle time.

`--compile` compiles what a user's run would: `Transformer.compile_parts()` (torch.compile's default
mode, no CUDA graphs) on the one-device model and on every chunk, ours and the ones torch's stages
wrap, whose loss is then the chunk's compiled cross-entropy as in ours. Without expert parallelism
every implementation calls each decoder layer whole (one compiled graph per layer); with it, our
runtime would call the layers of an FB's two micro-batches part by part (compiled attention and
mlp, eager dispatch and combine). A compiled chunk has one backward graph per layer for its input
and weight gradients together: our runtime runs it whole at B (W is then empty). torch's
split-backward schedules (ZBV, DualPipeV) cannot run compiled stages at all (their weight backward
reads autograd metadata a compiled node lacks; measured on torch 2.11), so `--compile` runs torch's
1F1B only and refuses the others, unless `--torch-eager` runs all of torch's stages eager beside
our compiled ones, so that its split-backward schedules run at all, on the same stage cuts and
micro-batches (its rows are named "(eager)"; its 1F1B, which could run compiled, runs eager too).
Compilation happens in the warm-up steps; a row that still compiled a graph during its timed steps is
named under the tables.

Speed table: the median step time (slowest rank, host clock around the step) and tokens/s; the
measured bubble, the largest share of the step a rank spent outside its compute actions (waiting for
transfers included); the median time of each action kind. Each compute action is timed with CUDA
events on GPUs (device time, no synchronisation inside the step) and the wall clock on CPU; torch's
actions by wrapping its stage's forward_one_chunk, backward_one_chunk and backward_weight_one_chunk.

Prediction table: the simulator (`lightning_dsv3.pipeline.simulate`) runs our schedule of the row's
name with the action times measured in the same step (`lightning_dsv3.pipeline.MeasuredCosts`), four
ways, each adding one thing:

  one median per kind  F, B, W, BW, FB each the median over every rank and chunk; unequal stages
                       get one cost
  per-stage medians    each action costs the median of its kind on its rank and chunk(s) (what the
                       PipelineTimeline callback predicts with)
  + P2P                the same, each hop also taking the measured time of one transfer of a
                       micro-batch's hidden state (`p2p_seconds`, in the header)
  own times + P2P      each action costs its own measured duration: a replay of the step

What ran is matched to the schedule's action: our runtime fuses a B with the W right after it into
one BW (a fused B costs the BW, its W nothing); a schedule's BW that ran split costs its B plus W,
and an FB that did not run as one (torch's DualPipeV runs F then the backward) costs its F plus its
micro-batch's full backward. Torch's ZBV has no counterpart in our schedule IR.

What the gap between a measured and predicted step consists of. The replay has each rank's busy time
exactly as measured, so measured - replay is time no compute action ran that the schedule's
dependencies and one transfer time per hop do not explain: (1) the host's work between actions
(posting each batch of sends and receives, the runtime's Python bookkeeping; host-bound, with eager
kernels this small, the device idles while it happens, and since a CUDA-event-timed action then
lasts as long as its launches, every host stall inside an action is counted as compute); (2) sends
that block: a rank's next compute action waits for its whole batch of P2P, sends included (on GPUs
the compute stream is ordered after it), and an NCCL send completes only once the peer has posted
its receive, while the simulator's SEND never blocks; (3) the step's edges, the host clock from the
step's start to the first kernel and from the last to the synchronisation. Replay - per-stage
medians is the spread of one stage's actions over micro-batches; per-stage - one median per kind is
what a single median gets wrong when stages do unequal work (DualPipeV on mini: rank 0 holds layers
0-2 with the embedding and layer 11 with the head, rank 1 layers 3-10).

    torchrun --nproc_per_node 2 -m benchmarks.pipeline_schedules                 # GPUs, NCCL, mini preset
    torchrun --nproc_per_node 2 -m benchmarks.pipeline_schedules --compile --micro-batch 4
    torchrun --nproc_per_node 2 -m benchmarks.pipeline_schedules --preset debug --seq-len 32 \\
        --micro-batch 1 --n-microbatches 4 --steps 2 --warmup 1                 # CPU small mode, gloo
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.pipelining as pipelining
from torch import nn
from torch.profiler import ProfilerActivity, profile

from benchmarks.results_io import (
    checked_step_args,
    markdown_table,
    microbatch_step_parser,
    synchronize,
    write_result,
)
from lightning_dsv3.callbacks.timeline import Bar, bubble_fractions, parse_action
from lightning_dsv3.config import ModelConfig, get_preset
from lightning_dsv3.model.transformer import Transformer
from lightning_dsv3.pipeline.costs import StageCosts, measure_stage_costs
from lightning_dsv3.pipeline.graphs import ChunkGraphs, graphs_ineligible
from lightning_dsv3.pipeline.measured import MeasuredCosts, Recorded, medians_by_kind, step_durations
from lightning_dsv3.pipeline.runtime import ActionClock, PipelineRuntime
from lightning_dsv3.pipeline.schedules import PipelineSchedule, ScheduleError, make_schedule
from lightning_dsv3.pipeline.simulate import Costs, simulate
from lightning_dsv3.pipeline.stages import StagePlan

OURS = ("1f1b", "zb1p", "dualpipe", "dualpipev")
TORCH = {  # our name -> torch.distributed.pipelining class, V-shaped (two stages per rank)
    "1f1b": ("Schedule1F1B", False),
    "zbv": ("ScheduleZBVZeroBubble", True),
    "dualpipev": ("ScheduleDualPipeV", True),
}
# torch's schedules that split a stage's backward into input and weight gradients
TORCH_SPLIT_BACKWARD = {"zbv", "dualpipev"}
FEEDINGS = {  # how the simulator is fed (see the module docstring) -> column header
    "kind": "one median per kind",
    "stage": "per-stage medians",
    "stage+p2p": "per-stage medians + P2P",
    "replay+p2p": "own times + P2P",
}
TOKEN_SEED = 1234


class TorchStageModule(nn.Module):
    """One of our stage chunks as torch.distributed.pipelining wants a stage: one tensor in, one out.

    In: token ids (first stage) or hidden states; out: hidden states, or logits (last stage).
    """

    def __init__(self, chunk: Transformer) -> None:
        super().__init__()
        self.chunk = chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.chunk.embed_tokens(x) if self.chunk.with_embedding else x
        h = self.chunk.run_layers(h)
        return self.chunk.logits(h) if self.chunk.with_head else h


@dataclass
class Row:
    """One schedule's measurements (rank 0's view, already reduced over ranks); lists hold one entry per
    timed step."""

    impl: str
    schedule: str
    step_s: list[float] = field(default_factory=list)
    bubble: list[float] = field(default_factory=list)
    busy_s: list[list[float]] = field(default_factory=list)  # each rank's compute time
    memory: list[tuple[float, int]] = field(default_factory=list)  # each rank's (peak GiB, allocator retries)
    predicted: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # (step s, bubble)
    action_ms: dict[str, list[float]] = field(default_factory=dict)  # median time of each kind
    first_loss: float = float("nan")
    late_graphs: int = 0  # graphs compiled during the timed steps (most on any rank)
    note: str = ""


@dataclass(frozen=True)
class Bench:
    """What every run measures with: one model, one step's tokens, the options and where to run, so the
    rows compare the same work."""

    config: ModelConfig
    tokens: torch.Tensor  # (n_microbatches * micro_batch, seq_len + 1)
    args: argparse.Namespace
    device: torch.device
    dtype: Any
    p2p_s: float  # one hop of one micro-batch's hidden state
    costs: StageCosts | None = None  # measured (--cut measured), else the FLOP model cuts the stages

    def clock(self) -> ActionClock:
        return ActionClock(self.device)

    def chunks(self, schedule: PipelineSchedule, rank: int, compile: bool = True) -> list[Transformer]:
        """This rank's chunks of `schedule`'s stage cut, initialised from the whole model's seeded values
        (and compiled with --compile unless `compile` is False)."""
        plan = StagePlan.build(self.config, schedule, self.args.seq_len, self.costs)
        return [
            self.prepare(
                Transformer(self.config, spec.layer_ids, spec.with_embedding, spec.with_head),
                pipelined=True,
                compile=compile,
            )
            for spec in plan.chunks_of(rank)
        ]

    def prepare(self, model: Transformer, pipelined: bool = False, compile: bool = True) -> Transformer:
        """Seeded weights on the device, compiled as a user's run compiles them when --compile (a
        pipeline stage in a CUDA-graph mode: our runtime graphs its layers, torch's runs them without)."""
        model.init_weights(0)
        model.to(device=self.device, dtype=self.dtype)
        if self.args.compile and compile:
            model.compile_parts(self.args.compile_mode, pipelined)
        return model


def predictions(
    schedule: PipelineSchedule, ranks: list[Recorded], p2p_s: float
) -> dict[str, tuple[float, float]]:
    """(step s, largest bubble share) the simulator gives `schedule` under each of FEEDINGS."""
    durations = step_durations(ranks)
    per_stage, own = MeasuredCosts(durations, by="stage"), MeasuredCosts(durations, by="own")
    free, hop = Costs(f=0.0, b=0.0), Costs(f=0.0, b=0.0, p2p_latency=p2p_s)
    results = {
        "kind": simulate(schedule, free, MeasuredCosts(durations, by="kind")),
        "stage": simulate(schedule, free, per_stage),
        "stage+p2p": simulate(schedule, hop, per_stage),
        "replay+p2p": simulate(schedule, hop, own),
    }
    return {
        name: (r.makespan, r.max_bubble / r.makespan if r.makespan else 0.0) for name, r in results.items()
    }


def gather_actions(clock: ActionClock) -> list[Recorded]:
    ranks: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, [(t.action, t.start_s, t.end_s) for t in clock.read()])
    return ranks


def slowest(seconds: float, device: torch.device) -> float:
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def mean_loss(losses: list[torch.Tensor], device: torch.device) -> float:
    """The mean micro-batch loss over the ranks that computed one (the last stage's)."""
    total = sum(float(x.detach()) for x in losses)
    t = torch.tensor([total, float(len(losses))], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t[0] / t[1]) if t[1] else float("nan")


def allocator_marks(device: torch.device) -> tuple[int, int]:
    """(peak allocated bytes since the last reset, allocator retries so far) on a GPU; zeros on CPU. A
    retry is a cudaMalloc that failed, made the allocator free its cache (synchronising the device)
    and try again: a step that retries stalls on the host."""
    if device.type != "cuda":
        return 0, 0
    stats = torch.cuda.memory_stats(device)
    return stats.get("allocated_bytes.all.peak", 0), stats.get("num_alloc_retries", 0)


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far."""
    from torch._dynamo.utils import counters  # on first use: importing dynamo takes a while

    return int(counters["stats"]["unique_graphs"])


def p2p_seconds(config: ModelConfig, args: argparse.Namespace, device: torch.device, dtype: Any) -> float:
    """One hop of one micro-batch's hidden state, rank 0 to rank 1, made as the runtime makes it (a
    batched isend/irecv, then waited for): the median of 20 round trips after 5, halved. The simulator
    takes it as the latency of every SEND/RECV pair; every rank gets rank 0's value."""
    rank = dist.get_rank()
    buf = torch.zeros(args.micro_batch, args.seq_len, config.dim, dtype=dtype, device=device)
    pairs = {0: (dist.isend, dist.irecv), 1: (dist.irecv, dist.isend)} if dist.get_world_size() > 1 else {}
    ops = pairs.get(rank, ())
    times = []
    for _ in range(25):
        dist.barrier()
        synchronize(device)
        start = time.perf_counter()
        for op in ops:
            for req in dist.batch_isend_irecv([dist.P2POp(op, buf, 1 - rank)]):
                req.wait()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return slowest(statistics.median(times[5:]) / 2 if rank == 0 else 0.0, device)


def measure(
    row: Row,
    step: Callable[[], list[torch.Tensor]],
    clock: ActionClock,
    sim_schedule: PipelineSchedule | None,
    bench: Bench,
    modules: list[nn.Module],
) -> None:
    """Run warm-up and timed steps; fill `row` on every rank (rank 0 reports it)."""
    args, device = bench.args, bench.device
    graphs, retries = compiled_graphs(), 0
    for i in range(args.warmup + args.steps):
        if i == args.warmup:  # graphs, peak and retries of the timed steps only
            graphs = compiled_graphs()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            retries = allocator_marks(device)[1]
        for m in modules:
            m.zero_grad(set_to_none=True)
        dist.barrier()
        synchronize(device)
        clock.start()
        start = time.perf_counter()
        losses = step()
        synchronize(device)
        step_s = slowest(time.perf_counter() - start, device)
        loss = mean_loss(losses, device)
        ranks = gather_actions(clock)
        if i == 0:
            row.first_loss = loss
        if i >= args.warmup:
            row.step_s.append(step_s)
            record(row, ranks, sim_schedule, bench.p2p_s)
    row.late_graphs = int(slowest(compiled_graphs() - graphs, device))
    peak, retried = allocator_marks(device)
    memory: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(memory, (peak / 2**30, retried - retries))
    row.memory = memory
    if args.trace:
        trace_step(
            step,
            modules,
            device,
            Path(args.trace) / f"{row.impl}-{row.schedule}-rank{dist.get_rank()}.json.gz",
        )


def trace_step(
    step: Callable[[], list[torch.Tensor]], modules: list[nn.Module], device: torch.device, path: Path
) -> None:
    """One more step, untimed, under torch.profiler: this rank's Chrome trace (host ops and kernels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for m in modules:
        m.zero_grad(set_to_none=True)
    dist.barrier()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    prof.export_chrome_trace(str(path))


def record(row: Row, ranks: list[Recorded], sim_schedule: PipelineSchedule | None, p2p_s: float) -> None:
    """One timed step's bubble, busy times, action medians and predictions into `row`."""
    bars: list[list[Bar]] = [[parse_action(*action) for action in actions] for actions in ranks]
    shares, _ = bubble_fractions(bars)
    row.bubble.append(max(shares))
    row.busy_s.append([sum(end - start for _, start, end in actions) for actions in ranks])
    for op, t in medians_by_kind(step_durations(ranks)).items():
        row.action_ms.setdefault(op, []).append(t * 1e3)
    if sim_schedule is None:
        return
    try:
        predicted = predictions(sim_schedule, ranks, p2p_s)
    except KeyError as err:  # an action of our schedule that this run did not record
        row.note = f"no prediction: {err}"
        return
    for name, value in predicted.items():
        row.predicted.setdefault(name, []).append(value)


def run_ours(name: str, bench: Bench) -> Row:
    row = Row("lightning_dsv3", name)
    rank, pp = dist.get_rank(), dist.get_world_size()
    n_micro = bench.args.n_microbatches
    try:
        schedule = make_schedule(name, pp, n_micro)
    except (ValueError, ScheduleError) as err:
        row.note = str(err)
        return row
    chunks = bench.chunks(schedule, rank)
    runtime = PipelineRuntime(
        schedule, chunks, rank, dist.group.WORLD, lambda r: r, lambda chunk, h, t: chunk.loss(h, t)
    )
    clock = runtime.action_clock  # CUDA events on GPUs; the runtime restarts it at each run
    micro = list(bench.tokens.chunk(n_micro))

    def step() -> list[torch.Tensor]:
        return [out.ce for _, out in runtime.run(micro, 1.0 / n_micro)]

    measure(row, step, clock, schedule, bench, chunks)
    runtime.drop_graphs()  # as the strategy's teardown does: the next row captures on a clean slate
    return row


def run_one_device(bench: Bench) -> Row:
    """The baseline: the whole model on rank 0 alone, forward and backward of the same micro-batches one
    after the other (gradients accumulate, as in the pipelines); the other ranks wait. In a CUDA-graph
    mode its layers replay one capture (`ChunkGraphs` with one slot: one micro-batch in flight), as our
    stages do: torch.compile's own graphs fail when gradients accumulate over micro-batches (measured:
    "accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run")."""
    config, tokens, args, device = bench.config, bench.tokens, bench.args, bench.device
    row = Row("one device", "no pipeline")
    if dist.get_rank() == 0:
        model = bench.prepare(Transformer(config, tuple(range(config.n_layers)), True, True), pipelined=True)
        graphable = model.cuda_graphs and graphs_ineligible(model, False, device) is None
        layers = ChunkGraphs(model, 1) if graphable else None
        micro = list(tokens.chunk(args.n_microbatches))
        graphs = compiled_graphs()
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                graphs = compiled_graphs()
            model.zero_grad(set_to_none=True)
            if layers is not None and layers.prepare_step() is not None:
                layers = None  # its experts would read their counts on the host: plain compiled
            synchronize(device)
            start = time.perf_counter()
            ces = []
            for mb in micro:
                if layers is None:
                    out = model.training_loss(mb)
                else:
                    out = model.loss(layers.run_layers(0, model.embed_tokens(mb[:, :-1])), mb)
                (out.loss / args.n_microbatches).backward()
                ces.append(out.ce.detach())
            synchronize(device)
            if i == 0:
                row.first_loss = float(torch.stack(ces).mean())
            if i >= args.warmup:
                row.step_s.append(time.perf_counter() - start)
        row.late_graphs = compiled_graphs() - graphs
        if layers is not None:
            layers.drop()  # the captures' pools go before the next row captures its own
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dist.barrier()
    return row


def _timed(
    clock: ActionClock, fn: Callable[..., Any], op_of: Callable[..., str], chunk: int
) -> Callable[..., Any]:
    """`fn` (a torch stage's method) recording each call on `clock` as our action `op(micro-batch.chunk)`."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = clock.mark()
        out = fn(*args, **kwargs)
        clock.add(f"{op_of(*args, **kwargs)}({args[0]}.{chunk})", start, clock.mark())
        return out

    return wrapper


def _backward_op(mb: int, loss: Any = None, full_backward: bool = True, last_backward: bool = False) -> str:
    return "BW" if full_backward else "B"


def run_torch(name: str, bench: Bench) -> Row:
    tokens, args, device = bench.tokens, bench.args, bench.device
    eager = args.compile and args.torch_eager  # beside our compiled stages (module docstring)
    row = Row("torch.distributed.pipelining" + (" (eager)" if eager else ""), name)
    class_name, v_shape = TORCH[name]
    schedule_class = getattr(pipelining, class_name, None)
    if schedule_class is None:
        row.note = f"torch {torch.__version__} has no {class_name}"
        return row
    rank, pp = dist.get_rank(), dist.get_world_size()
    # the stage cut of our schedule with the same layout: pp stages, or 2 pp in a V
    ours = make_schedule("dualpipev" if v_shape else "1f1b", pp, max(args.n_microbatches, 2 * pp))
    chunks = bench.chunks(ours, rank, compile=not eager)
    stage_ids = [ours.stage_of(rank, c) for c in range(ours.n_chunks)]
    clock = bench.clock()
    stages = []
    for c, (chunk, stage_id) in enumerate(zip(chunks, stage_ids)):
        stage = pipelining.PipelineStage(TorchStageModule(chunk), stage_id, ours.n_stages, device)
        stage.forward_one_chunk = _timed(clock, stage.forward_one_chunk, lambda *a, **k: "F", c)
        stage.backward_one_chunk = _timed(clock, stage.backward_one_chunk, _backward_op, c)
        stage.backward_weight_one_chunk = _timed(
            clock, stage.backward_weight_one_chunk, lambda *a, **k: "W", c
        )
        stages.append(stage)
    try:
        # the chunk's own cross-entropy (compiled with --compile unless eager), as our last stage's loss
        schedule = schedule_class(
            stages if v_shape else stages[0], args.n_microbatches, loss_fn=chunks[-1].cross_entropy
        )
    except (ValueError, RuntimeError) as err:
        row.note = str(err).splitlines()[0]
        return row
    first, last = 0 in stage_ids, ours.n_stages - 1 in stage_ids
    # contiguous: torch's stages check the strides of their inputs against the first micro-batch's
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def step() -> list[torch.Tensor]:
        losses: list[torch.Tensor] = []
        step_args = (inputs,) if first else ()
        step_kwargs = {"target": targets, "losses": losses} if last else {}
        schedule.step(*step_args, **step_kwargs)
        return losses

    sim_name = {"1f1b": "1f1b", "dualpipev": "dualpipev"}.get(name)
    sim = make_schedule(sim_name, pp, args.n_microbatches) if sim_name else None
    measure(row, step, clock, sim, bench, [s.submod for s in stages])
    return row


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def speed_table(rows: list[Row], tokens: int) -> str:
    """Step time, throughput, measured bubble and action medians of every row."""
    table = []
    one_device = next((statistics.median(r.step_s) for r in rows if r.impl == "one device"), None)
    for r in rows:
        if not r.step_s:
            table.append([r.impl, r.schedule, *["—"] * 9, r.note[:80]])
            continue
        step = statistics.median(r.step_s)
        speedup = f"{one_device / step:.2f}x" if one_device else "—"
        bubble = f"{statistics.median(r.bubble):.1%}" if r.bubble else "—"
        ms = {op: statistics.median(v) for op, v in r.action_ms.items()}
        costs = [f"{ms[op]:.2f}" if op in ms else "—" for op in ("F", "B", "W", "BW", "FB")]
        table.append(
            [r.impl, r.schedule, _ms(step), f"{tokens / step:,.0f}", speedup, bubble, *costs,
             f"{r.first_loss:.4f}"]
        )  # fmt: skip
    header = ["implementation", "schedule", "step ms", "tokens/s", "vs one device", "bubble measured",
              "F ms", "B ms", "W ms", "BW ms", "FB ms", "loss step 1"]  # fmt: skip
    return markdown_table(header, table)


def prediction_table(rows: list[Row]) -> str:
    """Measured step and bubble against the simulator's under each feeding (predicted / measured - 1)."""
    table = []
    for r in rows:
        if not r.bubble:
            continue
        step = statistics.median(r.step_s)
        busy = " / ".join(_ms(statistics.median(b)) for b in zip(*r.busy_s))
        cells = []
        for name in FEEDINGS:
            values = r.predicted.get(name)
            if not values:
                cells += ["—", "—"]
                continue
            span = statistics.median(v[0] for v in values)
            cells += [
                f"{_ms(span)} ({span / step - 1:+.0%})",
                f"{statistics.median(v[1] for v in values):.1%}",
            ]
        peaks = " / ".join(f"{gib:.1f}" for gib, _ in r.memory) if r.memory else "—"
        retries = " / ".join(str(n) for _, n in r.memory) if r.memory else "—"
        bubble = f"{statistics.median(r.bubble):.1%}"
        table.append([r.impl, r.schedule, _ms(step), busy, peaks, retries, bubble, *cells])
    header = ["implementation", "schedule", "step ms", "busy ms per rank", "peak GiB per rank",
              "allocator retries per rank", "bubble measured"]  # fmt: skip
    for title in FEEDINGS.values():
        header += [f"{title}: step ms (error)", "bubble"]
    return markdown_table(header, table)


def cut_text(costs: StageCosts | None) -> str:
    """How the stages were cut, for the header."""
    if costs is None:
        return "stages cut by the FLOP model"
    layers = " / ".join(str(t) for t in sorted({round(c * 1e3, 2) for c in costs.layers}))
    return (
        f"stages cut by times measured on rank 0 (pipeline.costs): layer {layers} ms, head "
        f"{costs.head * 1e3:.2f} ms, embedding {costs.embed * 1e3:.2f} ms"
    )


def report(
    rows: list[Row], args: argparse.Namespace, world: int, p2p_s: float, costs: StageCosts | None = None
) -> None:
    tokens = args.n_microbatches * args.micro_batch * args.seq_len
    compiled = (
        f"our chunks and the one-device model compiled (compile_parts, {args.compile_mode or 'default'} mode)"
    )
    graphed = args.compile_mode in ("reduce-overhead", "max-autotune")
    if graphed:
        compiled += (
            ", the decoder layers of our stages and of the one-device model replayed from CUDA graphs "
            "captured once per micro-batch in flight (lightning_dsv3.pipeline.graphs)"
        )
    if args.torch_eager:
        compiled += "; torch's stages eager (--torch-eager: its split-backward schedules cannot run compiled)"
    else:
        compiled += f", torch's stages compiled{' without graphs' if graphed else ''}"
    late = [f"{r.impl} {r.schedule} ({r.late_graphs})" for r in rows if r.late_graphs]
    notes = [f"{r.impl} {r.schedule}: {r.note}" for r in rows if r.note and r.step_s]
    body = (
        f"preset {args.preset} (MTP off), pp={world} (one pipeline rank per process), "
        f"{args.n_microbatches} micro-batches of {args.micro_batch} x {args.seq_len} tokens per step, "
        f"{args.steps} timed steps after {args.warmup} warm-up; forward and backward only; "
        f"{compiled if args.compile else 'eager'}; {cut_text(costs)}. Bubble: the largest share of the "
        "step one rank spent outside its compute actions; vs one device: against the whole model on one "
        "device running the same micro-batches. Action times are medians in ms (B: input gradient only; "
        "BW: full backward)."
        "\n\n" + speed_table(rows, tokens) + "\n\n"
        "The simulator on our schedule of each row's name with the action times measured in the same step "
        "(medians over steps; ZBV has no counterpart in our schedule IR); the error is predicted / measured "
        f"- 1. P2P: one hop of a micro-batch's hidden state measured at {p2p_s * 1e3:.3f} ms. Busy: each "
        "rank's compute time per step. Peak: the most memory each rank's tensors held over the row's "
        "timed steps; allocator retries: cudaMallocs in those steps that failed and made the caching "
        "allocator free its cache and synchronise (zeros on CPU). The module docstring says what the "
        "gap consists of.\n\n"
        + prediction_table(rows)
        + (f"\n\nGraphs compiled during the timed steps (raise --warmup): {', '.join(late)}" if late else "")
        + "".join(f"\n\n{note}" for note in notes)
    )
    suffix = (f"-compile-{args.compile_mode}" if args.compile_mode else "-compile") if args.compile else ""
    suffix += "-torch-eager" if args.compile and args.torch_eager else ""
    write_result(f"pipeline_schedules-{args.preset}-pp{world}{suffix}", body)


def measured_costs(config: ModelConfig, args: argparse.Namespace, device: torch.device) -> StageCosts:
    """Rank 0's measured stage costs, on every rank (each rank's own would differ by noise)."""
    costs: list[StageCosts | None] = [None]
    if dist.get_rank() == 0:
        precision = "bf16-true" if device.type == "cuda" else "32-true"
        costs[0] = measure_stage_costs(
            config, device, args.micro_batch, args.seq_len, precision, args.compile
        )
    dist.broadcast_object_list(costs, src=0)
    assert costs[0] is not None
    return costs[0]


def main() -> None:
    parser = microbatch_step_parser(__doc__)
    parser.add_argument("--ours", default=",".join(OURS), help="our schedules to run (empty: none)")
    parser.add_argument(
        "--torch",
        default=None,
        help=f"torch's schedules among {sorted(TORCH)} (default: all; with --compile, those not in "
        f"{sorted(TORCH_SPLIT_BACKWARD)})",
    )
    parser.add_argument(
        "--cut",
        choices=["flops", "measured"],
        default="flops",
        help="cut the stages by the FLOP model or by times measured on rank 0's device (pipeline.costs)",
    )
    parser.add_argument("--trace", default=None, help="a directory: one more step per row, traced per rank")
    parser.add_argument(
        "--compile-mode",
        default=None,
        help='torch.compile\'s mode under --compile; "reduce-overhead": the decoder layers of our stages '
        "replay CUDA graphs captured per micro-batch in flight (lightning_dsv3.pipeline.graphs), the "
        "one-device model's one capture the same way; torch's stages compile without graphs (or run eager: "
        "--torch-eager)",
    )
    parser.add_argument(
        "--torch-eager",
        action="store_true",
        help="with --compile, run torch's stages eager (so its split-backward schedules run too)",
    )
    args = checked_step_args(parser)
    compiled_torch = args.compile and not args.torch_eager
    if args.torch is None:
        args.torch = ",".join(n for n in TORCH if not (compiled_torch and n in TORCH_SPLIT_BACKWARD))
    refused = (
        sorted(set(filter(None, args.torch.split(","))) & TORCH_SPLIT_BACKWARD) if compiled_torch else []
    )
    if refused:
        parser.error(
            f"torch's {', '.join(refused)} cannot run compiled stages: its weight backward "
            "(stage_backward_weight) reads per-input metadata from each autograd node, which a compiled "
            "graph's backward node does not expose (torch 2.11: RuntimeError \"Attribute '_input_metadata' "
            'is invalid"). Run them without --compile, with --torch-eager, or pass --torch 1f1b'
        )

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    config = get_preset(args.preset, max_seq_len=args.seq_len, original_seq_len=args.seq_len, mtp_depth=0)
    gen = torch.Generator().manual_seed(TOKEN_SEED)
    batch = args.n_microbatches * args.micro_batch
    tokens = torch.randint(0, config.vocab_size, (batch, args.seq_len + 1), generator=gen).to(device)

    costs = measured_costs(config, args, device) if args.cut == "measured" else None
    bench = Bench(config, tokens, args, device, dtype, p2p_seconds(config, args, device, dtype), costs)
    runs = [partial(run_one_device, bench)]
    runs += [partial(run_ours, n, bench) for n in filter(None, args.ours.split(","))]
    runs += [partial(run_torch, n, bench) for n in filter(None, args.torch.split(","))]
    rows: list[Row] = []
    for run in runs:
        rows.append(run())
        if dist.get_rank() == 0:  # the file after every row: a row that crashes loses none before it
            report(rows, args, dist.get_world_size(), bench.p2p_s, bench.costs)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
