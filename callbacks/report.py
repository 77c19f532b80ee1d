"""What the callbacks share: sending scalars, images and tables to whichever loggers the Trainer has,
gathering small per-rank records, the folder pictures go to, and the base of the callbacks that report
every n optimizer steps.

Scalars go to every logger (CSV, TensorBoard, W&B, ...). Images and tables go to W&B loggers only;
the pictures are also written as PNG files, so a run without W&B still has them. Loggers write on
global rank 0 only, so per-rank data is gathered there first; every gather is a collective that all
ranks of the group must enter, which is why the callbacks call these helpers on every rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.loggers import WandbLogger

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, float], step: int) -> None:
    """Send `metrics` to every logger at `step`, as Lightning's own logging does (log, then save)."""
    if not metrics:
        return
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=step)
        logger.save()


def log_image(trainer: pl.Trainer, key: str, path: Path, step: int) -> None:
    """Send the PNG at `path` to every W&B logger under `key`."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)], step=step)


def log_table(
    trainer: pl.Trainer, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int
) -> None:
    """Send a table to every W&B logger under `key`."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key=key, columns=list(columns), data=[list(r) for r in rows], step=step)


def output_dir(trainer: pl.Trainer, dirpath: str | Path | None, name: str) -> Path:
    """`dirpath`, or `<trainer.log_dir>/<name>`. Call it on every rank: `log_dir` broadcasts."""
    if dirpath is not None:
        return Path(dirpath)
    return Path(trainer.log_dir or trainer.default_root_dir) / name


def gather(obj: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """`obj` of every rank of `group` (the world by default), in group-rank order; [obj] unlaunched."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def save_figure(fig: Figure, path: Path) -> Path:
    """Write `fig` as a PNG (creating the folder) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def new_figure(width: float, height: float) -> Figure:
    """A matplotlib Figure not tied to pyplot's global state (safe in any process, no display)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # matplotlib is a dev extra; the pictures need it
        raise ImportError(
            "the callbacks draw their pictures with matplotlib: pip install matplotlib"
        ) from err
    return Figure(figsize=(width, height), layout="constrained")


class PeriodicReport(pl.Callback):
    """Base of the callbacks that report every `every_n_steps` optimizer steps and write pictures to
    `dirpath` (default `<log_dir>/<folder>`), so the period's check and the folder's lookup live once.
    """

    folder: str  # the default subfolder of the log dir, set by each subclass

    def __init__(self, every_n_steps: int, dirpath: str | Path | None) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.dirpath = dirpath
        self._dir = Path(".")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._dir = output_dir(trainer, self.dirpath, self.folder)

    def log_figure(self, trainer: pl.Trainer, key: str, fig: Figure, step: int) -> Path:
        """Write `fig` as `<folder>_step<step>.png` in the callback's folder and send it to W&B as `key`."""
        path = save_figure(fig, self._dir / f"{self.folder}_step{step:06d}.png")
        log_image(trainer, key, path, step)
        return path
