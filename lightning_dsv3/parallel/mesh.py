"""The (pp, dp, ep) device mesh and every process group derived from it.

World = pp * dp * ep ranks laid out as `arange(world).view(pp, dp, ep)`: ep is innermost, so the
ranks that exchange expert traffic are neighbours (one node, NVLink). Groups:
- `pp`: the ranks of one pipeline, one per stage (point-to-point activations and gradients);
- `dp`: the data-parallel replicas of the same stage and expert slice (routed-expert gradients);
- `ep`: the ranks that split the routed experts of a stage (all-to-all dispatch);
- `dp_ep`: dp x ep flattened, every rank of one stage (dense gradients, expert load counts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lightning_dsv3.config import ParallelConfig


@dataclass
class ParallelMesh:
    """A resolved layout with this rank's coordinates and its process groups."""

    config: ParallelConfig
    device_mesh: DeviceMesh | None  # None in a single process without torch.distributed

    @property
    def pp(self) -> int:
        return self.config.pp

    @property
    def dp(self) -> int:
        return self.config.dp  # type: ignore[return-value]

    @property
    def ep(self) -> int:
        return self.config.ep

    def _local_rank(self, dim: str) -> int:
        return 0 if self.device_mesh is None else self.device_mesh[dim].get_local_rank()

    def group(self, name: str) -> dist.ProcessGroup | None:
        """The process group `name` (pp, dp, ep or dp_ep) of this rank; None without distributed."""
        if self.device_mesh is None:
            return None
        if name == "dp_ep":
            return self.device_mesh["dp_ep"].get_group()
        return self.device_mesh[name].get_group()

    @property
    def pp_rank(self) -> int:
        return self._local_rank("pp")

    @property
    def dp_rank(self) -> int:
        return self._local_rank("dp")

    @property
    def ep_rank(self) -> int:
        return self._local_rank("ep")

    @property
    def data_rank(self) -> int:
        """Which slice of the global batch this rank reads: one per (dp, ep) pair."""
        return self.dp_rank * self.ep + self.ep_rank

    @property
    def data_size(self) -> int:
        return self.dp * self.ep

    def global_rank_of(self, pp_rank: int) -> int:
        """The global rank holding pipeline rank `pp_rank` with this rank's dp and ep coordinates."""
        return (pp_rank * self.dp + self.dp_rank) * self.ep + self.ep_rank


def build_mesh(config: ParallelConfig, world_size: int, device_type: str) -> ParallelMesh:
    """Resolve `config` against the world and create the groups (a collective call on every rank)."""
    config = config.resolve(world_size)
    if not dist.is_available() or not dist.is_initialized():
        if world_size != 1:
            raise RuntimeError("torch.distributed must be initialised before building a multi-rank mesh")
        return ParallelMesh(config, None)
    mesh = init_device_mesh(device_type, (config.pp, config.dp, config.ep), mesh_dim_names=("pp", "dp", "ep"))
    mesh["dp", "ep"]._flatten("dp_ep")  # registers mesh["dp_ep"]; no public API for this in torch yet
    return ParallelMesh(config, mesh)


def device_type_of(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"
