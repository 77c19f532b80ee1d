"""What the planner's activation and expert-load figures are checked against, measured on a live model.

The tests and `benchmarks/memory_model.py` / `benchmarks/checkpointing.py` compare the plan's activation
bytes with what autograd really keeps, and size the padded expert buffers from the measured expert
imbalance; these are those two measurements, written once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class SavedStorages:
    """The distinct storages autograd saved for backward (a model's parameters and buffers excluded)."""

    def __init__(self, model: nn.Module) -> None:
        self._excluded = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
        self._storages: dict[int, torch.UntypedStorage] = {}

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        """Count t's storage (the saved-tensor hook; also for tensors kept by other means, such as a
        pipeline tape's cut tensors)."""
        s = t.untyped_storage()
        if s._cdata not in self._excluded:
            self._storages[s._cdata] = s
        return t

    @property
    def nbytes(self) -> int:
        """Their bytes now (a storage freed until backward, as selective recomputation does, counts 0)."""
        return sum(s.nbytes() for s in self._storages.values())


@contextmanager
def saved_storages(model: nn.Module) -> Iterator[SavedStorages]:
    """Count what autograd saves for backward while the block runs (parameters and buffers excluded)."""
    saved = SavedStorages(model)
    with torch.autograd.graph.saved_tensors_hooks(saved.keep, lambda t: t):
        yield saved


def expert_imbalance(model: nn.Module) -> dict[int, float]:
    """Busiest / mean expert load per MoE layer (MTP depth k is layer n_layers + k - 1) since the
    routers' counts were last reset: `memory_plan(expert_imbalance=...)` sizes padded expert buffers by it."""
    out = {}
    for name, router in model.routers():  # type: ignore[operator]
        layer = int(name.split(".")[1]) + (model.config.n_layers if name.startswith("mtp") else 0)
        out[layer] = float(router.expert_load.max() / router.expert_load.mean())
    return out
