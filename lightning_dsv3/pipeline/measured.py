"""Simulator costs from one measured step: each compute action costs what ran for it on its rank.

The pipeline runtime records each rank's compute actions of a step as (`str(Action)`, start s, end s)
(`PipelineRuntime.timings`; benchmarks/pipeline_schedules.py records torch's schedules the same way).
`MeasuredCosts` turns a step's durations into the `action_cost(rank, action)` hook of `simulate`, so
that the simulator times a schedule with what its actions took, grouped `by`:

- "stage": the median of the action's kind on its rank and chunk(s), whatever its micro-batch. Stages
  that do unequal work keep their own times: DualPipeV on the mini preset puts 4 layers with the
  embedding and the head on rank 0 and 8 layers on rank 1, and one cost per kind misses either.
- "kind": the median of its kind (F, B, W, BW, FB) over every rank and chunk; one cost per kind, the
  comparison that shows what unequal stages do to a prediction.
- "own": its own measured duration; the simulator then replays the step.

Medians, not means: one action stalled by the OS or the garbage collector would otherwise stretch every
action of its group.

What ran is matched to the schedule's action where the two differ: the runtime runs a B followed at
once by its W as one BW (the B then costs that BW, its W nothing); a schedule's BW that ran as a B and
a W costs both; an FB that ran as two actions (torch's DualPipeV runs F, then the backward) costs its
F plus its other micro-batch's full backward. An action with no counterpart raises KeyError.
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Literal

from lightning_dsv3.pipeline.schedules import Action, Op
from lightning_dsv3.pipeline.simulate import SimResult

Recorded = list[tuple[str, float, float]]  # one rank's compute actions of a step: (action, start s, end s)
Grouping = Literal["stage", "kind", "own"]


def step_durations(ranks: list[Recorded]) -> list[dict[str, float]]:
    """Per rank: action string -> seconds, the form `MeasuredCosts` reads."""
    return [{name: end - start for name, start, end in actions} for actions in ranks]


def as_recorded(result: SimResult) -> list[Recorded]:
    """A simulated step in the form the runtime records a measured one, to chart or measure it alike."""
    ranks: list[Recorded] = [[] for _ in result.busy]
    for record in result.records:
        if not record.action.op.is_comm:
            ranks[record.rank].append((str(record.action), record.start, record.end))
    return ranks


def medians_by_kind(durations: list[dict[str, float]]) -> dict[str, float]:
    """The median seconds of each action kind ("F", "B", "W", "BW", "FB") over every rank and chunk."""
    return _medians((item for d in durations for item in d.items()), _kind)


class MeasuredCosts:
    """The simulator's cost of each compute action, from one step's durations on every rank.

    `durations[rank]` maps each action string that ran to its seconds (`step_durations`); `by` picks
    what an action's cost is the median of (module docstring).
    """

    def __init__(self, durations: list[dict[str, float]], by: Grouping = "stage") -> None:
        if by not in _KEYS:
            raise ValueError(f"MeasuredCosts.by must be one of {sorted(_KEYS)}; got {by!r}")
        self.durations = durations
        self.key = _KEYS[by]
        if by == "kind":
            self.medians = [medians_by_kind(durations)] * len(durations)
        else:
            self.medians = [_medians(d.items(), self.key) for d in durations]

    def __call__(self, rank: int, action: Action) -> float:
        name = str(action)
        if name in self.durations[rank]:
            return self._time(rank, name)
        mb, chunk = action.mb, action.chunk
        if action.op is Op.B:
            return self._time(rank, f"BW({mb}.{chunk})")
        if action.op is Op.W and f"BW({mb}.{chunk})" in self.durations[rank]:
            return 0.0
        if action.op is Op.BW:
            return self._backward(rank, mb, chunk)
        if action.op is Op.FB:
            assert action.mb2 is not None and action.chunk2 is not None
            return self._time(rank, f"F({mb}.{chunk})") + self._backward(rank, action.mb2, action.chunk2)
        raise KeyError(f"rank {rank} recorded nothing that ran {name}")

    def _time(self, rank: int, name: str) -> float:
        if name not in self.durations[rank]:
            raise KeyError(f"rank {rank} recorded no {name}")
        return self.medians[rank][self.key(name)]

    def _backward(self, rank: int, mb: int, chunk: int) -> float:
        """The full backward of (mb, chunk) as it ran: one BW, or a B and its W."""
        if f"BW({mb}.{chunk})" in self.durations[rank]:
            return self._time(rank, f"BW({mb}.{chunk})")
        return self._time(rank, f"B({mb}.{chunk})") + self._time(rank, f"W({mb}.{chunk})")


def _kind(action: str) -> str:
    """An action string's kind: "FB(4.0|1.1)" -> "FB"."""
    return action.partition("(")[0]


def _stage_kind(action: str) -> str:
    """An action string without its micro-batches: "FB(4.0|1.1)" -> "FB(0|1)", the same work on a rank."""
    return re.sub(r"(?<=[(|])\d+\.", "", action)


def _own(action: str) -> str:
    """The action string itself: each action of a step runs once on its rank, its own group of one."""
    return action


_KEYS: dict[str, Callable[[str], str]] = {"stage": _stage_kind, "kind": _kind, "own": _own}


def _medians(durations: Iterable[tuple[str, float]], key: Callable[[str], str]) -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for name, seconds in durations:
        groups[key(name)].append(seconds)
    return {group: statistics.median(times) for group, times in groups.items()}
