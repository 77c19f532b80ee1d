"""Measured stage costs: what a decoder layer, the head and the embedding take on the device.

The FLOP model (`partition`'s default) balances stages by arithmetic, which is right only where
every piece runs at the same efficiency. It does not: measured on two H100s (mini, compiled,
8 x 1024-token micro-batches), the FLOP cut gave stage 0 seven layers and stage 1 five plus the head
(the head's 32K-wide GEMM is 2.7 layers of FLOPs but runs far faster per FLOP), and stage 0 was busy
1.7x as long as stage 1 under torch's 1F1B, 2.3x under ours
(benchmarks/results/pipeline_schedules-mini-pp2-compile-mb8-*). Where small
micro-batches leave the host as the bound, a layer costs its kernel launches whatever its FLOPs.
Timing each kind of piece once on the device and cutting by those times balances what really runs.

    python -m lightning_dsv3.pipeline.costs --preset mini --micro-batch 8 --compile --pp 2

prints the measured costs and the cut they give next to the FLOP model's; pass the costs to
`DSV3Strategy(layer_costs=...)`. Every rank takes rank 0's cut, so ranks that measured on their own
cannot disagree.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lightning_dsv3.config import ModelConfig, get_preset
from lightning_dsv3.model.transformer import Transformer
from lightning_dsv3.pipeline.partition import partition
from lightning_dsv3.pipeline.schedules import make_schedule

PRECISIONS = ("bf16-mixed", "bf16-true", "32-true")


@dataclass(frozen=True)
class StageCosts:
    """Forward + backward seconds of each decoder layer, of the last stage's head (final norm, output
    head, loss and the MTP modules) and of the first stage's embedding, for `partition`."""

    layers: tuple[float, ...]
    head: float
    embed: float = 0.0


def measure_stage_costs(
    config: ModelConfig,
    device: torch.device | str,
    micro_batch: int = 1,
    seq_len: int | None = None,
    precision: str = "bf16-mixed",
    compile: bool = False,
    repeats: int = 5,
) -> StageCosts:
    """Time one layer of each kind (dense, MoE), the head and the embedding on `device`.

    A layer kind is timed once and its time given to every layer of that kind: the layers of a kind
    run the same kernels. `precision` is Lightning's ("bf16-mixed": fp32 weights under autocast,
    "bf16-true", "32-true"); `compile` compiles as a pipelined `DeepSeekV3Module(compile=True)` does.
    Medians of `repeats` timed runs after two untimed ones (compilation included), each between two
    synchronisations (a fixed few microseconds added to every piece). What is not timed: the expert
    all-to-all (every expert is local here, so with ep > 1 an MoE layer's exchange is left out) and
    fp8 conversion; a layer is timed whole, as the pipeline runs every micro-batch that no FB
    interleaves.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}")
    device = torch.device(device)
    seq = seq_len or config.max_seq_len
    kinds: dict[bool, int] = {}
    for i in range(config.n_layers):
        kinds.setdefault(config.is_moe_layer(i), i)
    model = Transformer(config, sorted(kinds.values()), with_embedding=True, with_head=True)
    model.init_weights(0)
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    model.to(device=device, dtype=dtype)
    if compile:
        model.compile_parts(pipelined=True)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if precision == "bf16-mixed"
        else contextlib.nullcontext()
    )
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (micro_batch, seq + 1), generator=gen).to(device)
    hidden = torch.randn(micro_batch, seq, config.dim, generator=gen).to(device, dtype)
    cos, sin = model.rope(seq)

    def timed(fn: Callable[[], torch.Tensor]) -> float:
        def run() -> None:
            with autocast:
                out = fn()
            out.backward(torch.ones_like(out) if out.dim() == 0 else hidden.to(out.dtype))
            model.zero_grad(set_to_none=True)

        for _ in range(2):
            run()
        times = []
        for _ in range(repeats):
            _synchronize(device)
            start = time.perf_counter()
            run()
            _synchronize(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    blocks = {block.layer_id: block for block in model.blocks()}
    per_kind = {
        moe: timed(lambda b=blocks[i]: b(hidden.detach().requires_grad_(), cos, sin))
        for moe, i in kinds.items()
    }
    head = timed(lambda: model.loss(hidden.detach().requires_grad_(), tokens).loss)
    embed = timed(lambda: model.embed_tokens(tokens[:, :-1]))
    layers = tuple(per_kind[config.is_moe_layer(i)] for i in range(config.n_layers))
    return StageCosts(layers=layers, head=head, embed=embed)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_dsv3.pipeline.costs",
        description="Time a layer of each kind, the head and the embedding; show the stage cut they give.",
    )
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--precision", default="bf16-mixed", choices=PRECISIONS)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--n-microbatches", type=int, default=8)
    args = parser.parse_args()
    config = get_preset(args.preset)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    costs = measure_stage_costs(config, device, args.micro_batch, args.seq_len, args.precision, args.compile)
    n_stages = make_schedule(args.schedule, args.pp, args.n_microbatches).n_stages
    seq = args.seq_len or config.max_seq_len
    measured = partition(config, n_stages, seq, costs.layers, costs.head, costs.embed)
    by_flops = partition(config, n_stages, seq)
    print(f"layers (ms): {[round(c * 1e3, 3) for c in costs.layers]}")
    print(f"head (ms): {costs.head * 1e3:.3f}   embedding (ms): {costs.embed * 1e3:.3f}")
    print(f"cut by these times: {[(r.start, r.stop) for r in measured]}")
    print(f"cut by the FLOP model: {[(r.start, r.stop) for r in by_flops]}")


if __name__ == "__main__":
    main()
