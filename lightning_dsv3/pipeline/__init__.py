"""Pipeline parallelism: schedules as per-rank action lists, a simulator that times them, and the
simulator's costs from a measured step."""

from lightning_dsv3.pipeline.measured import MeasuredCosts, as_recorded, medians_by_kind, step_durations
from lightning_dsv3.pipeline.schedules import (
    GENERATORS,
    Action,
    Op,
    PipelineSchedule,
    ScheduleError,
    check_batched_p2p,
    dualpipe,
    dualpipe_min_microbatches,
    dualpipev,
    dualpipev_min_microbatches,
    gpipe,
    insert_communication,
    interleaved_1f1b,
    make_schedule,
    one_f_one_b,
    zb1p,
)
from lightning_dsv3.pipeline.simulate import ActionRecord, Costs, SimResult, simulate

__all__ = [
    "GENERATORS",
    "Action",
    "ActionRecord",
    "Costs",
    "MeasuredCosts",
    "Op",
    "PipelineSchedule",
    "ScheduleError",
    "SimResult",
    "as_recorded",
    "check_batched_p2p",
    "dualpipe",
    "dualpipe_min_microbatches",
    "dualpipev",
    "dualpipev_min_microbatches",
    "gpipe",
    "insert_communication",
    "interleaved_1f1b",
    "make_schedule",
    "medians_by_kind",
    "one_f_one_b",
    "simulate",
    "step_durations",
    "zb1p",
]
