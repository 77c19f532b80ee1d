"""lightning-dsv3: DeepSeek-V3-style training (MLA, DeepSeekMoE, DualPipe, expert parallelism, ZeRO-1)
as a PyTorch Lightning strategy."""

from lightning_dsv3.config import PRESETS, ModelConfig, ParallelConfig, count_parameters, get_preset

__version__ = "0.1.0"

__all__ = ["PRESETS", "ModelConfig", "ParallelConfig", "count_parameters", "get_preset"]
