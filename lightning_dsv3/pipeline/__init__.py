"""Pipeline parallelism: schedules as per-rank action lists and a simulator that times them."""

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
    "Op",
    "PipelineSchedule",
    "ScheduleError",
    "SimResult",
    "check_batched_p2p",
    "dualpipe",
    "dualpipe_min_microbatches",
    "dualpipev",
    "dualpipev_min_microbatches",
    "gpipe",
    "insert_communication",
    "interleaved_1f1b",
    "make_schedule",
    "one_f_one_b",
    "simulate",
    "zb1p",
]
