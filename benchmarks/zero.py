"""ZeRO-1 against replicated optimizer state: bytes per rank and step time on one model, dp = world.

The same DeepSeekV3Module, data and AdamW settings trained four ways on N data-parallel ranks:

  ddp          Lightning's DDPStrategy, AdamW replicated on every rank
  ddp-zero     Lightning's DDPStrategy with torch's ZeroRedundancyOptimizer around the same AdamW:
               each rank keeps the moments of its 1/N of the parameters (whole tensors per rank)
  dsv3         DSV3Strategy(zero=False): our gradient reduction, AdamW replicated
  dsv3-zero1   DSV3Strategy(zero=True): reduce-scatter of flat buckets, each rank steps its 1/N
               shard (fp32 parameters are their own master; bf16 ones get an fp32 copy) with its
               moments, then all-gathers the parameters

Bytes are counted from the tensors each rank holds after a step (callbacks/memory.py): weights,
gradients (ZeRO-1's master gradients included) and optimizer state (moments, and ZeRO-1's fp32
master shards of bf16 parameters), the largest rank's; on GPUs also the CUDA allocator's peak. Step
time is the median after warm-up. The loss of the last step shows the four train the same model
(they differ only by reduction order, and DDP's router bias follows rank 0's expert load, broadcast
with the buffers).

    torchrun --nproc_per_node 2 -m benchmarks.zero                         # GPUs, NCCL, mini preset
    torchrun --nproc_per_node 2 -m benchmarks.zero --preset debug --seq-len 32 --batch 2 --steps 3 --warmup 1
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.optim import ZeroRedundancyOptimizer

from benchmarks.end_to_end import StepTimer
from benchmarks.results_io import markdown_table, write_result
from lightning_dsv3 import DSV3Strategy
from lightning_dsv3.callbacks.memory import grad_bytes, optimizer_bytes
from lightning_dsv3.module import DeepSeekV3Module

# ours first: with torch's ZeroRedundancyOptimizer trained before DSV3Strategy in one process, rank 1
# aborted at interpreter exit in about 1 CPU run of 6 (gloo, torch 2.13); in this order, 0 of 10
VARIANTS = ("dsv3", "dsv3-zero1", "ddp", "ddp-zero")
MIB = 2**20


class ZeroRedundancyModule(DeepSeekV3Module):
    """DeepSeekV3Module with torch's ZeroRedundancyOptimizer around its AdamW (same groups, same schedule)."""

    def make_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        return ZeroRedundancyOptimizer(
            groups, optimizer_class=torch.optim.AdamW, lr=self.hparams.lr, betas=tuple(self.hparams.betas)
        )


class MemoryProbe(L.Callback):
    """Bytes of weights, gradients and optimizer state on this rank, after the first optimizer steps."""

    def __init__(self) -> None:
        self.bytes: dict[str, float] = {}

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_before_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule, optimizer: Any) -> None:
        self.bytes["grads"] = grad_bytes(module, _inner(trainer.optimizers))

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        self.bytes["weights"] = sum(p.numel() * p.element_size() for p in module.parameters())
        self.bytes["optimizer"] = optimizer_bytes(module, _inner(trainer.optimizers))
        if torch.cuda.is_available():
            self.bytes["peak"] = torch.cuda.max_memory_allocated()


def _inner(optimizers: list[Any]) -> list[torch.optim.Optimizer]:
    """ZeroRedundancyOptimizer keeps its rank's state in the optimizer it wraps."""
    return [getattr(opt, "optim", opt) for opt in optimizers]


def train(variant: str, args: argparse.Namespace, world: int) -> dict[str, Any]:
    L.seed_everything(0)
    cuda = torch.cuda.is_available()
    module_class = ZeroRedundancyModule if variant == "ddp-zero" else DeepSeekV3Module
    module = module_class(
        preset=args.preset, model_overrides={"max_seq_len": args.seq_len, "original_seq_len": args.seq_len},
        lr=args.lr, warmup_steps=2,
    )  # fmt: skip
    strategy = DDPStrategy() if variant.startswith("ddp") else DSV3Strategy(zero=variant == "dsv3-zero1")
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(
        0, module.config.vocab_size, (args.batch * world * args.steps, args.seq_len + 1), generator=gen
    )
    timer, probe = StepTimer(), MemoryProbe()
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=world, strategy=strategy, max_steps=args.steps,
        precision="bf16-mixed" if cuda else "32-true", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[timer, probe],
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(rows, batch_size=args.batch))
    per_rank: list[Any] = [None] * world
    dist.all_gather_object(per_rank, probe.bytes)
    largest = {k: max(r[k] for r in per_rank) for k in per_rank[0]}
    return {"step_s": timer.step_s, "loss": timer.losses[-1], "bytes": largest}


def report(results: dict[str, Any], args: argparse.Namespace, world: int) -> None:
    """Rank 0: the table, printed and written to benchmarks/results/."""
    rows = []
    for name, r in results.items():
        b = r["bytes"]
        step_s = statistics.median(r["step_s"][args.warmup :] or r["step_s"])
        peak = f"{b['peak'] / MIB:,.1f}" if "peak" in b else "—"
        total = b["weights"] + b["grads"] + b["optimizer"]
        rows.append(
            [name, f"{b['weights'] / MIB:,.1f}", f"{b['grads'] / MIB:,.1f}", f"{b['optimizer'] / MIB:,.1f}",
             f"{total / MIB:,.1f}", peak, f"{step_s * 1e3:.1f}", f"{r['loss']:.4f}"]
        )  # fmt: skip
    body = (
        f"preset {args.preset}, dp={world}, {args.batch} x {args.seq_len} tokens per rank and step, "
        f"{args.steps} steps ({args.warmup} warm-up), AdamW; MiB per rank (the largest rank)\n\n"
        + markdown_table(
            [
                "variant",
                "weights",
                "grads",
                "optimizer state",
                "weights+grads+optimizer",
                "peak allocated",
                "step ms (median)",
                "loss, last step",
            ],
            rows,
        )  # fmt: skip
    )
    write_result(f"zero-{args.preset}-dp{world}", body)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank and step")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    results = {v: train(v, args, world) for v in args.variants.split(",")}
    if dist.get_rank() == 0:
        report(results, args, world)
    dist.barrier()  # every rank leaves its process groups before exit
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
