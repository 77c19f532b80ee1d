"""Every recipe parses through LightningCLI, plans on its GPUs, and the two-GPU ones train on CPU."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from recipe_checks import RECIPES, load_train, run_recipe

from lightning_dsv3 import DSV3Strategy
from lightning_dsv3.pipeline import make_schedule

CONFIGS = RECIPES / "configs"
OVERLAYS = {"wandb.yaml"}  # added on top of another config, never alone
BASES = sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name not in OVERLAYS)
GPU_RECIPES = [name for name in BASES if name.startswith(("mini-", "lite-"))]
TWO_GPU_RECIPES = [name for name in BASES if name.startswith("mini-2gpu-")]


@pytest.fixture(scope="module")
def train() -> Any:
    return load_train()


@pytest.fixture(scope="module")
def plan_only(train: Any) -> tuple[Any, str]:
    """The plan-only recipe run as users run it; its CLI's parser then parses the other configs."""
    cli = train.main(["plan", "--config", str(CONFIGS / "v3-671b-plan.yaml")])
    return cli, cli.plan_text


def test_the_recipes_this_project_documents_exist() -> None:
    expected = {
        "debug.yaml", "mini-1gpu.yaml", "mini-2gpu-dualpipe.yaml", "mini-2gpu-dualpipev.yaml",
        "mini-2gpu-ep2.yaml", "mini-2gpu-dp2-zero.yaml", "lite-8gpu.yaml", "v3-671b-plan.yaml",
    }  # fmt: skip
    assert expected <= set(BASES)
    readme = (RECIPES.parent / "README.md").read_text()
    assert all(f"recipes/configs/{name}" in readme for name in BASES + sorted(OVERLAYS))


@pytest.mark.parametrize("name", BASES)
def test_config_parses_and_builds(plan_only: tuple[Any, str], name: str) -> None:
    """Class paths resolve, arguments type-check, and the model, data and strategy objects construct."""
    parser = plan_only[0].parser
    extra = ["--config", str(CONFIGS / "wandb.yaml")] if name == "debug.yaml" else []
    config = parser.parse_args(["fit", "--config", str(CONFIGS / name), *extra])
    if config.fit.plan.only:  # a plan-only config is never built, by design
        return
    built = parser.instantiate_classes(config).fit
    strategy = built.trainer.strategy
    if isinstance(strategy, DSV3Strategy):
        world = built.trainer.devices * (built.trainer.num_nodes or 1)
        layout = strategy.parallel_config.resolve(world)
        n_micro = strategy.n_microbatches()
        assert built.data.batch_size % n_micro == 0
        assert built.model.config.n_routed_experts % layout.ep == 0
        if layout.pipelined:
            make_schedule(layout.schedule, layout.pp, n_micro)  # raises on too few micro-batches


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_gpu_recipe_fits_its_gpus_by_the_planner(plan_only: tuple[Any, str], train: Any, name: str) -> None:
    config = plan_only[0].parser.parse_args(["fit", "--config", str(CONFIGS / name)]).fit
    plan = train.plan_of(config)
    assert plan.fits("this"), f"{name}: predicted peak {plan.memory['this'].worst.peak_bytes / 2**30:.1f} GiB"


def test_plan_only_recipe_prints_the_plan_and_builds_nothing(plan_only: tuple[Any, str], train: Any) -> None:
    cli, text = plan_only
    assert not hasattr(cli, "trainer") and not hasattr(cli, "model")
    assert "Layout: pp=16 x dp=2 x ep=64, dualpipe, ZeRO-1 on, fp8" in text
    assert "Batch: 15360 sequences of 4096 tokens" in text
    assert "published (DeepSeek-V3 report)" in text
    # `fit` on the same config plans too: plan.only in the YAML keeps it from allocating 671B parameters
    again = train.main(["fit", "--config", str(CONFIGS / "v3-671b-plan.yaml")])
    assert again.plan_text == text


def test_one_gpu_recipe_trains_on_cpu(tmp_path: Path) -> None:
    result = run_recipe(
        "mini-1gpu.yaml", str(tmp_path), "--trainer.precision=32-true", "--model.compile=false"
    )
    assert result["global_step"] == 2 and math.isfinite(result["train_loss"])
    assert (Path(result["log_dir"]) / "metrics.csv").is_file()


@pytest.mark.parametrize("name", TWO_GPU_RECIPES)
def test_two_gpu_recipe_trains_on_two_cpu_processes(pool2: Any, tmp_path: Path, name: str) -> None:
    """The YAML's strategy and layout as written (bf16-mixed included), on gloo instead of NCCL."""
    results = pool2.run(run_recipe, name, str(tmp_path))
    assert [r["strategy"] for r in results] == ["DSV3Strategy"] * 2
    assert all(r["world_size"] == 2 and r["global_step"] == 2 for r in results)
    assert results[0]["precision"] == "bf16-mixed"
    assert results[0]["train_loss"] == pytest.approx(results[1]["train_loss"])  # the global loss on both
    assert (Path(results[0]["log_dir"]) / "metrics.csv").is_file()
