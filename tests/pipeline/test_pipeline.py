"""Every pipeline schedule, alone and with dp / ep / ZeRO-1, equals one process on the global batch."""

from __future__ import annotations

from typing import Any

import pytest
from checks import (
    GLOBAL_BATCH,
    OVERRIDES,
    STEPS,
    check_layout,
    check_results,
    rank_costs_run,
    reference,
    reference_val_loss,
    validate_run,
)

from lightning_dsv3.config import get_preset

SCHEDULES = ["gpipe", "1f1b", "zb1p", "interleaved_1f1b", "dualpipe", "dualpipev"]


@pytest.fixture(scope="module")
def ref() -> dict[str, Any]:
    return reference(STEPS, GLOBAL_BATCH, "sgd")


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pp2_matches_one_process(pool2, ref, schedule: str) -> None:
    check_layout(pool2, {"pp": 2, "schedule": schedule, "zero": False}, ref)


def test_ranks_with_different_measured_costs_take_rank_zeros_cut(pool2, ref) -> None:
    """Costs measured in each process differ; a cut that differed between ranks would build stages that
    do not fit together. Rank 0 measured a costly first layer: both ranks cut it off as its own stage."""
    results = pool2.run(
        rank_costs_run, {"pp": 2, "schedule": "1f1b", "zero": False}, STEPS, GLOBAL_BATCH, "sgd"
    )
    assert all(r["stage_layers"][0] == (0, 1) for r in results)
    check_results(results, ref)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pp4_matches_one_process(pool4, ref, schedule: str) -> None:
    check_layout(pool4, {"pp": 4, "schedule": schedule, "zero": False}, ref)


@pytest.mark.parametrize("schedule", ["dualpipe", "dualpipev", "zb1p"])
@pytest.mark.parametrize("mesh", [{"dp": 2}, {"ep": 2}], ids=["pp2xdp2", "pp2xep2"])
def test_pp2_with_data_or_expert_parallel_and_zero(pool4, ref, schedule: str, mesh: dict[str, Any]) -> None:
    check_layout(pool4, {"pp": 2, **mesh, "schedule": schedule, "zero": True}, ref)


def test_an_fb_pairing_a_whole_half_with_a_part_wise_half_matches_one_process(pool4, ref) -> None:
    """pp=2 x ep=2 DualPipeV with the dense layer 0 cut as its own stage: on rank 0 every FB pairs
    that chunk, which exchanges nothing and is recorded whole, with one whose experts exchange tokens,
    recorded part by part."""
    n_layers = get_preset("debug", **OVERRIDES).n_layers
    layout = {"pp": 2, "ep": 2, "schedule": "dualpipev", "zero": True,
              "layer_costs": [10.0 * n_layers] + [1.0] * (n_layers - 1)}  # fmt: skip
    results = check_layout(pool4, layout, ref)
    assert all(r["stage_layers"][0] == (0, 1) for r in results)
    fbs = [a for a in results[0]["actions"] if a.startswith("FB(")]  # pipeline rank 0: stages 0 and 3
    assert fbs and all(sorted(half.split(".")[1] for half in a[3:-1].split("|")) == ["0", "1"] for a in fbs)


@pytest.mark.parametrize(
    "layout",
    [
        {"ep": 1, "n_microbatches": 4},
        {"ep": 2, "n_microbatches": 4},
        {"dp": 2, "ep": 2},  # the default: 2 micro-batches, one overlapped pair
    ],
    ids=["ep1", "ep2", "dp2xep2"],
)
def test_pp1_dualpipev_overlaps_micro_batches_and_matches_one_process(
    pool1, pool2, pool4, ref, layout: dict[str, Any]
) -> None:
    """At pp=1, dualpipev runs its one-rank V (two half-model chunks, FB pairs) with ZeRO-1 on."""
    pool = {1: pool1, 2: pool2, 4: pool4}[layout.get("dp", 1) * layout["ep"]]
    for r in check_layout(pool, {**layout, "schedule": "dualpipev", "zero": True}, ref):
        n = layout.get("n_microbatches", 2)
        assert sum(a.startswith("FB(") for a in r["actions"]) == 2 * n - 3


@pytest.mark.parametrize(
    "layout",
    [
        {"ep": 2, "schedule": "dualpipev"},
        {"pp": 2, "schedule": "dualpipev"},
        {"pp": 2, "ep": 2, "schedule": "dualpipe"},
        {"pp": 4, "schedule": "1f1b"},
    ],
    ids=["pp1xep2-dualpipev", "pp2-dualpipev", "pp2xep2-dualpipe", "pp4-1f1b"],
)
def test_validation_runs_forward_only_and_matches_one_process(pool4, pool2, layout: dict[str, Any]) -> None:
    pool = pool2 if layout.get("pp", 1) * layout.get("ep", 1) == 2 else pool4
    losses = pool.run(validate_run, layout)
    assert losses == pytest.approx([reference_val_loss()] * len(losses), rel=1e-5)
