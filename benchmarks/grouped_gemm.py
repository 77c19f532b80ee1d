"""The routed experts' grouped GEMMs alone: forward and backward time, and which kernels take it.

A profile of mini's training step (batch 16 x 1024, `end_to_end --profile`) shows three grouped-GEMM
kernels of 36 calls each, two at about 4.8 ms per step and one at 9.4-10 ms: the three GEMM kinds of
the experts' forward and backward (forward, input gradient, weight gradient) do not run alike (it is
the weight gradient, slowed by how unevenly the routers spread tokens: the kinds table shows it). This
times `GroupedExperts` (three grouped GEMMs and the SwiGLU, fp32 weights under bf16 autocast as
bf16-mixed training runs them) on the tokens one MoE layer of a preset routes at a batch, three ways:

  eager      torch._grouped_mm as aten runs it (CUTLASS on Hopper)
  compiled   torch.compile's default mode (Inductor keeps aten's grouped GEMM)
  autotuned  torch.compile "max-autotune-no-cudagraphs": Inductor times its Triton grouped-GEMM
             templates against aten's on this GPU and keeps the fastest per shape

on two routings: uniform at random, and the routing the preset's routers choose as initialised on
the default data (skewed: a run's first hundreds of steps see it). It reports the forward and
backward device time, their TFLOP/s, and the kernels of one forward and backward; then each of the
three GEMM kinds alone on both routings (which one slows down under skew, and whether the weight
gradient cut into balanced pieces, or one GEMM per expert, avoids it).

    python -m benchmarks.grouped_gemm                       # mini, 16 x 1024 tokens, on a Hopper GPU
    python -m benchmarks.grouped_gemm --preset debug --tokens 256 --ways eager,compiled --reps 2   # CPU
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

from benchmarks.profile_step import device_ms, kernel_ms
from benchmarks.results_io import markdown_table, synchronize, write_result
from lightning_dsv3.config import ModelConfig, get_preset
from lightning_dsv3.data import DSV3DataModule
from lightning_dsv3.model.moe import GroupedExperts, Router, tokens_per_expert
from lightning_dsv3.model.transformer import Transformer

WAYS = {"eager": None, "compiled": "default", "autotuned": "max-autotune-no-cudagraphs"}


def routed_counts(tokens: int, n_experts: int, top_k: int, seed: int = 0) -> torch.Tensor:
    """(n_experts,) rows per expert when each of `tokens` picks `top_k` distinct experts at random."""
    gen = torch.Generator().manual_seed(seed)
    picks = torch.rand(tokens, n_experts, generator=gen).topk(top_k, dim=-1).indices
    return tokens_per_expert(picks, n_experts)


def model_seq_len(config: ModelConfig) -> int:
    """The sequence length `model_counts` routes its tokens in."""
    return min(1024, config.max_seq_len)


def model_counts(config: ModelConfig, tokens: int, device: torch.device) -> list[torch.Tensor]:
    """Rows per expert of each MoE layer of the decoder (a plain forward does not run the MTP block's)
    when the preset's routers, as initialised, route `tokens` tokens of the default data (the bytes of
    Python's standard library), a multiple of `model_seq_len`: the routing of a run's first steps,
    before aux-loss-free balancing has moved any bias."""
    seq_len = model_seq_len(config)
    if tokens % seq_len:
        raise ValueError(f"route a multiple of {seq_len} tokens, not {tokens}")
    model = Transformer(config)
    model.init_weights()
    model.to(device).train()
    data = DSV3DataModule(seq_len=seq_len, batch_size=tokens // seq_len, seed=0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))[:, :-1].to(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        model(batch)
    return [r.expert_load.long() for r in model.modules() if isinstance(r, Router) and r.expert_load.any()]


def balanced_weight_gradient(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """dy_e^T x_e for every expert e, (E, out, in), as a grouped GEMM with no group longer than the mean:
    a candidate fix for the weight gradient's slowdown under skewed routing, measured and not adopted.

    The weight gradient's groups run along the GEMM's K (an expert's rows): every output tile of a busy
    expert loops over all of its rows while the other SMs idle. Here the rows are cut at the experts'
    ends and every ceil(N / E) rows (2E pieces at most, each within one expert), the grouped GEMM takes
    each piece as a group, and a GEMM against a 0/1 matrix sums each expert's pieces (one pass,
    deterministic). x: (N, in) and dy: (N, out) sorted by expert; offs: (E,) int32 end rows.
    """
    n_rows, n_experts = x.shape[0], offs.numel()
    step = -(-n_rows // n_experts)
    cuts = (torch.arange(1, n_experts + 1, device=x.device) * step).clamp(max=n_rows).to(offs.dtype)
    ends = torch.cat([offs, cuts]).sort().values
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    expert = torch.searchsorted(offs, starts, right=True).clamp(max=n_experts - 1)
    pieces = torch._grouped_mm(dy.t(), x, offs=ends)  # (2E, out, in); an empty group's product is zero
    member = (torch.arange(n_experts, device=x.device).unsqueeze(1) == expert).to(pieces.dtype)
    return (member @ pieces.flatten(1)).view(n_experts, *pieces.shape[1:])


def gemm_kinds(
    x: torch.Tensor, weight: torch.Tensor, counts: list[torch.Tensor], device: torch.device, reps: int
) -> list[list[object]]:
    """The three GEMMs of y = x @ W^T per expert, each alone, in device time (`device_ms`) averaged over
    the routings in `counts`, each row printed once timed: forward, input gradient, and the weight
    gradient four ways: x^T dy as torch's backward computes it (the gradient of W^T, both operands
    read through transposed views), dy^T x (the gradient in W's own (out, in) layout), in balanced
    pieces (`balanced_weight_gradient`, its largest difference from dy^T x in the row), and one cuBLAS
    GEMM per expert (a reference with no grouping). x: (rows, in); weight: (E, out, in) as stored.
    (Copying x^T first so the token dimension is contiguous is no option: the grouped GEMM then needs
    every expert's row count to be a multiple of 8.)"""
    w = weight.to(x.dtype)
    dy = torch.randn(x.shape[0], w.shape[1], device=x.device, dtype=x.dtype)
    flops = 2 * x.shape[0] * w.shape[1] * w.shape[2]
    times: dict[str, list[float]] = {}
    error = 0.0
    for c in counts:
        offs = c.cumsum(0).to(torch.int32)
        bounds = [0, *offs.tolist()]
        per_expert = [(x[a:b], dy[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

        def one_mm_per_expert(per_expert: list = per_expert) -> list[torch.Tensor]:
            return [dy_e.t() @ x_e for x_e, dy_e in per_expert]

        calls = {
            "forward: x W^T": lambda o=offs: torch._grouped_mm(x, w.transpose(-2, -1), offs=o),
            "input gradient: dy W": lambda o=offs: torch._grouped_mm(dy, w, offs=o),
            "weight gradient: x^T dy (torch's)": lambda o=offs: torch._grouped_mm(x.t(), dy, offs=o),
            "weight gradient: dy^T x (W's layout)": lambda o=offs: torch._grouped_mm(dy.t(), x, offs=o),
            "weight gradient: balanced pieces (tried)": lambda o=offs: balanced_weight_gradient(x, dy, o),
            "weight gradient: one mm per expert": one_mm_per_expert,
        }
        for name, call in calls.items():
            times.setdefault(name, []).append(device_ms(call, device, reps))
        exact = torch._grouped_mm(dy.t(), x, offs=offs).float()
        diff = (balanced_weight_gradient(x, dy, offs).float() - exact).abs().max() / exact.abs().max()
        error = max(error, float(diff))
    rows: list[list[object]] = []
    for name, ms_list in times.items():
        ms = statistics.mean(ms_list)
        note = f"largest difference {error:.1e} of the largest entry" if "balanced" in name else ""
        rows.append([f"{w.shape[2]} -> {w.shape[1]}", name, f"{ms:.3f}", f"{flops / ms / 1e9:.0f}", note])
        print(rows[-1], flush=True)
    return rows


def kernels(forward: Callable, backward: Callable, device: torch.device, reps: int, top: int) -> str:
    """The `top` kernels of one forward and backward by device time, as a table (GPU only)."""
    per_call = kernel_ms(lambda: (forward(), backward()), device, reps)
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
    config = get_preset(args.preset)
    if args.tokens % model_seq_len(config):
        parser.error(
            f"--tokens must be a multiple of {model_seq_len(config)}: the routers see whole sequences"
        )

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
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

    routings = {"uniform": [counts], "model": model_counts(config, args.tokens, device)}
    skew = [float(c.max() / c.float().mean()) for c in routings["model"]]
    kinds_tables = []
    with torch.no_grad():  # first: the ways below may compile for minutes
        hidden = torch.randn(rows_n, config.moe_inter_dim, device=device, dtype=dtype)
        for routing, sets in routings.items():
            kinds = gemm_kinds(x.detach(), experts.w1, sets, device, args.reps)
            kinds += gemm_kinds(hidden, experts.w2, sets, device, args.reps)
            kinds_tables.append(f"\n\n{routing} routing\n\n" + markdown_table(
                ["GEMM (in -> out per expert)", "kind", "ms", "TFLOP/s", ""], kinds
            ))  # fmt: skip
            print(kinds_tables[-1], flush=True)

    # the modules' forward and backward on one MoE layer's routing: uniform, and the model layer of
    # median skew
    by_skew = sorted(routings["model"], key=lambda c: float(c.max()))
    layer_counts = {"uniform": counts, "model": by_skew[len(by_skew) // 2]}
    rows, kernel_tables = [], []
    for way in ways:
        mode = WAYS[way]
        fn = torch.compile(experts.forward, mode=mode) if mode else experts.forward
        out: list[torch.Tensor] = []
        for routing, c in layer_counts.items():

            def forward(fn: Callable = fn, out: list = out, c: torch.Tensor = c) -> None:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                    out[:] = [fn(x, c)]

            def backward(out: list = out) -> None:
                torch.autograd.grad(out[0], (x, experts.w1, experts.w2, experts.w3), grad, retain_graph=True)

            name = [way, routing]
            try:  # compilation happens here: a way torch cannot compile is a row that says why
                for _ in range(args.warmup):
                    forward()
                    backward()
            except Exception as err:  # noqa: BLE001 - any compiler failure is the way's result
                rows.append(
                    [*name, f"failed: {type(err).__name__}: {str(err).strip().splitlines()[0][:150]}"]
                )
                print(rows[-1], flush=True)  # each way as it ends: a later way's compilation may run long
                break
            synchronize(device)
            fwd_ms = device_ms(forward, device, args.reps)
            forward()
            bwd_ms = device_ms(backward, device, args.reps)
            rows.append([
                *name, f"{fwd_ms:.3f}", f"{fwd_flops / fwd_ms / 1e9:.0f}",
                f"{bwd_ms:.3f}", f"{2 * fwd_flops / bwd_ms / 1e9:.0f}",
            ])  # fmt: skip
            print(rows[-1], flush=True)
            if cuda and routing == "model":
                kernel_tables.append(f"\n\n{way}, model routing: kernels of one forward and backward "
                    "(ms)\n\n" + kernels(forward, backward, device, args.reps, args.top))  # fmt: skip
    body = (
        f"preset {args.preset}: {config.n_routed_experts} experts, dim {config.dim}, expert hidden "
        f"{config.moe_inter_dim}; {args.tokens} tokens x top-{config.n_activated_experts} = {rows_n} rows "
        f"(random routing, {int(counts.min())}-{int(counts.max())} per expert); fp32 weights, "
        f"{'bf16 autocast' if cuda else 'fp32'}; {args.reps} timed calls after {args.warmup} warm-up\n\n"
        + "Forward and backward of `GroupedExperts` in device time per call (their kernels' times summed "
        "over the timed calls, divided by their number; the host clock's median on CPUs), on the random "
        "routing and on the model's layer of median skew:\n\n"
        + markdown_table(
            ["way", "routing", "forward ms", "forward TFLOP/s", "backward ms", "backward TFLOP/s"], rows
        )
        + "".join(kernel_tables)
        + f"\n\nEach GEMM kind alone (torch._grouped_mm, {dtype} operands), in device time, for the "
        f"uniform routing above and for each decoder MoE layer's routing by the preset's routers as "
        f"initialised on the default data (largest expert {min(skew):.1f}x-{max(skew):.1f}x the mean over "
        f"{len(skew)} layers; the mean over layers):" + "".join(kinds_tables)
    )
    write_result(f"grouped_gemm-{args.preset}", body)


if __name__ == "__main__":
    main()
