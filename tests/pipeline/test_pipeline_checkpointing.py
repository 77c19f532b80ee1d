"""Activation checkpointing under every kind of pipeline step: split input/weight backwards (ZB1P,
DualPipe's W actions), DualPipe's overlapped FB pairs, and the expert all-to-all."""

from __future__ import annotations

from typing import Any

import pytest
from checks import GLOBAL_BATCH, STEPS, _check_grads, _check_state, reference
from memory_checks import model_overrides, strategy_run_with

# equal head dims: attention runs the flash kernel, whose saved q, k, v "selective" frees and rebuilds
PAD_V = {"attn_pad_v": True}


@pytest.fixture(scope="module")
def ref() -> dict[str, Any]:
    with model_overrides(**PAD_V):
        return reference(STEPS, GLOBAL_BATCH, "sgd")


def _check(results: list[dict[str, Any]], ref: dict[str, Any]) -> None:
    for r in results:
        _check_grads(r["grads"], ref["grads"], r["ep_rank"], r["ep"])
        _check_state(r["state"], ref["state"], r["ep_rank"], r["ep"])
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5)


@pytest.mark.parametrize(
    "schedule,option",
    [("zb1p", "selective"), ("zb1p", "layer"), ("dualpipev", "selective"), ("dualpipev", "layer"),
     ("dualpipe", "attention"), ("1f1b", "mlp")],
)  # fmt: skip
def test_pp2_with_checkpointing_matches_one_process(pool2, ref, schedule: str, option: str) -> None:
    layout = {"pp": 2, "schedule": schedule, "zero": False}
    _check(pool2.run(strategy_run_with, {**PAD_V, "activation_checkpointing": option}, layout), ref)


def test_pp2_ep2_dualpipe_recomputes_without_the_all_to_all(pool4, ref) -> None:
    layout = {"pp": 2, "ep": 2, "schedule": "dualpipe", "zero": True}
    recomputed = pool4.run(strategy_run_with, {**PAD_V, "activation_checkpointing": "layer"}, layout)
    _check(recomputed, ref)
    kept = pool4.run(strategy_run_with, {**PAD_V, "activation_checkpointing": "none"}, layout)
    for r, k in zip(recomputed, kept):  # the recomputed forward reuses the exchanged tokens
        calls = {n: v for n, v in r["comm"].items() if n.startswith("comm/ep.") and n.endswith("/calls")}
        assert calls and calls == {n: k["comm"][n] for n in calls}
