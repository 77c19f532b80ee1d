"""Where one training step's time goes: torch.profiler over a few steps of the strategy's step.

Prints the kernels that take the most GPU time, the GPU busy fraction of the step (low means the
host cannot launch fast enough) and the step time, and writes the table to benchmarks/results/.

    python -m benchmarks.profile_step --batch 8 --seq-len 1024          # GPU, mini preset
    python -m benchmarks.profile_step --preset debug --seq-len 32 --batch 2 --steps 2   # CPU small mode
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.results_io import markdown_table, median_ms, synchronize, write_result
from lightning_dsv3.config import get_preset
from lightning_dsv3.model.transformer import Transformer

# ranges the profiler also reports as device time, spanning kernels already counted
ANNOTATIONS = {"Optimizer.step#AdamW.step", "Optimizer.zero_grad#AdamW.zero_grad"}
# calls that make the host wait for the device: a step with any of these cannot run ahead of the GPU
SYNC_OPS = {
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "aten::_local_scalar_dense",
}


def device_kernels(events: list) -> list:
    """The profiler's device kernels alone: an aten op's device time repeats the time of the kernels it
    launched, and an annotation (the optimizer's step, which under Lightning spans the whole closure)
    spans kernels already counted."""
    cuda = torch.autograd.DeviceType.CUDA
    return [e for e in events if e.device_type == cuda and e.key not in ANNOTATIONS]


def kernel_ms(call: Callable[[], object], device: torch.device, reps: int) -> Counter[str]:
    """Device milliseconds per call of each kernel `call` launches (torch.profiler, GPU only), after
    one untimed call."""
    call()
    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            call()
        synchronize(device)
    return Counter(
        {e.key: e.self_device_time_total / reps / 1e3 for e in device_kernels(prof.key_averages())}
    )


def device_ms(call: Callable[[], object], device: torch.device, reps: int) -> float:
    """Device milliseconds per call: the sum of its kernels' times (`kernel_ms`), so a call made of
    several small kernels is not charged the host's time to launch them, as it is not under CUDA
    graphs; the host clock's median on CPUs."""
    if device.type != "cuda":
        return median_ms(call, device, reps)
    return sum(kernel_ms(call, device, reps).values())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--pad-v", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile each layer and the loss")
    parser.add_argument("--compile-mode", default=None, help='torch.compile mode, e.g. "reduce-overhead"')
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--trace", default=None, help="also write a Chrome trace (.json or .json.gz) here")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    config = get_preset(
        args.preset, max_seq_len=args.seq_len, original_seq_len=args.seq_len, attn_pad_v=args.pad_v
    )
    model = Transformer(config)
    model.init_weights(0)
    model.to(device)
    if args.compile:
        model.compile_parts(args.compile_mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq_len + 1), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model.training_loss(tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):  # unprofiled: the profiler's own host cost stretches host-bound steps
        step()
    if cuda:
        torch.cuda.synchronize()
    plain_ms = (time.perf_counter() - start) / args.steps * 1e3
    start = time.perf_counter()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    step_ms = (time.perf_counter() - start) / args.steps * 1e3
    if args.trace:
        prof.export_chrome_trace(args.trace)
    syncs = sum(e.count for e in prof.key_averages() if e.key in SYNC_OPS) // args.steps
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    averages = prof.key_averages()
    if cuda:
        averages = device_kernels(averages)
    events = sorted(averages, key=lambda e: getattr(e, key), reverse=True)
    total_us = sum(getattr(e, key) for e in events)
    rows = [
        [
            e.key[:70],
            f"{getattr(e, key) / args.steps / 1e3:.2f}",
            f"{getattr(e, key) / max(total_us, 1):.1%}",
            e.count // args.steps,
        ]
        for e in events[: args.top]
    ]
    busy = total_us / args.steps / 1e3
    what = "GPU kernel time" if cuda else "CPU op time"
    body = (
        f"preset {args.preset}, batch {args.batch} x seq {args.seq_len}, pad_v={args.pad_v}, "
        f"compile={args.compile} (mode {args.compile_mode}); step {plain_ms:.1f} ms, {step_ms:.1f} ms "
        f"profiled; {what} {busy:.1f} ms per step "
        f"({busy / step_ms:.0%} of the step); host syncs per step ({', '.join(sorted(SYNC_OPS))}): "
        f"{syncs}\n\n" + markdown_table(["op / kernel", "ms per step", "share", "calls per step"], rows)
    )
    write_result(f"profile_step-{args.preset}", body)


if __name__ == "__main__":
    main()
