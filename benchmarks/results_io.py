"""Shared by the benchmark scripts: describe the device and write a dated result file, and the options
of the payload-size sweeps.

Every figure quoted in README or docs comes from a file written here, with the device, the torch
version, the command and the date beside the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"CPU ({platform.processor() or platform.machine()})"


def command_line() -> str:
    """The command that started this process, as a reader would retype it.

    `python -m module` when run as a module (the scripts import `benchmarks.*`, so they run from the
    repository root that way), and torchrun's own command line, with its process counts, when
    torchrun started it (it sets TORCHELASTIC_RUN_ID in every worker).
    """
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    target = f"-m {spec.name}" if spec is not None else shlex.quote(sys.argv[0])
    args = " ".join(shlex.quote(a) for a in sys.argv[1:])
    launcher = "python"
    if "TORCHELASTIC_RUN_ID" in os.environ:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        nodes = int(os.environ.get("WORLD_SIZE", str(per_node))) // per_node
        launcher = f"torchrun --nproc_per_node {per_node}" + (f" --nnodes {nodes}" if nodes > 1 else "")
    return f"{launcher} {target} {args}".rstrip()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), around a timed region."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median milliseconds of `fn()` over `reps` runs after two warm-up runs: CUDA events around each
    run on GPUs (the device's time), the host clock on CPUs."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    def cell(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(name: str, body: str, out_dir: Path | None = None) -> Path:
    """Print `body` and write it with device, torch version, command and date to results/.

    DSV3_RESULTS_DIR redirects the file (the test suite's small runs write to a temporary folder).
    """
    today = dt.date.today().isoformat()
    device = device_name()
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    folder = out_dir or Path(os.environ.get("DSV3_RESULTS_DIR", RESULTS))
    path = folder / f"{name}-{slug}-{today}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    command = command_line()
    text = (
        f"# {name}\n\n- date: {today}\n- device: {device}\n- torch: {torch.__version__}\n"
        f"- command: `{command}`\n\n{body}\n"
    )
    path.write_text(text)
    print(text)
    return path


def payload_sweep_parser(doc: str) -> argparse.ArgumentParser:
    """The options of the scripts that sweep payload sizes (codec_throughput, dispatch), one set so their
    tables line up: rows of --dim channels, --min-mib to --max-mib MiB, each size timed --reps times."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-mib", type=int, default=1)
    parser.add_argument("--max-mib", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=7168, help="channels per row (DeepSeek-V3: 7168)")
    parser.add_argument("--reps", type=int, default=10)
    return parser


def microbatch_step_parser(doc: str) -> argparse.ArgumentParser:
    """The options of the scripts that time steps of micro-batches (pipeline_schedules, exposed_exchange):
    the preset, --n-microbatches of --micro-batch sequences of --seq-len tokens, --steps timed after
    --warmup (which must cover compilation under --compile: `Transformer.compile_parts` on every chunk)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-batch")
    parser.add_argument("--n-microbatches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation included)")
    parser.add_argument("--compile", action="store_true", help="Transformer.compile_parts() on every chunk")
    return parser


def checked_step_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse `microbatch_step_parser`'s options, refusing counts that leave nothing to time."""
    args = parser.parse_args()
    if min(args.micro_batch, args.n_microbatches, args.steps) < 1 or args.warmup < 0:
        parser.error("--micro-batch, --n-microbatches and --steps must be at least 1, --warmup at least 0")
    return args


def payload_sizes_mib(args: argparse.Namespace) -> list[int]:
    """The powers of two from args.min_mib to args.max_mib."""
    return [2**i for i in range(args.max_mib.bit_length()) if args.min_mib <= 2**i <= args.max_mib]
