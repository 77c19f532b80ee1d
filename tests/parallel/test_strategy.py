"""DSV3Strategy on CPU processes with gloo: every layout equals one process on the global batch."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from checks import reference, strategy_run

STEPS, GLOBAL_BATCH = 3, 8


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: the error relative to the tensor's norm."""
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _local(name: str, ref: torch.Tensor, ep_rank: int, ep: int) -> torch.Tensor:
    """The slice of a reference tensor that an ep rank holds (routed experts are split over ep)."""
    if ".experts.w" in name and ep > 1:
        n = ref.shape[0] // ep
        return ref[ep_rank * n : (ep_rank + 1) * n]
    return ref


def _check_state(state: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], ep_rank: int, ep: int) -> None:
    assert state.keys() == ref.keys()
    for name, value in state.items():
        expected = _local(name, ref[name], ep_rank, ep)
        assert value.shape == expected.shape, name
        assert _rel_err(value, expected) < 1e-5, (name, _rel_err(value, expected))


def _check_grads(grads: dict[str, Any], ref: dict[str, torch.Tensor], ep_rank: int, ep: int) -> None:
    if "zero" not in grads:
        for name, g in grads.items():
            assert _rel_err(g, _local(name, ref[name], ep_rank, ep)) < 1e-5, name
        return
    for names, _offsets, _sizes, rank, shard_numel, shard in grads["zero"]:
        names = [n.removeprefix("model.") for n in names]
        flat = torch.cat([_local(n, ref[n], ep_rank, ep).reshape(-1) for n in names])
        flat = torch.nn.functional.pad(flat, (0, shard_numel * (rank + 1) - flat.numel()))  # padding is zero
        expected = flat[rank * shard_numel : (rank + 1) * shard_numel]
        assert shard.shape == expected.shape
        assert _rel_err(shard, expected) < 1e-5, names


@pytest.fixture(scope="module")
def ref() -> dict[str, Any]:
    return reference(STEPS, GLOBAL_BATCH, "sgd")


def _check_layout(
    pool, layout: dict[str, Any], ref: dict[str, Any], optim: str = "sgd"
) -> list[dict[str, Any]]:
    results = pool.run(strategy_run, layout, STEPS, GLOBAL_BATCH, optim)
    for r in results:
        _check_grads(r["grads"], ref["grads"], r["ep_rank"], r["ep"])
        _check_state(r["state1"], ref["state1"], r["ep_rank"], r["ep"])
        _check_state(r["state"], ref["state"], r["ep_rank"], r["ep"])
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    return results


@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("layout", [{"dp": 2}, {"ep": 2}], ids=["dp2", "ep2"])
def test_two_rank_layouts_match_one_process(pool2, ref, layout: dict[str, Any], zero: bool) -> None:
    _check_layout(pool2, {**layout, "zero": zero}, ref)


@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("layout", [{"dp": 2, "ep": 2}, {"ep": 4}], ids=["dp2xep2", "ep4"])
def test_four_rank_layouts_match_one_process(pool4, ref, layout: dict[str, Any], zero: bool) -> None:
    results = _check_layout(pool4, {**layout, "zero": zero}, ref)
    if zero:
        for r in results:
            for size, numel, shard in r["shard_sizes"]:
                assert shard == -(-numel // size)  # 1/N of the bucket, up to padding
            assert r["state_bytes"]["local"] < r["state_bytes"]["replicated"] / 1.9


def test_micro_batches_match_one_process(pool2, ref) -> None:
    _check_layout(pool2, {"dp": 2, "n_microbatches": 2}, ref)


def test_adamw_state_sharding_matches_one_process(pool4) -> None:
    _check_layout(pool4, {"dp": 2, "ep": 2, "zero": True}, reference(STEPS, GLOBAL_BATCH, "adamw"), "adamw")
