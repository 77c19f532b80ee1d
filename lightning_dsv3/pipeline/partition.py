"""Assign decoder layers to pipeline stages by cost.

Stages hold contiguous layer ranges; the first stage also holds the embedding and the last the final
norm, the output head and the MTP modules, whose cost is counted. The split minimises the most
expensive stage (uneven layer counts are fine), from modelled forward FLOPs per token or from
measured per-layer times passed as `layer_costs`. The FLOP model is `lightning_dsv3.flops`.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning_dsv3.config import ModelConfig
from lightning_dsv3.flops import head_flops, layer_flops


def partition(
    config: ModelConfig,
    n_stages: int,
    seq_len: int | None = None,
    layer_costs: Sequence[float] | None = None,
    head_cost: float | None = None,
    embed_cost: float = 0.0,
) -> list[range]:
    """Contiguous layer ranges, one per stage, minimising the largest stage cost.

    `layer_costs` (one per layer, e.g. measured milliseconds, see `pipeline.costs`) replaces the FLOP
    model; `head_cost` then gives the last stage's extra cost in the same unit (default: the modelled
    ratio) and `embed_cost` the first stage's (the FLOP model counts none: a lookup).
    """
    n_layers = config.n_layers
    if n_stages < 1:
        raise ValueError(f"n_stages must be >= 1, got {n_stages}")
    if n_layers < n_stages:
        raise ValueError(
            f"n_layers={n_layers} cannot fill {n_stages} pipeline stages (each needs a layer); use at most "
            f"{n_layers} stages (pp times the schedule's chunks per rank: two under dualpipev, at pp=1 too), "
            "or a deeper model"
        )
    seq = seq_len or config.max_seq_len
    first = 0.0
    if layer_costs is None:
        costs = [layer_flops(config, i, seq) for i in range(n_layers)]
        extra = head_flops(config, seq)
    else:
        if len(layer_costs) != n_layers:
            raise ValueError(f"layer_costs has {len(layer_costs)} entries; the model has {n_layers} layers")
        costs = [float(c) for c in layer_costs]
        ratio = head_flops(config, seq) / max(layer_flops(config, n_layers - 1, seq), 1.0)
        extra = head_cost if head_cost is not None else ratio * costs[-1]
        first = embed_cost

    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(start: int, end: int, last: bool) -> float:
        return prefix[end] - prefix[start] + (extra if last else 0.0) + (first if start == 0 else 0.0)

    # best[s][i]: the smallest max-stage cost of layers [0, i) over s stages; cut[s][i] the last start
    inf = float("inf")
    best = [[inf] * (n_layers + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n_layers + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, n_stages + 1):
        last = s == n_stages
        for i in range(s, n_layers + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], cost(j, i, last and i == n_layers))
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    ranges: list[range] = []
    end = n_layers
    for s in range(n_stages, 0, -1):
        start = cut[s][end]
        ranges.append(range(start, end))
        end = start
    return ranges[::-1]
