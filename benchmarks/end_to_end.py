"""End to end on one device: the same model and data trained three ways, loss curves and speed.

  plain  Lightning's default strategy, routed experts as a Python loop over experts
  auto   Lightning's default strategy, routed experts as one grouped GEMM
  dsv3   DSV3Strategy (NCCL on GPUs, gloo on CPU, world of one), grouped GEMM
  dsv3-padv  the same with V padded to the q/k head dim, so SDPA can take its flash path
  dsv3-compile  dsv3-padv with every decoder layer under torch.compile

For each: the loss of every step, tokens/s (median step time after warm-up), and MFU against the
bf16 matmul peak measured in the same process. The loss curves of `auto` and `dsv3` should agree
within bf16 noise; `dsv3` against `plain` is the speed-up of the grouped GEMM.

    python benchmarks/end_to_end.py                       # mini preset on a GPU
    python benchmarks/end_to_end.py --preset debug --steps 6 --seq-len 64 --batch 4   # CPU small mode
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import lightning as L
import torch

from benchmarks.results_io import markdown_table, write_result
from lightning_dsv3 import DSV3Strategy
from lightning_dsv3.data import DSV3DataModule
from lightning_dsv3.flops import train_flops
from lightning_dsv3.module import DeepSeekV3Module


class StepTimer(L.Callback):
    """Per-step loss and wall time (synchronised on GPUs)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.step_s: list[float] = []

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer: L.Trainer, module: Any, batch: Any, idx: int) -> None:
        self._sync()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self._sync()
        self.step_s.append(time.perf_counter() - self._t)
        self.losses.append(float(outputs["loss"]))


def matmul_peak_tflops() -> float:
    """bf16 8192^3 matmul throughput, median of 20 (GPU only)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / statistics.median(times) / 1e12


def train(variant: str, args: argparse.Namespace) -> StepTimer:
    L.seed_everything(0)
    overrides = {
        "expert_impl": "loop" if variant == "plain" else "grouped",
        "attn_pad_v": variant.endswith(("padv", "compile")),
        "max_seq_len": args.seq_len,
        "original_seq_len": args.seq_len,
    }
    module = DeepSeekV3Module(
        preset=args.preset,
        model_overrides=overrides,
        lr=args.lr, warmup_steps=5, compile=variant.endswith("compile"),
    )  # fmt: skip
    data = DSV3DataModule(seq_len=args.seq_len, batch_size=args.batch, max_bytes=16 * 2**20, seed=0)
    timer = StepTimer()
    gpu = torch.cuda.is_available()
    trainer = L.Trainer(
        accelerator="gpu" if gpu else "cpu", devices=1, max_steps=args.steps,
        strategy=DSV3Strategy() if variant.startswith("dsv3") else "auto",
        precision="bf16-mixed" if gpu else "32-true", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[timer],
        use_distributed_sampler=False,  # one process: every variant reads the data module's seeded order
    )  # fmt: skip
    trainer.fit(module, data)
    return timer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--variants", default="plain,auto,dsv3,dsv3-padv,dsv3-compile")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the speed median")
    args = parser.parse_args()

    results = {v: train(v, args) for v in args.variants.split(",")}
    from lightning_dsv3.config import get_preset

    config = get_preset(args.preset, max_seq_len=args.seq_len, original_seq_len=args.seq_len)
    flops_per_step = train_flops(config, args.batch, args.seq_len)
    peak = matmul_peak_tflops() if torch.cuda.is_available() else float("nan")
    tokens = args.batch * args.seq_len
    rows = []
    for name, t in results.items():
        step_s = statistics.median(t.step_s[args.warmup :] or t.step_s)
        tflops = flops_per_step / step_s / 1e12
        rows.append(
            [name, f"{step_s * 1e3:.1f}", f"{tokens / step_s:,.0f}", f"{tflops:.1f}", f"{tflops / peak:.1%}"]
        )
    speed = markdown_table(
        ["variant", "step ms (median)", "tokens/s", "model TFLOP/s", "MFU vs matmul peak"], rows
    )
    names = list(results)
    curve_rows = []
    for i in range(args.steps):
        curve_rows.append([i + 1, *(f"{results[n].losses[i]:.4f}" for n in names)])
    diffs = ""
    if "auto" in results and "dsv3" in results:
        a, b = results["auto"].losses, results["dsv3"].losses
        rel = [abs(x - y) / abs(x) for x, y in zip(a, b)]
        diffs = (
            f"\n\nauto vs dsv3 loss: max relative difference {max(rel):.2e}, mean {statistics.mean(rel):.2e}"
        )
    body = (
        f"preset {args.preset}, seq_len {args.seq_len}, batch {args.batch}, {args.steps} steps, "
        f"bf16 matmul peak {peak:.0f} TFLOP/s, model FLOPs/step {flops_per_step:.3e}\n\n{speed}{diffs}\n\n"
        + markdown_table(["step", *names], curve_rows)
    )
    write_result(f"end_to_end-{args.preset}", body)


if __name__ == "__main__":
    main()
