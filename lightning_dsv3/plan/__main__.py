"""python -m lightning_dsv3.plan: plan one layout of a cluster, or rank them all (see lightning_dsv3.plan)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from lightning_dsv3.config import CHECKPOINTING, get_preset
from lightning_dsv3.plan.activations import IMPLEMENTATIONS, PRECISIONS
from lightning_dsv3.plan.cluster import (
    SEARCH_SCHEDULES,
    format_plan,
    format_search,
    plan_runnable,
    published_hours,
    search_layouts,
)
from lightning_dsv3.plan.timing import GPUS, Efficiency


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_dsv3.plan",
        description="Memory, communication and step time of a DeepSeek-V3 layout on a GPU cluster.",
    )
    parser.add_argument("--preset", default="v3-671b")
    parser.add_argument("--gpus", type=int, default=2048)
    parser.add_argument("--gpu", default="h800", choices=sorted(GPUS))
    parser.add_argument("--pp", type=int, help="pipeline stages (with --ep: plan this layout)")
    parser.add_argument("--ep", type=int, help="expert-parallel size")
    parser.add_argument(
        "--schedule", default="dualpipe", choices=SEARCH_SCHEDULES + ("gpipe", "interleaved_1f1b")
    )
    parser.add_argument("--precision", default="fp8", choices=PRECISIONS)
    parser.add_argument("--seq-len", type=int, default=4096, help="DeepSeek-V3 pre-trained at 4K")
    parser.add_argument(
        "--global-batch", type=int, default=15360, help="sequences per step (DeepSeek-V3's final batch size)"
    )
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--checkpointing", default="selective", choices=CHECKPOINTING)
    parser.add_argument("--no-zero", action="store_true", help="replicate optimizer state")
    parser.add_argument(
        "--max-nodes-per-token", type=int, default=4, help="node-limited routing (DeepSeek: 4)"
    )
    parser.add_argument(
        "--implementation",
        choices=["auto", *IMPLEMENTATIONS],
        default="auto",
        help="whose memory and recomputation to time (auto: this code if it fits, else deepseek)",
    )
    parser.add_argument("--gemm-efficiency", type=float, default=Efficiency.gemm)
    parser.add_argument("--attention-efficiency", type=float, default=Efficiency.attention)
    parser.add_argument("--search", action="store_true", help="rank every layout of --gpus that fits")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    config, gpu = get_preset(args.preset), GPUS[args.gpu]
    eff = Efficiency(gemm=args.gemm_efficiency, attention=args.attention_efficiency)
    published = published_hours(args.preset, args.gpu)
    if args.search:
        impl = "this" if args.implementation == "auto" else args.implementation
        batch = (args.global_batch, args.seq_len, args.micro_batch)
        nodes = args.max_nodes_per_token
        found = search_layouts(config, args.gpus, gpu, args.precision, *batch, impl, eff, nodes)
        print(
            f"Layouts of {args.gpus} x {gpu.name} for {args.preset} ({impl} memory profile, "
            f"{args.precision}, {args.global_batch} x {args.seq_len} tokens per step), fastest first:"
        )
        print(format_search(found, args.top))
        print(f"Assumed kernel efficiency: GEMM {eff.gemm:.0%}, attention {eff.attention:.0%} of peak.")
        return
    if args.pp is None or args.ep is None:
        parser.error("give --pp and --ep to plan one layout, or --search to rank layouts")
    spans_nodes = args.ep > gpu.gpus_per_node
    kwargs = dict(
        config=config, gpus=args.gpus, gpu=gpu, pp=args.pp, ep=args.ep, schedule=args.schedule,
        precision=args.precision, global_batch=args.global_batch, seq_len=args.seq_len,
        micro_batch_size=args.micro_batch, checkpointing=args.checkpointing, zero=not args.no_zero,
        max_nodes_per_token=args.max_nodes_per_token if spans_nodes else None, efficiency=eff,
    )  # fmt: skip
    print(format_plan(plan_runnable(args.implementation, **kwargs), published))


if __name__ == "__main__":
    main()
