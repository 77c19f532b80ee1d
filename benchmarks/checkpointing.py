"""What each activation-checkpointing option saves in memory and costs in time, in one table.

Every option of `ModelConfig.activation_checkpointing` trains the same model on the same batch (bf16
autocast on GPU, fused AdamW), each in a fresh process so no option's memory or allocator state leaks
into the next one's peak. For each: the median step time over
the timed steps (CUDA events on GPU), the peak memory of the last step (torch.cuda.max_memory_allocated)
and the bytes autograd saves for one forward (the activations the option keeps), each against "none".

    python -m benchmarks.checkpointing                                   # GPU, mini preset
    python -m benchmarks.checkpointing --preset debug --seq-len 64 --batch 2 --steps 3 --warmup 1  # CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from benchmarks.results_io import markdown_table, write_result
from lightning_dsv3.config import CHECKPOINTING, get_preset
from lightning_dsv3.model.transformer import Transformer
from lightning_dsv3.plan.measure import saved_storages

MIB = 2**20


def step_ms(step: Callable[[], None], cuda: bool) -> float:
    """Milliseconds one call of `step` takes: CUDA events around it on GPU, the host clock on CPU."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3


def saved_bytes(model: Transformer, tokens: torch.Tensor, cuda: bool) -> int:
    """Bytes of the distinct storages autograd keeps for backward in one forward (parameters excluded)."""
    with torch.autocast("cuda", torch.bfloat16, enabled=cuda), saved_storages(model) as saved:
        loss = model.training_loss(tokens).loss
    nbytes = saved.nbytes
    del loss
    return nbytes


def measure(option: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Train `args.steps` steps with `option`; return median step ms, last step's peak and saved bytes."""
    cuda = device.type == "cuda"
    config = get_preset(
        args.preset, max_seq_len=args.seq_len, original_seq_len=args.seq_len,
        activation_checkpointing=option, attn_pad_v=cuda,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights(0)
    model.to(device)
    if args.compile:
        for block in model.blocks():
            block.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq_len + 1), device=device)

    def step() -> None:
        with torch.autocast("cuda", torch.bfloat16, enabled=cuda):
            loss = model.training_loss(tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        ms = step_ms(step, cuda)
        if i >= args.warmup:
            times.append(ms)
    peak = torch.cuda.max_memory_allocated(device) if cuda else float("nan")
    saved = saved_bytes(model, tokens, cuda)
    return {"ms": statistics.median(times), "peak": peak, "saved": saved}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    parser.add_argument("--options", nargs="+", default=list(CHECKPOINTING), choices=CHECKPOINTING)
    parser.add_argument("--one", choices=CHECKPOINTING, help=argparse.SUPPRESS)  # a child: print JSON
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.one:
        print(json.dumps(measure(args.one, args, device)))
        return
    if "none" not in args.options:
        parser.error("--options must include 'none': every row is compared with it")

    results = {}
    for option in args.options:
        child = [sys.executable, "-m", "benchmarks.checkpointing", *sys.argv[1:], "--one", option]
        out = subprocess.run(child, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"checkpointing={option!r} failed:\n{out.stderr[-3000:]}")
        results[option] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results["none"]
    rows = []
    for option, r in results.items():
        rows.append([
            option,
            f"{r['ms']:.1f}",
            f"{r['ms'] / base['ms'] - 1:+.1%}",
            f"{r['peak'] / MIB:,.0f}" if device.type == "cuda" else "-",
            f"{1 - r['peak'] / base['peak']:.1%}" if device.type == "cuda" else "-",
            f"{r['saved'] / MIB:,.0f}",
            f"{1 - r['saved'] / base['saved']:.1%}",
        ])  # fmt: skip
    header = ["checkpointing", "step ms (median)", "time cost vs none", "peak MiB", "peak saved",
              "activations MiB (1 forward)", "activations saved"]  # fmt: skip
    body = (
        f"preset {args.preset}, batch {args.batch} x seq {args.seq_len}, one device, bf16 autocast on "
        f"GPU, fused AdamW, compile={args.compile}; median of {args.steps} steps after {args.warmup} "
        "warm-up steps; peak = max_memory_allocated over the last step; activations = distinct "
        "storages autograd saves in one forward\n\n" + markdown_table(header, rows)
    )
    write_result(f"checkpointing-{args.preset}", body)


if __name__ == "__main__":
    main()
