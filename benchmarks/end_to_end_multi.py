"""End to end on several devices: one model and global batch in every DSV3Strategy layout, against
Lightning's DDP and FSDP strategies; tokens/s and MFU.

  ddp        Lightning's DDPStrategy (data parallel, AdamW replicated)
  fsdp       Lightning's FSDPStrategy, each decoder layer a unit (GPUs only: Lightning refuses it on CPU)
  dsv3:...   DSV3Strategy with the layout after the colon, e.g. dsv3:dp=2, dsv3:ep=2,
             dsv3:pp=2,schedule=dualpipev,n_microbatches=8; dp is inferred from the world size

Every variant trains the same model from the same initial weights on `--global-batch` sequences per
step, split over the data slices of its layout (world / pp), from the standard-library corpus. Speed
is the median step after warm-up on rank 0 (the optimizer step included), tokens/s counts the whole
global batch, and MFU divides the model FLOPs of a step (`lightning_dsv3.flops.train_flops`: matmuls
only, causal attention halved) by the step time, the world size and the bf16 matmul peak measured on
one GPU in the same process. The loss is the mean of the last five steps; layouts slice the global
batch differently, so losses agree only up to the data order.

    torchrun --nproc_per_node 2 -m benchmarks.end_to_end_multi                 # GPUs, NCCL, mini preset
    torchrun --nproc_per_node 2 -m benchmarks.end_to_end_multi --preset debug --seq-len 32 \\
        --global-batch 8 --steps 3 --warmup 1                                  # CPU small mode, gloo
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, Strategy

from benchmarks.end_to_end import StepTimer, matmul_peak_tflops
from benchmarks.results_io import markdown_table, write_result
from lightning_dsv3 import DSV3Strategy
from lightning_dsv3.config import get_preset
from lightning_dsv3.data import DSV3DataModule
from lightning_dsv3.flops import train_flops
from lightning_dsv3.model.block import Block
from lightning_dsv3.module import DeepSeekV3Module


def default_variants(world: int) -> list[str]:
    """DDP, FSDP, and DSV3Strategy as pure data, pure expert, and pp=2 DualPipe / DualPipeV layouts."""
    variants = ["ddp", "fsdp", f"dsv3:dp={world}", f"dsv3:ep={world}"]
    if world % 2 == 0:
        ep = world // 2
        variants += [f"dsv3:pp=2,ep={ep},schedule={s},n_microbatches=8" for s in ("dualpipe", "dualpipev")]
    return variants


def parse_layout(text: str) -> dict[str, Any]:
    """ "pp=2,ep=1,schedule=dualpipe" -> DSV3Strategy keyword arguments."""
    layout: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        layout[key] = value if key == "schedule" else int(value)
    return layout


def make_strategy(variant: str) -> tuple[Strategy, int]:
    """The strategy of a variant and its pipeline depth (data slices = world / pp)."""
    if variant == "ddp":
        return DDPStrategy(), 1
    if variant == "fsdp":
        return FSDPStrategy(auto_wrap_policy={Block}), 1
    kind, _, layout = variant.partition(":")
    if kind != "dsv3":
        raise ValueError(f"unknown variant {variant!r}: use ddp, fsdp or dsv3:<layout>")
    kwargs = parse_layout(layout)
    return DSV3Strategy(**kwargs), kwargs.get("pp", 1)


def train(variant: str, args: argparse.Namespace, world: int) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    strategy, pp = make_strategy(variant)
    slices = world // pp
    if args.global_batch % slices:
        raise ValueError(f"--global-batch {args.global_batch} does not split into {slices} data slices")
    L.seed_everything(0)
    module = DeepSeekV3Module(
        preset=args.preset, model_overrides={"max_seq_len": args.seq_len, "original_seq_len": args.seq_len},
        lr=args.lr, warmup_steps=5,
    )  # fmt: skip
    data = DSV3DataModule(
        seq_len=args.seq_len, batch_size=args.global_batch // slices, max_bytes=16 * 2**20, seed=0
    )
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=world, strategy=strategy, max_steps=args.steps,
        precision="bf16-mixed" if cuda else "32-true", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[timer],
    )  # fmt: skip
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, data)
    peak = torch.tensor(
        [torch.cuda.max_memory_allocated() if cuda else 0], device=trainer.strategy.root_device
    )
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return {"step_s": timer.step_s, "losses": timer.losses, "peak_bytes": int(peak)}


def report(results: dict[str, Any], args: argparse.Namespace, world: int) -> None:
    """Rank 0: the table, printed and written to benchmarks/results/."""
    cuda = torch.cuda.is_available()
    config = get_preset(args.preset, max_seq_len=args.seq_len, original_seq_len=args.seq_len)
    flops = train_flops(config, args.global_batch, args.seq_len)
    peak = matmul_peak_tflops() if cuda else float("nan")
    tokens = args.global_batch * args.seq_len
    rows = []
    for name, r in results.items():
        step_s = statistics.median(r["step_s"][args.warmup :] or r["step_s"])
        mfu = f"{flops / step_s / world / (peak * 1e12):.1%}" if cuda else "—"
        memory = f"{r['peak_bytes'] / 2**30:.1f}" if cuda else "—"
        loss = statistics.mean(r["losses"][-5:])
        rows.append(
            [name, f"{step_s * 1e3:.1f}", f"{tokens / step_s:,.0f}", f"{tokens / step_s / world:,.0f}",
             mfu, memory, f"{loss:.4f}"]
        )  # fmt: skip
    skipped = "" if cuda else " (fsdp left out: Lightning's FSDPStrategy needs GPUs)"
    body = (
        f"preset {args.preset}, {world} devices, global batch {args.global_batch} x {args.seq_len} tokens, "
        f"{args.steps} steps ({args.warmup} warm-up), bf16 matmul peak {peak:.0f} TFLOP/s per device "
        "(MFU on GPUs only), "
        f"model FLOPs/step {flops:.3e}{skipped}\n\n"
        + markdown_table(
            [
                "variant",
                "step ms (median)",
                "tokens/s",
                "tokens/s per device",
                "MFU",
                "peak GiB (max rank)",
                "loss, last 5 steps",
            ],
            rows,
        )  # fmt: skip
    )
    write_result(f"end_to_end_multi-{args.preset}-{world}x", body)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--global-batch", type=int, help="sequences per step (default: 8 per device)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the speed median")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--variants", help="separated by ';' (layouts use commas); default: all")
    args = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    args.global_batch = args.global_batch or 8 * world
    cuda = torch.cuda.is_available()
    variants = args.variants.split(";") if args.variants else default_variants(world)
    if not cuda and "fsdp" in variants:
        variants.remove("fsdp")  # Lightning's FSDPStrategy needs GPUs
    results = {v: train(v, args, world) for v in variants}
    if dist.get_rank() == 0:
        report(results, args, world)
    # every rank leaves its process groups: a rank that exits while rank 0 still reports can
    # abort in gloo's threads at interpreter shutdown
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
