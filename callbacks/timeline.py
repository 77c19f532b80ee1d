"""PipelineTimeline: the pipeline's recorded actions as a Gantt chart, measured bubble vs simulated.

DSV3Strategy's runtime records every compute action of a step on each rank
(`strategy.runtime.timings`: action, start and end in seconds from the rank's start of the step).
Every `every_n_steps` optimizer steps this callback gathers them over the pipeline group and, on
rank 0:

- measures each rank's bubble fraction: 1 - busy / step time, where busy sums the rank's compute
  actions and the step time is the latest end on any rank (ranks enter a step together: the
  previous one ends with collectives). Waiting for P2P transfers counts as bubble;
- times the same schedule with the simulator (`lightning_dsv3.pipeline.simulate`), each action
  costing the median measured duration of its kind on its own rank and chunk(s)
  (`lightning_dsv3.pipeline.MeasuredCosts`: stages that do unequal work, such as DualPipeV's rank
  with the embedding and the head, keep their own times; a B that ran fused with its W costs the BW).
  That predicts the bubble that the schedule itself leaves with those costs and free transfers, so
  the gap between the two is transfer time and the spread of one stage's actions over micro-batches;
- draws both as one chart (measured above, predicted below, one row per rank, one colour per action
  kind, the second chunk of a rank lighter) to a PNG, sent to W&B as an image with a table;
- logs `pipeline/bubble/rank{r}`, `pipeline/bubble_predicted/rank{r}`, `pipeline/step_ms`,
  `pipeline/step_ms_predicted` and `pipeline/cost_ms/<op>` (the median of each action kind over every
  rank and chunk) to every logger.

Without a pipeline runtime (Lightning's strategies, or pp = 1) there is nothing to draw: one warning.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from lightning_dsv3.callbacks.report import PeriodicReport, gather, log_scalars, log_table, new_figure
from lightning_dsv3.pipeline.measured import (
    MeasuredCosts,
    Recorded,
    as_recorded,
    medians_by_kind,
    step_durations,
)
from lightning_dsv3.pipeline.schedules import PipelineSchedule
from lightning_dsv3.pipeline.simulate import Costs, simulate

OP_COLOURS = {"F": "#4C72B0", "B": "#DD8452", "W": "#55A868", "BW": "#C44E52", "FB": "#8172B3"}
_ACTION = re.compile(r"^(\w+)\((\d+)\.(\d+)(?:\|(\d+)\.(\d+))?\)$")  # F(mb.chunk), FB(mb.chunk|mb2.chunk2)


@dataclass(frozen=True)
class Bar:
    """One compute action on the chart: times in seconds."""

    op: str
    label: str  # micro-batch(es)
    chunk: int
    start: float
    end: float


def parse_action(action: str, start: float, end: float) -> Bar:
    """A Bar from a recorded action string (`str(Action)`, e.g. "BW(3.1)" or "FB(4.0|1.1)")."""
    m = _ACTION.match(action)
    if m is None:
        raise ValueError(f"unrecognised pipeline action {action!r}")
    op, mb, chunk, mb2, _ = m.groups()
    return Bar(op, mb if mb2 is None else f"{mb}|{mb2}", int(chunk), start, end)


def bubble_fractions(ranks: list[list[Bar]]) -> tuple[list[float], float]:
    """Each rank's idle fraction of the step, and the step time (latest end on any rank)."""
    makespan = max((bar.end for bars in ranks for bar in bars), default=0.0)
    if makespan <= 0:
        return [0.0] * len(ranks), 0.0
    return [1 - sum(b.end - b.start for b in bars) / makespan for bars in ranks], makespan


def predicted(
    schedule: PipelineSchedule, durations: list[dict[str, float]]
) -> tuple[list[list[Bar]], list[float], float]:
    """The simulator's chart, bubble fractions and step time for `schedule`, each action costing the
    median of its kind on its rank and chunk(s) in a step's measured `durations` (`step_durations`)."""
    result = simulate(schedule, Costs(f=0.0, b=0.0), MeasuredCosts(durations))  # Costs: free transfers
    ranks = [[parse_action(*action) for action in actions] for actions in as_recorded(result)]
    span = result.makespan
    return ranks, [b / span if span > 0 else 0.0 for b in result.bubble], span


class PipelineTimeline(PeriodicReport):
    """Gantt chart and bubble of the pipeline every `every_n_steps` optimizer steps.

    Args:
        every_n_steps: draw after every n-th optimizer step (the first steps include warm-up costs).
        dirpath: where PNGs go (default `<log_dir>/timeline`).
    """

    folder = "timeline"

    def __init__(self, every_n_steps: int = 50, dirpath: str | Path | None = None) -> None:
        super().__init__(every_n_steps, dirpath)
        self._warned = False
        self._last_step = -1
        self.last_path: Path | None = None
        self.last_bubble: list[float] = []  # measured bubble fraction per pipeline rank, on rank 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == 0 or step == self._last_step or step % self.every_n_steps:
            return
        self._last_step = step
        strategy = trainer.strategy
        runtime = getattr(strategy, "runtime", None)
        if runtime is None:
            if not self._warned:
                rank_zero_warn(
                    f"PipelineTimeline: {type(strategy).__name__} runs no pipeline; nothing to draw "
                    "(use DSV3Strategy with pp > 1, or schedule='dualpipev' at pp = 1)"
                )
                self._warned = True
            return
        local = [(t.action, t.start_s, t.end_s) for t in runtime.timings]
        recorded = gather(local, strategy.mesh.group("pp"))
        if trainer.is_global_zero:
            self._report(trainer, strategy.plan.schedule, recorded, step)

    def _report(
        self, trainer: pl.Trainer, schedule: PipelineSchedule, recorded: list[Recorded], step: int
    ) -> None:
        ranks = [[parse_action(*action) for action in actions] for actions in recorded]
        bubble, span = bubble_fractions(ranks)
        self.last_bubble = bubble
        durations = step_durations(recorded)
        sim_ranks, sim_bubble, sim_span = predicted(schedule, durations)
        metrics = {"pipeline/step_ms": span * 1e3, "pipeline/step_ms_predicted": sim_span * 1e3}
        metrics.update({f"pipeline/cost_ms/{op}": t * 1e3 for op, t in medians_by_kind(durations).items()})
        for r, (measured, sim) in enumerate(zip(bubble, sim_bubble)):
            metrics[f"pipeline/bubble/rank{r}"] = measured
            metrics[f"pipeline/bubble_predicted/rank{r}"] = sim
        log_scalars(trainer, metrics, step)
        title = f"{schedule.name}: pp={schedule.pp}, {schedule.n_microbatches} micro-batches, step {step}"
        fig = plot_timeline(ranks, bubble, sim_ranks, sim_bubble, title)
        self.last_path = self.log_figure(trainer, "pipeline/timeline", fig, step)
        rows = [[r, m, s] for r, (m, s) in enumerate(zip(bubble, sim_bubble))]
        log_table(trainer, "pipeline/bubble_table", ["rank", "measured", "predicted"], rows, step)


def _draw(ax: Any, ranks: list[list[Bar]], bubble: list[float], span_ms: float, title: str) -> None:
    """One row per rank; bars grouped by (kind, chunk) into one broken_barh each, fast for long lists."""
    height = 0.8
    for r, bars in enumerate(ranks):
        groups: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
        for bar in bars:
            start, width = bar.start * 1e3, (bar.end - bar.start) * 1e3
            groups[(bar.op, bar.chunk)].append((start, width))
            if width > span_ms / 45:  # room for the label
                ax.text(start + width / 2, r, bar.label, ha="center", va="center", fontsize=7)
        for (op, chunk), spans in groups.items():
            ax.broken_barh(
                spans, (r - height / 2, height), facecolors=OP_COLOURS.get(op, "0.5"),
                alpha=1.0 if chunk == 0 else 0.55, edgecolor="white", linewidth=0.6,
            )  # fmt: skip
    ax.set_yticks(range(len(ranks)), [f"rank {r}\nbubble {b:.0%}" for r, b in enumerate(bubble)])
    ax.set_ylim(len(ranks) - 0.5, -0.5)
    ax.set_title(title, fontsize=10, loc="left")
    ax.grid(axis="x", alpha=0.3)


def plot_timeline(
    ranks: list[list[Bar]],
    bubble: list[float],
    sim_ranks: list[list[Bar]],
    sim_bubble: list[float],
    title: str,
) -> Any:
    """Measured (top) and simulated (bottom) Gantt charts on one time axis in milliseconds."""
    from matplotlib.patches import Patch

    span_ms = max([b.end for bars in ranks + sim_ranks for b in bars] + [1e-9]) * 1e3
    fig = new_figure(12, 1.2 + 1.1 * len(ranks))
    top, bottom = fig.subplots(2, 1, sharex=True)
    _draw(top, ranks, bubble, span_ms, f"{title}: measured")
    sim_title = "simulated with the median measured time of each action kind on its rank and chunk"
    _draw(bottom, sim_ranks, sim_bubble, span_ms, sim_title)
    bottom.set_xlabel("time in the step (ms)")
    shown = {b.op for bars in ranks for b in bars}
    handles = [Patch(color=colour, label=op) for op, colour in OP_COLOURS.items() if op in shown]
    fig.legend(
        handles=handles, loc="outside upper right", ncols=len(handles), fontsize=8, title_fontsize=8,
        title="lighter: a rank's second chunk; numbers: micro-batch (FB: forward | backward)",
    )  # fmt: skip
    return fig
