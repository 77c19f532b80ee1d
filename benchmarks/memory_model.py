"""Measured against predicted memory: the plan's memory model on one device, config by config.

    python -m benchmarks.memory_model                     # four mini-preset configs on one GPU
    python -m benchmarks.memory_model --cpu               # the tiny CPU mode (debug preset)

Each config trains a few steps through Trainer + DSV3Strategy in a fresh process and reports:
- on GPU, torch.cuda.max_memory_allocated over the last step against `memory_plan(...).worst.peak_bytes`
  (the largest of its phases: forward/backward, gradient reduction, optimizer step, parameter gather);
- on any device, the bytes autograd saves for one micro-batch (summed by torch's saved-tensor hooks)
  against the plan's activation bytes, and the parameter + optimizer bytes the strategy holds against
  the plan's.
The table goes to benchmarks/results/memory_model-<device>-<date>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch

from benchmarks.results_io import markdown_table, write_result
from lightning_dsv3.plan.measure import expert_imbalance, saved_storages

MIB = 2**20


@dataclass(frozen=True)
class Config:
    name: str
    precision: str
    checkpointing: str
    micro_batch: int
    seq_len: int
    n_microbatches: int = 1


# sized so that activations are about half of each peak (predicted 27-42 GiB: one 80 GB GPU)
GPU_CONFIGS = [
    Config("bf16 none", "bf16-true", "none", 8, 2048),
    Config("bf16 selective", "bf16-true", "selective", 8, 2048),
    Config("bf16 layer, 2 micro-batches", "bf16-true", "layer", 16, 2048, 2),
    Config("mixed none", "bf16-mixed", "none", 4, 2048),
    Config("mixed mlp", "bf16-mixed", "mlp", 8, 2048),
]
CPU_CONFIGS = [Config("fp32 none", "32-true", "none", 2, 32), Config("fp32 layer", "32-true", "layer", 2, 32)]


def _saved_bytes(module: Any, batch: torch.Tensor, precision: str, device: torch.device) -> tuple[int, dict]:
    """Bytes of the distinct storages autograd saves in one forward of `batch` (parameters excluded),
    and the expert imbalance of that forward (it sizes the padded expert buffers)."""
    model = module.model
    for _, router in model.routers():
        router.expert_load.zero_()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    with autocast, saved_storages(model) as saved:
        loss = model.training_loss(batch).loss
    total = saved.nbytes
    del loss
    return total, expert_imbalance(model)


def run_one(config: Config, preset: str, steps: int) -> dict[str, Any]:
    """Train `steps` steps of `config` on one device in this process; return what was measured."""
    import lightning as L

    from lightning_dsv3.module import DeepSeekV3Module
    from lightning_dsv3.strategy import DSV3Strategy

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    overrides = {"max_seq_len": config.seq_len, "original_seq_len": config.seq_len}
    overrides["activation_checkpointing"] = config.checkpointing
    module = DeepSeekV3Module(preset=preset, model_overrides=overrides, warmup_steps=1)
    batch_size = config.micro_batch * config.n_microbatches
    data = torch.randint(0, module.config.vocab_size, (batch_size * steps, config.seq_len + 1))
    peaks: list[int] = []
    loads: dict[int, float] = {}  # of the last step

    class Peak(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)

        def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, optimizer: Any) -> None:
            loads.update(expert_imbalance(pl_module.model))

        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            if cuda:
                peaks.append(torch.cuda.max_memory_allocated(device))

    strategy = DSV3Strategy(n_microbatches=config.n_microbatches)
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=1, strategy=strategy, precision=config.precision,
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Peak()], num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(list(data), batch_size=batch_size))
    opt_bytes = strategy.optimizer_state_bytes()["local"]
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    module.to(device)  # Lightning's teardown moved it back to the CPU
    micro = data[: config.micro_batch].clone().to(device)  # its own storage, as a loader batch has
    saved, saved_imbalance = _saved_bytes(module, micro, config.precision, device)
    return {
        "peak_bytes": peaks[-1] if peaks else None,
        "saved_bytes": saved,
        "static_bytes": param_bytes + opt_bytes,
        "imbalance": loads,
        "saved_imbalance": saved_imbalance,
        "device": "cuda" if cuda else "cpu",
    }


def _fresh_world_env() -> dict[str, str]:
    """This environment without a launcher's rendezvous variables: each child is a world of one and
    picks a free port itself, rather than reuse a MASTER_PORT an earlier run left (it may be taken)."""
    launch = {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"}
    return {k: v for k, v in os.environ.items() if k not in launch}


def predict(config: Config, preset: str, measured: dict[str, Any]) -> dict[str, float]:
    from lightning_dsv3.config import ParallelConfig, get_preset
    from lightning_dsv3.pipeline.stages import ChunkSpec
    from lightning_dsv3.plan import Kernels, chunk_activation_bytes, memory_plan

    model = get_preset(preset, max_seq_len=config.seq_len, original_seq_len=config.seq_len)
    parallel = ParallelConfig(pp=1, dp=1, ep=1, n_microbatches=config.n_microbatches)
    imbalance = {int(k): v for k, v in measured["imbalance"].items()}
    saved_imbalance = {int(k): v for k, v in measured["saved_imbalance"].items()}
    args = (model, parallel, config.micro_batch, config.seq_len, config.precision, config.checkpointing)
    plan = memory_plan(*args, measured["device"], expert_imbalance=imbalance).worst
    whole = ChunkSpec(0, tuple(range(model.n_layers)), True, True)
    kernels = Kernels.for_device(measured["device"], config.precision, model)
    acts = chunk_activation_bytes(
        model, whole, config.micro_batch, config.seq_len, config.precision, kernels, config.checkpointing,
        expert_imbalance=saved_imbalance,
    )  # fmt: skip
    return {
        "peak_bytes": plan.peak_bytes,
        "phase": plan.peak_phase,
        "saved_bytes": sum(acts.values()),
        "static_bytes": plan.params_bytes + plan.master_bytes + plan.moments_bytes,
    }


def _error(measured: float | None, predicted: float) -> str:
    return "n/a" if not measured else f"{(predicted - measured) / measured:+.1%}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the tiny CPU mode (debug preset)")
    parser.add_argument("--preset", default=None, help="default: mini on GPU, debug with --cpu")
    parser.add_argument("--steps", type=int, default=3, help="the last step is measured")
    parser.add_argument("--only", type=int, nargs="*", help="indices of the configs to run")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one JSON config, print JSON
    args = parser.parse_args(argv)
    preset = args.preset or ("debug" if args.cpu else "mini")
    if args.one:
        print(json.dumps(run_one(Config(**json.loads(args.one)), preset, args.steps)))
        return
    configs = CPU_CONFIGS if args.cpu else GPU_CONFIGS
    configs = [configs[i] for i in args.only] if args.only else configs
    rows = []
    for config in configs:
        cmd = [sys.executable, "-m", "benchmarks.memory_model", "--one", json.dumps(asdict(config))]
        cmd += ["--preset", preset, "--steps", str(args.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=_fresh_world_env())
        if out.returncode != 0:
            raise RuntimeError(f"{config.name} failed:\n{out.stderr[-3000:]}")
        measured = json.loads(out.stdout.strip().splitlines()[-1])
        predicted = predict(config, preset, measured)
        peak, predicted_peak = measured["peak_bytes"], predicted["peak_bytes"]
        rows.append([
            config.name, f"{config.micro_batch}x{config.seq_len}x{config.n_microbatches}",
            "n/a" if peak is None else peak / MIB, predicted_peak / MIB, _error(peak, predicted_peak),
            predicted["phase"], measured["saved_bytes"] / MIB, predicted["saved_bytes"] / MIB,
            _error(measured["saved_bytes"], predicted["saved_bytes"]), measured["static_bytes"] / MIB,
            predicted["static_bytes"] / MIB, _error(measured["static_bytes"], predicted["static_bytes"]),
        ])  # fmt: skip
    header = [
        "config", "batch x seq x micro-batches", "peak MiB", "predicted", "error", "predicted phase",
        "saved MiB (1 micro-batch)", "predicted", "error", "params+optimizer MiB", "predicted", "error",
    ]  # fmt: skip
    body = (
        f"Preset `{preset}`, one device, DSV3Strategy (pp = dp = ep = 1, ZeRO-1). Peak: "
        "torch.cuda.max_memory_allocated over the last step (GPU only); saved: the distinct storages "
        "autograd keeps for one micro-batch (saved-tensor hooks); params+optimizer: parameters, fp32 "
        "master shards and AdamW moments after the steps.\n\n" + markdown_table(header, rows)
    )
    write_result("memory_model", body)


if __name__ == "__main__":
    main()
