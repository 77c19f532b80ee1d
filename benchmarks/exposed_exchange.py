"""With the overlapped forward&backward, how much of the expert all-to-all stays exposed in the step?

pp=1, ep = the world size: every rank holds 1/ep of each MoE layer's routed experts and exchanges
tokens with the others, and runs the same micro-batches of the same model two ways, built from
DSV3Strategy's own pieces (its mesh, communication, stage plan and pipeline runtime; no Trainer):

  dualpipev  DSV3Strategy(pp=1, ep=..., schedule="dualpipev"): DualPipeV's one-rank V, whose FB pairs
             run one micro-batch's dispatch and combine on the communication stream while another
             micro-batch computes
  1f1b       the plain pp=1 step (any schedule but dualpipev at pp=1): forward, then backward, of each
             micro-batch in turn; every exchange is exposed

For each, alternating step by step after the warm-up:
  (a) the step: forward and backward of every micro-batch (no optimizer step, in either run);
  (b) the same step with each MoE layer's dispatcher replaced by `local_exchange.CopyExchange`, which
      moves the same rows on the rank itself (every rank computes on the rows it routed: the same
      work on every rank, and no rank waits for another);
  (c) the all-to-all's time on the wire in (a), from the strategy's `CommTelemetry`: the union of the
      intervals of every ep-group call (the count exchange, dispatch, combine and their backwards).
exposed = (a - b) / c, the share of the wire time the step did not hide (above 1: the exchange costs
the step more than its wire time, e.g. host synchronisation on the counts or ranks waiting for each
other). Each figure is the median over the timed steps of the slowest rank's value (the step on the
host clock around a synchronised step; the wire time as the telemetry records it). On a CPU nothing
runs concurrently (no streams): the small mode checks that the script runs, not the overlap.

    torchrun --nproc_per_node 2 -m benchmarks.exposed_exchange             # GPUs, NCCL, mini preset
    torchrun --nproc_per_node 2 -m benchmarks.exposed_exchange --compile   # compile_parts() first
    torchrun --nproc_per_node 2 -m benchmarks.exposed_exchange --preset debug --seq-len 32 \\
        --micro-batch 1 --n-microbatches 4 --steps 2 --warmup 1               # CPU small mode, gloo
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from benchmarks.local_exchange import CopyExchange
from benchmarks.results_io import (
    checked_step_args,
    markdown_table,
    microbatch_step_parser,
    synchronize,
    write_result,
)
from lightning_dsv3.config import ModelConfig, ParallelConfig, get_preset
from lightning_dsv3.model.moe import Dispatcher
from lightning_dsv3.model.transformer import LossOutput, Transformer
from lightning_dsv3.parallel.comm import Communication, setup_communication
from lightning_dsv3.parallel.mesh import ParallelMesh, build_mesh
from lightning_dsv3.pipeline.runtime import PipelineRuntime
from lightning_dsv3.pipeline.stages import StagePlan
from lightning_dsv3.plan.memory import chunks_of, stage_plan

TOKEN_SEED = 1234
LAYOUTS = {"dualpipev": "one-rank V, FB pairs overlap", "1f1b": "plain: forward, then backward"}
Step = Callable[[], list[LossOutput]]


@dataclass
class Row:
    """One layout's timed steps: slowest-rank step seconds with the exchange and with the stand-in,
    and the largest per-rank wire time of the exchange."""

    schedule: str
    real_s: list[float] = field(default_factory=list)
    copy_s: list[float] = field(default_factory=list)
    wire_s: list[float] = field(default_factory=list)
    first_loss: float = float("nan")


@dataclass(frozen=True)
class Bench:
    """What both layouts share: the model, the step's micro-batches, the mesh and its communication."""

    config: ModelConfig
    micro: list[torch.Tensor]  # n_microbatches x (micro_batch, seq_len + 1) token ids
    layout: ParallelConfig  # pp=1, ep=world, schedule dualpipev
    mesh: ParallelMesh
    comm: Communication
    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype


def chunks_for(bench: Bench, plan: StagePlan | None) -> list[Transformer]:
    """This rank's chunks as DSV3Strategy builds them: the V's two stages under `plan`, else the whole
    model; experts sharded over ep, on the device (compiled with --compile)."""
    config = bench.config
    chunks = []
    for spec in chunks_of(config, plan, bench.mesh.pp_rank):
        chunk = Transformer(config, spec.layer_ids, spec.with_embedding, spec.with_head)
        chunk.init_weights(0)
        if bench.args.compile:
            chunk.compile_parts()
        bench.comm.install(chunk, bench.mesh)
        chunk.to(device=bench.device, dtype=bench.dtype)
        chunk.set_aux_loss_scale(1.0 / len(bench.micro))
        chunks.append(chunk)
    return chunks


def step_for(bench: Bench, plan: StagePlan | None, chunks: list[Transformer]) -> Step:
    """Forward and backward of every micro-batch: the pipeline runtime's program, or the plain loop."""
    scale = 1.0 / len(bench.micro)
    if plan is not None:
        mesh = bench.mesh
        runtime = PipelineRuntime(
            plan.schedule, chunks, mesh.pp_rank, mesh.group("pp"), mesh.global_rank_of,
            lambda chunk, h, tokens: chunk.loss(h, tokens),
        )  # fmt: skip
        return lambda: [out for _, out in runtime.run(bench.micro, scale)]

    (model,) = chunks

    def plain() -> list[LossOutput]:
        outs = []
        for mb in bench.micro:
            out = model.training_loss(mb)
            (out.loss * scale).backward()
            outs.append(out)
        return outs

    return plain


def use_dispatcher(chunks: list[Transformer], dispatcher: Dispatcher) -> None:
    for chunk in chunks:
        for _, moe in chunk.moe_layers():
            moe.dispatcher = dispatcher


def slowest(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def timed(step: Step, chunks: list[Transformer], bench: Bench) -> tuple[float, float, list[LossOutput]]:
    """One step from synchronised ranks: (its host seconds, the wire seconds the telemetry recorded)."""
    for chunk in chunks:
        chunk.zero_grad(set_to_none=True)
    telemetry = bench.comm.telemetry
    telemetry.end_step()  # drop what came before
    dist.barrier()
    synchronize(bench.device)
    start = time.perf_counter()
    outs = step()
    synchronize(bench.device)
    seconds = time.perf_counter() - start
    telemetry.end_step()
    wire_ms = telemetry.stats().get("comm/total/time_ms", 0.0)
    return seconds, wire_ms / 1e3, outs


def mean_ce(outs: list[LossOutput], device: torch.device) -> float:
    """The mean micro-batch cross-entropy over every rank."""
    t = torch.stack([o.ce.detach().double() for o in outs]).mean().reshape(1).to(device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def run(bench: Bench, schedule: str) -> Row:
    """Warm-up, then timed steps alternating the real exchange and the stand-in (module docstring)."""
    plan = stage_plan(bench.config, dataclasses.replace(bench.layout, schedule=schedule))
    chunks = chunks_for(bench, plan)
    step = step_for(bench, plan, chunks)
    real, stand_in = bench.comm.dispatcher, CopyExchange(bench.config.n_routed_experts // bench.mesh.ep)
    row = Row(schedule)
    device = bench.device
    for i in range(bench.args.warmup + bench.args.steps):
        use_dispatcher(chunks, real)
        real_s, wire_s, outs = timed(step, chunks, bench)
        if i == 0:
            row.first_loss = mean_ce(outs, device)
        use_dispatcher(chunks, stand_in)
        copy_s, _, _ = timed(step, chunks, bench)
        if i >= bench.args.warmup:
            row.real_s.append(slowest(real_s, device))
            row.copy_s.append(slowest(copy_s, device))
            row.wire_s.append(slowest(wire_s, device))
    del chunks, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def table(rows: list[Row]) -> str:
    cells = []
    for r in rows:
        a, b, c = (statistics.median(v) * 1e3 for v in (r.real_s, r.copy_s, r.wire_s))
        cells.append(
            [f"{r.schedule} ({LAYOUTS[r.schedule]})", f"{a:.2f}", f"{b:.2f}", f"{a - b:.2f}", f"{c:.2f}",
             f"{(a - b) / c:.0%}" if c > 0 else "—", f"{r.first_loss:.4f}"]
        )  # fmt: skip
    header = ["layout", "step ms (a)", "step ms, local copy (b)", "a - b ms", "all-to-all on the wire ms (c)",
              "exposed (a - b) / c", "loss step 1"]  # fmt: skip
    return markdown_table(header, cells)


def report(rows: list[Row], bench: Bench) -> None:
    args, mesh = bench.args, bench.mesh
    v, plain = (statistics.median(r.copy_s) for r in rows)
    body = (
        f"preset {args.preset}, pp=1 x dp={mesh.dp} x ep={mesh.ep}, {args.n_microbatches} micro-batches of "
        f"{args.micro_batch} x {args.seq_len} tokens per rank and step, {args.steps} timed steps after "
        f"{args.warmup} warm-up, forward and backward only (no optimizer step), "
        f"{'compile_parts() (default mode)' if args.compile else 'eager'}, {bench.dtype} weights. "
        "(a) the step with the expert all-to-all, (b) the same step with a local copy of the same rows in "
        "its place, (c) the all-to-all's time on the wire in (a) (union of the ep group's calls, "
        "CommTelemetry); medians over the timed steps of the slowest rank. Without its exchange the "
        f"dualpipev step takes {v / plain:.2f}x the plain one (the cost of running a layer part by part)."
        "\n\n" + table(rows)
    )
    write_result(f"exposed_exchange-{args.preset}-ep{mesh.ep}{'-compile' if args.compile else ''}", body)


def parse_args() -> argparse.Namespace:
    parser = microbatch_step_parser(__doc__)
    args = checked_step_args(parser)
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        parser.error("run it under torchrun with two or more processes: ep = the world size")
    return args


def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    world = dist.get_world_size()
    config = get_preset(args.preset, max_seq_len=args.seq_len, original_seq_len=args.seq_len)
    layout = ParallelConfig(pp=1, ep=world, schedule="dualpipev", n_microbatches=args.n_microbatches)
    layout = layout.resolve(world)
    mesh = build_mesh(layout, world, device.type)
    comm = setup_communication(layout, mesh, config, device, None, False, print)
    gen = torch.Generator().manual_seed(TOKEN_SEED + dist.get_rank())  # each rank its own data slice
    tokens = torch.randint(
        0, config.vocab_size, (args.n_microbatches * args.micro_batch, args.seq_len + 1), generator=gen
    )
    micro = list(tokens.to(device).chunk(args.n_microbatches))
    dtype = torch.bfloat16 if cuda else torch.float32
    bench = Bench(config, micro, layout, mesh, comm, args, device, dtype)
    rows = [run(bench, schedule) for schedule in LAYOUTS]
    if dist.get_rank() == 0:
        report(rows, bench)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
