"""Gradient reduction over the mesh and ZeRO-1: optimizer state sharded over the reducing groups.

Dense parameters are replicated over the dp x ep ranks of a stage and routed experts over the dp
ranks of an expert slice; each is reduced over exactly that group and divided by dp * ep (the
number of data slices), which makes the result the gradient of the global-batch mean loss.

With ZeRO-1 the parameters of one optimizer param-group and one reducing group are packed into a
flat bucket, padded to a multiple of the group size. Each rank steps an fp32 master of its 1/N
shard: for fp32 parameters (32-true, bf16-mixed) a slice of the one flat buffer the parameters
become views of, so the weights exist once and the all-gather writes them in place; for bf16
parameters a separate fp32 copy. The user's optimizer is re-pointed at those shards, so AdamW
moments exist only for the shard while LR schedulers, `param_groups` and `state_dict` keep working
on the same object.
A step is: reduce-scatter the bucket gradients (all buckets in flight at once) -> step the shards
-> all-gather the updated shards back into the model's parameters.

Reductions start during the backward: once `arm` is called before the last backward of a step, a
bucket's collective is launched from the gradient hook of its last parameter to finish, while
autograd goes on with earlier layers. Buckets launch in one fixed order (latest layers first) on every
rank, each only after those before it, so every group sees its collectives in the same sequence even
when a rank's bucket is not ready (an expert that got no tokens on this rank has no gradient to wait
for): that bucket, and the ones after it, launch in `reduce_gradients`.

`bucket_bytes` caps a bucket's size (a parameter is never split; one larger than the cap gets a
bucket of its own): with several buckets in flight, flattening one overlaps the collective of the
previous, at the price of a fixed latency per collective (the strategy picks the cap from its
start-up probe). Each bucket is then its own ZeRO-1 shard and master parameter.

A gradient codec (`TopKCodec`, `PowerSGDCodec`) replaces, once its `start_iter` warm-up steps are
over, a bucket's reduction over a group of more than one rank by a compressed all-reduce with error
feedback: every rank of the group computes the
same approximate mean, so replicas stay identical. Under ZeRO-1 each rank keeps its shard of that
mean: a sparse or low-rank sum has no reduce-scatter, so the whole bucket is reduced (the bytes sent
are still the compressed ones) and the error-feedback residuals, like the gradients ZeRO-1 keeps,
are full-size. Top-k keeps the k largest entries of a whole bucket (one all_gather per bucket; with
AdamW, a per-parameter k trained worse in our tests); PowerSGD compresses each parameter worth it as
a matrix (3-D expert stacks viewed as (experts * rows, columns), so the low-rank factors share the
input space across experts), every P of a bucket in one all-reduce and every Q in another, and sends
the rest of the bucket as one plain all-reduce. Codecs skip their NaN/Inf check (a host sync): a
non-finite gradient ruins the step with or without them. Their residuals are not checkpointed; a
resumed run starts them at zero.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from lightning_dsv3.parallel.compression import PowerSGDCodec, TopKCodec
from lightning_dsv3.parallel.telemetry import CommTelemetry, Link

GradCodec = TopKCodec | PowerSGDCodec


@dataclass
class ReduceGroup:
    """A process group that reduces some parameters' gradients, and this rank's place in it.

    `name` is the mesh's name for the group ("dp_ep", "dp"): buckets and telemetry use it.
    """

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
    # ZeRO-1 over fp32 parameters: the flat buffer the parameters are views of; `master` is its slice
    storage: torch.Tensor | None = None

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
        codec: compress reductions over groups of more than one rank (see the module docstring).
        bucket_bytes: cap on a bucket's flat gradient (fp32 under ZeRO-1); None: one bucket per
            (param-group, reduce group).
        telemetry: records every collective (default: none recorded).
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, nn.Parameter]],
        optimizer: torch.optim.Optimizer,
        group_of: Callable[[str], ReduceGroup],
        n_data_slices: int,
        zero: bool,
        copies: Callable[[str], int] = lambda name: 1,
        codec: GradCodec | None = None,
        bucket_bytes: int | None = None,
        telemetry: CommTelemetry | None = None,
    ) -> None:
        if bucket_bytes is not None and bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be positive or None (no cap), got {bucket_bytes}")
        self.optimizer = optimizer
        self.copies = copies
        self.zero = zero
        self.codec = codec
        self.telemetry = telemetry or CommTelemetry(torch.device("cpu"), enabled=False)
        self.scale = 1.0 / n_data_slices
        name_of = {p: n for n, p in named_params}
        self.buckets: list[Bucket] = []
        for param_group in optimizer.param_groups:
            by_group: dict[str, list[Bucket]] = {}
            for p in param_group["params"]:
                if p not in name_of:
                    raise ValueError("the optimizer holds a parameter that is not one of the model's")
                rg = group_of(name_of[p])
                buckets = by_group.setdefault(rg.name, [])
                item_bytes = 4 if zero else p.element_size()  # the flat gradient's dtype
                if not buckets or (
                    bucket_bytes is not None and (buckets[-1].numel + p.numel()) * item_bytes > bucket_bytes
                ):
                    buckets.append(Bucket([], [], rg, 0))
                bucket = buckets[-1]
                bucket.names.append(name_of[p])
                bucket.params.append(p)
                bucket.offsets.append(bucket.numel)
                bucket.numel += p.numel()
            new = [b for buckets in by_group.values() for b in buckets]
            self.buckets.extend(new)
            if zero:
                param_group["params"] = [self._make_master(b) for b in new]
        # launch order: the bucket holding the latest parameter of the model first (backward order)
        position = {name: i for i, name in enumerate(name_of.values())}
        self._order = sorted(self.buckets, key=lambda b: -max(position[n] for n in b.names))
        self._armed = False
        self._ready: dict[int, int] = {}  # bucket index in _order -> its parameters' hooks fired so far
        self._launched: list[tuple[Bucket, torch.Tensor, dist.Work | None]] = []
        self.early_launches = 0
        this = weakref.ref(self)  # the hooks must not keep a replaced reducer (and its shards) alive
        self._hooks = [
            p.register_post_accumulate_grad_hook(partial(_notify, this, k))
            for k, bucket in enumerate(self._order)
            for p in bucket.params
        ]

    @torch.no_grad()
    def _make_master(self, bucket: Bucket) -> nn.Parameter:
        flat = self._flat([p.detach() for p in bucket.params], bucket, torch.float32)
        start = bucket.reduce_group.rank * bucket.shard_numel
        if all(p.dtype == torch.float32 for p in bucket.params):
            # fp32 parameters (32-true, bf16-mixed) are their own master weights: they become views of
            # one flat buffer whose shard the optimizer steps, so no second copy exists and the
            # all-gather lands in place
            bucket.storage = flat
            self._point_into_storage(bucket)
            bucket.master = nn.Parameter(flat[start : start + bucket.shard_numel])
        else:
            bucket.master = nn.Parameter(flat[start : start + bucket.shard_numel].clone())
        return bucket.master

    @staticmethod
    def _point_into_storage(bucket: Bucket) -> None:
        for p, offset in zip(bucket.params, bucket.offsets):
            view = bucket.storage[offset : offset + p.numel()].view_as(p)
            if p.data_ptr() != view.data_ptr():
                view.copy_(p.detach())
                p.data = view

    @torch.no_grad()
    def refresh_masters(self) -> None:
        """ZeRO-1: make the master shards hold the model's current weights (after loading weights).

        Where the parameters are views of the bucket's buffer, a parameter that was given new storage
        (say by `load_state_dict(assign=True)`) is copied back into the buffer and pointed at it again.
        """
        for bucket in self.buckets:
            if bucket.storage is not None:
                self._point_into_storage(bucket)
            elif bucket.master is not None:
                flat = self._flat([p.detach() for p in bucket.params], bucket, torch.float32)
                start = bucket.reduce_group.rank * bucket.shard_numel
                bucket.master.copy_(flat[start : start + bucket.shard_numel])

    @staticmethod
    def _flat(tensors: list[torch.Tensor], bucket: Bucket, dtype: torch.dtype) -> torch.Tensor:
        flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
        pad = bucket.padded_numel - bucket.numel
        return torch.nn.functional.pad(flat, (0, pad)) if pad else flat

    # ---- the step ------------------------------------------------------------------------------
    def _link(self, rg: ReduceGroup) -> Link:
        return Link(rg.group, rg.name, self.telemetry)

    def remove_hooks(self) -> None:
        """Detach the gradient hooks from the parameters (the strategy replaces this reducer)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def arm(self) -> None:
        """Start each bucket's reduction as soon as the next backward has finished its gradients.

        Call it before the last backward of a step only: a gradient that another backward would still
        add to must not be sent. Compressed reductions (a started codec) wait for `reduce_gradients`.
        """
        self._armed = self.codec is None or not self.codec.started
        self._ready = {}
        self._launched = []

    @torch.no_grad()
    def _on_gradient(self, k: int) -> None:
        if not self._armed or k < len(self._launched):
            return
        self._ready[k] = self._ready.get(k, 0) + 1  # a leaf's hook fires once per backward
        while len(self._launched) < len(self._order):  # launch, in order, every bucket that is ready
            nxt = len(self._launched)
            if self._ready.get(nxt, 0) < len(self._order[nxt].params):
                break
            self._launched.append(self._launch(self._order[nxt]))

    def _launch(self, bucket: Bucket) -> tuple[Bucket, torch.Tensor, dist.Work | None]:
        """Start the bucket's reduction: (bucket, the tensor it lands in, the collective's handle)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket.params]
        dtype = torch.float32 if self.zero else grads[0].dtype
        rg = bucket.reduce_group
        work = None
        if rg.size > 1 and self.codec is not None and self.codec.started:
            flat = self._codec_reduce(bucket, grads, dtype).mul_(rg.size)  # a sum, like the rest
            if self.zero:
                start = rg.rank * bucket.shard_numel
                flat = flat[start : start + bucket.shard_numel]
        elif self.zero:
            full = self._flat(grads, bucket, dtype)
            flat = full  # alone in its group, the shard is the whole flat gradient: no copy
            if rg.size > 1:
                flat = full.new_empty(bucket.shard_numel)
                work = self._link(rg).reduce_scatter(flat, full, "reduce_scatter", async_op=True)
        else:
            flat = self._flat(grads, bucket, dtype)
            if rg.size > 1:
                work = self._link(rg).all_reduce(flat, "all_reduce", async_op=True)
        if self.zero:
            for p in bucket.params:
                p.grad = None  # the shard holds what this rank needs; free the full gradient
        return bucket, flat, work

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Average every gradient over its group (ZeRO-1: into this rank's master shard only)."""
        self._armed = False
        pending, self._launched = self._launched, []
        self.early_launches = len(pending)  # of this step's buckets, launched during the backward
        pending += [self._launch(bucket) for bucket in self._order[len(pending) :]]
        for bucket, flat, work in pending:
            if work is not None:
                work.wait()
            if self.scale != 1.0:  # one data slice: a pass over every gradient for nothing
                flat.mul_(self.scale)
            if self.zero:
                bucket.master.grad = flat
            else:
                for p, offset in zip(bucket.params, bucket.offsets):
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        if self.codec is not None:
            self.codec.step()

    def _codec_reduce(self, bucket: Bucket, grads: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The group mean of the bucket's gradients through the codec, as a padded flat `dtype` tensor.

        Top-k: one all_gather of the bucket's top-k. PowerSGD: one all-reduce of every P, one of every Q, and
        one plain all-reduce of the parameters not worth compressing.
        """
        rg = bucket.reduce_group
        link = self._link(rg)
        dense = [sum(g.numel() * g.element_size() for g in grads)]  # counted once, on the first collective

        def nbytes() -> int:
            return dense.pop() if dense else 0

        if isinstance(self.codec, TopKCodec):  # the residual is keyed by the bucket's first parameter
            return self.codec.allreduce(
                self._flat(grads, bucket, dtype), rg.group, name=bucket.names[0], check_finite=False,
                all_gather=lambda out, x: link.all_gather(out, x, "all_reduce", nbytes=nbytes()),
            )  # fmt: skip
        matrices = [g.reshape(-1, g.shape[-1]) if g.dim() > 2 else g for g in grads]
        lowrank = [self.codec.will_compress(m.shape) for m in matrices]
        means: list[torch.Tensor] = list(grads)
        if any(lowrank):
            picked = [k for k, low in enumerate(lowrank) if low]
            reduced = self.codec.allreduce_many(
                [matrices[k] for k in picked], rg.group, names=[bucket.names[k] for k in picked],
                check_finite=False, all_reduce=lambda t: link.all_reduce(t, "all_reduce", nbytes=nbytes()),
            )  # fmt: skip
            for k, mean in zip(picked, reduced):
                means[k] = mean
        rest = [k for k, low in enumerate(lowrank) if not low]
        if rest:
            flat = torch.cat([grads[k].reshape(-1) for k in rest])
            link.all_reduce(flat, "all_reduce", nbytes=nbytes())
            for k, mean in zip(rest, flat.div_(rg.size).split([grads[k].numel() for k in rest])):
                means[k] = mean
        return self._flat(means, bucket, dtype)

    @torch.no_grad()
    def gather_parameters(self) -> None:
        """ZeRO-1: all-gather the updated master shards into the model's parameters."""
        if not self.zero:
            return
        pending = []
        for bucket in self.buckets:
            rg = bucket.reduce_group
            if bucket.storage is not None:  # the parameters are the buffer: gather in place
                if rg.size > 1:  # the input is this rank's slice of the output: NCCL and gloo allow it
                    work = self._link(rg).all_gather(
                        bucket.storage, bucket.master.detach(), "all_gather", async_op=True
                    )
                    pending.append((bucket, None, work))
                continue
            full = bucket.master.new_empty(bucket.padded_numel)
            work = None
            if rg.size > 1:
                work = self._link(rg).all_gather(full, bucket.master.detach(), "all_gather", async_op=True)
            else:
                full.copy_(bucket.master.detach())
            pending.append((bucket, full, work))
        for bucket, full, work in pending:
            if work is not None:
                work.wait()
            if full is not None:
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
        # separate fp32 masters exist only for low-precision parameters (fp32 ones are their own)
        kept = [b for b in self.buckets if b.master is not None and b.storage is None]
        return {
            "local": int(local + 4 * sum(b.shard_numel for b in kept)),
            "replicated": int(per_element * full_numel + 4 * sum(b.numel for b in kept)),
        }


def _notify(reducer: weakref.ref[GradientReducer], k: int, _param: torch.Tensor) -> None:
    """A parameter's gradient hook: tell its reducer, if it still exists, that bucket k has one more."""
    live = reducer()
    if live is not None:
        live._on_gradient(k)
