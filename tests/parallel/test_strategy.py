"""DSV3Strategy on CPU processes with gloo: every layout equals one process on the global batch."""

from __future__ import annotations

from typing import Any

import pytest
from checks import GLOBAL_BATCH, STEPS, check_layout, reference


@pytest.fixture(scope="module")
def ref() -> dict[str, Any]:
    return reference(STEPS, GLOBAL_BATCH, "sgd")


@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("layout", [{"dp": 2}, {"ep": 2}], ids=["dp2", "ep2"])
def test_two_rank_layouts_match_one_process(pool2, ref, layout: dict[str, Any], zero: bool) -> None:
    check_layout(pool2, {**layout, "zero": zero}, ref)


@pytest.mark.parametrize("zero", [False, True])
def test_buckets_reduce_during_the_backward_and_match_one_process(pool4, ref, zero: bool) -> None:
    """With small buckets, reductions start from gradient hooks while the last backward runs (a bucket
    with a parameter that got no gradient on a rank, such as an idle expert, waits for the end)."""
    layout = {"dp": 2, "ep": 2, "zero": zero, "bucket_bytes": 4096, "probe_network": False}
    for r in check_layout(pool4, layout, ref):
        assert len(r["shard_sizes"]) > 4 and r["early_launches"] > 0


@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("layout", [{"dp": 2, "ep": 2}, {"ep": 4}], ids=["dp2xep2", "ep4"])
def test_four_rank_layouts_match_one_process(pool4, ref, layout: dict[str, Any], zero: bool) -> None:
    results = check_layout(pool4, {**layout, "zero": zero}, ref)
    if zero:
        for r in results:
            for size, numel, shard in r["shard_sizes"]:
                assert shard == -(-numel // size)  # 1/N of the bucket, up to padding
            assert r["state_bytes"]["local"] < r["state_bytes"]["replicated"] / 1.9


def test_micro_batches_match_one_process(pool2, ref) -> None:
    check_layout(pool2, {"dp": 2, "n_microbatches": 2}, ref)


def test_adamw_state_sharding_matches_one_process(pool4) -> None:
    check_layout(pool4, {"dp": 2, "ep": 2, "zero": True}, reference(STEPS, GLOBAL_BATCH, "adamw"), "adamw")
