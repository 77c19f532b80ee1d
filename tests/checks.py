"""Functions the process pool runs on every rank, and the single-process reference they match."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from lightning_dsv3.checkpoint import canonical_name
from lightning_dsv3.config import get_preset
from lightning_dsv3.model import Transformer
from lightning_dsv3.module import DeepSeekV3Module, decay_groups
from lightning_dsv3.pipeline.costs import StageCosts
from lightning_dsv3.strategy import DSV3Strategy

SEQ = 16
STEPS, GLOBAL_BATCH = 3, 8
# SGD's update is linear in the gradient, so a wrong gradient scale shows in the next steps; AdamW's
# first step is ~lr * sign(g), which amplifies last-bit differences of near-zero gradients (any
# change of summation order), so it is checked with a small lr.
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-4, "betas": (0.9, 0.95)}),
    # fused (as DeepSeekV3Module makes it on GPUs): the non-finite check decides on the device
    "adamw-fused": (torch.optim.AdamW, {"lr": 1e-4, "betas": (0.9, 0.95), "fused": True}),
}
# 8 layers, so that pp=4 with two chunks per rank (DualPipeV, interleaved 1F1B) has a layer per stage
OVERRIDES: dict[str, Any] = {
    "max_seq_len": SEQ,
    "original_seq_len": SEQ,
    "aux_loss_alpha": 0.01,
    "n_layers": 8,
}


def batches(steps: int, global_batch: int, seed: int = 0) -> torch.Tensor:
    """(steps * global_batch, SEQ + 1) random token ids; step k uses rows [k * B, (k + 1) * B)."""
    return torch.randint(
        0, 256, (steps * global_batch, SEQ + 1), generator=torch.Generator().manual_seed(seed)
    )


def make_optimizer(named_params: Any, optim: str) -> torch.optim.Optimizer:
    cls, kwargs = OPTIMIZERS[optim]
    return cls(decay_groups(named_params, 0.1), **kwargs)


class _Module(DeepSeekV3Module):
    def __init__(self, optim: str) -> None:
        super().__init__(preset="debug", model_overrides=OVERRIDES)
        self.optim = optim

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.named_parameters(), self.optim)


def reference(steps: int, global_batch: int, optim: str) -> dict[str, Any]:
    """One process, the whole global batch at once: losses, step-1 gradients, states after 1 and N steps."""
    torch.manual_seed(0)
    model = Transformer(get_preset("debug", **OVERRIDES))
    model.init_weights(0)
    opt = make_optimizer(model.named_parameters(), optim)
    data = batches(steps, global_batch)
    out: dict[str, Any] = {"losses": []}
    for k in range(steps):
        loss = model.training_loss(data[k * global_batch : (k + 1) * global_batch]).loss
        loss.backward()
        out["losses"].append(loss.item())
        if k == 0:
            out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
        for _, router in model.routers():
            router.update_bias()
        opt.step()
        opt.zero_grad()
        if k == 0:
            out["state1"] = {n: t.clone() for n, t in model.state_dict().items()}
    out["state"] = {n: t.clone() for n, t in model.state_dict().items()}
    return out


class Capture(L.Callback):
    """Records each step's loss, the reduced gradients of the first step and the state after it."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.grads: dict[str, Any] | None = None
        self.state1: dict[str, torch.Tensor] | None = None

    def on_before_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule, optimizer: Any) -> None:
        if self.grads is not None:
            return
        reducer = trainer.strategy.reducer
        if reducer.zero:
            self.grads = {
                "zero": [
                    (b.names, b.offsets, [p.numel() for p in b.params], b.reduce_group.rank, b.shard_numel,
                     b.master.grad.clone())
                    for b in reducer.buckets
                ]
            }  # fmt: skip
        else:
            self.grads = {canonical_name(n): p.grad.clone() for n, p in module.named_parameters()}

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.losses.append(float(outputs["loss"]))
        if self.state1 is None:
            self.state1 = _state(module)


def _state(module: L.LightningModule) -> dict[str, torch.Tensor]:
    """The module's state under whole-model names ("layers.3...."), whatever chunk holds it."""
    return {canonical_name(n).removeprefix("model."): t.clone() for n, t in module.state_dict().items()}


def strategy_run(
    layout: dict[str, Any], steps: int, global_batch: int, optim: str, callbacks: tuple[L.Callback, ...] = ()
) -> dict[str, Any]:
    """Train through Trainer + DSV3Strategy on this rank; return what the test compares."""
    import torch.distributed as dist

    world = dist.get_world_size()
    strategy = DSV3Strategy(**layout)
    module = _Module(optim)
    capture = Capture()
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy=strategy, max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[capture, *callbacks], limit_val_batches=0, num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )  # fmt: skip
    data_size = world // layout.get("pp", 1)
    rows = list(batches(steps, global_batch))
    # Lightning's injected sampler always shuffles training data; this one keeps step k's global batch
    # equal to rows [k * B, (k + 1) * B) as in the reference (data rank = global rank % (dp * ep)).
    sampler = DistributedSampler(
        rows, num_replicas=data_size, rank=dist.get_rank() % data_size, shuffle=False
    )
    loader = DataLoader(rows, batch_size=global_batch // data_size, sampler=sampler)
    trainer.fit(module, train_dataloaders=loader)
    mesh = strategy.mesh
    return {
        "losses": capture.losses,
        "grads": capture.grads,
        "state1": capture.state1,
        "state": _state(module),
        "ep_rank": mesh.ep_rank,
        "ep": mesh.ep,
        "state_bytes": strategy.optimizer_state_bytes(),
        "shard_sizes": [(b.reduce_group.size, b.numel, b.shard_numel) for b in strategy.reducer.buckets],
        "comm": strategy.communication_stats(),
        "early_launches": strategy.reducer.early_launches,
        "actions": [t.action for t in strategy.runtime.timings] if strategy.runtime is not None else [],
        "stage_layers": [(r.start, r.stop) for r in strategy.plan.layers]
        if strategy.plan is not None
        else [],
    }


def rank_costs_run(layout: dict[str, Any], steps: int, global_batch: int, optim: str) -> dict[str, Any]:
    """`strategy_run` where each rank measured different layer costs (rank 0: a costly first layer)."""
    import torch.distributed as dist

    n_layers = _Module(optim).config.n_layers
    first = 100.0 if dist.get_rank() == 0 else 1.0
    costs = StageCosts(layers=(first,) + (1.0,) * (n_layers - 1), head=1.0)
    return strategy_run({**layout, "layer_costs": costs}, steps, global_batch, optim)


class _SaveAt(L.Callback):
    def __init__(self, path: str, epoch: int) -> None:
        self.path, self.epoch = path, epoch

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.save_checkpoint(self.path)


def checkpoint_run(layout: dict[str, Any], path: str, resume: bool, global_batch: int = 8) -> dict[str, Any]:
    """Three one-batch epochs; the first run saves after epoch 2, a resumed run trains epoch 3 only.

    Returns the losses and the final state under layout-independent names (one key per expert).
    """
    import torch.distributed as dist

    from lightning_dsv3.checkpoint import model_entries

    world = dist.get_world_size()
    module = _Module("sgd")
    capture = Capture()
    callbacks = [capture] if resume else [capture, _SaveAt(path, epoch=1)]
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy=DSV3Strategy(**layout), max_epochs=3, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks, limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
    )  # fmt: skip
    data_size = world // layout.get("pp", 1)
    rows = list(batches(1, global_batch))
    sampler = DistributedSampler(
        rows, num_replicas=data_size, rank=dist.get_rank() % data_size, shuffle=False
    )
    trainer.fit(module, DataLoader(rows, batch_size=global_batch // data_size, sampler=sampler),
                ckpt_path=path if resume else None)  # fmt: skip
    entries = {k: v.clone() for k, v in model_entries(module).items()}  # chunk indices dropped, as saved
    return {"losses": capture.losses, "step": trainer.global_step, "state": entries}


# ---- assertions shared by the strategy and pipeline tests -------------------------------------
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
    assert state.keys() <= ref.keys()  # a pipeline rank holds some stages
    for name, value in state.items():
        expected = _local(name, ref[name], ep_rank, ep)
        assert value.shape == expected.shape, name
        assert _rel_err(value, expected) < 1e-5, (name, _rel_err(value, expected))


def _check_grads(grads: dict[str, Any], ref: dict[str, torch.Tensor], ep_rank: int, ep: int) -> None:
    if "zero" not in grads:
        for name, g in grads.items():
            name = name.removeprefix("model.")
            assert _rel_err(g, _local(name, ref[name], ep_rank, ep)) < 1e-5, name
        return
    for names, _offsets, _sizes, rank, shard_numel, shard in grads["zero"]:
        names = [canonical_name(n).removeprefix("model.") for n in names]
        flat = torch.cat([_local(n, ref[n], ep_rank, ep).reshape(-1) for n in names])
        flat = torch.nn.functional.pad(flat, (0, shard_numel * (rank + 1) - flat.numel()))  # padding is zero
        expected = flat[rank * shard_numel : (rank + 1) * shard_numel]
        assert shard.shape == expected.shape
        assert _rel_err(shard, expected) < 1e-5, names


def check_layout(
    pool, layout: dict[str, Any], ref: dict[str, Any], optim: str = "sgd"
) -> list[dict[str, Any]]:
    return check_results(pool.run(strategy_run, layout, STEPS, GLOBAL_BATCH, optim), ref)


def check_results(results: list[dict[str, Any]], ref: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's losses, gradients and parameters equal the one-process reference's."""
    for r in results:
        _check_grads(r["grads"], ref["grads"], r["ep_rank"], r["ep"])
        _check_state(r["state1"], ref["state1"], r["ep_rank"], r["ep"])
        _check_state(r["state"], ref["state"], r["ep_rank"], r["ep"])
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    return results


def validate_run(layout: dict[str, Any], global_batch: int = 8) -> float:
    """`Trainer.validate` through the strategy on one global batch; returns the logged val_loss."""
    import torch.distributed as dist

    world = dist.get_world_size()
    data_size = world // layout.get("pp", 1)
    rows = list(batches(1, global_batch, seed=1))
    sampler = DistributedSampler(
        rows, num_replicas=data_size, rank=dist.get_rank() % data_size, shuffle=False
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy=DSV3Strategy(**layout), logger=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
    )  # fmt: skip
    module = _Module("sgd")
    trainer.validate(module, DataLoader(rows, batch_size=global_batch // data_size, sampler=sampler))
    return float(trainer.callback_metrics["val_loss"])


def reference_val_loss(global_batch: int = 8) -> float:
    model = Transformer(get_preset("debug", **OVERRIDES))
    model.init_weights(0)
    model.eval()
    with torch.no_grad():
        return model.training_loss(batches(1, global_batch, seed=1)).ce.item()
