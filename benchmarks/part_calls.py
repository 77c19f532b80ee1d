"""One pipeline chunk recorded whole against part by part, on one device: what the cut costs.

Under expert parallelism our pipeline runtime records a forward that an FB interleaves as four parts
per layer (attention, dispatch, mlp, combine), each its own autograd graph, the communication parts
on a second CUDA stream, so that the FB step can step one micro-batch's forward against another's
backward and hide its all-to-alls (`lightning_dsv3.pipeline.overlap`); every other forward, and
every one without expert parallelism, it records whole, one graph through the chunk, as torch's
pipeline stages and the one-device model call it. What this measures is what that rule weighs: the
host time the cut adds, against the exchange time it can hide. This runs the same chunk (the
embedding and `--layers`, by default the first pipeline stage of mini at pp=2) forward and backward
each way on the same micro-batch, compiled (`compile_parts`, as a user's run) or eager, and reports
per step: the time (host clock around synchronised steps), the kernel time, the host syncs and
allocator calls, the kernels whose time differs most between whole and parts, and the host ops that
cost most in the part-wise call.

    python -m benchmarks.part_calls --compile                      # GPU, mini, layers 0-6, 8 x 1024
    python -m benchmarks.part_calls --preset debug --seq-len 32 --micro-batch 2 --layers 0-2 --steps 2
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.profile_step import SYNC_OPS, device_kernels
from benchmarks.results_io import markdown_table, synchronize, write_result
from lightning_dsv3.config import get_preset
from lightning_dsv3.model.transformer import Transformer
from lightning_dsv3.pipeline.costs import median_seconds
from lightning_dsv3.pipeline.overlap import Chain, ParamCache, Streams, Tape, forward_parts

ALLOCATOR_OPS = {"cudaMalloc", "cudaFree"}


def layer_range(text: str) -> list[int]:
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def recorded_step(
    chunk: Transformer,
    tokens: torch.Tensor,
    grad: torch.Tensor,
    streams: Streams,
    cache: ParamCache,
    whole: bool,
) -> None:
    """The chunk as our runtime's F and BW actions call it: whole (one graph, as torch's stage calls
    it; what the runtime records where no FB hides an all-to-all behind the micro-batch) or part by
    part."""
    tape, chain = Tape(), Chain()
    steps = forward_parts(
        chunk, tape, tokens[:, :-1], tokens, True, False, None, 1.0, streams, chain, cache, whole=whole
    )  # type: ignore[arg-type]
    for _ in steps:
        pass
    streams.join(chain)
    streams.resume(chain)
    for _ in tape.backward_parts(grad, False, streams, chain):
        pass
    streams.join(chain)


def measure(
    step: Callable[[], None], chunk: Transformer, steps: int, warmup: int, device: torch.device
) -> tuple[float, object]:
    """(median step ms without the profiler, the profiler over `steps` more steps)."""

    def one() -> None:
        step()
        chunk.zero_grad(set_to_none=True)

    step_ms = median_seconds(one, device, warmup, steps) * 1e3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            one()
        synchronize(device)
    return step_ms, prof.key_averages()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per micro-batch")
    parser.add_argument("--layers", default="0-6", help="first-last layer of the chunk (mini pp=2: 0-6)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation included)")
    parser.add_argument("--compile", action="store_true", help="Transformer.compile_parts() first")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    config = get_preset(args.preset, max_seq_len=args.seq_len, original_seq_len=args.seq_len, mtp_depth=0)
    chunk = Transformer(config, layer_range(args.layers), with_embedding=True, with_head=False)
    chunk.init_weights(0)
    chunk.to(device=device, dtype=dtype)
    if args.compile:
        chunk.compile_parts()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (args.micro_batch, args.seq_len + 1), generator=gen).to(
        device
    )
    grad = torch.randn(args.micro_batch, args.seq_len, config.dim, generator=gen).to(device, dtype)
    streams, one_stream, cache = Streams(device), Streams(torch.device("cpu")), {}

    ways = {
        "whole (one graph, as torch's stage)": lambda: recorded_step(
            chunk, tokens, grad, streams, cache, True
        ),
        "parts (an FB's half)": lambda: recorded_step(chunk, tokens, grad, streams, cache, False),
        # the same calls with every part on the current stream: what the second stream costs or saves
        "parts, one stream": lambda: recorded_step(chunk, tokens, grad, one_stream, cache, False),
    }
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows, kernels, hosts = [], {}, {}
    for name, step in ways.items():
        ms, averages = measure(step, chunk, args.steps, args.warmup, device)
        work = device_kernels(averages) if cuda else list(averages)
        kernels[name] = Counter({e.key: getattr(e, key) / args.steps / 1e3 for e in work})
        hosts[name] = Counter({e.key: e.self_cpu_time_total / args.steps / 1e3 for e in averages})
        calls = Counter({e.key: e.count // args.steps for e in averages})
        rows.append([
            name, f"{ms:.2f}", f"{sum(kernels[name].values()):.2f}" if cuda else "—",
            sum(calls[k] for k in SYNC_OPS), sum(calls[k] for k in ALLOCATOR_OPS),
            sum(calls[e.key] for e in work),
        ])  # fmt: skip
    whole, parts = list(kernels.values())[:2]
    diff = sorted(set(whole) | set(parts), key=lambda k: abs(parts[k] - whole[k]), reverse=True)
    kernel_rows = [
        [k[:70], f"{whole[k]:.2f}", f"{parts[k]:.2f}", f"{parts[k] - whole[k]:+.2f}"]
        for k in diff[: args.top]
    ]
    host = list(hosts.values())[1]
    host_rows = [[k[:70], f"{v:.2f}"] for k, v in host.most_common(args.top)]
    what = "kernels" if cuda else "CPU ops"
    body = (
        f"preset {args.preset} (MTP off), layers {args.layers} with the embedding, micro-batch "
        f"{args.micro_batch} x {args.seq_len} tokens, {dtype}, "
        f"{'compile_parts() (default mode)' if args.compile else 'eager'}; forward and backward, no "
        f"optimizer; median of {args.steps} steps after {args.warmup} warm-up (host clock around "
        "synchronised steps), then the profiler over as many steps. Syncs: "
        f"{', '.join(sorted(SYNC_OPS))}; allocator: {', '.join(sorted(ALLOCATOR_OPS))}.\n\n"
        + markdown_table(
            ["call", "step ms", "kernel ms", "syncs/step", "allocator calls/step", f"{what}/step"], rows
        )
        + f"\n\nThe {what} whose time differs most (ms per step):\n\n"
        + markdown_table(["kernel / op", "whole", "parts", "parts - whole"], kernel_rows)
        + "\n\nHost time per step of the part-wise call, by op (self CPU ms):\n\n"
        + markdown_table(["op", "ms"], host_rows)
    )
    print(body)
    write_result(f"part_calls-{args.preset}{'-compile' if args.compile else ''}", body)


if __name__ == "__main__":
    main()
