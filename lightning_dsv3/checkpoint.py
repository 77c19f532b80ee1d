"""Sharded checkpoints through torch.distributed.checkpoint (DCP), loadable on any other mesh.

A checkpoint is a folder: DCP shards holding one flat dict plus `meta.pt` (written by rank 0) with
Lightning's loop, scheduler and callback state and the layout that wrote it. Names are the
model's own, independent of the layout: pipeline chunk indices are dropped and routed experts are
stored one tensor per global expert ("model.layers.3.ffn.experts.w1.17"), so a rank of any other
(pp, dp, ep) asks DCP for exactly the keys it holds. Optimizer state is stored the same way, per
parameter and per expert, whether or not ZeRO-1 sharded it during training; replicated tensors are
written once (DCP dedups identical keys across ranks).

The folder is written under a temporary name and renamed when complete, so a crash mid-save never
leaves something that looks like a checkpoint; a save sweeps away the temporary folders an earlier
crash left beside it. `meta.pt` is written last and carries a `dsv3` entry: the format version,
the mesh and the model config that wrote the folder. `verify` checks a folder without reading its
tensors (meta.pt readable, DCP's index readable, every shard file present and as long as the index
says), so a truncated copy or a half-deleted folder is refused with the file that is wrong; bit
flips inside a shard surface when DCP reads it. `resolve` picks what to load: the folder asked
for, or, when a `last*.ckpt` (what `ckpt_path="last"` finds) is bad, the newest good checkpoint
beside it, with a warning that names the bad one.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from lightning_dsv3.config import ModelConfig, ParallelConfig
from lightning_dsv3.model.moe import MoE
from lightning_dsv3.parallel.expert import is_expert_param
from lightning_dsv3.parallel.zero import GradientReducer

META_FILE = "meta.pt"
INDEX_FILE = ".metadata"  # DCP's index of every stored tensor and where its bytes are
FORMAT_VERSION = 1  # of the folder layout and the `dsv3` entry of meta.pt; raise it on any change
_CHUNK_INDEX = re.compile(r"^model\.\d+\.")
_LAST = re.compile(r"^last(-v\d+)?\.ckpt$")  # ModelCheckpoint's save_last names
_PARTIAL_SUFFIXES = (".tmp", ".old")  # a save in progress, a checkpoint being replaced


class CorruptCheckpointError(RuntimeError):
    """A checkpoint folder that is incomplete or unreadable; `path` is the file that is wrong."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(path, problem)  # both in args, so the error pickles across ranks
        self.path, self.problem = path, problem

    def __str__(self) -> str:
        return f"corrupt checkpoint: {self.path} {self.problem}"


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


class _IndexedReader(dcp.FileSystemReader):
    """A checkpoint folder's reader that reads DCP's index (`.metadata`) once: the verification, the
    check of names and shapes and each `dcp.load` of a resume ask for it (five reads per rank before)."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        self._index: Any = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("rank") is not None:  # a rank-local index (not what this package writes): as is
            return super().read_metadata(*args, **kwargs)
        if self._index is None:
            self._index = super().read_metadata(*args, **kwargs)
        self._index.storage_meta.load_id = self.load_id  # as a fresh read would stamp it
        return self._index


def _load_copies(reader: _IndexedReader, copies: dict[str, list[torch.Tensor]]) -> None:
    """Load each stored entry into the first local copy and copy it into the others."""
    reader.reset()  # a new load id, as dcp.load gives a reader it is handed with a checkpoint_id
    dcp.load({key: tensors[0] for key, tensors in copies.items()}, storage_reader=reader)
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


def param_group_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The param groups' hyperparameters (lr, betas, weight decay, ...), which schedulers move.

    The per-parameter state goes through DCP; this small part travels in meta.pt as Lightning's
    "optimizer_states", so the first step after a resume uses the learning rate it would have used.
    """
    return {"param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]}


def _restore_param_groups(optimizer: torch.optim.Optimizer, meta: dict[str, Any], path: Path) -> None:
    """Put the saved hyperparameters back (a weights-only save has none: the optimizer keeps its own)."""
    if not meta.get("optimizer_states"):
        return
    (saved,) = meta["optimizer_states"]
    groups = saved["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(
            f"checkpoint {path} holds {len(groups)} optimizer param groups, this optimizer has "
            f"{len(optimizer.param_groups)}; configure_optimizers must build the groups it was saved with"
        )
    for group, hyper in zip(optimizer.param_groups, groups):
        group.update(hyper)


def describe(layout: ParallelConfig, config: ModelConfig) -> dict[str, Any]:
    """The `dsv3` entry of meta.pt: what wrote the folder (the model config is checked again when it
    is loaded; the layout is a record, since any layout can load any other's checkpoint)."""
    return {
        "format_version": FORMAT_VERSION,
        "layout": dataclasses.asdict(layout),
        "model_config": dataclasses.asdict(config),
    }


def save(
    path: Path, module: nn.Module, reducer: GradientReducer | None, meta: dict[str, Any], rank: int
) -> None:
    """Write the checkpoint folder `path` atomically (a collective call on every rank).

    Shards go to `<name>.tmp`, then rank 0 writes meta.pt (fsynced) and swaps the folder in by two
    renames, so `path` is always either the old complete checkpoint or the new one.
    """
    tmp = path.with_name(path.name + ".tmp")
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_partial(path.parent)
    _barrier()
    entries = model_entries(module)
    if reducer is not None:
        entries.update(optimizer_entries(module, reducer))
    dcp.save(entries, checkpoint_id=str(tmp))
    if rank == 0:
        with open(tmp / META_FILE, "wb") as f:
            torch.save(meta, f)
            f.flush()
            os.fsync(f.fileno())
        _swap_in(tmp, path)
    _barrier()


def _swap_in(new: Path, path: Path) -> None:
    """Rename `new` to `path`; an existing `path` is moved aside first and removed after."""
    if not (path.exists() or path.is_symlink()):
        new.rename(path)
        return
    old = path.with_name(path.name + ".old")
    remove(old)
    path.rename(old)
    new.rename(path)
    remove(old)


def remove(path: Path) -> None:
    """Delete a checkpoint folder, a symlink to one (save_last="link") or a file; absent is fine."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _is_partial(path: Path) -> bool:
    """A `.tmp` / `.old` folder holding nothing but what a checkpoint save writes."""
    if not path.is_dir() or path.is_symlink() or not path.name.endswith(_PARTIAL_SUFFIXES):
        return False
    return all(
        f.name.endswith(".distcp") or f.name.startswith((INDEX_FILE, META_FILE)) for f in path.iterdir()
    )


def sweep_partial(directory: Path) -> list[Path]:
    """Remove what crashed saves left in `directory` (they are never loaded); returns the removed."""
    removed = [p for p in directory.iterdir() if _is_partial(p)] if directory.is_dir() else []
    for p in removed:
        shutil.rmtree(p)
    return removed


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def verify(path: Path) -> dict[str, Any]:
    """Check a checkpoint folder without reading its tensors; returns meta.pt's contents.

    Raises FileNotFoundError when nothing is at `path`, ValueError when it is not a lightning-dsv3
    checkpoint or is newer than this code, and CorruptCheckpointError naming the file that is
    missing, unreadable or truncated.
    """
    return _verified(path)[0]


def _verified(path: Path) -> tuple[dict[str, Any], _IndexedReader]:
    """`verify`, also returning the folder's reader with the index it read."""
    if not (path.exists() or path.is_symlink()):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise ValueError(
            f"{path} is a file, not a lightning-dsv3 checkpoint folder; DSV3Strategy loads the folders "
            "it writes (ModelCheckpoint or trainer.save_checkpoint under DSV3Strategy)"
        )
    meta_file, index_file = path / META_FILE, path / INDEX_FILE
    if not meta_file.is_file():
        raise CorruptCheckpointError(meta_file, "is missing (the save did not finish or the copy is partial)")
    try:
        meta = torch.load(meta_file, weights_only=False)
    except Exception as err:
        raise CorruptCheckpointError(meta_file, f"cannot be read ({type(err).__name__}: {err})") from err
    info = meta.get("dsv3") if isinstance(meta, dict) else None
    if not isinstance(info, dict) or "format_version" not in info:
        raise CorruptCheckpointError(meta_file, "holds no `dsv3` entry (format version, mesh, model config)")
    if info["format_version"] > FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {path} has format version {info['format_version']}; this lightning-dsv3 reads up "
            f"to version {FORMAT_VERSION}: upgrade lightning-dsv3 to load it"
        )
    if not index_file.is_file():
        raise CorruptCheckpointError(index_file, "is missing (DCP's index of the stored tensors)")
    reader = _IndexedReader(path)
    try:
        index = reader.read_metadata()
    except Exception as err:
        raise CorruptCheckpointError(index_file, f"cannot be read ({type(err).__name__}: {err})") from err
    needed: dict[str, int] = {}
    for item in (index.storage_data or {}).values():
        end = item.offset + item.length
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        shard = path / name
        if not shard.is_file():
            raise CorruptCheckpointError(shard, f"is missing ({INDEX_FILE} lists it)")
        size = shard.stat().st_size
        if size < end:
            raise CorruptCheckpointError(shard, f"is truncated: {size} bytes, {INDEX_FILE} needs {end}")
    return meta, reader


def _step_of(meta: dict[str, Any]) -> int:
    return int(meta.get("global_step", -1))


def newest_good(directory: Path, skip: Path | None = None) -> tuple[Path | None, list[str]]:
    """The good checkpoint of `directory` with the highest step (then the newest), and why others failed.

    Temporary folders of a save in progress are never candidates.
    """
    found: list[tuple[int, float, Path]] = []
    problems: list[str] = []
    for candidate in sorted(directory.iterdir()) if directory.is_dir() else []:
        if candidate == skip or candidate.name.endswith(_PARTIAL_SUFFIXES) or not candidate.is_dir():
            continue
        try:
            meta = verify(candidate)
        except (CorruptCheckpointError, ValueError) as err:
            problems.append(str(err))
            continue
        found.append((_step_of(meta), candidate.stat().st_mtime, candidate))
    return (max(found)[2] if found else None), problems


def resolve(path: Path) -> Path:
    """What to load for `path`: `path` itself when it verifies.

    When it does not and it is a `last*.ckpt` (what `ckpt_path="last"` resolves to), the newest good
    checkpoint beside it is returned instead, with a warning that names the bad one; with none good,
    the error about `path` is raised. Any other bad path raises its error.
    """
    try:
        verify(path)
        return path
    except (CorruptCheckpointError, ValueError) as err:
        if not _LAST.match(path.name):
            raise
        fallback, problems = newest_good(path.parent, skip=path)
        if fallback is None:
            raise
        warnings.warn(
            f"{err}; resuming from the newest good checkpoint beside it, {fallback}"
            + (f" (also unusable: {'; '.join(problems)})" if problems else ""),
            stacklevel=2,
        )
        return fallback


@torch.no_grad()
def load(
    path: Path, module: nn.Module, reducer: GradientReducer | None, config: ModelConfig
) -> dict[str, Any]:
    """Load the model (and optimizer) state this rank holds from `path`; returns the Lightning meta.

    The folder is verified first; a checkpoint of another model (a name this model needs is absent,
    or stored with another shape) is refused with the config fields that differ.
    """
    meta, reader = _verified(path)
    index = reader.read_metadata().state_dict_metadata
    entries = _model_copies(module)
    missing = sorted(k for k in entries if k not in index)
    reshaped = sorted(
        k for k, copies in entries.items() if k in index and tuple(index[k].size) != tuple(copies[0].shape)
    )
    if missing or reshaped:
        what = f"lacks {len(missing)} entries this model needs, e.g. {missing[:3]}" if missing else ""
        if reshaped:
            key = reshaped[0]
            what += " and " if what else ""
            what += (
                f"stores {len(reshaped)} with another shape, e.g. {key}: {tuple(index[key].size)}, "
                f"here {tuple(entries[key][0].shape)}"
            )
        diff = _config_diff(meta["dsv3"]["model_config"], config)
        if not diff:
            raise CorruptCheckpointError(
                path / INDEX_FILE, f"disagrees with its meta.pt's model config: it {what}"
            )
        raise ValueError(
            f"checkpoint {path} was written for another model: it {what}; it was saved with {diff}; build "
            "the module with the checkpoint's preset and model_overrides"
        )
    try:
        _load_copies(reader, entries)
        if reducer is not None:
            _load_optimizer(reader, module, reducer, index)
            _restore_param_groups(reducer.optimizer, meta, path)
    except (RuntimeError, OSError, EOFError, CheckpointException) as err:
        raise CorruptCheckpointError(
            path, f"has a shard that cannot be read ({type(err).__name__}: {err})"
        ) from err
    return meta


def _config_diff(stored: dict[str, Any], config: ModelConfig) -> str:
    """The model config fields in which `stored` differs from `config` ("" when none does)."""
    ours = dataclasses.asdict(config)
    return ", ".join(
        f"{k}={stored[k]!r} (this model: {ours[k]!r})" for k in ours if k in stored and stored[k] != ours[k]
    )


def _load_optimizer(
    reader: _IndexedReader, module: nn.Module, reducer: GradientReducer, stored: dict[str, Any]
) -> None:
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
    _load_copies(reader, targets)
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
