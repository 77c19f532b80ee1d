"""End to end on one device: the same model and data trained three ways, loss curves and speed.

  plain  Lightning's default strategy, routed experts as a Python loop over experts
  auto   Lightning's default strategy, routed experts as one grouped GEMM
  dsv3   DSV3Strategy (NCCL on GPUs, gloo on CPU, world of one), grouped GEMM
  dsv3-padv  the same with V padded to the q/k head dim, so SDPA can take its flash path
  dsv3-compile  dsv3-padv with every decoder layer and the cross-entropy under torch.compile
  dsv3-compile-bf16  dsv3-compile with bf16 parameters (precision="bf16-true", see dsv3-graphs-bf16)
  dsv3-graphs  dsv3-compile in torch.compile's "reduce-overhead" mode: each layer's kernels replay as
            CUDA graphs
  dsv3-graphs-bf16  dsv3-graphs with bf16 parameters (precision="bf16-true"); the strategy's ZeRO-1 keeps
            their fp32 master copy, as DeepSeek-V3 trains, so no per-step cast of fp32 weights to bf16
  dsv3-fp8  dsv3-compile with the linear layers in fp8 through torchao, tensorwise scales (torchao's
            fastest recipe; `DeepSeekV3Module(float8=...)`, needs torchao and compute capability 8.9+)
  dsv3-fp8-rowwise  the same with rowwise scales
  dsv3-graphs-fp8  dsv3-graphs with dsv3-fp8's linears: fp8 adds an amax, a scale and a cast around
            every converted linear's GEMMs, kernels a CUDA graph replays without their launches

For each: the loss of every step, tokens/s (median step time after warm-up), and MFU against the
bf16 matmul peak measured in the same process. The loss curves of `auto` and `dsv3` should agree
within bf16 noise; `dsv3` against `plain` is the speed-up of the grouped GEMM. Every variant starts
from the same weights (seeded by name) and reads the same batches, so an fp8 variant run beside its
settings without fp8 (`dsv3-compile` for `dsv3-fp8`, `dsv3-graphs` for `dsv3-graphs-fp8`) gets a table
of its step time and loss against that bf16 baseline.

    python -m benchmarks.end_to_end                       # mini preset on a GPU
    python -m benchmarks.end_to_end --variants dsv3-compile,dsv3-fp8 --steps 500   # fp8 against bf16
    python -m benchmarks.end_to_end --preset debug --steps 6 --seq-len 64 --batch 4   # CPU small mode
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, NamedTuple

import lightning as L
import torch

from benchmarks.profile_step import SYNC_OPS, device_kernels
from benchmarks.results_io import markdown_table, write_result
from lightning_dsv3 import DSV3Strategy
from lightning_dsv3.data import DSV3DataModule
from lightning_dsv3.float8 import check_float8, check_float8_device
from lightning_dsv3.flops import train_flops
from lightning_dsv3.model.moe import Router
from lightning_dsv3.module import DeepSeekV3Module


class StepTimer(L.Callback):
    """Per-step loss and time, without synchronising: on GPUs an event recorded as each step starts
    gives the steps' spacing on the device's timeline, so a host that runs ahead of the device (as
    training does when nothing reads a value back) is measured as it runs."""

    def __init__(self) -> None:
        self._marks: list[Any] = []  # CUDA events on GPUs, host clock readings on CPUs
        self._losses: list[torch.Tensor] = []
        self._loads: list[list[torch.Tensor]] = []  # per step, each router's `last_load` (a new tensor)
        self.step_s: list[float] = []  # read once training ends
        self.losses: list[float] = []
        # per step: the largest expert's load over the mean, averaged over the routers (the balance the
        # grouped GEMMs see; aux-loss-free balancing lowers it over a run), read from the load the
        # step's bias update used (`Router.last_load`: a step skipped as non-finite repeats the one
        # before); nan where no router saw a token
        self.skews: list[float] = []

    def _mark(self) -> None:
        if torch.cuda.is_available():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append(event)
        else:
            self._marks.append(time.perf_counter())

    def on_train_batch_start(self, trainer: L.Trainer, module: Any, batch: Any, idx: int) -> None:
        self._mark()

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self._losses.append(outputs["loss"].detach())
        # kept, not reduced here: no kernels of ours inside the timed steps
        self._loads.append(
            [m.last_load for m in module.modules() if isinstance(m, Router) and m.last_load is not None]
        )

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        self._mark()
        if torch.cuda.is_available():
            self._marks[-1].synchronize()
            self.step_s = [a.elapsed_time(b) / 1e3 for a, b in zip(self._marks, self._marks[1:])]
        else:
            self.step_s = [b - a for a, b in zip(self._marks, self._marks[1:])]
        self.losses = torch.stack(self._losses).float().tolist() if self._losses else []
        # nanmean: a router that saw no tokens (0 / 0) leaves the average, not the step
        self.skews = [
            float(torch.stack([x.max() / x.mean() for x in loads]).nanmean()) if loads else float("nan")
            for loads in self._loads
        ]


class StepProfiler(L.Callback):
    """torch.profiler over `n` steps from `start`: where the step's host and device time go, and how
    many times the host waited for the device (any wait stops it from running ahead)."""

    def __init__(self, start: int, n: int = 3, trace: str | None = None) -> None:
        self.start, self.n, self.trace = start, n, trace
        self.summary = ""
        self._prof: torch.profiler.profile | None = None

    def on_train_batch_start(self, trainer: L.Trainer, module: Any, batch: Any, idx: int) -> None:
        if trainer.global_step == self.start and self._prof is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities, with_stack=bool(self.trace))
            self._prof.__enter__()

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, idx: int) -> None:
        if self._prof is None or trainer.global_step != self.start + self.n or self.summary:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._prof.__exit__(None, None, None)
        if self.trace:
            self._prof.export_chrome_trace(self.trace)
        events = self._prof.key_averages()
        syncs = {e.key: e.count // self.n for e in events if e.key in SYNC_OPS and e.count}
        kernels = device_kernels(events)
        device_ms = sum(e.self_device_time_total for e in kernels) / self.n / 1e3
        host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
        host_rows = [
            [e.key[:60], f"{e.self_cpu_time_total / self.n / 1e3:.2f}", e.count // self.n] for e in host
        ]
        top = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:20]
        rows = [
            [e.key[:60], f"{e.self_device_time_total / self.n / 1e3:.2f}", e.count // self.n] for e in top
        ]
        self.summary = (
            f"profiled steps {self.start}..{self.start + self.n - 1}: device kernel time {device_ms:.1f} ms "
            f"per step; host waits per step {syncs or 'none'}\n\n"
            + markdown_table(["host op", "self CPU ms per step", "calls per step"], host_rows)
            + "\n\n"
            + markdown_table(["device kernel", "ms per step", "calls per step"], rows)
        )


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


# what each variant changes: Lightning's strategy or ours, the expert GEMMs, V padding, compile, fp8
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {"dsv3": False, "expert_impl": "loop"},
    "auto": {"dsv3": False},
    "dsv3": {},
    "dsv3-padv": {"attn_pad_v": True},
    "dsv3-compile": {"attn_pad_v": True, "compile": True},
    "dsv3-compile-bf16": {"attn_pad_v": True, "compile": True, "precision": "bf16-true"},
    "dsv3-graphs": {"attn_pad_v": True, "compile": "reduce-overhead"},
    "dsv3-graphs-bf16": {"attn_pad_v": True, "compile": "reduce-overhead", "precision": "bf16-true"},
    "dsv3-fp8": {"attn_pad_v": True, "compile": True, "float8": "tensorwise"},
    "dsv3-fp8-rowwise": {"attn_pad_v": True, "compile": True, "float8": "rowwise"},
    "dsv3-graphs-fp8": {"attn_pad_v": True, "compile": "reduce-overhead", "float8": "tensorwise"},
}


def variant_spec(variant: str) -> dict[str, Any]:
    """Every setting of `variant`: the defaults, then what the variant changes."""
    spec = {"dsv3": True, "expert_impl": "grouped", "attn_pad_v": False, "compile": False, "float8": None,
            "precision": "bf16-mixed" if torch.cuda.is_available() else "32-true"}  # fmt: skip
    return {**spec, **VARIANTS[variant]}


def fp8_baseline(variant: str) -> str | None:
    """The variant with `variant`'s settings but fp8 off (None for a variant without fp8); ValueError
    when no variant has them, so that `main` refuses such a variant before any training."""
    spec = variant_spec(variant)
    if not spec["float8"]:
        return None
    without = {**spec, "float8": None}
    match = next((name for name in VARIANTS if variant_spec(name) == without), None)
    if match is None:
        changed = {k: v for k, v in VARIANTS[variant].items() if k != "float8"}
        raise ValueError(
            f"fp8 variant {variant!r} has no bf16 baseline: add a variant with {changed} and no float8"
        )
    return match


def preset_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The preset's fields every variant changes: the sequence length, and gamma when given."""
    overrides: dict[str, Any] = {"max_seq_len": args.seq_len, "original_seq_len": args.seq_len}
    if args.bias_update_speed is not None:
        overrides["bias_update_speed"] = args.bias_update_speed
    return overrides


class Run(NamedTuple):
    """One variant's training: what `main` reports of it."""

    timer: StepTimer
    profile: str  # the profiled steps' summary, "" without --profile
    gamma: float  # the bias update speed its routers balanced with


def train(variant: str, args: argparse.Namespace) -> Run:
    """Train `variant` (`variant_spec`) on the preset with `preset_overrides`."""
    L.seed_everything(0)
    gpu = torch.cuda.is_available()
    spec = variant_spec(variant)
    overrides = {"expert_impl": spec["expert_impl"], "attn_pad_v": spec["attn_pad_v"]}
    module = DeepSeekV3Module(
        preset=args.preset,
        model_overrides={**overrides, **preset_overrides(args)},
        lr=args.lr, warmup_steps=5, compile=spec["compile"], float8=spec["float8"],
    )  # fmt: skip
    data = DSV3DataModule(seq_len=args.seq_len, batch_size=args.batch, max_bytes=16 * 2**20, seed=0)
    timer = StepTimer()
    trace = f"{args.trace}-{variant}.json.gz" if args.trace else None
    profiler = StepProfiler(args.profile, trace=trace) if args.profile is not None else None
    callbacks = [timer, *([profiler] if profiler else [])]
    trainer = L.Trainer(
        accelerator="gpu" if gpu else "cpu", devices=1, max_steps=args.steps,
        strategy=DSV3Strategy() if spec["dsv3"] else "auto",
        precision=spec["precision"] if gpu else "32-true", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=callbacks,
        use_distributed_sampler=False,  # one process: every variant reads the data module's seeded order
    )  # fmt: skip
    trainer.fit(module, data)
    return Run(timer, profiler.summary if profiler else "", module.config.bias_update_speed)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--bias-update-speed", type=float, default=None,
        help="gamma of aux-loss-free balancing (default: the preset's); how fast the routing balances",
    )  # fmt: skip
    parser.add_argument(
        "--variants", default="plain,auto,dsv3,dsv3-padv,dsv3-compile", help=f"any of {', '.join(VARIANTS)}"
    )
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the speed median")
    parser.add_argument("--profile", type=int, default=None, help="profile 3 steps from this one")
    parser.add_argument(
        "--trace", default=None, help="with --profile: Chrome traces to PREFIX-<variant>.json.gz"
    )
    parser.add_argument(
        "--loss-window", type=int, default=20, help="fp8 against bf16: mean loss over this many last steps"
    )
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose among {', '.join(VARIANTS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for recipe in {VARIANTS[v].get("float8") for v in variants} - {None}:  # refuse fp8 before any run
        check_float8(recipe)
        check_float8_device(device, recipe)
    for v in variants:  # and an fp8 variant without a baseline to compare it with
        fp8_baseline(v)

    runs = {v: train(v, args) for v in variants}
    results = {v: run.timer for v, run in runs.items()}
    profiles = "".join(f"\n\n{v}: {run.profile}" for v, run in runs.items() if run.profile)
    gammas = sorted({run.gamma for run in runs.values()})  # one: every variant gets the same overrides
    from lightning_dsv3.config import get_preset

    config = get_preset(args.preset, **preset_overrides(args))
    flops_per_step = train_flops(config, args.batch, args.seq_len)
    peak = matmul_peak_tflops() if torch.cuda.is_available() else float("nan")
    tokens = args.batch * args.seq_len
    rows = []
    step_s_of = {name: statistics.median(t.step_s[args.warmup :] or t.step_s) for name, t in results.items()}
    for name, step_s in step_s_of.items():
        tflops = flops_per_step / step_s / 1e12
        skews = [x for x in (results[name].skews[args.warmup :] or results[name].skews) if x == x]
        skew = f"{statistics.median(skews):.2f}" if skews else "—"
        rows.append([
            name, f"{step_s * 1e3:.1f}", f"{tokens / step_s:,.0f}", f"{tflops:.1f}", f"{tflops / peak:.1%}",
            skew,
        ])  # fmt: skip
    speed = markdown_table(
        ["variant", "step ms (median)", "tokens/s", "model TFLOP/s", "MFU vs matmul peak",
         "largest expert load / mean (median of timed steps)"], rows,
    )  # fmt: skip
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
    fp8 = fp8_against_baseline(results, step_s_of, args.loss_window)
    body = (
        f"preset {args.preset}, seq_len {args.seq_len}, batch {args.batch}, {args.steps} steps, "
        f"bias_update_speed {', '.join(f'{g:g}' for g in gammas)}, "
        f"bf16 matmul peak {peak:.0f} TFLOP/s, model FLOPs/step {flops_per_step:.3e}\n\n{speed}{diffs}"
        f"{fp8}{profiles}\n\n" + markdown_table(["step", *names], curve_rows)
    )
    write_result(f"end_to_end-{args.preset}", body)


def fp8_against_baseline(results: dict[str, StepTimer], step_s_of: dict[str, float], window: int) -> str:
    """A table of each fp8 variant against its settings without fp8 (`fp8_baseline`; same model, data
    and seed): step time ratio (issue 9's target: at most 0.85) and loss ratios after the last step and
    over the last `window` steps (target: within 2%); a row for each fp8 variant whose baseline ran."""
    rows = []
    for name, t in results.items():
        base_name = fp8_baseline(name)
        base = results.get(base_name) if base_name else None
        if base is None:
            continue
        last = min(window, len(t.losses))
        mean, base_mean = statistics.mean(t.losses[-last:]), statistics.mean(base.losses[-last:])
        rows.append([
            name, base_name, f"{step_s_of[name] / step_s_of[base_name]:.3f}",
            f"{t.losses[-1]:.4f} / {base.losses[-1]:.4f}", f"{t.losses[-1] / base.losses[-1] - 1:+.2%}",
            f"{mean:.4f} / {base_mean:.4f}", f"{mean / base_mean - 1:+.2%}",
        ])  # fmt: skip
    if not rows:
        return ""
    header = [
        "fp8 variant", "bf16 baseline", "step time / baseline's", "last loss (fp8 / bf16)", "difference",
        f"mean of last {window} losses (fp8 / bf16)", "difference",
    ]  # fmt: skip
    return "\n\n" + markdown_table(header, rows)


if __name__ == "__main__":
    main()
