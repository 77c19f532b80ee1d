"""benchmarks/grouped_gemm.py's model routing: each decoder MoE layer's counts, whole sequences only."""

from __future__ import annotations

import pytest
import torch

from benchmarks.grouped_gemm import model_counts, model_seq_len, routed_counts
from lightning_dsv3.config import get_preset
from lightning_dsv3.model.moe import MoE
from lightning_dsv3.model.transformer import Transformer


def test_model_counts_route_every_token_of_each_decoder_moe_layer() -> None:
    config = get_preset("debug")
    tokens = 2 * model_seq_len(config)
    counts = model_counts(config, tokens, torch.device("cpu"))
    decoder_moes = [m for m in Transformer(config).layers.modules() if isinstance(m, MoE)]
    assert len(counts) == len(decoder_moes) > 0
    assert all(int(c.sum()) == tokens * config.n_activated_experts for c in counts)
    # the routers as initialised on real text, not a uniform draw: the same counts every call, and
    # every layer more skewed than a uniform draw of the same size (1.1x-1.2x the mean for 5 seeds)
    assert all(torch.equal(a, b) for a, b in zip(counts, model_counts(config, tokens, torch.device("cpu"))))
    draws = [routed_counts(tokens, config.n_routed_experts, config.n_activated_experts, s) for s in range(5)]
    uniform = max(float(c.max() / c.float().mean()) for c in draws)
    assert min(float(c.max() / c.float().mean()) for c in counts) > uniform


def test_model_counts_refuse_a_partial_sequence() -> None:
    config = get_preset("debug")
    with pytest.raises(ValueError, match="multiple of"):
        model_counts(config, model_seq_len(config) + 1, torch.device("cpu"))
