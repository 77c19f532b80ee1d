"""Train a DeepSeek-V3-style model with Lightning, or plan a run without allocating it.

    python recipes/train.py fit --config recipes/configs/debug.yaml
    python recipes/train.py fit --config recipes/configs/debug.yaml --ckpt_path runs/debug/.../last.ckpt
    python recipes/train.py plan --config recipes/configs/v3-671b-plan.yaml

Every Trainer, model and data argument can be set in the YAML or on the command line (LightningCLI).

`plan` reads the same config as `fit` and prints what `lightning_dsv3.plan` predicts for it instead of
training: memory per GPU, communication, bubble and step time of the layout the config names
(trainer.devices x trainer.num_nodes GPUs, the strategy's pp, ep, schedule and micro-batches, the data's
sequence length and batch size, the model's activation checkpointing). Nothing is allocated, so a
config far larger than the machine (v3-671b on 2,048 GPUs) plans on a laptop. The `plan:` options
name the GPU (`plan.gpu`, default h100) and the planned precision (`plan.precision`, default the
trainer's; "fp8" plans DeepSeek-V3's FP8 recipe); `plan.only: true` in a config makes `fit` print the
plan as well, so a plan-only config can never start allocating by mistake.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_dsv3.config import ParallelConfig, get_preset
from lightning_dsv3.data import DSV3DataModule
from lightning_dsv3.module import DeepSeekV3Module
from lightning_dsv3.plan import (
    GPUS,
    PRECISIONS,
    ClusterPlan,
    format_plan,
    plan_runnable,
    published_hours,
)

# Lightning precision names the planner spells otherwise (fp16 mixed keeps the bytes of bf16 mixed)
_PLAN_PRECISIONS = {"32": "32-true", "bf16": "bf16-mixed", "16-mixed": "bf16-mixed"}


class DSV3CLI(LightningCLI):
    """LightningCLI for DeepSeekV3Module and DSV3DataModule, with the `plan:` options of the planner."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--plan.only", type=bool, default=False, help="print the planner's prediction instead of running"
        )
        parser.add_argument(
            "--plan.gpu", type=str, default="h100", help="GPU the plan assumes (h100, h200, h800)"
        )
        parser.add_argument(
            "--plan.precision",
            type=str | None,
            default=None,
            help="precision the plan assumes (default: trainer.precision; 'fp8' for DeepSeek-V3's recipe)",
        )

    def instantiate_classes(self) -> None:
        """With plan.only nothing is built: the plan is printed and no subcommand runs."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.plan.only:
            self.plan_text = plan_text(config)
            print(self.plan_text)
            self.subcommand = None  # LightningCLI runs the subcommand only when one is set
            return
        super().instantiate_classes()


def strategy_layout(strategy: Any) -> dict[str, Any]:
    """DSV3Strategy's init arguments from a parsed `trainer.strategy` (pp=1, ep=1, no ZeRO otherwise)."""
    if strategy == "dsv3":
        return {}
    if isinstance(strategy, Namespace) and str(strategy.get("class_path", "")).endswith("DSV3Strategy"):
        return {k: v for k, v in dict(strategy.get("init_args") or {}).items() if v is not None}
    return {"zero": False}  # Lightning's own strategies: one replica of the optimizer state per rank


def plan_of(config: Namespace) -> ClusterPlan:
    """What `lightning_dsv3.plan` predicts for the run a parsed fit config describes."""
    trainer, data = config.trainer, config.data
    if not isinstance(trainer.devices, int) or trainer.devices < 1:
        raise ValueError(
            f"planning needs trainer.devices as a number of GPUs per node, got {trainer.devices!r}"
        )
    gpus = trainer.devices * (trainer.num_nodes or 1)
    if config.plan.gpu not in GPUS:
        raise ValueError(
            f"plan.gpu={config.plan.gpu!r} is not known to the planner; choose one of {sorted(GPUS)}"
        )
    gpu = GPUS[config.plan.gpu]
    precision = config.plan.precision or _PLAN_PRECISIONS.get(str(trainer.precision), str(trainer.precision))
    if precision not in PRECISIONS:
        raise ValueError(
            f"the planner knows the precisions {PRECISIONS}, not {precision!r}; set plan.precision"
        )
    model = get_preset(config.model.preset, **(config.model.model_overrides or {}))
    layout = strategy_layout(trainer.strategy)
    pp, ep = layout.get("pp", 1), layout.get("ep", 1)
    schedule = layout.get("schedule", "1f1b")
    n_micro = ParallelConfig(
        pp=pp, schedule=schedule, n_microbatches=layout.get("n_microbatches")
    ).microbatches
    if data.batch_size % n_micro:
        raise ValueError(
            f"data.batch_size={data.batch_size} does not split into n_microbatches={n_micro}; "
            f"use a multiple of {n_micro}"
        )
    if gpus % pp:
        raise ValueError(f"{gpus} GPUs do not split into pp={pp} pipeline stages")
    kwargs = dict(
        config=model, gpus=gpus, gpu=gpu, pp=pp, ep=ep, schedule=schedule,
        precision=precision, global_batch=data.batch_size * (gpus // pp), seq_len=data.seq_len,
        micro_batch_size=data.batch_size // n_micro, checkpointing=model.activation_checkpointing,
        zero=layout.get("zero", True),
        max_nodes_per_token=layout.get("max_nodes_per_token") if ep > gpu.gpus_per_node else None,
        layer_costs=layout.get("layer_costs"),
    )  # fmt: skip
    return plan_runnable(**kwargs)


def plan_text(config: Namespace) -> str:
    """The plan of a parsed fit config as the planner prints it (with the published figure for v3-671b)."""
    return format_plan(plan_of(config), published_hours(config.model.preset, config.plan.gpu))


def main(args: Sequence[str] | None = None) -> DSV3CLI:
    """Run the CLI; `plan ARGS` is `fit ARGS --plan.only=true` (a subcommand Lightning's Trainer lacks)."""
    if args is None and sys.argv[1:2] == ["plan"]:  # from the command line: LightningCLI reads sys.argv
        sys.argv[1:] = ["fit", *sys.argv[2:], "--plan.only=true"]
    elif args is not None and list(args[:1]) == ["plan"]:
        args = ["fit", *args[1:], "--plan.only=true"]
    return DSV3CLI(DeepSeekV3Module, DSV3DataModule, save_config_kwargs={"overwrite": True}, args=args)


if __name__ == "__main__":
    main()
