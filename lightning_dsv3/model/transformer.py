"""The DeepSeek-V3 decoder: embedding, layers, final norm, head and MTP, cut into stages by layer ranges.

A `Transformer` built with a subset of `layer_ids` is one pipeline stage; parameter names stay those
of the whole model ("layers.7.attn.wq_a.weight"), so stages load slices of one state dict and
`init_weights` gives every parameter the same values whatever the cut (its seed depends on its name).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lightning_dsv3.config import ModelConfig
from lightning_dsv3.model.block import Block
from lightning_dsv3.model.mla import rope_cos_sin
from lightning_dsv3.model.moe import MoE, Router
from lightning_dsv3.model.mtp import MTPModule
from lightning_dsv3.model.norm import RMSNorm


@dataclass
class LossOutput:
    """The training objective and its parts (detached parts are for logging)."""

    loss: torch.Tensor  # scalar: ce + mtp_loss_weight * mean(mtp)
    ce: torch.Tensor  # scalar: next-token cross-entropy, mean over tokens
    mtp: list[torch.Tensor]  # per-depth cross-entropy of the MTP modules


# torch.compile's modes that replay CUDA graphs -> the same compilation without them
_WITHOUT_CUDA_GRAPHS: dict[str, str | None] = {
    "reduce-overhead": None,
    "max-autotune": "max-autotune-no-cudagraphs",
}


class Transformer(nn.Module):
    """The whole model, or the pipeline stage holding `layer_ids` (and the embedding / head if asked).

    The last stage (`with_head`) also holds the MTP modules, and therefore an embedding of its own
    when it is not also the first stage; the strategy keeps the two embedding copies in sync.
    """

    def __init__(
        self,
        config: ModelConfig,
        layer_ids: Sequence[int] | None = None,
        with_embedding: bool = True,
        with_head: bool = True,
    ) -> None:
        super().__init__()
        self.config = config
        self.cross_entropy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = _cross_entropy
        self.parts_compiled = False  # set by `compile_parts`: a pipeline then runs each part's backward whole
        # set by `compile_parts` for a pipelined chunk in a CUDA-graph mode: the pipeline runtime graphs
        # its layers itself, one capture per micro-batch in flight (`pipeline.graphs`)
        self.cuda_graphs = False
        self.layer_ids = list(range(config.n_layers)) if layer_ids is None else list(layer_ids)
        bad = [i for i in self.layer_ids if not 0 <= i < config.n_layers]
        if bad:
            raise ValueError(f"layer ids {bad} are outside [0, n_layers={config.n_layers})")
        self.with_embedding, self.with_head = with_embedding, with_head
        needs_embed = with_embedding or (with_head and config.mtp_depth > 0)
        self.embed = nn.Embedding(config.vocab_size, config.dim) if needs_embed else None
        self.layers = nn.ModuleDict({str(i): Block(i, config) for i in self.layer_ids})
        if with_head:
            self.norm = RMSNorm(config.dim, eps=config.norm_eps)
            self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
            self.mtp = nn.ModuleList(MTPModule(config.n_layers + k, config) for k in range(config.mtp_depth))
        cos, sin = rope_cos_sin(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    # ---- pieces the pipeline calls one by one -------------------------------------------------
    def rope(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len > self.rope_cos.shape[0]:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_seq_len={self.rope_cos.shape[0]}; "
                "shorten the sequences or raise max_seq_len (with rope_factor for YaRN)"
            )
        return self.rope_cos[:seq_len], self.rope_sin[:seq_len]

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, seq) token ids -> (batch, seq, dim)."""
        return self.embed(input_ids)

    def blocks(self) -> Iterator[Block]:
        yield from self.layers.values()  # type: ignore[misc]

    def run_layers(self, h: torch.Tensor) -> torch.Tensor:
        """(batch, seq, dim) -> (batch, seq, dim) through this stage's layers."""
        cos, sin = self.rope(h.shape[1])
        for block in self.blocks():
            h = block(h, cos, sin)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(h))

    def compile_parts(self, mode: str | None = None, pipelined: bool = False) -> None:
        """torch.compile each decoder layer, its compute parts, and the loss's cross-entropy, in place.

        Layer by layer rather than the whole chunk: the layers compile to one graph that every layer of
        a stage reuses. A pipeline calls a layer's `forward` where nothing interleaves the micro-batch,
        and its parts one at a time (`attention`, `dispatch`, `mlp`, `combine`) where an FB hides an
        expert all-to-all, so `attention` and `mlp`, the parts that compute, are compiled too;
        `dispatch` and `combine` hold the expert all-to-all and stay eager. The parts, and with
        `pipelined` every piece, take torch.compile's default mode whatever `mode` is: a pipeline keeps
        several micro-batches' outputs of each piece alive, which the CUDA graphs of torch.compile's
        "reduce-overhead" and "max-autotune" would overwrite (measured: the replay of the next
        micro-batch's forward overwrites the previous one's outputs). A pipelined chunk asked for such a
        mode sets `cuda_graphs` instead, and the pipeline runtime captures the layers' graphs itself,
        once per micro-batch in flight (`lightning_dsv3.pipeline.graphs`).
        The cross-entropy runs in fp32 over (tokens, vocab) logits; eager, it writes an fp32 copy of the
        logits and its softmax (four passes over 2 GiB at the mini preset's 16K tokens), compiled it
        reads the bf16 logits and writes their gradient. `mode` is torch.compile's ("reduce-overhead"
        replays CUDA graphs).
        A compiled part is one backward node for its input and weight gradients together, so a
        pipeline runs its backward whole where a schedule splits B from W (`parts_compiled`).
        """
        parts_mode = _WITHOUT_CUDA_GRAPHS.get(mode, mode) if mode is not None else None
        whole_mode = parts_mode if pipelined else mode
        self.cuda_graphs = pipelined and whole_mode != mode
        for block in self.all_blocks():
            block.compile(mode=whole_mode)
            block.attention = torch.compile(block.attention, mode=parts_mode)  # type: ignore[method-assign]
            block.mlp = torch.compile(block.mlp, mode=parts_mode)  # type: ignore[method-assign]
        self.cross_entropy = torch.compile(_cross_entropy, mode=whole_mode)
        self.parts_compiled = True

    def loss(self, h: torch.Tensor, tokens: torch.Tensor) -> LossOutput:
        """h: (batch, seq, dim) last hidden state; tokens: (batch, seq + 1) -> LossOutput.

        The main head predicts tokens[:, 1:]; MTP depth k predicts tokens[:, k+1:] from positions
        [0, seq - k), feeding on the embeddings of tokens[:, k:seq].
        """
        seq = h.shape[1]
        ce = self.cross_entropy(self.logits(h), tokens[:, 1:])
        mtp_losses: list[torch.Tensor] = []
        h_prev = h
        for k, module in enumerate(self.mtp, start=1):
            if seq - k < 1:
                break
            cos, sin = self.rope(seq - k)
            h_prev = module(h_prev[:, : seq - k], self.embed(tokens[:, k:seq]), cos, sin)
            mtp_losses.append(self.cross_entropy(self.head(module.norm(h_prev)), tokens[:, k + 1 :]))
        loss = ce
        if mtp_losses:
            loss = ce + self.config.mtp_loss_weight * torch.stack(mtp_losses).mean()
        return LossOutput(loss=loss, ce=ce.detach(), mtp=[m.detach() for m in mtp_losses])

    # ---- whole-model conveniences ---------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, seq) token ids -> (batch, seq, vocab) logits. Needs the whole model."""
        self._require_whole("forward")
        return self.logits(self.run_layers(self.embed_tokens(input_ids)))

    def training_loss(self, tokens: torch.Tensor) -> LossOutput:
        """tokens: (batch, seq + 1) -> LossOutput on the whole model."""
        self._require_whole("training_loss")
        return self.loss(self.run_layers(self.embed_tokens(tokens[:, :-1])), tokens)

    def _require_whole(self, what: str) -> None:
        if not (self.with_embedding and self.with_head and len(self.layer_ids) == self.config.n_layers):
            raise RuntimeError(f"Transformer.{what} needs the whole model; this is a pipeline stage")

    # ---- MoE helpers ----------------------------------------------------------------------------
    def all_blocks(self) -> Iterator[Block]:
        """Decoder layers and the MTP modules' layers."""
        yield from self.blocks()
        if self.with_head:
            for module in self.mtp:
                yield module.block

    def routers(self) -> Iterator[tuple[str, Router]]:
        for name, module in self.named_modules():
            if isinstance(module, Router):
                yield name, module

    def moe_layers(self) -> Iterator[tuple[str, MoE]]:
        for name, module in self.named_modules():
            if isinstance(module, MoE):
                yield name, module

    def set_aux_loss_scale(self, scale: float) -> None:
        for block in self.all_blocks():
            block.aux_loss_scale = scale

    # ---- initialisation -------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Normal(0, init_std) weights, unit norms, zero router bias; each tensor seeded by its name.

        Because the seed depends only on (seed, parameter name), a pipeline stage, an expert shard or
        the whole model initialise identical values for the parameters they share.
        """
        std = self.config.init_std
        for name, param in self.named_parameters():
            gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32, device="cpu") * std)
        for _, router in self.routers():
            router.e_score_correction_bias.zero_()
            router.expert_load.zero_()


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy in fp32. logits: (batch, seq, vocab); targets: (batch, seq)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
