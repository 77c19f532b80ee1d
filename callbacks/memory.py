"""MemoryProfiler: memory of every rank (and so of every pipeline stage) per step, a plot, snapshots.

Two kinds of numbers, named apart because they measure different things:

- Device counters. On GPU, torch.cuda's `allocated_mib` (live tensors), `reserved_mib` (the caching
  allocator's pool) and `peak_mib` (most allocated since the previous sample). On CPU
  the allocator keeps no such counters, so the process's resident set is logged instead:
  `rss_mib` (now; psutil when installed, else /proc/self/statm) and `peak_rss_mib`
  (getrusage's high-water mark since the process started: it cannot be reset per step).
- Tensor bytes, on any device, summed from the tensors themselves: `params_mib` (the model's
  parameters on this rank), `grads_mib` (their gradients just before the optimizer step, plus ZeRO-1's
  master-shard gradients) and `optimizer_mib` (optimizer state, plus parameters the optimizer holds
  that the model does not: ZeRO-1's fp32 master shards of bf16 parameters), after the step.

Each rank's sample is gathered to rank 0 and logged as `memory/rank{r}/<name>`; with a pipeline the
table and the plot name the stages each rank holds. At the end of training a PNG (device memory per
step per rank, and the tensor bytes of the last sample) is written and sent to W&B with a table of
every sample. `snapshot_steps` records CUDA allocator histories around chosen steps (GPU only) for
pytorch.org/memory_viz.

At the end of the first epoch a DeepSeek-V3 module gets the scale planner's advice
(`lightning_dsv3.plan.recommend`) for its layout, given what was measured: the busiest rank's GPU
peak against the GPU's memory (CPU resident memory is no allocator peak, so on CPUs the planner
predicts it), the micro-batch and sequence sizes, and, when those callbacks run too, the
PipelineTimeline's worst bubble and the ExpertLoadMonitor's worst imbalance. The sentences are
logged as text and as the W&B table `memory/recommendations`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_dsv3.callbacks.expert_load import ExpertLoadMonitor
from lightning_dsv3.callbacks.report import PeriodicReport, gather, log_scalars, log_table, new_figure
from lightning_dsv3.callbacks.timeline import PipelineTimeline
from lightning_dsv3.config import ModelConfig, ParallelConfig
from lightning_dsv3.plan import PRECISIONS, recommend

MIB = 2**20


def process_rss_bytes() -> int | None:
    """Resident set size of this process now: psutil when installed, else Linux's /proc; None otherwise."""
    try:
        import psutil
    except ImportError:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return None
    return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int | None:
    """The process's resident high-water mark since it started (None where getrusage is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def _nbytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct tensors among `tensors` (a tensor listed twice counts once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        key = (t.data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _optimizer_only_params(
    module: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer]
) -> list[torch.Tensor]:
    """Parameters an optimizer steps that the model does not hold (ZeRO-1's master shards)."""
    own = {id(p) for p in module.parameters()}
    return [p for opt in optimizers for g in opt.param_groups for p in g["params"] if id(p) not in own]


def grad_bytes(module: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> int:
    params = [*module.parameters(), *_optimizer_only_params(module, optimizers)]
    return _nbytes(p.grad for p in params)


def optimizer_bytes(module: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> int:
    """Optimizer state, plus master shards with storage of their own (a ZeRO-1 shard of fp32
    parameters is a slice of the parameters' buffer and adds nothing)."""
    states = [v for opt in optimizers for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    shared = {p.untyped_storage().data_ptr() for p in module.parameters()}
    masters = [
        p for p in _optimizer_only_params(module, optimizers) if p.untyped_storage().data_ptr() not in shared
    ]
    return _nbytes([*masters, *states])


def pipeline_stages(trainer: pl.Trainer) -> tuple[int, ...]:
    """The pipeline stages this rank holds under DSV3Strategy with a pipeline (pp > 1, or pp = 1
    dualpipev); () otherwise."""
    plan, mesh = getattr(trainer.strategy, "plan", None), getattr(trainer.strategy, "mesh", None)
    if plan is None or mesh is None:
        return ()
    return tuple(plan.schedule.stage_of(mesh.pp_rank, c) for c in range(plan.schedule.n_chunks))


class MemoryProfiler(PeriodicReport):
    """Per-rank device memory and tensor bytes every `every_n_steps` optimizer steps.

    Args:
        every_n_steps: sample after every n-th optimizer step (a gather over all ranks each time).
        snapshot_steps: optimizer steps (1-based, as `trainer.global_step` after them) around which CUDA
            records its allocation history, dumped as `snapshot_rank{r}_step{s}.pickle` (GPU only).
        dirpath: where the plot and snapshots go (default `<log_dir>/memory`).
    """

    folder = "memory"

    def __init__(
        self, every_n_steps: int = 1, snapshot_steps: Sequence[int] = (), dirpath: str | Path | None = None
    ) -> None:
        super().__init__(every_n_steps, dirpath)
        self.snapshot_steps = frozenset(snapshot_steps)
        self.samples: list[dict[str, Any]] = []  # every rank's samples, on global rank 0
        self.recommendations: list[str] = []  # the planner's advice after the first epoch, on rank 0
        self.measured: dict[str, Any] = {}  # what the advice was given
        self._batch_shape: tuple[int, ...] = ()
        self._grads = 0
        self._last_step = -1
        self._recording = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.snapshot_steps and trainer.strategy.root_device.type != "cuda":
            rank_zero_warn("MemoryProfiler: CUDA memory snapshots need a GPU; snapshot_steps is ignored")

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        cuda = trainer.strategy.root_device.type == "cuda"
        if cuda and not self._recording and trainer.global_step + 1 in self.snapshot_steps:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
            self._recording = True

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if (trainer.global_step + 1) % self.every_n_steps == 0:  # only for a step that is sampled
            self._grads = grad_bytes(pl_module, trainer.optimizers)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if torch.is_tensor(batch):
            self._batch_shape = tuple(batch.shape)
        step = trainer.global_step
        if step == 0 or step == self._last_step:
            return  # accumulating: no optimizer step since the last batch
        self._last_step = step
        device = trainer.strategy.root_device
        if self._recording and step in self.snapshot_steps:
            self._dir.mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._dump_snapshot(
                str(self._dir / f"snapshot_rank{trainer.global_rank}_step{step}.pickle")
            )
            torch.cuda.memory._record_memory_history(enabled=None)
            self._recording = False
        if step % self.every_n_steps:
            return
        sample: dict[str, Any] = {
            "step": step,
            "rank": trainer.global_rank,
            "stages": pipeline_stages(trainer),
        }
        if device.type == "cuda":
            sample["allocated_mib"] = torch.cuda.memory_allocated(device) / MIB
            sample["reserved_mib"] = torch.cuda.memory_reserved(device) / MIB
            sample["peak_mib"] = torch.cuda.max_memory_allocated(device) / MIB
            torch.cuda.reset_peak_memory_stats(device)
        else:
            for name, value in (("rss_mib", process_rss_bytes()), ("peak_rss_mib", peak_rss_bytes())):
                if value is not None:
                    sample[name] = value / MIB
        sample["params_mib"] = _nbytes(pl_module.parameters()) / MIB
        sample["grads_mib"] = self._grads / MIB
        sample["optimizer_mib"] = optimizer_bytes(pl_module, trainer.optimizers) / MIB
        samples = gather(sample)
        if not trainer.is_global_zero:
            return
        self.samples.extend(samples)
        metrics = {
            f"memory/rank{s['rank']}/{k}": v for s in samples for k, v in s.items() if k.endswith("_mib")
        }
        log_scalars(trainer, metrics, step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        config = getattr(pl_module, "config", None)
        if trainer.current_epoch != 0 or not trainer.is_global_zero or not isinstance(config, ModelConfig):
            return
        if trainer.precision not in PRECISIONS or len(self._batch_shape) != 2:
            rank_zero_warn(
                f"MemoryProfiler: no recommendations for precision {trainer.precision!r} and batches of "
                f"shape {self._batch_shape} (the planner knows {PRECISIONS} and (batch, seq + 1) tokens)"
            )
            return
        self.measured = self._measured(trainer)
        self.recommendations = recommend(
            config, self._parallel_config(trainer), self.measured, self._budget_bytes(trainer)
        )
        for line in self.recommendations:
            rank_zero_info(f"MemoryProfiler recommends: {line}")
        rows = [[line] for line in self.recommendations]
        log_table(trainer, "memory/recommendations", ["recommendation"], rows, trainer.global_step)

    @staticmethod
    def _parallel_config(trainer: pl.Trainer) -> ParallelConfig:
        """DSV3Strategy's resolved layout; under Lightning's strategies, plain data parallelism."""
        mesh = getattr(trainer.strategy, "mesh", None)
        return mesh.config if mesh is not None else ParallelConfig(dp=trainer.world_size, zero=False)

    def _measured(self, trainer: pl.Trainer) -> dict[str, Any]:
        split = getattr(trainer.strategy, "n_microbatches", None)
        n_micro = split() if split is not None else 1
        cuda = trainer.strategy.root_device.type == "cuda"
        measured: dict[str, Any] = {
            "micro_batch_size": max(1, self._batch_shape[0] // n_micro),
            "seq_len": self._batch_shape[1] - 1,
            "precision": trainer.precision,
            "device": "cuda" if cuda else "cpu",
        }
        if cuda and self.samples:
            measured["peak_mib"] = max(s["peak_mib"] for s in self.samples)
        for callback in trainer.callbacks:
            if isinstance(callback, PipelineTimeline) and callback.last_bubble:
                measured["bubble_fraction"] = max(callback.last_bubble)
            if isinstance(callback, ExpertLoadMonitor):
                loads = [v["load"] for v in callback.last.values() if sum(v["load"]) > 0]
                if loads:
                    measured["expert_load_imbalance"] = max(max(x) * len(x) / sum(x) for x in loads)
        return measured

    @staticmethod
    def _budget_bytes(trainer: pl.Trainer) -> float | None:
        device = trainer.strategy.root_device
        return float(torch.cuda.get_device_properties(device).total_memory) if device.type == "cuda" else None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not self.samples:
            return
        step = trainer.global_step
        self.log_figure(trainer, "memory/plot", plot_memory(self.samples), step)
        columns = sorted({k for s in self.samples for k in s} - {"step", "rank", "stages"})
        rows = [
            [s["step"], s["rank"], ",".join(map(str, s["stages"])), *(s.get(c) for c in columns)]
            for s in self.samples
        ]
        log_table(trainer, "memory/samples", ["step", "rank", "stages", *columns], rows, step)


def _rank_label(sample: dict[str, Any]) -> str:
    stages = sample["stages"]
    if not stages:
        return f"rank {sample['rank']}"
    return f"rank {sample['rank']} (stage{'s' if len(stages) > 1 else ''} {', '.join(map(str, stages))})"


def plot_memory(samples: Sequence[dict[str, Any]]) -> Any:
    """Left: device memory per step, one colour per rank (solid: now, dashed: peak). Right: the
    tensor bytes of each rank's last sample, stacked (parameters, gradients, optimizer state)."""
    from matplotlib.ticker import MaxNLocator

    fig = new_figure(11, 4)
    left, right = fig.subplots(1, 2, width_ratios=(3, 2))
    cuda = "allocated_mib" in samples[0]
    now_key, peak_key = ("allocated_mib", "peak_mib") if cuda else ("rss_mib", "peak_rss_mib")
    ranks = sorted({s["rank"] for s in samples})
    colours = [f"C{i % 10}" for i in range(len(ranks))]
    last: dict[int, dict[str, Any]] = {}
    for rank, colour in zip(ranks, colours):
        mine = sorted((s for s in samples if s["rank"] == rank), key=lambda s: s["step"])
        last[rank] = mine[-1]
        steps = [s["step"] for s in mine]
        for key, style in ((now_key, "-"), (peak_key, "--")):
            if key in mine[0]:
                left.plot(steps, [s[key] for s in mine], style, color=colour, lw=1.6)
        left.plot([], [], "-", color=colour, label=_rank_label(mine[0]))
    left.plot([], [], "-", color="0.3", label="allocated" if cuda else "resident (RSS)")
    left.plot([], [], "--", color="0.3", label="peak in step" if cuda else "peak RSS since start")
    left.set(xlabel="optimizer step", ylabel="MiB", title="device memory" if cuda else "process memory (CPU)")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.grid(alpha=0.3)
    left.legend(fontsize=8, loc="best")
    parts = (("params_mib", "parameters", "#4C72B0"), ("grads_mib", "gradients", "#DD8452"),
             ("optimizer_mib", "optimizer state", "#55A868"))  # fmt: skip
    labels = [_rank_label(last[r]) for r in ranks]
    base = [0.0] * len(ranks)
    for key, name, colour in parts:
        values = [last[r][key] for r in ranks]
        right.barh(labels, values, left=base, color=colour, label=name, height=0.6)
        base = [b + v for b, v in zip(base, values)]
    right.invert_yaxis()
    right.set(xlabel="MiB", title=f"tensor bytes at step {max(s['step'] for s in samples)}")
    right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncols=3, frameon=False)
    right.grid(axis="x", alpha=0.3)
    return fig
