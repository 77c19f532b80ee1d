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
`DSV3Strategy(layer_costs=...)`, or `--save costs.json` and give the strategy that path (a recipe's
YAML: `layer_costs: costs.json`), so a training run cuts by times measured once, without measuring
at start-up. Every rank takes rank 0's cut, so ranks that measured on their own cannot disagree.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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

    def __post_init__(self) -> None:
        """Checked, and kept as floats in a tuple however given: the planner caches plans by them."""
        layers = self.layers if isinstance(self.layers, list | tuple) else ()
        if not (layers and all(_seconds(c) and c > 0 for c in layers)):
            raise ValueError(
                f"stage costs need a positive time in seconds per decoder layer, got {self.layers!r}"
            )
        if not (_seconds(self.head) and _seconds(self.embed)):
            raise ValueError(
                f"stage costs need head and embed times in seconds >= 0, got head={self.head!r}, "
                f"embed={self.embed!r}"
            )
        object.__setattr__(self, "layers", tuple(float(c) for c in layers))
        object.__setattr__(self, "head", float(self.head))
        object.__setattr__(self, "embed", float(self.embed))

    def save(self, path: str | Path) -> None:
        """Write the costs (seconds) as JSON, for `DSV3Strategy(layer_costs=path)`."""
        record = {"layers": list(self.layers), "head": self.head, "embed": self.embed}
        Path(path).write_text(json.dumps(record, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> StageCosts:
        """Read what `save` wrote; a missing, unreadable or malformed file is a ValueError saying how
        to write a good one."""
        remedy = f"write one with `python -m lightning_dsv3.pipeline.costs ... --save {path}`"
        if not str(path).strip():
            raise ValueError(f"layer_costs is an empty path; {remedy}")
        try:
            record = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read stage costs from {path} ({err}); {remedy}") from err
        try:
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not an object")
            missing = [key for key in ("layers", "head") if key not in record]
            if missing:
                raise ValueError(f"no {' or '.join(missing)}")
            return cls(record["layers"], record["head"], record.get("embed", 0.0))
        except ValueError as err:
            raise ValueError(
                f'{path} is not a stage-costs file ({err}): it needs "layers" (a positive time in seconds '
                f'per decoder layer), "head" and "embed" (seconds, >= 0); {remedy}'
            ) from err


def as_layer_costs(value: object) -> tuple[float, ...] | StageCosts | None:
    """What `DSV3Strategy(layer_costs=...)` and the planner accept, in one checked, hashable form: None,
    one cost per layer (a tuple), or `StageCosts`, given as such, as the path of a file
    `StageCosts.save` wrote, or as a parsed config's mapping of `layers`, `head` and `embed`."""
    if value is None or isinstance(value, StageCosts):
        return value
    if isinstance(value, str | Path):
        return StageCosts.load(value)
    if isinstance(value, dict):
        return StageCosts(value.get("layers"), value.get("head"), value.get("embed", 0.0))  # type: ignore[arg-type]
    if hasattr(value, "layers"):  # the namespace a config parser made of StageCosts' fields
        return StageCosts(value.layers, getattr(value, "head", None), getattr(value, "embed", 0.0))  # type: ignore[arg-type]
    if isinstance(value, list | tuple):
        if not (value and all(_seconds(c) and c > 0 for c in value)):
            raise ValueError(f"layer_costs needs a positive cost per decoder layer, got {value!r}")
        return tuple(float(c) for c in value)
    raise TypeError(
        f"layer_costs must be one cost per layer, a StageCosts or the path of a costs file, got {value!r}"
    )


def _seconds(value: object) -> bool:
    """A finite, non-negative number (JSON's true and false are not numbers here)."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return number and math.isfinite(value) and value >= 0  # type: ignore[arg-type,operator]


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
    fp8 conversion; a layer is timed whole, as the pipeline runs every micro-batch whose FB has no
    all-to-all to hide and every one that no FB interleaves.
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

        return median_seconds(run, device, warmup=2, repeats=repeats)

    blocks = {block.layer_id: block for block in model.blocks()}
    per_kind = {
        moe: timed(lambda b=blocks[i]: b(hidden.detach().requires_grad_(), cos, sin))
        for moe, i in kinds.items()
    }
    head = timed(lambda: model.loss(hidden.detach().requires_grad_(), tokens).loss)
    embed = timed(lambda: model.embed_tokens(tokens[:, :-1]))
    layers = tuple(per_kind[config.is_moe_layer(i)] for i in range(config.n_layers))
    return StageCosts(layers=layers, head=head, embed=embed)


def median_seconds(run: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of `run()` over `repeats` calls after `warmup` untimed ones, each call between
    two synchronisations of `device` (the host clock then spans the device's work)."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        run()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
    parser.add_argument(
        "--save", metavar="PATH", help="write the costs as JSON for DSV3Strategy(layer_costs=PATH)"
    )
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
    if args.save:
        costs.save(args.save)
        print(f"saved to {args.save}: DSV3Strategy(layer_costs={args.save!r})")


if __name__ == "__main__":
    main()
