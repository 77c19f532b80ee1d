"""Pipeline schedules on the same stages and micro-batches: ours against torch.distributed.pipelining's.

Ours (`lightning_dsv3.pipeline`: 1F1B, ZB1P, DualPipe, DualPipeV, run by `PipelineRuntime`) and torch's
(`Schedule1F1B`, `ScheduleZBVZeroBubble`, `ScheduleDualPipeV`, where the installed torch has them)
run forward and backward of the same global batch through the same stage cuts (the FLOP-balanced
layer ranges of `lightning_dsv3.pipeline.partition`; two stages per rank in a V for ZBV, DualPipeV
and our DualPipeV), from the same initial weights, with one pipeline rank per process. No optimizer
step: this measures the schedule.

For each: the median step time (slowest rank) and tokens/s; the measured bubble, the largest share of
the step a rank spent outside its compute actions (waiting for transfers included); and the
simulator's prediction for our schedule of the same name under the measured median time of each
action kind (F, B, W, and FB for ours), which is the bubble the schedule itself leaves with free
transfers. Each compute action is timed with CUDA events on GPUs (device time, no synchronisation
inside the step) and the wall clock on CPU; torch's actions are timed by wrapping its stage's
forward_one_chunk, backward_one_chunk and backward_weight_one_chunk. Torch's DualPipeV runs its
overlapped forward&backward as two actions one after the other, so it is predicted without overlap.
With one GPU per stage and no expert parallelism there is no all-to-all for DualPipe's FB step to
hide; what it can still hide is the pipeline's own idle time. The first step's loss is printed for
each: every row trains the same model on the same batch.

    torchrun --nproc_per_node 2 -m benchmarks.pipeline_schedules                 # GPUs, NCCL, mini preset
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
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.pipelining as pipelining
import torch.nn.functional as F
from torch import nn

from benchmarks.results_io import markdown_table, write_result
from lightning_dsv3.callbacks.timeline import Bar, bubble_fractions, measured_costs, parse_action, predicted
from lightning_dsv3.config import ModelConfig, get_preset
from lightning_dsv3.model.transformer import Transformer
from lightning_dsv3.pipeline.runtime import ActionClock, PipelineRuntime
from lightning_dsv3.pipeline.schedules import PipelineSchedule, ScheduleError, make_schedule
from lightning_dsv3.pipeline.stages import StagePlan

OURS = ("1f1b", "zb1p", "dualpipe", "dualpipev")
TORCH = {  # our name -> torch.distributed.pipelining class, V-shaped (two stages per rank)
    "1f1b": ("Schedule1F1B", False),
    "zbv": ("ScheduleZBVZeroBubble", True),
    "dualpipev": ("ScheduleDualPipeV", True),
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


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The main head's loss as `Transformer.loss` computes it (fp32 logits, mean over tokens)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@dataclass
class Row:
    """One schedule's measurements (rank 0's view, already reduced over ranks)."""

    impl: str
    schedule: str
    step_s: list[float] = field(default_factory=list)
    bubble: list[float] = field(default_factory=list)
    predicted_bubble: list[float] = field(default_factory=list)
    predicted_step_s: list[float] = field(default_factory=list)
    action_ms: dict[str, list[float]] = field(default_factory=dict)  # per step: median time of each kind
    first_loss: float = float("nan")
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

    def clock(self) -> ActionClock:
        return ActionClock(self.device)

    def chunks(self, schedule: PipelineSchedule, rank: int) -> list[Transformer]:
        """This rank's chunks of `schedule`'s stage cut, initialised from the whole model's seeded values."""
        plan = StagePlan.build(self.config, schedule, self.args.seq_len)
        chunks = []
        for spec in plan.chunks_of(rank):
            chunk = Transformer(self.config, spec.layer_ids, spec.with_embedding, spec.with_head)
            chunk.init_weights(0)
            chunks.append(chunk.to(device=self.device, dtype=self.dtype))
        return chunks


def gather_bars(clock: ActionClock) -> list[list[Bar]]:
    ranks: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, [parse_action(t.action, t.start_s, t.end_s) for t in clock.read()])
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
    cuda = device.type == "cuda"
    for i in range(args.warmup + args.steps):
        for m in modules:
            m.zero_grad(set_to_none=True)
        dist.barrier()
        if cuda:
            torch.cuda.synchronize()
        clock.start()
        start = time.perf_counter()
        losses = step()
        if cuda:
            torch.cuda.synchronize()
        step_s = slowest(time.perf_counter() - start, device)
        loss = mean_loss(losses, device)
        ranks = gather_bars(clock)
        if i == 0:
            row.first_loss = loss
        if i < args.warmup:
            continue
        row.step_s.append(step_s)
        shares, _ = bubble_fractions(ranks)
        row.bubble.append(max(shares))
        costs, medians = measured_costs(ranks)
        for op, t in medians.items():
            row.action_ms.setdefault(op, []).append(t * 1e3)
        if sim_schedule is not None:
            _, sim_shares, sim_span = predicted(sim_schedule, costs)
            row.predicted_bubble.append(max(sim_shares))
            row.predicted_step_s.append(sim_span)


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
    return row


def run_one_device(bench: Bench) -> Row:
    """The baseline: the whole model on rank 0 alone, forward and backward of the same micro-batches one
    after the other (gradients accumulate, as in the pipelines); the other ranks wait."""
    config, tokens, args, device = bench.config, bench.tokens, bench.args, bench.device
    row = Row("one device", "no pipeline")
    rank = dist.get_rank()
    if rank == 0:
        model = Transformer(config, tuple(range(config.n_layers)), True, True)
        model.init_weights(0)
        model.to(device=device, dtype=bench.dtype)
        micro = list(tokens.chunk(args.n_microbatches))
        for i in range(args.warmup + args.steps):
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            ces = []
            for mb in micro:
                out = model.training_loss(mb)
                (out.loss / args.n_microbatches).backward()
                ces.append(out.ce.detach())
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i == 0:
                row.first_loss = float(torch.stack(ces).mean())
            if i >= args.warmup:
                row.step_s.append(time.perf_counter() - start)
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
    row = Row("torch.distributed.pipelining", name)
    tokens, args, device = bench.tokens, bench.args, bench.device
    class_name, v_shape = TORCH[name]
    schedule_class = getattr(pipelining, class_name, None)
    if schedule_class is None:
        row.note = f"torch {torch.__version__} has no {class_name}"
        return row
    rank, pp = dist.get_rank(), dist.get_world_size()
    # the stage cut of our schedule with the same layout: pp stages, or 2 pp in a V
    ours = make_schedule("dualpipev" if v_shape else "1f1b", pp, max(args.n_microbatches, 2 * pp))
    chunks = bench.chunks(ours, rank)
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
        schedule = schedule_class(
            stages if v_shape else stages[0], args.n_microbatches, loss_fn=cross_entropy
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


def report(rows: list[Row], args: argparse.Namespace, world: int) -> None:
    tokens = args.n_microbatches * args.micro_batch * args.seq_len
    table = []
    one_device = next((statistics.median(r.step_s) for r in rows if r.impl == "one device"), None)
    for r in rows:
        if r.note:
            table.append([r.impl, r.schedule, *["—"] * 11, r.note[:80]])
            continue
        step = statistics.median(r.step_s)
        speedup = f"{one_device / step:.2f}x" if one_device else "—"
        bubble = f"{statistics.median(r.bubble):.1%}" if r.bubble else "—"
        pred_b = f"{statistics.median(r.predicted_bubble):.1%}" if r.predicted_bubble else "—"
        pred_s = f"{statistics.median(r.predicted_step_s) * 1e3:.1f}" if r.predicted_step_s else "—"
        ms = {op: statistics.median(v) for op, v in r.action_ms.items()}
        costs = [f"{ms[op]:.2f}" if op in ms else "—" for op in ("F", "B", "W", "BW", "FB")]
        table.append(
            [r.impl, r.schedule, f"{step * 1e3:.1f}", f"{tokens / step:,.0f}", speedup, bubble, pred_b,
             pred_s, *costs, f"{r.first_loss:.4f}"]
        )  # fmt: skip
    body = (
        f"preset {args.preset} (MTP off), pp={world} (one pipeline rank per process), "
        f"{args.n_microbatches} micro-batches of {args.micro_batch} x {args.seq_len} tokens per step, "
        f"{args.steps} timed steps after {args.warmup} warm-up; forward and backward only. Bubble: the "
        "largest share of the step one rank spent outside its compute actions; predicted: the simulator "
        "on our schedule of that name with the measured median action times (ZBV has no counterpart in "
        "our schedule IR); vs one device: against the whole model on one device running the same "
        "micro-batches. Action times are medians in ms (B: input gradient only; BW: full backward).\n\n"
        + markdown_table(
            [
                "implementation",
                "schedule",
                "step ms",
                "tokens/s",
                "vs one device",
                "bubble measured",
                "bubble predicted",
                "predicted step ms",
                "F ms",
                "B ms",
                "W ms",
                "BW ms",
                "FB ms",
                "loss step 1",
            ],
            table,
        )  # fmt: skip
    )
    write_result(f"pipeline_schedules-{args.preset}-pp{world}", body)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-batch")
    parser.add_argument("--n-microbatches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ours", default=",".join(OURS), help="our schedules to run (empty: none)")
    parser.add_argument("--torch", default=",".join(TORCH), help=f"torch's schedules among {sorted(TORCH)}")
    args = parser.parse_args()

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

    bench = Bench(config, tokens, args, device, dtype)
    rows = [run_one_device(bench)]
    for name in filter(None, args.ours.split(",")):
        rows.append(run_ours(name, bench))
    for name in filter(None, args.torch.split(",")):
        rows.append(run_torch(name, bench))
    if dist.get_rank() == 0:
        report(rows, args, dist.get_world_size())
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
