"""The router over arbitrary logits and biases: distinct experts inside the kept groups, normalised gates."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_dsv3.config import get_preset
from lightning_dsv3.model.moe import Router


@st.composite
def routers(draw: st.DrawFn) -> tuple[Router, torch.Tensor, int]:
    """A valid routing config whose router computes `logits` = x (identity weight), and T tokens of x."""
    n_groups = draw(st.sampled_from([1, 2, 4, 8]))
    per_group = draw(st.sampled_from([1, 2, 4]))
    n_experts = n_groups * per_group
    kept = draw(st.integers(1, n_groups))
    top_k = draw(st.integers(1, kept * per_group))
    config = get_preset("debug").replace(
        dim=n_experts, n_routed_experts=n_experts, n_expert_groups=n_groups, n_limited_groups=kept,
        n_activated_experts=top_k, score_func=draw(st.sampled_from(["sigmoid", "softmax"])),
        route_scale=draw(st.sampled_from([1.0, 2.5])),
    )  # fmt: skip
    router = Router(config)
    tokens = draw(st.integers(1, 6))
    values = st.floats(-200.0, 200.0, allow_nan=False, width=32)
    logits = torch.tensor(draw(st.lists(values, min_size=tokens * n_experts, max_size=tokens * n_experts)))
    bias = torch.tensor(
        draw(st.lists(st.floats(-1.0, 1.0, width=32), min_size=n_experts, max_size=n_experts))
    )
    with torch.no_grad():
        router.weight.copy_(torch.eye(n_experts))
        router.e_score_correction_bias.copy_(bias)
    return router, logits.view(tokens, n_experts), per_group


@settings(max_examples=150, deadline=None)
@given(routers())
def test_any_logits_give_valid_experts_and_normalised_gates(case: tuple[Router, torch.Tensor, int]) -> None:
    router, logits, per_group = case
    routing = router(logits)
    tokens = logits.shape[0]
    assert routing.indices.shape == routing.weights.shape == (tokens, router.top_k)
    assert ((routing.indices >= 0) & (routing.indices < router.n_experts)).all()
    for row in routing.indices.tolist():
        assert len(set(row)) == len(row)  # distinct experts
        assert len({e // per_group for e in row}) <= router.n_limited_groups  # inside the kept groups
    gates = routing.weights.detach()
    assert torch.isfinite(gates).all() and (gates >= 0).all()
    sums = gates.sum(-1)
    if router.score_func == "sigmoid":  # normalised over the chosen experts, then scaled
        torch.testing.assert_close(sums, torch.full_like(sums, router.route_scale))
    else:  # softmax probabilities of the chosen experts: a part of the whole
        assert (sums <= router.route_scale * (1 + 1e-6)).all()
