"""Gradient reduction over the mesh and ZeRO-1: optimizer state sharded over the reducing groups.

Dense parameters are replicated over the dp x ep ranks of a stage and routed experts over the dp
ranks of an expert slice; each is reduced over exactly that group and divided by dp * ep (the
number of data slices), which makes the result the gradient of the global-batch mean loss.

With ZeRO-1 the parameters of one optimizer param-group and one reducing group are packed into a
flat bucket, padded to a multiple of the group size. Each rank keeps an fp32 master copy of its
1/N shard; the user's optimizer is re-pointed at those shards, so AdamW moments exist only for the
shard while LR schedulers, `param_groups` and `state_dict` keep working on the same object.
A step is: reduce-scatter the bucket gradients (all buckets in flight at once) -> step the shards
-> all-gather the updated shards back into the model's parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class ReduceGroup:
    """A process group that reduces some parameters' gradients, and this rank's place in it."""

    name: str
    group: dist.ProcessGroup | None
    size: int
    rank: int


@dataclass
class Bucket:
    """Parameters of one optimizer param-group reduced over one group, as one flat buffer."""

    names: list[str]
    params: list[nn.Parameter]
    reduce_group: ReduceGroup
    numel: int  # without padding
    master: nn.Parameter | None = None  # ZeRO-1: this rank's fp32 shard
    offsets: list[int] = field(default_factory=list)

    @property
    def padded_numel(self) -> int:
        size = self.reduce_group.size
        return -(-self.numel // size) * size

    @property
    def shard_numel(self) -> int:
        return self.padded_numel // self.reduce_group.size


class GradientReducer:
    """Reduces gradients over their groups; with `zero=True` also owns the sharded optimizer state.

    Args:
        named_params: the model's trainable parameters by name.
        optimizer: the user's optimizer over those parameters (re-pointed at shards under ZeRO-1).
        group_of: maps a parameter name to the ReduceGroup that shares its gradient.
        n_data_slices: dp * ep; reduced gradients are divided by it.
        zero: shard optimizer state (ZeRO-1) or keep it replicated.
        copies: how many pipeline chunks hold a parameter (DualPipe's mirrored stages, tied
            embeddings); the global norm counts each distinct parameter once.
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, nn.Parameter]],
        optimizer: torch.optim.Optimizer,
        group_of: Callable[[str], ReduceGroup],
        n_data_slices: int,
        zero: bool,
        copies: Callable[[str], int] = lambda name: 1,
    ) -> None:
        self.optimizer = optimizer
        self.copies = copies
        self.zero = zero
        self.scale = 1.0 / n_data_slices
        name_of = {p: n for n, p in named_params}
        self.buckets: list[Bucket] = []
        for param_group in optimizer.param_groups:
            by_group: dict[str, Bucket] = {}
            for p in param_group["params"]:
                if p not in name_of:
                    raise ValueError("the optimizer holds a parameter that is not one of the model's")
                rg = group_of(name_of[p])
                bucket = by_group.setdefault(rg.name, Bucket([], [], rg, 0))
                bucket.names.append(name_of[p])
                bucket.params.append(p)
                bucket.offsets.append(bucket.numel)
                bucket.numel += p.numel()
            self.buckets.extend(by_group.values())
            if zero:
                masters = [self._make_master(b) for b in by_group.values()]
                param_group["params"] = masters

    def _make_master(self, bucket: Bucket) -> nn.Parameter:
        flat = self._flat([p.detach() for p in bucket.params], bucket, torch.float32)
        start = bucket.reduce_group.rank * bucket.shard_numel
        bucket.master = nn.Parameter(flat[start : start + bucket.shard_numel].clone())
        return bucket.master

    @torch.no_grad()
    def refresh_masters(self) -> None:
        """ZeRO-1: copy the model's current weights into the master shards (after loading weights)."""
        for bucket in self.buckets:
            if bucket.master is not None:
                flat = self._flat([p.detach() for p in bucket.params], bucket, torch.float32)
                start = bucket.reduce_group.rank * bucket.shard_numel
                bucket.master.copy_(flat[start : start + bucket.shard_numel])

    @staticmethod
    def _flat(tensors: list[torch.Tensor], bucket: Bucket, dtype: torch.dtype) -> torch.Tensor:
        flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
        pad = bucket.padded_numel - bucket.numel
        return torch.nn.functional.pad(flat, (0, pad)) if pad else flat

    # ---- the step ------------------------------------------------------------------------------
    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Average every gradient over its group (ZeRO-1: into this rank's master shard only)."""
        pending = []
        for bucket in self.buckets:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket.params]
            flat = self._flat(grads, bucket, torch.float32 if self.zero else grads[0].dtype)
            rg = bucket.reduce_group
            if self.zero:
                shard = flat.new_empty(bucket.shard_numel)
                work = None
                if rg.size > 1:
                    work = dist.reduce_scatter_tensor(shard, flat, group=rg.group, async_op=True)
                else:
                    shard.copy_(flat)
                pending.append((bucket, shard, work))
                for p in bucket.params:
                    p.grad = None  # the shard holds what this rank needs; free the full gradient
            else:
                work = dist.all_reduce(flat, group=rg.group, async_op=True) if rg.size > 1 else None
                pending.append((bucket, flat, work))
        for bucket, flat, work in pending:
            if work is not None:
                work.wait()
            flat.mul_(self.scale)
            if self.zero:
                bucket.master.grad = flat
            else:
                for p, offset in zip(bucket.params, bucket.offsets):
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))

    @torch.no_grad()
    def gather_parameters(self) -> None:
        """ZeRO-1: all-gather the updated master shards into the model's parameters."""
        if not self.zero:
            return
        pending = []
        for bucket in self.buckets:
            rg = bucket.reduce_group
            full = bucket.master.new_empty(bucket.padded_numel)
            work = None
            if rg.size > 1:
                work = dist.all_gather_into_tensor(
                    full, bucket.master.detach(), group=rg.group, async_op=True
                )
            else:
                full.copy_(bucket.master.detach())
            pending.append((bucket, full, work))
        for bucket, full, work in pending:
            if work is not None:
                work.wait()
            for p, offset in zip(bucket.params, bucket.offsets):
                p.copy_(full[offset : offset + p.numel()].view_as(p))

    # ---- norms and memory ----------------------------------------------------------------------
    @torch.no_grad()
    def grad_norm_sq_owned(self) -> torch.Tensor:
        """This rank's share of the squared global gradient norm; summed over the world it is exact.

        Under ZeRO-1 every element lives in exactly one shard of its group; replicated gradients are
        divided by the group size, and parameters held by several pipeline chunks by their copies.
        """
        total = torch.zeros((), device=self._device())
        for bucket in self.buckets:
            size = bucket.reduce_group.size
            start = bucket.reduce_group.rank * bucket.shard_numel
            for name, p, offset in zip(bucket.names, bucket.params, bucket.offsets):
                if self.zero:
                    lo, hi = max(offset, start), min(offset + p.numel(), start + bucket.shard_numel)
                    if hi <= lo or bucket.master.grad is None:
                        continue
                    sq = bucket.master.grad[lo - start : hi - start].float().pow(2).sum()
                else:
                    if p.grad is None:
                        continue
                    sq = p.grad.float().pow(2).sum() / size
                total += sq / self.copies(name)
        return total

    def _device(self) -> torch.device:
        return self.buckets[0].params[0].device if self.buckets else torch.device("cpu")

    @torch.no_grad()
    def scale_gradients(self, factor: float | torch.Tensor) -> None:
        for bucket in self.buckets:
            grads = [bucket.master.grad] if self.zero else [p.grad for p in bucket.params]
            for g in grads:
                if g is not None:
                    g.mul_(factor)

    def optimizer_state_bytes(self) -> dict[str, int]:
        """Bytes of optimizer state (moments and fp32 masters) held here, and what replication would hold.

        "replicated" is the state of an unsharded optimizer over the same parameters: every state tensor
        at full size, plus fp32 master weights when the sharded run keeps them.
        """
        local = 0
        for state in self.optimizer.state.values():
            local += sum(
                t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t) and t.dim()
            )
        full_numel = sum(b.numel for b in self.buckets)
        shard_numel = sum(b.shard_numel if self.zero else b.numel for b in self.buckets)
        per_element = local / shard_numel if shard_numel else 0.0
        masters = 4 * shard_numel if self.zero else 0
        return {
            "local": int(local + masters),
            "replicated": int(per_element * full_numel + (4 * full_numel if self.zero else 0)),
        }
