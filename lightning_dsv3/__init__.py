"""lightning-dsv3: DeepSeek-V3-style training (MLA, DeepSeekMoE, DualPipe, expert parallelism, ZeRO-1)
as a PyTorch Lightning strategy."""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_dsv3.config import PRESETS, ModelConfig, ParallelConfig, count_parameters, get_preset
from lightning_dsv3.strategy import DSV3Strategy

if "dsv3" not in StrategyRegistry:
    DSV3Strategy.register_strategies(StrategyRegistry)

__version__ = "0.1.0"

__all__ = ["DSV3Strategy", "PRESETS", "ModelConfig", "ParallelConfig", "count_parameters", "get_preset"]
