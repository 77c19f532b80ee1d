"""The strategy's communication: telemetry, node groups, the start-up probe, dispatcher, gradient codec.

`setup_communication` runs once per rank in `DSV3Strategy.setup`, before the experts are sharded;
it is collective (node subgroups, the probe). What it decides is logged and kept in the telemetry's
`choices`, reported with every step's metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from lightning_dsv3.config import ModelConfig, ParallelConfig
from lightning_dsv3.model.moe import Dispatcher, check_node_limit
from lightning_dsv3.model.transformer import Transformer
from lightning_dsv3.parallel.compression import PowerSGDCodec, TopKCodec, get_codec
from lightning_dsv3.parallel.expert import AllToAllDispatcher, shard_experts
from lightning_dsv3.parallel.hierarchical import HierarchicalDispatcher, build_node_groups, limit_nodes
from lightning_dsv3.parallel.mesh import ParallelMesh
from lightning_dsv3.parallel.probe import (
    CPU_SIZES,
    GPU_SIZES,
    DispatchCodecPolicy,
    ProbeTarget,
    choose_bucket_bytes,
    probe_codec,
    probe_network,
)
from lightning_dsv3.parallel.telemetry import CommTelemetry, Link
from lightning_dsv3.parallel.zero import GradCodec

GRAD_CODECS: dict[str, type[TopKCodec] | type[PowerSGDCodec]] = {"topk": TopKCodec, "powersgd": PowerSGDCodec}


def make_grad_codec(name: str | None, options: dict[str, Any]) -> GradCodec | None:
    """The gradient codec `name` built from `options`, with an error naming the bad option."""
    if name is None:
        return None
    cls = GRAD_CODECS[name]
    try:
        return cls(**options)
    except TypeError as err:
        raise ValueError(
            f"grad_codec_options {options} do not fit {cls.__name__} ({err}); see its signature for the "
            "accepted keyword arguments"
        ) from None


def node_layout(ep: int, ranks_per_node: int | None, hierarchical: bool | None) -> tuple[int, int, bool]:
    """(ranks per node inside the ep group, nodes the ep group spans, whether dispatch takes two hops)."""
    rpn = min(ranks_per_node or ep, ep)
    n_nodes = ep // rpn
    return rpn, n_nodes, n_nodes > 1 if hierarchical is None else hierarchical


def validate_node_layout(config: ParallelConfig, model: ModelConfig, ranks_per_node: int | None) -> None:
    """Refuse, before any process group exists, a two-hop dispatch within one node and node-limited
    routing that cannot pick top_k experts."""
    _, n_nodes, two_hops = node_layout(config.ep, ranks_per_node, config.hierarchical_dispatch)
    if two_hops and n_nodes == 1:
        raise ValueError(
            f"hierarchical_dispatch=True needs an ep group spanning nodes, but the ep={config.ep} ranks "
            f"share one node (ranks_per_node={ranks_per_node}); set ranks_per_node below ep or drop the flag"
        )
    if config.max_nodes_per_token is not None and n_nodes > 1 and model.n_moe_layers:
        check_node_limit(
            model.n_routed_experts, model.n_activated_experts, model.n_expert_groups,
            model.n_limited_groups, n_nodes, config.max_nodes_per_token,
        )  # fmt: skip


@dataclass
class Communication:
    """What `setup_communication` built for this rank."""

    telemetry: CommTelemetry
    dispatcher: Dispatcher | None  # None when ep = 1
    n_nodes: int  # nodes the ep group spans
    max_nodes: int | None  # node-limited routing, applied when n_nodes > 1
    grad_codec: GradCodec | None
    bucket_bytes: int | None

    def install(self, chunk: Transformer, mesh: ParallelMesh) -> None:
        """Shard the chunk's experts over ep, install the dispatcher and node-limited routing."""
        shard_experts(chunk, mesh.ep, mesh.ep_rank, self.dispatcher)
        if self.max_nodes is not None and self.n_nodes > 1:
            limit_nodes(chunk, self.n_nodes, self.max_nodes)


def setup_communication(
    config: ParallelConfig,
    mesh: ParallelMesh,
    model: ModelConfig,
    device: torch.device,
    ranks_per_node: int | None,
    probe: bool,
    log: Callable[[str], None],
    timeout: timedelta | None = None,
) -> Communication:
    """Build this rank's links, dispatcher and gradient codec; with `probe`, time the network and choose.

    The probe times the dispatch codec on `device` in bf16 on GPUs and fp32 on CPUs, the usual
    compute dtypes there. `timeout` bounds the collectives of the node subgroups a two-hop dispatch
    creates, as the strategy's timeout bounds the mesh's groups.
    """
    telemetry = CommTelemetry(device)
    rpn, n_nodes, two_hops = node_layout(mesh.ep, ranks_per_node, config.hierarchical_dispatch)
    if two_hops:
        nodes = build_node_groups(mesh, rpn, timeout)
        links = [Link(nodes.inter, "ep_inter", telemetry), Link(nodes.intra, "ep_intra", telemetry)]
    else:
        links = [Link(mesh.group("ep"), "ep", telemetry)]
    codec = get_codec(config.dispatch_codec) if mesh.ep > 1 else None
    grad_codec = make_grad_codec(config.grad_codec, config.grad_codec_options)
    policy, bucket_bytes = None, config.bucket_bytes
    if probe and mesh.device_mesh is not None:
        sizes, iters = (GPU_SIZES, 5) if device.type == "cuda" else (CPU_SIZES, 3)
        reduce_kinds = ("reduce_scatter", "all_gather") if config.zero else ("all_reduce",)
        if grad_codec is not None:
            reduce_kinds += ("all_gather",) if isinstance(grad_codec, TopKCodec) else ("all_reduce",)
        targets = [ProbeTarget(link.name, link.group, link.size, ("all_to_all",)) for link in links]
        targets += [
            ProbeTarget("dp_ep", mesh.group("dp_ep"), mesh.data_size, tuple(dict.fromkeys(reduce_kinds))),
            ProbeTarget("dp", mesh.group("dp"), mesh.dp, tuple(dict.fromkeys(reduce_kinds))),
        ]
        table = probe_network(targets, device, sizes, iters)  # groups of one rank are skipped
        telemetry.peaks = table
        if bucket_bytes is None:  # sized for the collective that carries a bucket
            kind = reduce_kinds[-1] if grad_codec is not None else reduce_kinds[0]
            bucket_bytes, reason = choose_bucket_bytes(table, ["dp_ep", "dp"], kind)
            log(reason)
        if codec is not None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            cost = probe_codec(codec, model.dim, dtype, device, sizes, iters)
            policy = DispatchCodecPolicy(codec.name, links[0].name, table, cost, log, telemetry.choices)
    if bucket_bytes is not None:
        telemetry.choices["bucket_bytes"] = float(bucket_bytes)
    dispatcher = None
    if mesh.ep > 1:
        n_local = model.n_routed_experts // mesh.ep
        grad = codec if config.quantize_dispatch_grad else None
        if two_hops:
            dispatcher = HierarchicalDispatcher(
                links[0], links[1], n_nodes, rpn, n_local, codec, grad, policy
            )
        else:
            dispatcher = AllToAllDispatcher(links[0], mesh.ep, n_local, codec, grad, policy)
    return Communication(telemetry, dispatcher, n_nodes, config.max_nodes_per_token, grad_codec, bucket_bytes)
