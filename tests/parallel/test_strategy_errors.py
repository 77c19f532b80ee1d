"""Invalid layouts are refused with one clear error before any process or group is started."""

import lightning as L
import pytest
import torch

from lightning_dsv3 import DSV3Strategy
from lightning_dsv3.module import DeepSeekV3Module


def test_strategy_is_registered_under_its_short_name() -> None:
    trainer = L.Trainer(strategy="dsv3", accelerator="cpu", devices=1, logger=False)
    assert isinstance(trainer.strategy, DSV3Strategy)


@pytest.mark.parametrize(
    ("kwargs", "devices", "match"),
    [
        ({"pp": 1, "ep": 2}, 3, "not divisible by pp\\*ep"),
        ({"dp": 2, "ep": 2}, 2, "does not match the world size 2"),
        ({"pp": 0}, 1, "pp must be >= 1"),
        ({"schedule": "zigzag"}, 1, "unknown schedule"),
        ({"n_microbatches": 0}, 1, "n_microbatches must be >= 1"),
    ],
)
def test_bad_mesh_is_refused_before_launch(kwargs, devices, match) -> None:
    with pytest.raises(ValueError, match=match):
        L.Trainer(strategy=DSV3Strategy(**kwargs), accelerator="cpu", devices=devices, logger=False)


def test_ep_must_divide_the_experts() -> None:
    module = DeepSeekV3Module(
        model_overrides={"n_routed_experts": 6, "n_expert_groups": 2, "n_limited_groups": 1}
    )
    strategy = DSV3Strategy(ep=4)
    strategy._lightning_module = module  # what Trainer.fit's connect does
    with pytest.raises(ValueError, match="ep=4 does not divide n_routed_experts=6"):
        strategy._validate(world_size=4)


def test_only_the_dsv3_module_is_accepted(tmp_path) -> None:
    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Linear(2, 2)

        def training_step(self, batch, batch_idx):
            return self.w(batch).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(strategy=DSV3Strategy(), accelerator="cpu", devices=1, logger=False, max_steps=1)
    with pytest.raises(TypeError, match="DeepSeekV3Module"):
        trainer.fit(Plain(), torch.utils.data.DataLoader(torch.zeros(4, 2)))


def test_batch_that_does_not_split_into_microbatches() -> None:
    strategy = DSV3Strategy(n_microbatches=3)
    with pytest.raises(ValueError, match="does not split into n_microbatches=3"):
        strategy.split_microbatches(torch.zeros(4, 9, dtype=torch.long))


def test_measured_layer_costs_cut_the_stages() -> None:
    module = DeepSeekV3Module()
    n = module.config.n_layers
    strategy = DSV3Strategy(pp=2, schedule="1f1b", n_microbatches=2, layer_costs=[100.0] + [1.0] * (n - 1))
    strategy._lightning_module = module
    strategy._validate(world_size=2)
    assert list(strategy.plan.layers[0]) == [0]  # the costly first layer is a stage of its own


def test_layer_costs_of_the_wrong_length_are_refused_before_launch() -> None:
    strategy = DSV3Strategy(pp=2, schedule="1f1b", n_microbatches=2, layer_costs=[1.0, 2.0, 3.0])
    strategy._lightning_module = DeepSeekV3Module()
    with pytest.raises(ValueError, match="layer_costs has 3 entries"):
        strategy._validate(world_size=2)
