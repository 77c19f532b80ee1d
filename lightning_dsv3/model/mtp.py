"""Multi-token prediction (MTP): extra sequential modules that predict tokens further ahead.

Module k (1-based) combines the previous depth's hidden state at position i with the embedding of
token i+k and predicts token i+k+1, keeping the causal chain: h_i^k = Block(W [norm(Emb(t_{i+k}));
norm(h_i^{k-1})]). The embedding and the output head are the main model's; each module has its own
final norm. At inference the modules can be dropped.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_dsv3.config import ModelConfig
from lightning_dsv3.model.block import Block
from lightning_dsv3.model.norm import RMSNorm


class MTPModule(nn.Module):
    """One MTP depth: projection of [embedding; hidden] to dim, one decoder layer, a final norm."""

    def __init__(self, layer_id: int, config: ModelConfig) -> None:
        super().__init__()
        self.enorm = RMSNorm(config.dim, eps=config.norm_eps)
        self.hnorm = RMSNorm(config.dim, eps=config.norm_eps)
        self.eh_proj = nn.Linear(2 * config.dim, config.dim, bias=False)
        self.block = Block(layer_id, config)
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)

    def forward(
        self, h_prev: torch.Tensor, emb_ahead: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """h_prev, emb_ahead: (batch, seq_k, dim) -> hidden (batch, seq_k, dim), before `norm`."""
        x = self.eh_proj(torch.cat([self.enorm(emb_ahead), self.hnorm(h_prev)], dim=-1))
        return self.block(x, cos, sin)
