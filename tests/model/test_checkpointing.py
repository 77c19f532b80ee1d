"""Activation checkpointing: same gradients as none, and the activation memory the plan predicts.

Memory is measured as the distinct storages autograd saves in a forward (torch's saved-tensor hooks),
parameters and buffers excluded; the plan's `chunk_activation_bytes` must give the same bytes for
every option, so each option's saving is the model's.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

from lightning_dsv3.config import CHECKPOINTING, ModelConfig, get_preset
from lightning_dsv3.model import Transformer
from lightning_dsv3.model.moe import LocalDispatcher
from lightning_dsv3.pipeline.stages import ChunkSpec
from lightning_dsv3.plan import Kernels, chunk_activation_bytes
from lightning_dsv3.plan.measure import expert_imbalance, saved_storages

BATCH, SEQ = 4, 16


def _config(option: str, pad_v: bool = False) -> ModelConfig:
    return get_preset(
        "debug", max_seq_len=SEQ, original_seq_len=SEQ, aux_loss_alpha=0.01, attn_pad_v=pad_v,
        activation_checkpointing=option,
    )  # fmt: skip


def _tokens() -> torch.Tensor:
    return torch.randint(0, 256, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))


def test_an_unknown_option_is_refused() -> None:
    with pytest.raises(ValueError, match="activation_checkpointing='full' is not an option"):
        get_preset("debug", activation_checkpointing="full")


@functools.cache
def _train_once(option: str, pad_v: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
    """Loss, gradients and expert loads of one forward and backward of the whole model."""
    model = Transformer(_config(option, pad_v))
    model.init_weights(0)
    loss = model.training_loss(_tokens()).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return loss.detach(), grads, [r.expert_load.clone() for _, r in model.routers()]


@pytest.mark.parametrize("pad_v", [False, True], ids=["math-attention", "flash-attention"])
@pytest.mark.parametrize("option", [o for o in CHECKPOINTING if o != "none"])
def test_gradients_equal_those_without_checkpointing(option: str, pad_v: bool) -> None:
    """Every option recomputes exactly; the routers, outside every region, count each token once."""
    loss0, grads0, loads0 = _train_once("none", pad_v)
    loss1, grads1, loads1 = _train_once(option, pad_v)
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, msg=name)
    assert all(torch.equal(a, b) for a, b in zip(loads0, loads1))


class _CountingDispatcher(LocalDispatcher):
    def __init__(self) -> None:
        self.calls = 0

    def dispatch(self, tokens: torch.Tensor, counts: torch.Tensor, token_ids: Any = None) -> Any:
        self.calls += 1
        return super().dispatch(tokens, counts, token_ids)

    def combine(self, expert_out: torch.Tensor, ctx: Any) -> torch.Tensor:
        self.calls += 1
        return super().combine(expert_out, ctx)


@pytest.mark.parametrize("option", CHECKPOINTING)
def test_recomputation_never_repeats_the_exchange(option: str) -> None:
    """Regions end where the all-to-all starts: backward runs no dispatch or combine again."""
    model = Transformer(_config(option))
    model.init_weights(0)
    dispatcher = _CountingDispatcher()
    moe_layers = list(model.moe_layers())
    for _, moe in moe_layers:
        moe.dispatcher = dispatcher
    loss = model.training_loss(_tokens()).loss
    assert dispatcher.calls == 2 * len(moe_layers)
    loss.backward()
    assert dispatcher.calls == 2 * len(moe_layers)


def _saved_bytes(model: Transformer) -> tuple[int, dict[int, float]]:
    """Bytes autograd keeps after one training forward, and each MoE layer's busiest / mean expert load."""
    with saved_storages(model) as saved:
        loss = model.training_loss(_tokens()).loss
    nbytes = saved.nbytes  # read now: selective has freed q, k, v already
    loss.backward()
    return nbytes, expert_imbalance(model)


@pytest.mark.parametrize("pad_v", [False, True], ids=["math-attention", "flash-attention"])
def test_saved_activations_fall_as_the_model_predicts(pad_v: bool) -> None:
    """Measured bytes equal the plan's for every option, so each option's share of "none" is the model's.

    The model's expectation for this config (whole model, fp32, CPU kernels): "layer" keeps under a
    third of "none" (only region inputs, routing and the combine's inputs stay); "attention" and "mlp"
    keep roughly two thirds; "selective" frees the norms and projections, and with equal head dims
    (flash attention) also the kernel's q, k, v.
    """
    measured, predicted = {}, {}
    for option in CHECKPOINTING:
        config = _config(option, pad_v)
        model = Transformer(config)
        model.init_weights(0)
        measured[option], imbalance = _saved_bytes(model)
        whole = ChunkSpec(0, tuple(range(config.n_layers)), True, True)
        kernels = Kernels.for_device("cpu", "32-true", config)
        items = chunk_activation_bytes(
            config, whole, BATCH, SEQ, "32-true", kernels, expert_imbalance=imbalance
        )
        predicted[option] = sum(items.values())
    assert measured == pytest.approx(predicted, rel=1e-9)
    share = {o: measured[o] / measured["none"] for o in CHECKPOINTING}
    assert share["layer"] < 1 / 3
    assert share["layer"] < min(share["attention"], share["mlp"], share["selective"])
    assert 0.5 < share["attention"] < 0.8 and 0.5 < share["mlp"] < 0.8
    assert share["selective"] < (0.8 if pad_v else 0.9)
