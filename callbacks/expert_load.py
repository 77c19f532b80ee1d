"""ExpertLoadMonitor: tokens per layer and expert, a heatmap, max violation and the balancing bias.

Each router counts the tokens it sends to each expert in its `expert_load` buffer; the module's
`on_before_optimizer_step` sums the counts over the ranks (the strategy's `reduce_expert_loads`, under
DSV3Strategy), moves the bias (`e_score_correction_bias`) against them with `Router.update_bias`, which
keeps them as `Router.last_load`, and resets the buffer. This callback reads what that update used
instead of reducing the counts a second time: before the optimizer step (callbacks' hooks run before
the LightningModule's) it notes the bias the step was routed with, and after the batch it reads
`last_load`. So under DSV3Strategy a report costs no collective beyond the pipeline gather below.

Under a strategy without `reduce_expert_loads` (Lightning's DDP, FSDP) the module sums the counts over
every rank with the strategy's own `reduce(..., reduce_op="sum")` before the bias update, so
`last_load` is global there too and the heatmap shows the whole global batch, not rank 0's share. A
module that leaves the counts alone (no `update_bias` this step) gets them read from `expert_load` and
reduced here, as the strategy or the module would; a step the strategy skipped
as non-finite (its counts dropped, its bias kept) is not reported. Every pipeline rank holds other
layers, so the per-layer results are gathered over the pipeline group to rank 0.

Logged: `experts/max_violation/<layer>` (max load / mean load - 1, the balance the bias drives to 0),
`experts/max_violation` (the worst layer) and `experts/bias_spread/<layer>` (max - min bias);
a PNG and W&B image with two heatmaps (layers x experts: load relative to the mean, and the bias) and
a W&B table of (layer, expert, tokens, bias).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_dsv3.callbacks.report import PeriodicReport, gather, log_scalars, log_table, new_figure
from lightning_dsv3.model.moe import Router
from lightning_dsv3.module import sum_over_ranks


def _routers(module: pl.LightningModule) -> Iterator[tuple[str, Router]]:
    """(name, router) under the names the strategy's reduce_expert_loads uses (relative to a chunk)."""
    chunks = getattr(module, "chunks", None)
    parts = chunks() if chunks is not None else [module]
    for part in parts:
        for name, sub in part.named_modules():
            if isinstance(sub, Router):
                yield name, sub


def _layer_name(router_name: str) -> str:
    return router_name.removesuffix(".ffn.router")


def _global_loads(trainer: pl.Trainer, routers: dict[str, Router]) -> dict[str, torch.Tensor]:
    """Each router's counts of the step summed over the ranks, with a collective only where the module's
    bias update did not already use global counts (see the module docstring)."""
    used = {name: r.last_load for name, r in routers.items() if r.last_load is not None}
    if len(used) == len(routers):
        return used  # reduced for the bias update
    loads = {name: r.expert_load.clone() for name, r in routers.items()}
    reduce = getattr(trainer.strategy, "reduce_expert_loads", None)
    if reduce is not None:
        return reduce(loads)
    return sum_over_ranks(trainer.strategy, loads)  # the world for DDP; itself in one process


def _layer_order(name: str) -> tuple[bool, int]:
    """Decoder layers first, in order, then the MTP modules' layers ("layers.3", "mtp.0.block")."""
    numbers = re.findall(r"\d+", name)
    return ("mtp" in name.split("."), int(numbers[0]) if numbers else 0)


class ExpertLoadMonitor(PeriodicReport):
    """Per-layer, per-expert token counts every `every_n_steps` optimizer steps.

    Args:
        every_n_steps: report the counts of every n-th optimizer step (step = `trainer.global_step`
            of the step being taken, counted from 1).
        dirpath: where heatmaps go (default `<log_dir>/experts`).
    """

    folder = "experts"

    def __init__(self, every_n_steps: int = 50, dirpath: str | Path | None = None) -> None:
        super().__init__(every_n_steps, dirpath)
        self.last: dict[str, dict[str, list[float]]] = {}  # layer -> {"load", "bias"}, on rank 0
        self._pending: tuple[int, dict[str, torch.Tensor]] | None = None  # (step, biases routed with)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step + 1
        if step % self.every_n_steps:
            return
        routers = dict(_routers(pl_module))
        if not routers:
            return
        for router in routers.values():
            router.last_load = None  # the module's bias update, right after this hook, sets it again
        biases = {name: router.e_score_correction_bias.clone() for name, router in routers.items()}
        self._pending = (step, biases)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._pending is None:
            return
        (step, biases), self._pending = self._pending, None
        guard = getattr(trainer.strategy, "nonfinite", None)
        if guard is not None and guard.skip_step:
            return  # a dropped step: its counts were discarded and the bias did not move
        routers = dict(_routers(pl_module))
        loads = _global_loads(trainer, routers)
        local = {
            _layer_name(name): {"load": loads[name].tolist(), "bias": biases[name].tolist()}
            for name in routers
        }
        mesh = getattr(trainer.strategy, "mesh", None)
        layers: dict[str, dict[str, list[float]]] = {}
        for part in gather(local, mesh.group("pp") if mesh is not None else None):
            layers.update(part)  # pipeline copies of a layer carry the same global counts
        if not trainer.is_global_zero:
            return
        self.last = dict(sorted(layers.items(), key=lambda kv: _layer_order(kv[0])))
        self._report(trainer, step)

    def _report(self, trainer: pl.Trainer, step: int) -> None:
        metrics: dict[str, float] = {}
        violations = []
        for layer, v in self.last.items():
            load = torch.tensor(v["load"])
            if load.sum() > 0:
                violation = float(load.max() / load.mean() - 1)
                violations.append(violation)
                metrics[f"experts/max_violation/{layer}"] = violation
            metrics[f"experts/bias_spread/{layer}"] = max(v["bias"]) - min(v["bias"])
        if violations:
            metrics["experts/max_violation"] = max(violations)
        log_scalars(trainer, metrics, step)
        self.log_figure(trainer, "experts/heatmap", plot_expert_load(self.last, step), step)
        rows = [
            [layer, e, tokens, bias]
            for layer, v in self.last.items()
            for e, (tokens, bias) in enumerate(zip(v["load"], v["bias"]))
        ]
        log_table(trainer, "experts/load", ["layer", "expert", "tokens", "bias"], rows, step)


def plot_expert_load(layers: dict[str, dict[str, list[float]]], step: int) -> Any:
    """Two heatmaps, layers x experts: tokens relative to the layer's mean, and the router bias.

    Both colour scales are centred (on 1 and on 0), so balance reads as white; cells carry their
    values while they stay legible (up to 16 experts and 24 layers).
    """
    names = list(layers)
    load = torch.tensor([layers[n]["load"] for n in names])  # (layers, experts)
    relative = load / load.mean(1, keepdim=True).clamp_min(1e-9)
    bias = torch.tensor([layers[n]["bias"] for n in names])
    n_layers, n_experts = load.shape
    spread = max(float((relative - 1).abs().max()), 0.05)
    reach = max(float(bias.abs().max()), 1e-6)
    panels = (
        (relative, "load / mean load", "RdBu_r", (1 - spread, 1 + spread), "{:.2f}"),
        (bias, "aux-loss-free bias", "PuOr_r", (-reach, reach), "{:+.3f}"),
    )
    fig = new_figure(2 * min(2 + 0.55 * n_experts, 14), 1.2 + 0.42 * n_layers)
    for ax, (values, title, cmap, (vmin, vmax), fmt) in zip(fig.subplots(1, 2), panels):
        image = ax.imshow(values.numpy(), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        fig.colorbar(image, ax=ax, shrink=0.9)
        if n_experts <= 32:
            ax.set_xticks(range(n_experts))
        ax.set_yticks(range(n_layers), names)
        ax.set(xlabel="expert", title=f"{title}, step {step}")
        if n_experts > 16 or n_layers > 24:
            continue
        for i in range(n_layers):
            for j in range(n_experts):
                value = float(values[i, j])
                r, g, b, _ = image.cmap(image.norm(value))
                ink = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"  # by luminance
                ax.text(j, i, fmt.format(value), ha="center", va="center", fontsize=7, color=ink)
    return fig
