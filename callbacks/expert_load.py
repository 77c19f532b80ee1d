"""ExpertLoadMonitor: tokens per layer and expert, a heatmap, max violation and the balancing bias.

Each router counts the tokens it sends to each expert in its `expert_load` buffer; the module's
`on_before_optimizer_step` turns the counts into the aux-loss-free bias update and resets them. The
Trainer runs callbacks' `on_before_optimizer_step` before the LightningModule's, so this callback
reads the counts of the step just before they are consumed, and the bias (`e_score_correction_bias`)
the step was routed with. Under DSV3Strategy the counts are made global with the strategy's
`reduce_expert_loads` (over the ranks that route tokens of a layer, and a layer's pipeline copies);
that method syncs in place, so it is given copies. Every pipeline rank holds other layers, so the
per-layer results are gathered over the pipeline group to rank 0.

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


def _layer_order(name: str) -> tuple[bool, int]:
    """Decoder layers first, in order, then the MTP modules' layers ("layers.3", "mtp.0.block")."""
    numbers = re.findall(r"\d+", name)
    return ("mtp" in name.split("."), int(numbers[0]) if numbers else 0)


class ExpertLoadMonitor(PeriodicReport):
    """Per-layer, per-expert token counts every `every_n_steps` optimizer steps.

    Args:
        every_n_steps: read the counts before every n-th optimizer step (step = `trainer.global_step`
            of the step being taken, counted from 1).
        dirpath: where heatmaps go (default `<log_dir>/experts`).
    """

    folder = "experts"

    def __init__(self, every_n_steps: int = 50, dirpath: str | Path | None = None) -> None:
        super().__init__(every_n_steps, dirpath)
        self.last: dict[str, dict[str, list[float]]] = {}  # layer -> {"load", "bias"}, on rank 0

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step + 1
        if step % self.every_n_steps:
            return
        routers = dict(_routers(pl_module))
        if not routers:
            return
        loads = {name: router.expert_load.clone() for name, router in routers.items()}
        reduce = getattr(trainer.strategy, "reduce_expert_loads", None)
        if reduce is not None:
            loads = reduce(loads)
        local = {
            _layer_name(name): {
                "load": loads[name].tolist(),
                "bias": router.e_score_correction_bias.tolist(),
            }
            for name, router in routers.items()
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
