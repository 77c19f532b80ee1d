"""The FLOP model (lightning_dsv3/flops.py) against torch's FlopCounterMode on the debug preset."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lightning_dsv3.config import get_preset
from lightning_dsv3.flops import forward_flops, layer_flops, train_flops
from lightning_dsv3.model import Transformer
from lightning_dsv3.model.moe import GroupedExperts

BATCH, SEQ = 2, 128  # the debug recipe's sequence length


def _counted_model() -> Transformer:
    """The debug model with its routed experts run one GEMM chain per expert.

    The CPU's padded bmm multiplies every expert's buffer up to the busiest expert's count, so the
    counter would see padding rows; the loop multiplies exactly the tokens routed to each expert,
    which is what the FLOP model counts (only the activated experts).
    """
    model = Transformer(get_preset("debug"))
    model.init_weights(0)
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            module.impl = "loop"
    return model


def _tokens() -> torch.Tensor:
    return torch.randint(0, 256, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))


def test_forward_flops_match_the_counter() -> None:
    """Matrix-multiply FLOPs of MLA, activated experts, head and MTP; the counter computes the full
    attention square (causal=False), and the match is within 0.1% (exact in practice)."""
    model, config = _counted_model(), get_preset("debug")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.training_loss(_tokens())
    assert counter.get_total_flops() == pytest.approx(
        forward_flops(config, BATCH, SEQ, causal=False), rel=1e-3
    )


def test_training_step_is_three_forwards() -> None:
    model, config = _counted_model(), get_preset("debug")
    with FlopCounterMode(display=False) as counter:
        model.training_loss(_tokens()).loss.backward()
    assert counter.get_total_flops() == pytest.approx(train_flops(config, BATCH, SEQ, causal=False), rel=1e-3)


def test_causal_counts_half_the_attention_square() -> None:
    config = get_preset("debug")
    d = config.n_heads * SEQ * (config.qk_head_dim + config.v_head_dim)  # per token: 2 * that / 2
    assert layer_flops(config, 0, SEQ, causal=False) - layer_flops(config, 0, SEQ) == pytest.approx(d)
    assert forward_flops(config, BATCH, SEQ) < forward_flops(config, BATCH, SEQ, causal=False)


def test_only_activated_experts_count() -> None:
    """Adding routed experts that no token uses changes nothing but the router's projection."""
    config = get_preset("debug")
    wider = config.replace(
        n_routed_experts=2 * config.n_routed_experts, n_expert_groups=config.n_expert_groups
    )
    extra = 2 * config.dim * config.n_routed_experts  # the router scores the new experts too
    assert layer_flops(wider, 1, SEQ) - layer_flops(config, 1, SEQ) == pytest.approx(extra)
