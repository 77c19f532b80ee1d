"""What autograd keeps per micro-batch, item by item as the model code saves it.

`layer_activation_bytes` follows model/block.py, mla.py and moe.py for every checkpointing option,
precision and kernel choice; `chunk_activation_bytes` adds the embedding, head and MTP a pipeline
chunk holds and, under the pipeline runtime, the tensors its tapes keep between a layer's parts.
On CPUs (composite RMSNorm, math or flash-CPU attention, padded experts) the tests check these
counts tensor by tensor against torch's saved-tensor hooks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from lightning_dsv3.config import CHECKPOINTING, ModelConfig
from lightning_dsv3.pipeline.stages import ChunkSpec

PRECISIONS: tuple[str, ...] = ("bf16-mixed", "bf16-true", "32-true", "fp8")
IMPLEMENTATIONS = {
    "this": "this code as it is (checked on CPU tensor by tensor, on GPUs by benchmarks/memory_model.py)",
    "deepseek": "DeepSeek-V3's memory techniques as its report describes them (modelled, not run here): "
    "FP8-cached expert and SwiGLU inputs, SwiGLU outputs recomputed, gates applied on the expert side, "
    "no tensors kept between a layer's parts, all-to-all without copies, one embedding for MTP and model",
}


@dataclass(frozen=True)
class PrecisionBytes:
    """Bytes per element of each kind of tensor under one precision setting.

    `stream`: the residual stream and norm outputs (the parameters' dtype: fp32 under bf16-mixed);
    `compute`: matmul inputs and outputs; `cached`: activations DeepSeek caches in FP8 (the output
    projection's input, the routed experts' inputs and SwiGLU); `param`, `grad`: model parameters and
    their gradients; `moment`: each AdamW moment; `autocast`: whether matmuls cast their operands
    (bf16-mixed), which keeps a cast copy of every matmul input and of every weight.
    """

    stream: int
    compute: int
    cached: int
    param: int
    grad: int
    moment: int
    autocast: bool

    @classmethod
    def of(cls, precision: str, zero: bool = True) -> PrecisionBytes:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
        if precision == "fp8":  # DeepSeek-V3: bf16 weights, fp32 grads, bf16 moments
            return cls(stream=2, compute=2, cached=1, param=2, grad=4, moment=2, autocast=False)
        param = 2 if precision == "bf16-true" else 4
        compute = 4 if precision == "32-true" else 2
        moment = 4 if zero else param  # ZeRO-1 steps fp32 master shards; without it, the parameters
        return cls(param, compute, compute, param, param, moment, precision == "bf16-mixed")


@dataclass(frozen=True)
class Kernels:
    """The implementations whose saved tensors differ (see `lightning_dsv3.plan`)."""

    norm: str = "fused"  # "fused" (CUDA) or "composite" (CPU: also keeps x / rms)
    attention: str = "fused"  # "fused" (q, k, v, out, lse) or "math" (q, k, v copies and probabilities)
    experts: str = "grouped"  # "grouped" (torch._grouped_mm) or "padded" (bmm over a capacity buffer)
    log_sigmoid_buffer: bool = False  # CPU's log_sigmoid keeps a buffer the size of its input

    @classmethod
    def for_device(cls, device: str, precision: str, config: ModelConfig) -> Kernels:
        """What runs on `device` ("cuda" means Hopper) for `precision` and this model's head dims."""
        if device == "cpu":
            equal_dims = config.attn_pad_v or config.v_head_dim == config.qk_head_dim
            return cls("composite", "fused" if equal_dims else "math", "padded", log_sigmoid_buffer=True)
        grouped = precision in ("bf16-mixed", "bf16-true", "fp8")
        return cls("fused", "fused", "grouped" if grouped else "padded")


@dataclass(frozen=True)
class _Shape:
    """One micro-batch through one layer: `tokens` = batch x seq."""

    batch: int
    seq: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def _norm_bytes(width: int, nbytes: int, kernels: Kernels) -> float:
    """Per token, what one RMSNorm keeps: its input and 1/rms (fp32); the composite one also x / rms."""
    if kernels.norm == "composite":
        return 2 * width * 4 + 4
    return width * nbytes + 4


def _matmul_inputs(width: int, source_bytes: int, n_consumers: int, pb: PrecisionBytes) -> float:
    """Per token, what `n_consumers` matmuls keep of one input: under autocast each keeps its own
    compute-dtype copy of an fp32 input; otherwise they share the input itself."""
    if pb.autocast and source_bytes == 4:
        return n_consumers * width * pb.compute
    return width * source_bytes


def layer_activation_bytes(
    config: ModelConfig,
    layer_id: int,
    batch: int,
    seq: int,
    precision: str = "bf16-mixed",
    kernels: Kernels | None = None,
    checkpointing: str | None = None,
    ep: int = 1,
    expert_imbalance: float = 1.0,
    implementation: str = "this",
) -> dict[str, float]:
    """Bytes autograd keeps for one micro-batch of `batch` x `seq` tokens through layer `layer_id`, by item.

    `checkpointing` defaults to the config's. `expert_imbalance` (busiest expert / mean) sizes the
    padded-bmm buffer. Items follow the code: model/block.py, mla.py, moe.py (see the module docstring).
    `implementation="deepseek"` models DeepSeek-V3's kernels instead (see `IMPLEMENTATIONS`).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}; choose one of {sorted(IMPLEMENTATIONS)}")
    option = config.activation_checkpointing if checkpointing is None else checkpointing
    if option not in CHECKPOINTING:
        raise ValueError(f"checkpointing={option!r} is not an option; choose one of {CHECKPOINTING}")
    kernels = kernels or Kernels()
    pb = PrecisionBytes.of(precision)
    shape = _Shape(batch, seq)
    items = _attention_items(config, shape, pb, kernels, option)
    if implementation == "deepseek":
        items.update(_deepseek_ffn_items(config, layer_id, shape, pb))
    else:
        items.update(_ffn_items(config, layer_id, shape, pb, kernels, option, ep, expert_imbalance))
    return {name: value for name, value in items.items() if value}


def _attention_items(
    config: ModelConfig, shape: _Shape, pb: PrecisionBytes, kernels: Kernels, option: str
) -> dict[str, float]:
    """The attention part up to the feed-forward norm (its consumers are counted with the FFN)."""
    t, d, h = shape.tokens, config.dim, config.n_heads
    s, c = pb.stream, pb.compute
    if option in ("attention", "layer"):  # one region from the layer input to norm(h)
        return {"attention region input": t * d * s}
    padded = config.attn_pad_v and config.v_head_dim < config.qk_head_dim
    v_width = config.qk_head_dim if padded else config.v_head_dim
    kernel: dict[str, float] = {}
    if kernels.attention == "fused":
        q_k = 2 * h * config.qk_head_dim * c
        v_storage = h * (config.qk_head_dim if padded else config.qk_nope_head_dim + config.v_head_dim) * c
        kernel["attention q, k, v"] = t * (q_k + v_storage) if option != "selective" else 0
        kernel["attention output, lse"] = t * (h * v_width * c + h * 4)
    else:  # math: copies of q, k, v and the seq x seq probabilities
        kernel["attention q, k, v copies"] = t * h * (2 * config.qk_head_dim + config.v_head_dim) * c
        kernel["attention probabilities"] = shape.batch * h * shape.seq**2 * c
    items = {
        **kernel,
        "output projection input": t * h * config.v_head_dim * pb.cached,
        "feed-forward norm": t * _norm_bytes(d, s, kernels),
    }
    if option == "selective":  # norms and projections ahead of the kernel recomputed from the input
        items["projection region input"] = t * d * s
        return items
    items["attention norm"] = t * _norm_bytes(d, s, kernels)
    items["q/kv down-projection input"] = t * _matmul_inputs(d, s, 2, pb)
    kv_width = config.kv_lora_rank + config.qk_rope_head_dim
    if config.q_lora_rank:
        items["q norm"] = t * _norm_bytes(config.q_lora_rank, c, kernels)
        items["q up-projection input"] = t * config.q_lora_rank * c
    # kv_norm keeps its input, a view of the whole down-projection output (latent and rope key)
    kv_norm = _norm_bytes(kv_width, c, kernels)
    if kernels.norm == "composite":
        kv_norm = kv_width * 4 + config.kv_lora_rank * 4 + 4
    items["kv norm"] = t * kv_norm
    items["kv up-projection input"] = t * config.kv_lora_rank * c
    return items


def _deepseek_ffn_items(
    config: ModelConfig, layer_id: int, shape: _Shape, pb: PrecisionBytes
) -> dict[str, float]:
    """The feed-forward side as DeepSeek-V3's report describes it: inputs of the experts' GEMMs and
    of SwiGLU cached in FP8 (under "fp8"), SwiGLU's output recomputed, the gate applied on the expert
    side (its gradient <dL/da, a> / g needs no expert output kept), no copies for the all-to-all."""
    t, d, cached = shape.tokens, config.dim, pb.cached
    if not config.is_moe_layer(layer_id):
        return {"MLP input": t * d * cached, "MLP hidden": t * 2 * config.inter_dim * cached}
    rows = shape.tokens * config.n_activated_experts
    items = {
        "router input": t * d * pb.compute,
        "router scores": t * _router_bytes(config, pb, Kernels()),
        "expert inputs": rows * d * cached + rows * 4,  # and the gates
        "expert hidden": rows * 2 * config.moe_inter_dim * cached,
        "routing indices": 2 * rows * 8,
    }
    if config.n_shared_experts:
        width = config.n_shared_experts * config.moe_inter_dim
        items["shared expert hidden"] = t * (d + 2 * width) * cached
    return items


def _router_bytes(config: ModelConfig, pb: PrecisionBytes, kernels: Kernels) -> float:
    """Per token, what moe.Router keeps: the scores (sigmoid or softmax output) and the chosen indices;
    sigmoid gates come from a softmax over the chosen log-sigmoids, which keeps the logits, the
    log-sigmoids (read by the gather), CPU's log-sigmoid buffer and the k gates."""
    n, k = config.n_routed_experts, config.n_activated_experts
    score = pb.compute if pb.autocast else 4  # autocast runs the router's linear in bf16
    if config.score_func != "sigmoid":
        return n * score + k * 8
    buffer = n * score if kernels.log_sigmoid_buffer else 0
    return 3 * n * score + buffer + k * 8 + k * 4


def _ffn_items(
    config: ModelConfig,
    layer_id: int,
    shape: _Shape,
    pb: PrecisionBytes,
    kernels: Kernels,
    option: str,
    ep: int,
    imbalance: float,
) -> dict[str, float]:
    """What the router, the experts (or the dense MLP) and the combine keep."""
    t, d = shape.tokens, config.dim
    s, c = pb.stream, pb.compute
    recompute_mlp = option in ("mlp", "layer")
    moe = config.is_moe_layer(layer_id)
    n_mlp_consumers = 2 if (not moe or config.n_shared_experts) else 0  # w1 and w3 read norm(h)
    items: dict[str, float] = {}
    if n_mlp_consumers:
        # the MLP region keeps norm(h) itself; otherwise w1 and w3 keep it (or their casts)
        width = d * s if recompute_mlp else _matmul_inputs(d, s, n_mlp_consumers, pb)
        items["feed-forward input"] = t * width
    if not moe:
        items["MLP hidden"] = 0 if recompute_mlp else t * 4 * config.inter_dim * c
        return items
    k, n_experts = config.n_activated_experts, config.n_routed_experts
    # the router's linear runs on norm(h).float(): fp32 inputs are the tensor itself (shared with the
    # MLP when that keeps norm(h) unchanged), bf16 ones an fp32 copy, and autocast keeps a bf16 cast
    if s == 4 and not pb.autocast:
        shared_with_mlp = n_mlp_consumers and items["feed-forward input"] == t * d * 4
        items["router input"] = 0 if shared_with_mlp else t * d * 4
    else:
        items["router input"] = t * d * (c if pb.autocast else 4)
    if not pb.autocast and s != 4:
        items["router weight copy"] = n_experts * d * 4  # weight.float() per micro-batch
    items["router scores"] = t * _router_bytes(config, pb, kernels)
    if config.aux_loss_alpha > 0:  # the balance loss keeps each token's score sum and f per sequence
        items["balance loss"] = t * 4 + shape.batch * n_experts * 4
    items["routing indices"] = t * k * 8 * 2  # gather of the routed rows and the combine's inverse
    if config.n_shared_experts:
        width = config.n_shared_experts * config.moe_inter_dim
        items["shared expert hidden"] = 0 if recompute_mlp else t * 4 * width * c
    rows = t * k  # routed rows received by this rank, on average (balanced routing)
    n_local = n_experts // ep
    if recompute_mlp:
        items["expert region input"] = rows * d * s + n_local * 8  # and the per-expert counts
    elif kernels.experts == "grouped":
        inputs = rows * d * pb.cached
        hidden = rows * 4 * config.moe_inter_dim * pb.cached
        items["expert inputs"] = inputs
        items["expert hidden"] = hidden
        if pb.autocast:  # grouped GEMM operands cast per micro-batch: w1, w2, w3 of the local experts
            items["expert weight casts"] = 3 * n_local * d * config.moe_inter_dim * c
    else:
        capacity_rows = n_local * math.ceil(rows / n_local * imbalance - 1e-6)  # a measured ratio is inexact
        items["expert slot indices"] = 2 * rows * 8
        items["expert buffer"] = capacity_rows * d * c
        items["expert hidden"] = capacity_rows * 4 * config.moe_inter_dim * c
    items["combine inputs"] = rows * (d * c + c)  # expert outputs in token order and their gates
    if ep > 1:  # the all-to-all's re-sorting by local expert (parallel/expert.py)
        items["expert-parallel sorting"] = rows * 2 * 8 + rows * d * c
    return items


def chunk_activation_bytes(
    config: ModelConfig,
    spec: ChunkSpec,
    batch: int,
    seq: int,
    precision: str = "bf16-mixed",
    kernels: Kernels | None = None,
    checkpointing: str | None = None,
    ep: int = 1,
    expert_imbalance: float | Mapping[int, float] = 1.0,
    pipelined: bool = False,
    implementation: str = "this",
    part_wise: bool = True,
) -> dict[str, float]:
    """Bytes one micro-batch keeps in one model chunk (its layers, and the embedding / head / MTP it
    holds), by item summed over layers. `pipelined`: run by the pipeline runtime, which keeps the
    stage output until its gradient comes back and, where it records the forward part by part
    (`part_wise`: under expert parallelism a micro-batch an FB interleaves; eager, one whose W runs
    apart from its B), the tensors cut between a layer's parts
    (`pipeline/overlap.py`).
    `expert_imbalance` may map layer ids (MTP depth k is layer n_layers + k - 1) to their own factor."""
    kernels = kernels or Kernels()
    option = config.activation_checkpointing if checkpointing is None else checkpointing
    pb = PrecisionBytes.of(precision)
    items: dict[str, float] = {}

    def layer(layer_id: int, layer_seq: int) -> dict[str, float]:
        """A decoder or MTP layer's items under this chunk's options and the layer's own imbalance."""
        imbalance = expert_imbalance
        if isinstance(imbalance, Mapping):
            imbalance = imbalance.get(layer_id, 1.0)
        return layer_activation_bytes(
            config, layer_id, batch, layer_seq, precision, kernels, option, ep, imbalance, implementation
        )

    def add(prefix: str, new: dict[str, float]) -> None:
        for name, value in new.items():
            items[f"{prefix}{name}"] = items.get(f"{prefix}{name}", 0.0) + value

    for layer_id in spec.layer_ids:
        add("", layer(layer_id, seq))
        if pipelined and part_wise and implementation == "this":
            add("", _tape_items(config, layer_id, batch * seq, pb, option, ep, kernels))
    t, d, s = batch * seq, config.dim, pb.stream
    if pipelined and implementation == "this":
        # the tape keeps the stage output until its gradient comes back (the scaled loss on the last stage)
        items["stage output"] = 4 if spec.with_head else t * d * s
    if spec.with_embedding or spec.with_head:
        items["token ids"] = batch * (seq + 1) * 8  # the micro-batch's ids, kept by the embedding and loss
    if spec.with_head:
        add("", _head_items(config, t, pb, kernels))
        for depth in range(1, config.mtp_depth + 1):
            if seq - depth < 1:
                break
            t_mtp = batch * (seq - depth)
            mtp = {
                "MTP embedding norm": t_mtp * _norm_bytes(d, s, kernels),
                # depth 1 normalises a view of the last hidden state, which the final norm keeps already
                "MTP hidden norm": t_mtp * (_norm_bytes(d, s, kernels) - (d * s if depth == 1 else 0)),
                "MTP projection input": t_mtp * _matmul_inputs(2 * d, s, 1, pb),
            }
            add("", mtp)
            add("MTP layer: ", layer(config.n_layers + depth - 1, seq - depth))
            add("MTP ", _head_items(config, t_mtp, pb, kernels))
    return {name: value for name, value in items.items() if value}


def _head_items(config: ModelConfig, tokens: int, pb: PrecisionBytes, kernels: Kernels) -> dict[str, float]:
    """The final norm, the head's input, and what the cross-entropy keeps: the fp32 log-softmax, the
    targets (a contiguous copy of a column slice of the token ids) and the total weight."""
    d = config.dim
    return {
        "head norm": tokens * _norm_bytes(d, pb.stream, kernels),
        "head input": tokens * _matmul_inputs(d, pb.stream, 1, pb),
        "log-softmax": tokens * config.vocab_size * 4,
        "targets": tokens * 8 + 4,
    }


def _tape_items(
    config: ModelConfig,
    layer_id: int,
    tokens: int,
    pb: PrecisionBytes,
    option: str,
    ep: int,
    kernels: Kernels,
) -> dict[str, float]:
    """What the pipeline's part-wise tape keeps of one layer beyond what autograd saves already.

    The tape holds every tensor cut between parts (h, norm(h), gates, routed rows, expert and shared
    outputs) until the backward; those autograd keeps too count once.
    """
    t, d, s, c = tokens, config.dim, pb.stream, pb.compute
    moe = config.is_moe_layer(layer_id)
    has_mlp_input = not moe or config.n_shared_experts > 0
    recompute_mlp = option in ("mlp", "layer")
    # norm(h) itself is kept by autograd where no cast sits between it and its readers
    xn_saved = recompute_mlp or (not pb.autocast and has_mlp_input) or s == 4 and not pb.autocast
    items = {
        "tape: h": 0 if option in ("none", "mlp", "selective") else t * d * s,  # else ffn_norm keeps it
        "tape: norm(h)": 0 if xn_saved else t * d * s,
        "tape: MLP outputs": t * d * c,
    }
    if moe:
        k = config.n_activated_experts
        rows = t * k
        gates_saved = s == 4 and not pb.autocast and c == 4
        # the routed rows are what the experts keep only when no cast or copy sits in between
        rows_saved = ep == 1 and (recompute_mlp or (kernels.experts == "grouped" and not pb.autocast))
        items["tape: gates"] = 0 if gates_saved else rows * 4
        items["tape: routed rows"] = 0 if rows_saved else rows * d * s
        items["tape: expert outputs"] = rows * d * c
    return items
