"""The routed experts' grouped GEMMs alone: forward and backward time, and which kernels take it.

A profile of mini's training step (batch 16 x 1024, `end_to_end --profile`) shows three grouped-GEMM
kernels of 36 calls each, two at about 4.8 ms per step and one at 9.4-10 ms: the three GEMM kinds of
the experts' forward and backward (forward, input gradient, weight gradient) do not run alike. This
times `GroupedExperts` (three grouped GEMMs and the SwiGLU, fp32 weights under bf16 autocast as
bf16-mixed training runs them) on the tokens one MoE layer of a preset routes at a batch, three ways:

  eager      torch._grouped_mm as aten runs it (CUTLASS on Hopper)
  compiled   torch.compile's default mode (Inductor keeps aten's grouped GEMM)
  autotuned  torch.compile "max-autotune-no-cudagraphs": Inductor times its Triton grouped-GEMM
             templates against aten's on this GPU and keeps the fastest per shape

and reports the forward and backward time (median of CUDA-event-timed repetitions), their TFLOP/s,
and the kernels of one forward and backward by device time; then each of the three GEMM kinds alone
(which one runs at half the others' rate, and whether reading the activations through a transposed
view is why).

    python -m benchmarks.grouped_gemm                       # mini, 16 x 1024 tokens, on a Hopper GPU
    python -m benchmarks.grouped_gemm --preset debug --tokens 256 --ways eager,compiled --reps 2   # CPU
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.profile_step import device_kernels
from benchmarks.results_io import markdown_table, median_ms, synchronize, write_result
from lightning_dsv3.config import get_preset
from lightning_dsv3.model.moe import GroupedExperts, tokens_per_expert

WAYS = {"eager": None, "compiled": "default", "autotuned": "max-autotune-no-cudagraphs"}


def routed_counts(tokens: int, n_experts: int, top_k: int, seed: int = 0) -> torch.Tensor:
    """(n_experts,) rows per expert when each of `tokens` picks `top_k` distinct experts at random."""
    gen = torch.Generator().manual_seed(seed)
    picks = torch.rand(tokens, n_experts, generator=gen).topk(top_k, dim=-1).indices
    return tokens_per_expert(picks, n_experts)


def gemm_kinds(
    x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor, device: torch.device, reps: int
) -> list[list[object]]:
    """The three GEMMs of y = x @ W^T per expert, each alone: forward, input gradient, and weight
    gradient timed two ways (the activations read through a transposed view, as a backward has them,
    and copied first so the token dimension is contiguous, the copy timed too). x: (rows, in) sorted
    by expert; weight: (E, out, in) as stored; offs: the experts' end rows."""
    w = weight.to(x.dtype)
    dy = torch.randn(x.shape[0], w.shape[1], device=x.device, dtype=x.dtype)
    flops = 2 * x.shape[0] * w.shape[1] * w.shape[2]
    calls = {
        "forward: x W^T": lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs),
        "input gradient: dy W": lambda: torch._grouped_mm(dy, w, offs=offs),
        "weight gradient: x^T dy, x^T a view": lambda: torch._grouped_mm(x.t(), dy, offs=offs),
        "weight gradient, x^T copied first": lambda: torch._grouped_mm(x.t().contiguous(), dy, offs=offs),
    }
    rows: list[list[object]] = []
    for name, call in calls.items():
        ms = median_ms(call, device, reps)
        rows.append([f"{w.shape[2]} -> {w.shape[1]}", name, f"{ms:.3f}", f"{flops / ms / 1e9:.0f}"])
    return rows


def kernels(forward: Callable, backward: Callable, device: torch.device, reps: int, top: int) -> str:
    """The `top` kernels of one forward and backward by device time, as a table (GPU only)."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            forward()
            backward()
        synchronize(device)
    per_call = Counter(
        {e.key: e.self_device_time_total / reps / 1e3 for e in device_kernels(prof.key_averages())}
    )
    return markdown_table(["kernel", "ms"], [[k[:90], f"{v:.3f}"] for k, v in per_call.most_common(top)])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--tokens", type=int, default=16 * 1024, help="tokens routed (batch x seq)")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"any of {', '.join(WAYS)}")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (compilation included)")
    parser.add_argument("--top", type=int, default=8, help="kernels listed per way")
    args = parser.parse_args()
    ways = args.ways.split(",")
    if unknown := [w for w in ways if w not in WAYS]:
        parser.error(f"unknown ways {unknown}; choose among {', '.join(WAYS)}")

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    config = get_preset(args.preset)
    counts = routed_counts(args.tokens, config.n_routed_experts, config.n_activated_experts).to(device)
    rows_n = int(counts.sum())
    experts = GroupedExperts(config.n_routed_experts, config.dim, config.moe_inter_dim).to(device)
    with torch.no_grad():
        for w in (experts.w1, experts.w2, experts.w3):
            w.normal_(0, config.dim**-0.5)
    dtype = torch.bfloat16 if cuda else torch.float32
    x = torch.randn(rows_n, config.dim, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(rows_n, config.dim, device=device, dtype=dtype)
    fwd_flops = 3 * 2 * rows_n * config.dim * config.moe_inter_dim

    offs = counts.cumsum(0).to(torch.int32)
    with torch.no_grad():  # first: the ways below may compile for minutes
        kinds = gemm_kinds(x.detach(), experts.w1, offs, device, args.reps)
        hidden = torch.randn(rows_n, config.moe_inter_dim, device=device, dtype=dtype)
        kinds += gemm_kinds(hidden, experts.w2, offs, device, args.reps)
    kinds_table = markdown_table(["GEMM (in -> out per expert)", "kind", "ms", "TFLOP/s"], kinds)
    print(kinds_table, flush=True)

    rows, kernel_tables = [], []
    for way in ways:
        mode = WAYS[way]
        fn = torch.compile(experts.forward, mode=mode) if mode else experts.forward
        out: list[torch.Tensor] = []

        def forward(fn: Callable = fn, out: list = out) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                out[:] = [fn(x, counts)]

        def backward(out: list = out) -> None:
            torch.autograd.grad(out[0], (x, experts.w1, experts.w2, experts.w3), grad, retain_graph=True)

        try:  # compilation happens here: a way torch cannot compile is a row that says why
            for _ in range(args.warmup):
                forward()
                backward()
        except Exception as err:  # noqa: BLE001 - any compiler failure is the way's result
            rows.append([way, f"failed: {type(err).__name__}: {str(err).strip().splitlines()[0][:150]}"])
            print(rows[-1], flush=True)  # each way as it ends: a later way's compilation may run long
            continue
        synchronize(device)
        fwd_ms = median_ms(forward, device, args.reps)
        forward()
        bwd_ms = median_ms(backward, device, args.reps)
        rows.append([
            way, f"{fwd_ms:.3f}", f"{fwd_flops / fwd_ms / 1e9:.0f}",
            f"{bwd_ms:.3f}", f"{2 * fwd_flops / bwd_ms / 1e9:.0f}",
        ])  # fmt: skip
        print(rows[-1], flush=True)
        if cuda:
            kernel_tables.append(f"\n\n{way}: kernels of one forward and backward (ms)\n\n" + kernels(
                forward, backward, device, args.reps, args.top
            ))  # fmt: skip
    body = (
        f"preset {args.preset}: {config.n_routed_experts} experts, dim {config.dim}, expert hidden "
        f"{config.moe_inter_dim}; {args.tokens} tokens x top-{config.n_activated_experts} = {rows_n} rows "
        f"(random routing, {int(counts.min())}-{int(counts.max())} per expert); fp32 weights, "
        f"{'bf16 autocast' if cuda else 'fp32'}; median of {args.reps} after {args.warmup} warm-up\n\n"
        + markdown_table(["way", "forward ms", "forward TFLOP/s", "backward ms", "backward TFLOP/s"], rows)
        + "".join(kernel_tables)
        + f"\n\nEach GEMM kind alone (torch._grouped_mm, {dtype} operands), median of {args.reps}:\n\n"
        + kinds_table
    )
    write_result(f"grouped_gemm-{args.preset}", body)


if __name__ == "__main__":
    main()
