"""The DeepSeek-V3 model, free of parallelism: the strategy cuts and shards it."""

from lightning_dsv3.model.block import Block, LayerState
from lightning_dsv3.model.mla import MLA
from lightning_dsv3.model.moe import MoE, Router, Routing
from lightning_dsv3.model.mtp import MTPModule
from lightning_dsv3.model.transformer import LossOutput, Transformer

__all__ = ["MLA", "Block", "LayerState", "LossOutput", "MTPModule", "MoE", "Router", "Routing", "Transformer"]
