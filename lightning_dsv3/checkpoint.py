"""Sharded checkpoints through torch.distributed.checkpoint (DCP), loadable on any other mesh.

A checkpoint is a folder: DCP shards holding one flat dict plus `meta.pt` (written by rank 0) with
Lightning's loop, scheduler and callback state and the layout that wrote it. Names are the
model's own, independent of the layout: pipeline chunk indices are dropped and routed experts are
stored one tensor per global expert ("model.layers.3.ffn.experts.w1.17"), so a rank of any other
(pp, dp, ep) asks DCP for exactly the keys it holds. Optimizer state is stored the same way, per
parameter and per expert, whether or not ZeRO-1 sharded it during training; replicated tensors are
written once (DCP dedups identical keys across ranks).

The folder is written under a temporary name and renamed when complete, so a crash mid-save never
leaves something that looks like a checkpoint.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from lightning_dsv3.model.moe import MoE
from lightning_dsv3.parallel.expert import is_expert_param
from lightning_dsv3.parallel.zero import GradientReducer

META_FILE = "meta.pt"
_CHUNK_INDEX = re.compile(r"^model\.\d+\.")


def canonical_name(name: str) -> str:
    """'model.1.layers.5.attn.wo.weight' (a pipeline chunk) -> 'model.layers.5.attn.wo.weight'."""
    return _CHUNK_INDEX.sub("model.", name)


def _expert_offsets(module: nn.Module) -> dict[str, int]:
    """Module-name prefix of each MoE's experts -> global id of its first local expert."""
    return {f"{name}.experts.": m.expert_offset for name, m in module.named_modules() if isinstance(m, MoE)}


def _split(name: str, tensor: torch.Tensor, offsets: dict[str, int]) -> Iterator[tuple[str, torch.Tensor]]:
    """One (name, tensor) per global expert for stacked expert tensors; the pair itself otherwise."""
    if not is_expert_param(name):
        yield canonical_name(name), tensor
        return
    offset = next(o for prefix, o in offsets.items() if name.startswith(prefix))
    for i in range(tensor.shape[0]):
        yield f"{canonical_name(name)}.{offset + i}", tensor[i]


def model_entries(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's persistent state under layout-independent names (expert rows are views)."""
    return {key: copies[0] for key, copies in _model_copies(module).items()}


def _model_copies(module: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Like `model_entries`, with every local copy of a name (two pipeline chunks can hold one)."""
    offsets = _expert_offsets(module)
    out: dict[str, list[torch.Tensor]] = {}
    for name, tensor in module.state_dict(keep_vars=False).items():
        for key, value in _split(name, tensor, offsets):
            out.setdefault(f"model/{key}", []).append(value)
    return out


def _load_copies(path: Path, copies: dict[str, list[torch.Tensor]]) -> None:
    """Load each stored entry into the first local copy and copy it into the others."""
    dcp.load({key: tensors[0] for key, tensors in copies.items()}, checkpoint_id=str(path))
    for tensors in copies.values():
        for other in tensors[1:]:
            other.copy_(tensors[0])


@torch.no_grad()
def optimizer_entries(module: nn.Module, reducer: GradientReducer) -> dict[str, torch.Tensor]:
    """Per-parameter optimizer state (ZeRO-1 shards gathered over their group), layout-independent."""
    offsets = _expert_offsets(module)
    out: dict[str, torch.Tensor] = {}
    for full_name, param, state in _full_states(reducer):
        for key, value in state.items():
            if value.dim() == 0:  # per-parameter scalars (AdamW's step): one copy per stored tensor
                for split_name, _ in _split(full_name, param, offsets):
                    out[f"optim/{split_name}/{key}"] = value
            else:
                for split_name, part in _split(full_name, value.view_as(param), offsets):
                    out[f"optim/{split_name}/{key}"] = part
    return out


def _full_states(reducer: GradientReducer) -> Iterator[tuple[str, nn.Parameter, dict[str, torch.Tensor]]]:
    optimizer = reducer.optimizer
    if not reducer.zero:
        for bucket in reducer.buckets:
            for name, p in zip(bucket.names, bucket.params):
                yield name, p, {k: v for k, v in optimizer.state.get(p, {}).items() if torch.is_tensor(v)}
        return
    for bucket in reducer.buckets:
        shard_state = {k: v for k, v in optimizer.state.get(bucket.master, {}).items() if torch.is_tensor(v)}
        shard_state["master"] = bucket.master.detach()
        full: dict[str, torch.Tensor] = {}
        rg = bucket.reduce_group
        for key, shard in shard_state.items():
            if shard.dim() == 0:
                full[key] = shard
                continue
            flat = shard.new_empty(bucket.padded_numel)
            if rg.size > 1:
                dist.all_gather_into_tensor(flat, shard.contiguous(), group=rg.group)
            else:
                flat.copy_(shard)
            full[key] = flat
        for name, p, offset in zip(bucket.names, bucket.params, bucket.offsets):
            yield (
                name,
                p,
                {k: (v if v.dim() == 0 else v[offset : offset + p.numel()]) for k, v in full.items()},
            )


def save(
    path: Path, module: nn.Module, reducer: GradientReducer | None, meta: dict[str, Any], rank: int
) -> None:
    """Write the checkpoint folder `path` atomically (a collective call on every rank)."""
    tmp = path.with_name(path.name + ".tmp")
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    _barrier()
    entries = model_entries(module)
    if reducer is not None:
        entries.update(optimizer_entries(module, reducer))
    dcp.save(entries, checkpoint_id=str(tmp))
    if rank == 0:
        torch.save(meta, tmp / META_FILE)
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        tmp.rename(path)
    _barrier()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / META_FILE).is_file() and (path / ".metadata").is_file()


@torch.no_grad()
def load(path: Path, module: nn.Module, reducer: GradientReducer | None) -> dict[str, Any]:
    """Load the model (and optimizer) state this rank holds from `path`; returns the Lightning meta."""
    if not is_checkpoint(path):
        raise FileNotFoundError(
            f"{path} is not a lightning-dsv3 checkpoint folder (it needs {META_FILE} and DCP's .metadata); "
            "pass the folder ModelCheckpoint or trainer.save_checkpoint wrote"
        )
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    entries = _model_copies(module)
    missing = sorted(k for k in entries if k not in stored)
    if missing:
        raise KeyError(
            f"checkpoint {path} lacks {len(missing)} entries this model needs, e.g. {missing[:3]}; "
            "was it written for another preset or model_overrides?"
        )
    _load_copies(path, entries)
    if reducer is not None:
        _load_optimizer(path, module, reducer, stored)
    return torch.load(path / META_FILE, weights_only=False)


def _load_optimizer(path: Path, module: nn.Module, reducer: GradientReducer, stored: dict[str, Any]) -> None:
    offsets = _expert_offsets(module)
    targets: dict[str, list[torch.Tensor]] = {}
    plan: list[tuple[str, nn.Parameter, str, torch.Tensor]] = []  # (param name, param, state key, buffer)
    keys_of: dict[str, set[str]] = {}
    for key in stored:
        if key.startswith("optim/"):
            name, state_key = key[len("optim/") :].rsplit("/", 1)
            keys_of.setdefault(name, set()).add(state_key)
    for bucket in reducer.buckets:
        for name, p in zip(bucket.names, bucket.params):
            first = next(_split(name, p, offsets))[0]
            for state_key in sorted(keys_of.get(first, ())):
                if state_key == "master" and not reducer.zero:
                    continue
                meta = stored[f"optim/{first}/{state_key}"]
                scalar = len(meta.size) == 0
                buf = torch.zeros(() if scalar else p.shape, dtype=meta.properties.dtype)
                for split_name, part in _split(name, p if scalar else buf, offsets):
                    targets.setdefault(f"optim/{split_name}/{state_key}", []).append(buf if scalar else part)
                plan.append((name, p, state_key, buf))
    if not targets:
        return
    _load_copies(path, targets)
    states: dict[str, dict[str, torch.Tensor]] = {}
    for name, _, state_key, buf in plan:
        states.setdefault(name, {})[state_key] = buf
    optimizer = reducer.optimizer
    reducer.refresh_masters()  # from the loaded weights; a stored fp32 master overrides below
    for bucket in reducer.buckets:
        if not reducer.zero:
            for name, p in zip(bucket.names, bucket.params):
                optimizer.state[p] = {k: v.to(p.device) for k, v in states.get(name, {}).items()}
            continue
        keys = set().union(*(states.get(n, {}).keys() for n in bucket.names))
        start = bucket.reduce_group.rank * bucket.shard_numel
        shard_state: dict[str, torch.Tensor] = {}
        for key in keys:
            parts = [states[n][key] for n in bucket.names]
            if parts[0].dim() == 0:
                shard_state[key] = parts[0].to(bucket.master.device)
                continue
            flat = torch.cat([t.reshape(-1) for t in parts])
            flat = torch.nn.functional.pad(flat, (0, bucket.padded_numel - bucket.numel))
            shard_state[key] = flat[start : start + bucket.shard_numel].clone().to(bucket.master.device)
        master = shard_state.pop("master", None)
        if master is not None:
            bucket.master.copy_(master)
        optimizer.state[bucket.master] = shard_state
