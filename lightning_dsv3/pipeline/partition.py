"""Assign decoder layers to pipeline stages by cost.

Stages hold contiguous layer ranges; the first stage also holds the embedding and the last the final
norm, the output head and the MTP modules, whose cost is counted. The split minimises the most
expensive stage (uneven layer counts are fine), from modelled forward FLOPs per token or from
measured per-layer times passed as `layer_costs`.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning_dsv3.config import ModelConfig


def layer_flops(config: ModelConfig, layer_id: int, seq_len: int) -> float:
    """Forward FLOPs per token of one decoder layer: MLA projections, attention, and its FFN."""
    d, h = config.dim, config.n_heads
    q = (
        2 * d * config.q_lora_rank + 2 * config.q_lora_rank * h * config.qk_head_dim
        if config.q_lora_rank
        else 2 * d * h * config.qk_head_dim
    )
    kv = 2 * d * (config.kv_lora_rank + config.qk_rope_head_dim)
    kv += 2 * config.kv_lora_rank * h * (config.qk_nope_head_dim + config.v_head_dim)
    out = 2 * h * config.v_head_dim * d
    attn = 2 * h * seq_len * (config.qk_head_dim + config.v_head_dim) / 2  # causal: half the scores
    if config.is_moe_layer(layer_id):
        experts = config.n_activated_experts + config.n_shared_experts
        ffn = 6 * d * config.moe_inter_dim * experts + 2 * d * config.n_routed_experts
    else:
        ffn = 6 * d * config.inter_dim
    return float(q + kv + out + attn + ffn)


def head_flops(config: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the output head plus the MTP modules (each a layer and a head)."""
    head = 2 * config.dim * config.vocab_size
    mtp = config.mtp_depth * (layer_flops(config, config.n_layers, seq_len) + 4 * config.dim**2 + head)
    return float(head + mtp)


def partition(
    config: ModelConfig,
    n_stages: int,
    seq_len: int | None = None,
    layer_costs: Sequence[float] | None = None,
    head_cost: float | None = None,
) -> list[range]:
    """Contiguous layer ranges, one per stage, minimising the largest stage cost.

    `layer_costs` (one per layer, e.g. measured milliseconds) replaces the FLOP model; `head_cost`
    then gives the last stage's extra cost in the same unit (default: the modelled ratio).
    """
    n_layers = config.n_layers
    if n_stages < 1:
        raise ValueError(f"n_stages must be >= 1, got {n_stages}")
    if n_layers < n_stages:
        raise ValueError(
            f"n_layers={n_layers} cannot fill {n_stages} pipeline stages (each needs a layer); "
            f"use pp (and chunks per rank) with at most {n_layers} stages, or a deeper model"
        )
    seq = seq_len or config.max_seq_len
    if layer_costs is None:
        costs = [layer_flops(config, i, seq) for i in range(n_layers)]
        extra = head_flops(config, seq)
    else:
        if len(layer_costs) != n_layers:
            raise ValueError(f"layer_costs has {len(layer_costs)} entries; the model has {n_layers} layers")
        costs = [float(c) for c in layer_costs]
        ratio = head_flops(config, seq) / max(layer_flops(config, n_layers - 1, seq), 1.0)
        extra = head_cost if head_cost is not None else ratio * costs[-1]

    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(start: int, end: int, last: bool) -> float:
        return prefix[end] - prefix[start] + (extra if last else 0.0)

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
