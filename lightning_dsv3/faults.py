"""What the strategy does when a step goes wrong: non-finite values and stuck collectives.

Non-finite steps. After the gradients of an optimizer step are reduced, and before clipping and the
optimizer, `NonFiniteGuard.check` looks at the step's loss and this rank's reduced gradients and
all-reduces one flag over the whole world, so every rank (every replica, every pipeline stage)
takes the same decision: with `policy="skip"` the step is dropped everywhere (gradients set to
None, which SGD and AdamW skip entirely: no moment, weight-decay or router-bias update) and
counted, until `max_consecutive` steps in a row were bad, when training stops with a message that
names the step and the first parameter, in layer order, whose gradient went bad; `policy="raise"`
stops at the first. The check costs one small all-reduce per optimizer step, and one host wait where
the optimizer is not fused; a fused optimizer (GPUs) skips the step from a device flag, and the host
reads the verdict one step later (`NonFiniteGuard.check_on_device`).

Stuck collectives. A collective whose peer never arrives fails after the process group's timeout
(gloo raises; NCCL does with blocking wait) with a message that names neither the operation nor
the ranks. `collective` wraps the strategy's blocking points (pipeline P2P, expert all-to-all,
gradient and loss reductions) and re-raises such a failure as `CollectiveError`, naming the
operation, the mesh group and its global ranks. `set_group_timeouts` gives the mesh's subgroups the
strategy's timeout: torch creates them with its 30-minute default otherwise.

Restarts. torchrun's agent keeps one TCP store for all restarts of its workers, and every attempt's
init_process_group writes each rank's address under the same keys: a rank of the restarted group
can read the address of a rank that died with the last attempt and fail to connect ("Connection
refused"). `restart_store` gives each attempt keys of its own.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

if TYPE_CHECKING:  # parallel/ imports `collective` from here
    from lightning_dsv3.parallel.zero import GradientReducer

NonFinitePolicy = Literal["skip", "raise", "off"]
POLICIES: tuple[str, ...] = ("skip", "raise", "off")
_LAYER = re.compile(r"(?:^|\.)(layers|mtp)\.(\d+)\.")


class CollectiveError(RuntimeError):
    """A collective of the strategy that failed or timed out, with its operation, group and ranks."""


class NonFiniteError(FloatingPointError):
    """Training stopped on non-finite losses or gradients (see `NonFiniteGuard`)."""


def _ranks(group: Any) -> list[int]:
    if not dist.is_initialized():
        return [0]
    return dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))


@contextmanager
def collective(op: str, group: Any, group_name: str) -> Iterator[None]:
    """Re-raise a failure of the collective(s) run inside as a `CollectiveError` with their context.

    `group` is the process group (None: the whole world), `group_name` the mesh's name for it. Wrap
    only the collective calls: any RuntimeError raised inside is reported as theirs.
    """
    start = time.monotonic()
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as err:
        waited = time.monotonic() - start
        raise CollectiveError(
            f"{op} over the {group_name} group (global ranks {_ranks(group)}) failed after {waited:.1f} s: "
            f"{err}. Another rank of that group is stuck before this collective or has died (see its "
            "log); if it is only slow, raise DSV3Strategy(timeout=...)"
        ) from err


def restart_store(timeout: timedelta | None) -> dist.Store | None:
    """Under torchrun with its shared store (the default), that store seen through a prefix private to
    this restart attempt; None elsewhere (init_process_group then reads MASTER_ADDR/PORT itself)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or dist.is_initialized():
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
        is_master=False, timeout=timeout or timedelta(minutes=30),
    )  # fmt: skip
    return dist.PrefixStore(f"dsv3/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def set_group_timeouts(groups: Iterable[Any], timeout: timedelta) -> None:
    """Give each process group `timeout`; the default group keeps the one init_process_group set."""
    from torch.distributed.distributed_c10d import _get_default_group, _set_pg_timeout

    default = _get_default_group()
    seen: set[int] = set()
    for group in groups:
        if group is None or group is default or id(group) in seen:
            continue
        seen.add(id(group))
        _set_pg_timeout(timeout, group)


def layer_order(name: str) -> tuple[int, int, str]:
    """Sort key of a parameter name in model order: embedding, layers by index, norm and head, MTP."""
    match = _LAYER.search(name)
    if match:
        return (1 if match.group(1) == "layers" else 3, int(match.group(2)), name)
    return (0 if ".embed." in f".{name}" else 2, 0, name)


def describe_layer(name: str) -> str:
    match = _LAYER.search(name)
    if not match:
        return "outside the decoder layers"
    return f"layer {match.group(2)}" if match.group(1) == "layers" else f"MTP module {match.group(2)}"


class NonFiniteGuard:
    """Decides, the same way on every rank, whether an optimizer step is skipped or training stops.

    Two ways to decide, one verdict. `check` reads the step's flag back at once (one host wait per
    step) and drops the gradients of a bad step. `check_on_device`, used where the optimizer is fused
    (GPUs), never waits: it hands the flag to the optimizer as `found_inf`, so the fused kernel leaves
    parameters, moments and step counts as they were, exposes it as `found_inf` for the router-bias
    update, and copies it to pinned host memory; `settle` reads it one step later (and at the end of
    training), when the device is long past it, to count, warn or stop, naming the same step and
    parameter as `check` would.

    Args:
        policy: "skip" the step (and count it), "raise" at once, or "off" (no check, no sync).
        max_consecutive: with "skip", stop once this many optimizer steps in a row were non-finite.
    """

    def __init__(self, policy: NonFinitePolicy = "skip", max_consecutive: int = 5) -> None:
        if policy not in POLICIES:
            raise ValueError(f"nonfinite must be one of {POLICIES}, got {policy!r}")
        if max_consecutive < 1:
            raise ValueError(
                f"max_consecutive_nonfinite must be >= 1, got {max_consecutive}; use nonfinite='raise' to "
                "stop at the first non-finite step"
            )
        self.policy = policy
        self.max_consecutive = max_consecutive
        self.skipped = 0  # optimizer steps skipped so far (settled ones, on the device path)
        self.consecutive = 0  # non-finite steps in a row, up to the last one checked
        self.skip_step = False  # the host's decision for the step being taken (`check` only)
        self.found_inf: Tensor | None = None  # the device's decision for it (`check_on_device` only)
        self._streak: tuple[int, str] | None = None  # (first step, first bad parameter) of the streak
        self._bad_loss: Tensor | None = None
        self._pending: _Pending | None = None  # a device verdict not read back yet
        self._skipped_on_device: Tensor | None = None  # the device path's running count, this step's included

    @property
    def enabled(self) -> bool:
        return self.policy != "off"

    def skipped_steps(self) -> Tensor | float:
        """Optimizer steps skipped so far, the one being taken included, for logging. On the device path
        a device tensor: a Python number logged is copied to the device by Lightning, a host wait."""
        return self._skipped_on_device if self._skipped_on_device is not None else float(self.skipped)

    @staticmethod
    def decides_on_device(optimizer: Any) -> bool:
        """Whether `optimizer` can skip a step from a device flag: torch's fused Adam/AdamW/SGD take
        `found_inf` (as GradScaler passes it) and undo their step counts where it is set."""
        return bool(getattr(optimizer, "defaults", {}).get("fused"))

    def observe_loss(self, loss: Tensor) -> None:
        """Remember whether a loss of this optimizer step (any accumulated micro-step) was not finite."""
        if self.enabled:
            bad = (~torch.isfinite(loss.detach())).float()
            self._bad_loss = bad if self._bad_loss is None else torch.maximum(self._bad_loss, bad)

    def _flags(self, grads: list[tuple[str, Tensor]]) -> tuple[Tensor, Tensor]:
        """(2,) world-reduced [gradients bad, loss bad] and (n,) this rank's per-gradient bad flags."""
        device = grads[0][1].device if grads else torch.device("cpu")
        # one fused kernel for every gradient (a sum each was 224 launches on mini): the max-abs norm
        # keeps NaN and Inf and, unlike a sum or a 2-norm, cannot overflow from finite values
        norms = torch._foreach_norm([g for _, g in grads], float("inf")) if grads else []
        local = (
            ~torch.isfinite(torch.stack([n.float() for n in norms]))
            if norms
            else torch.zeros(0, dtype=torch.bool, device=device)
        )
        bad_loss = self._bad_loss.to(device) if self._bad_loss is not None else torch.zeros((), device=device)
        flags = torch.stack([local.any().float(), bad_loss])
        self._bad_loss = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            with collective("non-finite check all_reduce", None, "world"):
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return flags, local

    def check(self, grads: list[tuple[str, Tensor]], step: int) -> bool:
        """Whether optimizer step `step` must be skipped; raises NonFiniteError when training must stop.

        `grads` are this rank's reduced gradients by parameter name (a ZeRO-1 rank passes its shard's
        pieces). A collective over the whole world: every rank calls it at every optimizer step.
        """
        self.skip_step, self.found_inf = False, None
        if not self.enabled:
            return False
        flags, local = self._flags(grads)
        bad_grads, loss_bad = (bool(v) for v in flags.tolist())  # the one host sync
        mine = [name for (name, _), bad in zip(grads, local.tolist()) if bad] if bad_grads else []
        self.skip_step = self._verdict(step, bad_grads, loss_bad, mine)
        return self.skip_step

    def check_on_device(self, grads: list[tuple[str, Tensor]], step: int, optimizer: Any) -> None:
        """`check` without a host wait, for an optimizer that `decides_on_device`: settles the previous
        step's verdict (raising if training must stop), then sets `optimizer.found_inf` for this one."""
        self.settle()
        if not self.enabled:
            return
        flags, local = self._flags(grads)
        self.found_inf = flags.max()
        optimizer.found_inf = self.found_inf
        before = self._skipped_on_device
        self._skipped_on_device = self.found_inf.clone() if before is None else before + self.found_inf
        on_host = (flags.to("cpu", non_blocking=True), local.to("cpu", non_blocking=True))
        event = torch.cuda.Event() if flags.is_cuda else None
        if event is not None:
            event.record()
        self._pending = _Pending(step, [name for name, _ in grads], *on_host, event)

    def settle(self) -> None:
        """Count, warn or stop for the step `check_on_device` decided last (a collective when it was
        bad: every rank settles at the same points)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending.event is not None:
            pending.event.synchronize()  # long done: it only orders the pinned copies before reading
        bad_grads, loss_bad = (bool(v) for v in pending.flags.tolist())
        mine = [n for n, bad in zip(pending.names, pending.local.tolist()) if bad] if bad_grads else []
        self._verdict(pending.step, bad_grads, loss_bad, mine)

    def _verdict(self, step: int, bad_grads: bool, loss_bad: bool, mine: list[str]) -> bool:
        """Book step `step`'s flags; True when it is skipped, NonFiniteError when training must stop.
        `mine`: the names of this rank's non-finite gradients."""
        if not (bad_grads or loss_bad):
            self.consecutive, self._streak = 0, None
            return False
        first = self._first_bad(mine) if bad_grads else None
        what = f"gradient of {first} ({describe_layer(first)})" if first else "gradient"
        if loss_bad:
            what = f"loss and {what}" if bad_grads else "loss"
        self.consecutive += 1
        if self._streak is None:
            self._streak = (step, what)
        if self.policy == "raise" or self.consecutive >= self.max_consecutive:
            start, first_what = self._streak
            raise NonFiniteError(
                f"non-finite {what} at optimizer step {step}: {self.consecutive} step(s) in a row "
                f"(nonfinite={self.policy!r}, max_consecutive_nonfinite={self.max_consecutive}); the streak "
                f"began at step {start} with a non-finite {first_what}. Lower the learning rate or raise "
                "gradient clipping, check the data near those steps, or resume from an earlier checkpoint"
            )
        self.skipped += 1
        if not dist.is_initialized() or dist.get_rank() == 0:
            warnings.warn(
                f"skipped optimizer step {step}: non-finite {what} ({self.consecutive} in a row, training "
                f"stops at {self.max_consecutive}; {self.skipped} skipped so far)",
                stacklevel=3,
            )
        return True

    @staticmethod
    def _first_bad(mine: list[str]) -> str | None:
        """The first parameter, in layer order over every rank, whose gradient is not finite."""
        first = min(mine, key=layer_order) if mine else None
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return first
        everyone: list[str | None] = [None] * dist.get_world_size()
        with collective("non-finite report all_gather_object", None, "world"):
            dist.all_gather_object(everyone, first)
        named = [n for n in everyone if n is not None]
        return min(named, key=layer_order) if named else None


@dataclass
class _Pending:
    """A device verdict on its way to the host: the step, this rank's gradient names, and pinned
    copies of the world's flags and of this rank's per-gradient flags, ordered by `event`."""

    step: int
    names: list[str]
    flags: Tensor
    local: Tensor
    event: Any


def reduced_gradients(reducer: GradientReducer) -> list[tuple[str, Tensor]]:
    """This rank's reduced gradients under whole-model names; under ZeRO-1 the pieces of its shard."""
    from lightning_dsv3.checkpoint import canonical_name  # it imports parallel.expert, which imports us

    out: list[tuple[str, Tensor]] = []
    for bucket in reducer.buckets:
        if not reducer.zero:
            out += [
                (canonical_name(n), p.grad)
                for n, p in zip(bucket.names, bucket.params)
                if p.grad is not None and p.grad.numel()  # an empty one has no value to check
            ]
            continue
        if bucket.master.grad is None:
            continue
        start = bucket.reduce_group.rank * bucket.shard_numel
        for name, p, offset in zip(bucket.names, bucket.params, bucket.offsets):
            lo, hi = max(offset, start), min(offset + p.numel(), start + bucket.shard_numel)
            if hi > lo:
                out.append((canonical_name(name), bucket.master.grad[lo - start : hi - start]))
    return out


def drop_gradients(model: nn.Module, reducer: GradientReducer) -> None:
    """Set every gradient (ZeRO-1 shards included) to None: the optimizer then skips its update."""
    for p in model.parameters():
        p.grad = None
    for bucket in reducer.buckets:
        if bucket.master is not None:
            bucket.master.grad = None
