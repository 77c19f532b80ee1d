"""Multi-head Latent Attention (MLA) with decoupled rotary keys and YaRN scaling.

MLA caches a `kv_lora_rank` latent plus one `qk_rope_head_dim` rotary key per token instead of full
per-head keys and values; training uses the decompressed form below. Rotary embeddings act on
interleaved pairs (x[2i], x[2i+1]), the convention of the public DeepSeek-V3 weights.

Selective recomputation (`activation_checkpointing="selective"`, DeepSeek-V3's choice): the RMSNorms
and the projections that make q, k and v are recomputed in backward instead of kept. Their internals
run under torch's non-reentrant checkpoint; the q, k, v the attention kernel itself saves are freed
once it has run and rebuilt just before its backward (what Megatron-LM's CheckpointWithoutOutput
does), so the attention kernel is never re-run. Kept per layer: the layer input, the attention output
and its log-sum-exp, and the input of the output projection.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_dsv3.config import ModelConfig
from lightning_dsv3.model.norm import RMSNorm


def _yarn_correction_dim(n_rotations: float, dim: int, base: float, original_seq_len: int) -> float:
    """The rotary dimension index whose wavelength fits `n_rotations` times into the original context."""
    return dim * math.log(original_seq_len / (n_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_frequencies(config: ModelConfig) -> torch.Tensor:
    """Per-pair angular frequencies, YaRN-interpolated when the context is extended.

    Returns a float64 tensor of shape (qk_rope_head_dim // 2,). Frequencies whose wavelength exceeds
    the original context (index above `beta_slow`'s correction dim) are divided by `rope_factor`;
    those that rotate more than `beta_fast` times are kept; a linear ramp blends the band between.
    """
    dim, base = config.qk_rope_head_dim, config.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if not config.uses_yarn:
        return freqs
    low = max(math.floor(_yarn_correction_dim(config.beta_fast, dim, base, config.original_seq_len)), 0)
    high = min(math.ceil(_yarn_correction_dim(config.beta_slow, dim, base, config.original_seq_len)), dim - 1)
    if low == high:
        high += 1e-3
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1 where frequencies stay, 0 where they are interpolated
    return freqs / config.rope_factor * (1 - keep) + freqs * keep


def rope_cos_sin(config: ModelConfig, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (seq_len, qk_rope_head_dim // 2), float32."""
    seq_len = seq_len or config.max_seq_len
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), rope_frequencies(config))
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim.

    x: (batch, seq, heads, rope_dim); cos, sin: (seq, rope_dim // 2). Computed in fp32.
    """
    xf = x.float().unflatten(-1, (-1, 2))
    x1, x2 = xf[..., 0], xf[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]  # (seq, 1, rope_dim // 2), broadcast over heads
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


def softmax_scale(config: ModelConfig) -> float:
    """1/sqrt(qk_head_dim), times YaRN's mscale squared when the context is extended."""
    scale = config.qk_head_dim**-0.5
    if config.uses_yarn:
        mscale = 0.1 * config.mscale * math.log(config.rope_factor) + 1.0
        scale *= mscale * mscale
    return scale


class MLA(nn.Module):
    """Causal multi-head latent attention.

    Queries: x -> wq_a (q_lora_rank) -> q_norm -> wq_b -> (heads, nope + rope), or one `wq` when
    q_lora_rank is 0. Keys/values: x -> wkv_a -> [latent (kv_lora_rank), k_rope (shared by heads)];
    latent -> kv_norm -> wkv_b -> (heads, nope + v).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.v_head_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.pad_v = config.attn_pad_v and config.v_head_dim < config.qk_head_dim
        if config.q_lora_rank > 0:
            self.wq_a = nn.Linear(config.dim, config.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(config.q_lora_rank, eps=config.norm_eps)
            self.wq_b = nn.Linear(config.q_lora_rank, config.n_heads * self.qk_head_dim, bias=False)
        else:
            self.wq = nn.Linear(config.dim, config.n_heads * self.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(config.dim, config.kv_lora_rank + config.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(config.kv_lora_rank, eps=config.norm_eps)
        self.wkv_b = nn.Linear(
            config.kv_lora_rank, config.n_heads * (config.qk_nope_head_dim + config.v_head_dim), bias=False
        )
        self.wo = nn.Linear(config.n_heads * config.v_head_dim, config.dim, bias=False)
        self.scale = softmax_scale(config)
        self.selective = config.activation_checkpointing == "selective"

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, seq, dim) -> q: (batch, seq, heads, qk_head_dim), before rope."""
        q = self.wq_b(self.q_norm(self.wq_a(x))) if hasattr(self, "wq_a") else self.wq(x)
        return q.unflatten(-1, (self.n_heads, self.qk_head_dim))

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, norm: nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (batch, seq, dim), normalised by `norm` first if given -> q, k, v for the attention kernel.

        q, k: (batch, seq, heads, qk_head_dim) with rope applied; v: (batch, seq, heads, v_head_dim),
        or qk_head_dim when padded.
        """
        if norm is not None:
            x = norm(x)
        q = self.project_q(x)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q = torch.cat([q_nope, apply_rope(q_rope, cos, sin)], dim=-1)  # (b, s, h, qk_head_dim)

        latent, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_rope = apply_rope(k_rope.unsqueeze(2), cos, sin)  # (b, s, 1, rope_dim), shared by heads
        kv = self.wkv_b(self.kv_norm(latent)).unflatten(-1, (self.n_heads, -1))
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, -1, self.n_heads, -1)], dim=-1)
        if self.pad_v:  # equal head dims let SDPA take its flash-attention path on GPUs
            v = F.pad(v, (0, self.qk_head_dim - self.v_head_dim))
        return q, k, v

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, norm: nn.Module | None = None
    ) -> torch.Tensor:
        """x: (batch, seq, dim), normalised by `norm` first if given; cos, sin: (seq, rope_dim // 2)
        -> (batch, seq, dim)."""
        recompute = self.selective and torch.is_grad_enabled()
        if recompute:
            q, k, v = checkpoint(self.project, x, cos, sin, norm, use_reentrant=False)
        else:
            q, k, v = self.project(x, cos, sin, norm)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=self.scale
        )  # (b, h, s, v or qk_head_dim)
        if recompute and out.grad_fn is not None:
            free_until_backward((q, k, v), lambda: self.project(x, cos, sin, norm), out.grad_fn)
        out = out[..., : self.v_head_dim].transpose(1, 2).flatten(2)
        return self.wo(out)


def free_until_backward(
    tensors: tuple[torch.Tensor, ...],
    rebuild: Callable[[], tuple[torch.Tensor, ...]],
    consumer: torch.autograd.graph.Node,
) -> None:
    """Free the memory of `tensors` now and refill it from `rebuild()` when `consumer`'s backward starts.

    For tensors whose only later reader is the backward of `consumer` (the op that saved them) and of
    ops behind it. The storages shrink to nothing and are refilled in place, so the autograd nodes that
    saved them see the rebuilt values; `rebuild` must reproduce them exactly (same ops, same autocast).
    """
    storages = _distinct_storages(tensors)
    nbytes = [s.nbytes() for s in storages]
    device = tensors[0].device.type
    autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))

    def refill(grad_outputs: Any) -> None:
        if all(s.nbytes() == n for s, n in zip(storages, nbytes)):
            return  # refilled by an earlier backward over the same graph
        with torch.no_grad(), torch.autocast(device, dtype=autocast[1], enabled=autocast[0]):
            fresh = _distinct_storages(rebuild())
        for storage, n, new in zip(storages, nbytes, fresh, strict=True):
            if new.nbytes() != n:
                raise RuntimeError(f"rebuilt activation has {new.nbytes()} bytes, the freed one had {n}")
            storage.resize_(n)
            storage.copy_(new)

    consumer.register_prehook(refill)
    for storage in storages:
        storage.resize_(0)


def _distinct_storages(tensors: tuple[torch.Tensor, ...]) -> list[torch.UntypedStorage]:
    """The storages under `tensors`, each once, in order (views of one storage share it)."""
    found: dict[int, torch.UntypedStorage] = {}
    for t in tensors:
        storage = t.untyped_storage()
        found.setdefault(storage.data_ptr(), storage)
    return list(found.values())
