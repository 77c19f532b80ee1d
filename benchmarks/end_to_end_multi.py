"""End to end on several devices: one model and global batch in every DSV3Strategy layout, against
Lightning's DDP and FSDP strategies; tokens/s, MFU, and each layout's loss curve against one device's.

  ddp        Lightning's DDPStrategy (data parallel, AdamW replicated)
  fsdp       Lightning's FSDPStrategy, each decoder layer a unit (GPUs only: Lightning refuses it on CPU)
  dsv3:...   DSV3Strategy with the layout after the colon, e.g. dsv3:dp=2, dsv3:ep=2,
             dsv3:pp=2,schedule=dualpipev,n_microbatches=8; dp is inferred from the world size; plain
             `dsv3` is pp = dp = ep = 1 (the one-device baseline below)
  compile=1  after any of them (ddp:compile=1, dsv3:pp=2,compile=1) builds the module with
             `DeepSeekV3Module(compile=True)`; `--compile` does so for every variant;
             compile=MODE takes torch.compile's mode (compile=reduce-overhead: CUDA graphs, which a
             pipeline stage captures per micro-batch in flight)
  gc=N       after any of them: the `GarbageCollection(every_n_steps=N)` callback (Python's
             automatic collection off, a collection every N steps on every rank at once)

Every variant trains the same model from the same initial weights on `--global-batch` sequences per
step, split over the data slices of its layout (world / pp), from the standard-library corpus. Speed
is the median step after warm-up on rank 0 (the optimizer step included), tokens/s counts the whole
global batch, and MFU divides the model FLOPs of a step (`lightning_dsv3.flops.train_flops`: matmuls
only, causal attention halved) by the step time, the world size and the bf16 matmul peak measured on
one GPU in the same process.

Loss curves. Each step's loss is the mean objective over the whole global batch, on rank 0:
DSV3Strategy's step already returns it on every rank (its `_global_losses` sums the last stages'
micro-batch losses over the world and divides by micro-batches x data slices, under any pp, dp, ep),
while Lightning's DDP and FSDP return each rank's mean over its own slice, which are averaged here.
Every layout and a one-device run read the same global batches in the same steps: the data module's
sampler shuffles the windows by its seed and deals consecutive windows of one permutation round-robin
to the data slices, so step k's global batch is windows [kB, (k+1)B) of that permutation whatever
the number of slices (only their order within the batch differs, which a mean loss does not see),
and a fingerprint of every global batch checks it. The curves then differ by numerics only
(reduction order; bf16 on GPUs). A run with `--dump-losses PATH` writes its curves and fingerprints;
`--curve-from PATH` reads the first curve of such a file as the baseline and reports, per variant,
the largest and the mean relative deviation from it over all steps, whether the global batches were
the same, and a table of the curves every 5th step. The baseline runs in one process:

    python -m benchmarks.end_to_end_multi --variants dsv3 --global-batch 16 \\
        --dump-losses one_gpu.json                                             # one GPU
    torchrun --nproc_per_node 2 -m benchmarks.end_to_end_multi \\
        --curve-from one_gpu.json                                              # GPUs, NCCL, mini preset
    python -m benchmarks.end_to_end_multi --preset debug --seq-len 32 --global-batch 8 --steps 3 \\
        --warmup 1 --variants dsv3 --dump-losses one.json                      # CPU small mode ...
    torchrun --nproc_per_node 2 -m benchmarks.end_to_end_multi --preset debug --seq-len 32 \\
        --global-batch 8 --steps 3 --warmup 1 --curve-from one.json            # ... gloo
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, Strategy

from benchmarks.end_to_end import StepTimer, matmul_peak_tflops
from benchmarks.results_io import markdown_table, write_result
from lightning_dsv3 import DSV3Strategy
from lightning_dsv3.callbacks import GarbageCollection
from lightning_dsv3.config import get_preset
from lightning_dsv3.data import DSV3DataModule
from lightning_dsv3.flops import train_flops
from lightning_dsv3.model.block import Block
from lightning_dsv3.module import DeepSeekV3Module

CURVE_SETTINGS = ("preset", "seq_len", "global_batch", "steps", "lr")  # what a baseline must share
CURVE_EVERY = 5  # the curve table's step spacing


def default_variants(world: int) -> list[str]:
    """DDP, FSDP, and DSV3Strategy as pure data, pure expert, and pp=2 DualPipe / DualPipeV layouts."""
    variants = ["ddp", "fsdp", f"dsv3:dp={world}", f"dsv3:ep={world}"]
    if world % 2 == 0:
        ep = world // 2
        variants += [f"dsv3:pp=2,ep={ep},schedule={s},n_microbatches=8" for s in ("dualpipe", "dualpipev")]
    return variants


def parse_layout(text: str) -> dict[str, Any]:
    """ "pp=2,ep=1,schedule=dualpipe,dispatch_codec=fp8" -> DSV3Strategy keyword arguments (numbers as
    int, names as given)."""
    layout: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        layout[key] = int(value) if value.isdigit() else value
    return layout


class Variant(NamedTuple):
    """One variant of the command line: the strategy's kind and layout, and the options after it."""

    kind: str
    layout: dict[str, Any]
    compile: bool | str = False  # True, or torch.compile's mode
    gc_every: int = 0  # GarbageCollection's every_n_steps; 0: Python's automatic collection


def parse_variant(variant: str) -> Variant:
    """ "dsv3:pp=2,schedule=dualpipe,compile=1,gc=50" -> Variant("dsv3", {"pp": 2, "schedule": "dualpipe"},
    True, 50)."""
    kind, _, text = variant.partition(":")
    layout = parse_layout(text)
    mode, gc_every = layout.pop("compile", 0), int(layout.pop("gc", 0))
    compile_ = mode if isinstance(mode, str) else bool(mode)
    if kind not in ("ddp", "fsdp", "dsv3"):
        raise ValueError(
            f"unknown variant {variant!r}: use ddp, fsdp or dsv3:<layout> (compile=1, gc=N optional)"
        )
    if gc_every < 0:
        raise ValueError(f"gc=N takes the steps between collections (N >= 1; 0: off), got {variant!r}")
    if kind != "dsv3" and layout:
        raise ValueError(f"{kind} takes no layout, only compile=1 and gc=N; got {variant!r}")
    return Variant(kind, layout, compile_, gc_every)


def make_strategy(variant: str) -> tuple[Strategy, int]:
    """The strategy of a variant and its pipeline depth (data slices = world / pp)."""
    kind, layout = parse_variant(variant)[:2]
    if kind == "ddp":
        return DDPStrategy(), 1
    if kind == "fsdp":
        return FSDPStrategy(auto_wrap_policy={Block}), 1
    return DSV3Strategy(**layout), layout.get("pp", 1)


class GlobalBatches(L.Callback):
    """A fingerprint of each step's global batch, to check that two runs trained on the same batches.

    Each sequence maps to a fixed random weighting of its tokens, summed over the batch: the order of
    the sequences does not change it (nor the mean loss). Kept on the device until training ends.
    """

    def __init__(self) -> None:
        self._weights: torch.Tensor | None = None
        self._local: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer: L.Trainer, module: Any, batch: torch.Tensor, idx: int) -> None:
        if self._weights is None:  # below 2^20: no global batch's sum comes near int64's range
            gen = torch.Generator().manual_seed(0)
            self._weights = torch.randint(0, 2**20, (batch.shape[1],), generator=gen).to(batch.device)
        self._local.append((batch.long() * self._weights).sum())

    def fingerprints(self, readers_per_slice: int) -> list[int]:
        """Every step's global fingerprint, on every rank: the sum over ranks, each slice read by
        `readers_per_slice` ranks (the pipeline ranks of a slice read the same batch)."""
        local = torch.stack(self._local)
        if dist.is_initialized():
            dist.all_reduce(local)
        return (local // readers_per_slice).tolist()


def global_batch_losses(losses: list[float], strategy: Strategy) -> list[float]:
    """Each step's mean loss over the whole global batch (module docstring: DSV3Strategy's steps return
    it already; Lightning's return each rank's mean over its equal slice, averaged over the ranks)."""
    if isinstance(strategy, DSV3Strategy) or not dist.is_initialized():
        return losses
    t = torch.tensor(losses, dtype=torch.float64, device=strategy.root_device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def train(variant: str, args: argparse.Namespace, world: int) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    strategy, pp = make_strategy(variant)
    options = parse_variant(variant)
    compile_ = options.compile or args.compile
    slices = world // pp
    if args.global_batch % slices:
        raise ValueError(f"--global-batch {args.global_batch} does not split into {slices} data slices")
    L.seed_everything(0)
    module = DeepSeekV3Module(
        preset=args.preset, model_overrides={"max_seq_len": args.seq_len, "original_seq_len": args.seq_len},
        lr=args.lr, warmup_steps=5, compile=compile_,
    )  # fmt: skip
    data = DSV3DataModule(
        seq_len=args.seq_len, batch_size=args.global_batch // slices, max_bytes=16 * 2**20, seed=0
    )
    timer, batches = StepTimer(), GlobalBatches()
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=world, strategy=strategy, max_steps=args.steps,
        precision="bf16-mixed" if cuda else "32-true", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[timer, batches] + ([GarbageCollection(options.gc_every)] if options.gc_every else []),
    )  # fmt: skip
    if cuda:
        # an earlier variant's objects in reference cycles (Lightning's, CUDA graphs') would still hold
        # memory and count in this variant's peak
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated() if cuda else 0
    trainer.fit(module, data)
    memory = torch.tensor(
        [torch.cuda.max_memory_allocated() if cuda else 0, held], device=trainer.strategy.root_device
    )
    dist.all_reduce(memory, op=dist.ReduceOp.MAX)
    peak, held = memory.tolist()
    return {
        "step_s": timer.step_s,
        "losses": global_batch_losses(timer.losses, trainer.strategy),
        "batches": batches.fingerprints(pp),
        "peak_bytes": int(peak),
        "held_bytes": int(held),
    }


def curve_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in CURVE_SETTINGS}


def dump_losses(path: str, results: dict[str, Any], args: argparse.Namespace, world: int) -> None:
    """Write every variant's loss curve and batch fingerprints, with the settings a comparison needs."""
    curves = {name: {"losses": r["losses"], "batches": r["batches"]} for name, r in results.items()}
    text = json.dumps({"settings": curve_settings(args), "world": world, "curves": curves}, indent=1)
    Path(path).write_text(text)


def load_baseline(path: str, args: argparse.Namespace) -> dict[str, Any]:
    """The first curve of a `--dump-losses` file, refused unless it trained the same steps on the same
    data and model as this run."""
    saved = json.loads(Path(path).read_text())
    differ = {k: (saved["settings"].get(k), v) for k, v in curve_settings(args).items()}
    differ = {k: pair for k, pair in differ.items() if pair[0] != pair[1]}
    if differ:
        found = ", ".join(f"{k}={theirs!r} (this run: {ours!r})" for k, (theirs, ours) in differ.items())
        raise ValueError(f"--curve-from {path} was run with {found}; rerun one of them with the other's")
    name, curve = next(iter(saved["curves"].items()))
    return {"name": f"{name} on {saved['world']} device(s)", **curve}


def deviations(losses: list[float], baseline: list[float]) -> list[float]:
    """|loss - baseline| / |baseline| at every step."""
    return [abs(a - b) / abs(b) for a, b in zip(losses, baseline, strict=True)]


def same_batches(batches: list[int], baseline: list[int]) -> str:
    differ = [i + 1 for i, (a, b) in enumerate(zip(batches, baseline, strict=True)) if a != b]
    return "yes" if not differ else f"no (first at step {differ[0]})"


def curve_table(results: dict[str, Any], baseline: dict[str, Any] | None, steps: int) -> str:
    """The loss of step 1, every CURVE_EVERY-th step and the last, baseline first."""
    curves = ([(baseline["name"], baseline["losses"])] if baseline else []) + [
        (name, r["losses"]) for name, r in results.items()
    ]
    shown = sorted({1, steps, *range(CURVE_EVERY, steps + 1, CURVE_EVERY)})
    rows = [[step, *(f"{losses[step - 1]:.4f}" for _, losses in curves)] for step in shown]
    return markdown_table(["step", *(name for name, _ in curves)], rows)


def report(
    results: dict[str, Any], args: argparse.Namespace, world: int, baseline: dict[str, Any] | None
) -> None:
    """Rank 0: the tables, printed and written to benchmarks/results/."""
    cuda = torch.cuda.is_available()
    config = get_preset(args.preset, max_seq_len=args.seq_len, original_seq_len=args.seq_len)
    flops = train_flops(config, args.global_batch, args.seq_len)
    peak = matmul_peak_tflops() if cuda else float("nan")
    tokens = args.global_batch * args.seq_len
    rows = []
    for name, r in results.items():
        step_s = statistics.median(r["step_s"][args.warmup :] or r["step_s"])
        mfu = f"{flops / step_s / world / (peak * 1e12):.1%}" if cuda else "—"
        memory = f"{r['peak_bytes'] / 2**30:.1f} ({r['held_bytes'] / 2**30:.1f})" if cuda else "—"
        loss = statistics.mean(r["losses"][-5:])
        against = ["—"] * 3
        if baseline is not None:
            rel = deviations(r["losses"], baseline["losses"])
            against = [
                f"{max(rel):.2e}",
                f"{statistics.mean(rel):.2e}",
                same_batches(r["batches"], baseline["batches"]),
            ]
        rows.append(
            [name, f"{step_s * 1e3:.1f}", f"{tokens / step_s:,.0f}", f"{tokens / step_s / world:,.0f}",
             mfu, memory, f"{loss:.4f}", *against]
        )  # fmt: skip
    skipped = "" if cuda else " (fsdp left out: Lightning's FSDPStrategy needs GPUs)"
    compiled = "; every variant compiled (DeepSeekV3Module(compile=True))" if args.compile else ""
    against = f"the baseline {baseline['name']} from {args.curve_from}" if baseline else "no baseline"
    body = (
        f"preset {args.preset}, {world} devices, global batch {args.global_batch} x {args.seq_len} tokens, "
        f"{args.steps} steps ({args.warmup} warm-up), bf16 matmul peak {peak:.0f} TFLOP/s per device "
        f"(MFU on GPUs only), model FLOPs/step {flops:.3e}{skipped}{compiled}. Peak: max over ranks of "
        "max_memory_allocated during the variant, after collecting what earlier variants left (in "
        "brackets: what was still allocated as the variant began). Losses are global-batch "
        f"means; deviations are relative to {against} (--curve-from), over all steps.\n\n"
        + markdown_table(
            [
                "variant",
                "step ms (median)",
                "tokens/s",
                "tokens/s per device",
                "MFU",
                "peak GiB (held before fit)",
                "loss, last 5 steps",
                "max deviation",
                "mean deviation",
                "same global batches",
            ],
            rows,
        )  # fmt: skip
        + "\n\nLoss curves (global-batch mean loss per step)\n\n"
        + curve_table(results, baseline, args.steps)
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
    parser.add_argument(
        "--compile", action="store_true", help="DeepSeekV3Module(compile=True) in every variant"
    )
    parser.add_argument("--dump-losses", metavar="PATH", help="write the loss curves as JSON (rank 0)")
    parser.add_argument("--curve-from", metavar="PATH", help="a --dump-losses file: the baseline curve")
    args = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    args.global_batch = args.global_batch or 8 * world
    baseline = load_baseline(args.curve_from, args) if args.curve_from else None  # refused before training
    cuda = torch.cuda.is_available()
    variants = args.variants.split(";") if args.variants else default_variants(world)
    kinds = [parse_variant(v)[0] for v in variants]  # a typo fails before the first variant trains
    if not cuda:  # Lightning's FSDPStrategy needs GPUs
        variants = [v for v, kind in zip(variants, kinds) if kind != "fsdp"]
    results = {v: train(v, args, world) for v in variants}
    if dist.get_rank() == 0:
        if args.dump_losses:
            dump_losses(args.dump_losses, results, args, world)
        report(results, args, world, baseline)
    # every rank leaves its process groups: a rank that exits while rank 0 still reports can
    # abort in gloo's threads at interpreter shutdown
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
