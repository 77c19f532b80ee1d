"""Host overhead of the pipeline runtime: a step at near-zero compute, pp=2 against dp=2.

At tiny sizes (the debug preset, a few tokens per sequence) a step's wall time on the CPU is almost
all host work: Python, autograd bookkeeping and op dispatch. On a GPU that host work is what bounds
a step whose kernels are short, so comparing a pipeline layout with data parallelism on the same
global batch here shows how much host time the pipeline runtime adds per step, and where it goes.

For every variant it prints the median step and its CPU time on rank 0's main thread (host work,
without waiting: the steadier figure on a shared machine), the same for the pipeline runtime (pp only),
the time per action kind (F, B, W, BW, FB and the P2P groups) and the ops dispatched per step (each
one at least one kernel launch on a GPU); with --profile, cProfile's top functions on rank 0.

    torchrun --nproc_per_node 2 -m benchmarks.pipeline_host                      # CPU, gloo
    torchrun --nproc_per_node 2 -m benchmarks.pipeline_host --layers 12 --profile \\
        --variants 'dsv3:pp=2,schedule=dualpipe,n_microbatches=8'
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.end_to_end import StepTimer
from benchmarks.end_to_end_multi import make_strategy
from benchmarks.results_io import markdown_table, write_result
from lightning_dsv3.data import DSV3DataModule
from lightning_dsv3.module import DeepSeekV3Module
from lightning_dsv3.pipeline import runtime as rt


class _OpCounter(TorchDispatchMode):
    def __init__(self, trace: set[str]) -> None:
        super().__init__()
        self.by_name: Counter[str] = Counter()
        self.trace = trace
        self.sites: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func.overloadpacket.__name__)
        self.by_name[name] += 1
        if name in self.trace:
            here = [f for f in traceback.extract_stack() if "lightning_dsv3" in f.filename]
            where = f"{Path(here[-1].filename).name}:{here[-1].lineno}" if here else "outside the package"
            self.sites[f"{name} @ {where}"] += 1
        return func(*args, **(kwargs or {}))


class HostProbe(L.Callback):
    """Per step: the pipeline runtime's time, per action kind, and (on one step) the ops dispatched."""

    def __init__(self, warmup: int, count_step: int, profile: bool, trace: set[str]) -> None:
        self.trace = trace
        self.sites: Counter[str] = Counter()
        self.warmup = warmup
        self.count_step = count_step
        self.run_s: list[float] = []
        self.run_cpu_s: list[float] = []  # the main thread's CPU time: host work, not waiting
        self.step_cpu_s: list[float] = []
        self.by_kind: dict[str, list[float]] = defaultdict(list)
        self.ops: Counter[str] = Counter()
        self.step_ops = 0  # of those, in the strategy's training step
        self.profiler = cProfile.Profile() if profile and os.environ.get("RANK", "0") == "0" else None
        self._counter: _OpCounter | None = None

    def on_train_batch_start(self, trainer: L.Trainer, module: Any, batch: Any, idx: int) -> None:
        runtime = trainer.strategy.runtime
        if runtime is not None and not hasattr(runtime, "_probe_wrapped"):
            self._wrap(runtime)
        if not hasattr(trainer.strategy, "_probe_wrapped"):
            self._wrap_step(trainer.strategy)
        self._c0 = time.thread_time()
        if idx == self.count_step:
            self._counter = _OpCounter(self.trace)
            self._counter.__enter__()
        elif self.profiler is not None and idx >= self.warmup:
            self.profiler.enable()

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.step_cpu_s.append(time.thread_time() - self._c0)
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.ops, self.sites = self._counter.by_name, self._counter.sites
            self._counter = None
        elif self.profiler is not None and idx >= self.warmup:
            self.profiler.disable()
        runtime = trainer.strategy.runtime
        if runtime is None or idx < self.warmup or idx == self.count_step:
            return
        kinds: dict[str, float] = defaultdict(float)
        for t in runtime.timings:
            kinds[t.action.split("(")[0].split(" ")[0]] += t.end_s - t.start_s
        kinds["P2P"] = runtime._probe_comm_s
        for k, v in kinds.items():
            self.by_kind[k].append(v)

    def _wrap_step(self, strategy: Any) -> None:
        """Count the ops of the training step alone (forward and backward of every micro-batch)."""
        step = strategy.training_step
        strategy._probe_wrapped = True

        def counted_step(*a: Any, **k: Any) -> Any:
            before = sum(self._counter.by_name.values()) if self._counter is not None else 0
            out = step(*a, **k)
            if self._counter is not None:
                self.step_ops = sum(self._counter.by_name.values()) - before
            return out

        strategy.training_step = counted_step

    def _wrap(self, runtime: rt.PipelineRuntime) -> None:
        run, comm = runtime.run, runtime._communicate
        runtime._probe_wrapped = True

        def timed_run(*a: Any, **k: Any) -> Any:
            runtime._probe_comm_s = 0.0
            t0, c0 = time.perf_counter(), time.thread_time()
            out = run(*a, **k)
            self.run_s.append(time.perf_counter() - t0)
            self.run_cpu_s.append(time.thread_time() - c0)
            return out

        def timed_comm(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            out = comm(*a, **k)
            runtime._probe_comm_s += time.perf_counter() - t0
            return out

        runtime.run, runtime._communicate = timed_run, timed_comm


def train(variant: str, args: argparse.Namespace, world: int) -> dict[str, Any]:
    strategy, pp = make_strategy(variant)
    slices = world // pp
    L.seed_everything(0)
    overrides = {"max_seq_len": args.seq_len, "original_seq_len": args.seq_len, "n_layers": args.layers}
    module = DeepSeekV3Module(preset=args.preset, model_overrides=overrides, warmup_steps=5)
    data = DSV3DataModule(
        seq_len=args.seq_len, batch_size=args.global_batch // slices, max_bytes=2**20, seed=0
    )
    timer = StepTimer()
    probe = HostProbe(args.warmup, args.warmup - 1, args.profile, set(args.trace_ops.split(",")))
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy=strategy, max_steps=args.steps, precision="32-true",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=[timer, probe],
    )  # fmt: skip
    trainer.fit(module, data)
    if probe.profiler is not None:
        s = io.StringIO()
        stats = pstats.Stats(probe.profiler, stream=s)
        n = args.steps - args.warmup
        print(f"\n== cProfile, rank 0, {variant}, {n} steps ==")
        stats.sort_stats("tottime").print_stats(args.top)
        stats.sort_stats("cumulative").print_stats(args.top)
        if args.profile_out:
            stats.dump_stats(f"{args.profile_out}.{variant.split(':')[-1].split(',')[0]}")
        print(s.getvalue())
    return {
        "step_s": timer.step_s[args.warmup :],
        "run_s": probe.run_s[args.warmup :],
        "step_cpu_s": [
            s for i, s in enumerate(probe.step_cpu_s) if i >= args.warmup and i != args.warmup - 1
        ],
        "run_cpu_s": probe.run_cpu_s[args.warmup :],
        "by_kind": {k: statistics.median(v) for k, v in probe.by_kind.items()},
        "ops": sum(probe.ops.values()),
        "step_ops": probe.step_ops,
        "top_ops": probe.ops.most_common(args.top),
        "sites": probe.sites.most_common(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="debug")
    parser.add_argument("--seq-len", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="cProfile rank 0 after warm-up")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--profile-out", help="also write the cProfile stats to PATH.<layout>")
    parser.add_argument("--trace-ops", default="", help="ops (e.g. stack,copy_) to count by call site")
    parser.add_argument("--variants", default="dsv3:dp=2;dsv3:pp=2,schedule=dualpipe,n_microbatches=8")
    args = parser.parse_args()
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    results = {v: train(v, args, world) for v in args.variants.split(";")}
    if dist.get_rank() == 0:
        rows = []
        for name, r in results.items():
            kinds = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in sorted(r["by_kind"].items()))
            run = f"{statistics.median(r['run_s']) * 1e3:.1f}" if r["run_s"] else "—"
            run_cpu = f"{statistics.median(r['run_cpu_s']) * 1e3:.1f}" if r["run_cpu_s"] else "—"
            step_cpu = f"{statistics.median(r['step_cpu_s']) * 1e3:.1f}"
            step = f"{statistics.median(r['step_s']) * 1e3:.1f}"
            rows.append([name, step, step_cpu, run, run_cpu, kinds or "—", r["ops"], r["step_ops"]])
        body = (
            f"preset {args.preset} with {args.layers} layers, {world} CPU processes (gloo), global batch "
            f"{args.global_batch} x {args.seq_len} tokens, {args.steps} steps ({args.warmup} warm-up)\n\n"
            + markdown_table(
                [
                    "variant",
                    "step ms",
                    "step host CPU ms",
                    "runtime ms",
                    "runtime host CPU ms",
                    "ms per action kind",
                    "ops dispatched/step",
                    "of which in training_step",
                ],
                rows,
            )
        )
        if args.profile:
            for name, r in results.items():
                print(f"== ops dispatched in one step, {name} ==")
                print(", ".join(f"{op} {n}" for op, n in r["top_ops"]))
                for site, n in r["sites"]:
                    print(f"  {n:6d}  {site}")
        write_result(f"pipeline_host-{args.preset}-L{args.layers}-{world}x", body)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
