"""The FLOP model of DeepSeek-V3: one count for stage partitioning, throughput and MFU.

What is counted: matrix-multiplication FLOPs only, two per multiply-accumulate (2 m n k for an
(m, k) x (k, n) product). That is every projection of MLA, the attention scores (q k^T) and the
weighted sum of the values, the dense MLPs, the router, the shared experts and only the routed
experts a token is sent to (`n_activated_experts` per MoE layer), the output head, and the MTP modules
(their [embedding; hidden] projection, their layer and the shared head). Not counted: norms, rotary
embeddings, softmax, activations, the embedding lookup, the loss and the optimizer (elementwise work
that MFU conventions leave out too). torch's `FlopCounterMode` counts the same set of operations,
which is how tests/callbacks checks this model.

Attention: a causal kernel needs only the scores on and below the diagonal, so by default half of
the seq x seq scores and value products are counted (`causal=True`); `causal=False` counts the full
square, which is what a kernel that computes the masked half does (and what FlopCounterMode reports).

Training: the backward of a product costs two products (the input and the weight gradients), so a
training step is `TRAIN_FACTOR` = 3 x the forward.
"""

from __future__ import annotations

from lightning_dsv3.config import ModelConfig

TRAIN_FACTOR = 3  # forward + backward (input and weight gradients) = 3 x forward


def layer_flops(config: ModelConfig, layer_id: int, seq_len: int, causal: bool = True) -> float:
    """Forward FLOPs per token of decoder layer `layer_id` (MLA and its FFN) in sequences of `seq_len`."""
    d, h = config.dim, config.n_heads
    if config.q_lora_rank:
        q = 2 * d * config.q_lora_rank + 2 * config.q_lora_rank * h * config.qk_head_dim
    else:
        q = 2 * d * h * config.qk_head_dim
    kv = 2 * d * (config.kv_lora_rank + config.qk_rope_head_dim)
    kv += 2 * config.kv_lora_rank * h * (config.qk_nope_head_dim + config.v_head_dim)
    out = 2 * h * config.v_head_dim * d
    # each token's query meets seq_len keys: scores (qk_head_dim) and values (v_head_dim)
    attn = 2 * h * seq_len * (config.qk_head_dim + config.v_head_dim)
    if causal:
        attn /= 2
    if config.is_moe_layer(layer_id):
        experts = config.n_activated_experts + config.n_shared_experts  # SwiGLU: three matrices each
        ffn = 6 * d * config.moe_inter_dim * experts + 2 * d * config.n_routed_experts  # + the router
    else:
        ffn = 6 * d * config.inter_dim
    return float(q + kv + out + attn + ffn)


def head_flops(config: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Forward FLOPs per token of the output head plus the MTP modules.

    MTP depth k (1-based) runs on the first seq_len - k positions only, so its share per token of the
    main sequence is (seq_len - k) / seq_len of a projection (2d -> d), a layer and the head.
    """
    head = 2 * config.dim * config.vocab_size
    mtp = 0.0
    for k in range(1, config.mtp_depth + 1):
        n = seq_len - k
        if n < 1:
            break
        per_token = layer_flops(config, config.n_layers + k - 1, n, causal) + 4 * config.dim**2 + head
        mtp += per_token * n / seq_len
    return float(head + mtp)


def forward_flops(config: ModelConfig, batch: int, seq_len: int, causal: bool = True) -> float:
    """Forward FLOPs of the whole model on `batch` sequences of `seq_len` input tokens."""
    per_token = sum(layer_flops(config, i, seq_len, causal) for i in range(config.n_layers))
    per_token += head_flops(config, seq_len, causal)
    return per_token * batch * seq_len


def train_flops(config: ModelConfig, batch: int, seq_len: int, causal: bool = True) -> float:
    """Forward and backward FLOPs of one training step on `batch` sequences of `seq_len` tokens."""
    return TRAIN_FACTOR * forward_flops(config, batch, seq_len, causal)
