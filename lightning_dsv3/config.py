"""Configuration dataclasses and named presets.

`ModelConfig` describes the DeepSeek-V3 architecture (field names follow the technical report and
the public reference implementation); `ParallelConfig` describes the (pp, dp, ep) layout and the
pipeline schedule. Both validate themselves in `__post_init__` so that an impossible request fails
before any process group or tensor is created, with a message that names the field and the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

ScoreFunc = Literal["sigmoid", "softmax"]
Schedule = Literal["dualpipe", "dualpipev", "1f1b", "zb1p", "interleaved_1f1b", "gpipe"]
SCHEDULES: tuple[str, ...] = ("dualpipe", "dualpipev", "1f1b", "zb1p", "interleaved_1f1b", "gpipe")
# what each layer recomputes in backward instead of keeping (model/block.py, model/mla.py)
CHECKPOINTING: tuple[str, ...] = ("none", "attention", "mlp", "layer", "selective")


@dataclass
class ModelConfig:
    """Hyper-parameters of a DeepSeek-V3-style decoder.

    Attention is MLA: queries go through a `q_lora_rank` bottleneck (0 means a full projection, as in
    DeepSeek-V2-Lite), keys and values through a shared `kv_lora_rank` latent, and a decoupled rotary
    key of `qk_rope_head_dim` is shared by every head. Feed-forward layers after the first
    `n_dense_layers` are DeepSeekMoE: `n_shared_experts` always-on experts plus `n_routed_experts`
    of which each token picks `n_activated_experts`, chosen within `n_limited_groups` of
    `n_expert_groups` groups.
    """

    vocab_size: int = 256
    dim: int = 64
    inter_dim: int = 128  # dense MLP hidden size (first_k_dense layers)
    moe_inter_dim: int = 32  # per-expert hidden size
    n_layers: int = 4
    n_dense_layers: int = 1  # "first_k_dense_replace"
    n_heads: int = 4
    # MoE
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    n_activated_experts: int = 2
    n_expert_groups: int = 4
    n_limited_groups: int = 2
    score_func: ScoreFunc = "sigmoid"
    route_scale: float = 1.0
    bias_update_speed: float = 1e-3  # gamma of aux-loss-free balancing
    aux_loss_alpha: float = 0.0  # sequence-wise balance loss weight (0 disables it)
    # MLA
    q_lora_rank: int = 32
    kv_lora_rank: int = 16
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    # positions, YaRN
    max_seq_len: int = 128
    original_seq_len: int = 128
    rope_theta: float = 10000.0
    rope_factor: float = 1.0
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    attn_pad_v: bool = False  # pad V to the q/k head dim so SDPA can use flash attention on GPUs
    expert_impl: Literal["grouped", "loop"] = "grouped"  # one grouped GEMM, or the plain loop over experts
    # multi-token prediction
    mtp_depth: int = 1
    mtp_loss_weight: float = 0.3
    # misc
    norm_eps: float = 1e-6
    init_std: float = 0.02
    # activation checkpointing, one of CHECKPOINTING: "attention" recomputes the attention part (norms,
    # MLA, residual), "mlp" the experts or dense MLP, "layer" both; "selective" (DeepSeek-V3's choice)
    # recomputes the RMSNorm and the MLA projections ahead of the attention kernel. None crosses the
    # expert all-to-all, so recomputation never repeats a collective.
    activation_checkpointing: str = "none"

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"ModelConfig: {msg}")

        for name in (
            "vocab_size",
            "dim",
            "n_layers",
            "n_heads",
            "kv_lora_rank",
            "v_head_dim",
            "max_seq_len",
            "original_seq_len",
        ):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(
            0 <= self.n_dense_layers <= self.n_layers,
            f"n_dense_layers={self.n_dense_layers} must lie in [0, n_layers={self.n_layers}]",
        )
        need(
            self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
            f"qk_rope_head_dim={self.qk_rope_head_dim} must be a positive even number (rotary pairs)",
        )
        need(self.q_lora_rank >= 0, "q_lora_rank must be >= 0 (0 means a full query projection)")
        need(self.mtp_depth >= 0, f"mtp_depth={self.mtp_depth} must be >= 0 (0 turns MTP off)")
        need(self.score_func in ("sigmoid", "softmax"), "score_func must be 'sigmoid' or 'softmax'")
        if self.n_moe_layers > 0:
            need(self.n_routed_experts > 0, "MoE layers need n_routed_experts > 0")
            need(
                0 < self.n_activated_experts <= self.n_routed_experts,
                f"n_activated_experts={self.n_activated_experts} must lie in "
                f"[1, n_routed_experts={self.n_routed_experts}]",
            )
            need(
                self.n_routed_experts % self.n_expert_groups == 0,
                f"n_routed_experts={self.n_routed_experts} must divide into "
                f"n_expert_groups={self.n_expert_groups} equal groups",
            )
            need(
                1 <= self.n_limited_groups <= self.n_expert_groups,
                f"n_limited_groups={self.n_limited_groups} must lie in [1, n_expert_groups]",
            )
            per_group = self.n_routed_experts // self.n_expert_groups
            need(
                self.n_limited_groups * per_group >= self.n_activated_experts,
                f"n_limited_groups={self.n_limited_groups} groups of {per_group} experts cannot hold "
                f"n_activated_experts={self.n_activated_experts}; raise n_limited_groups",
            )
        need(self.rope_factor >= 1.0, f"rope_factor={self.rope_factor} must be >= 1")
        need(
            self.activation_checkpointing in CHECKPOINTING,
            f"activation_checkpointing={self.activation_checkpointing!r} is not an option; choose one of "
            f"{CHECKPOINTING}",
        )
        need(
            self.expert_impl in ("grouped", "loop"),
            f"expert_impl must be 'grouped' or 'loop', got {self.expert_impl!r}",
        )

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def uses_yarn(self) -> bool:
        """YaRN applies when the context is extended beyond the pre-training length."""
        return self.rope_factor > 1.0 and self.max_seq_len > self.original_seq_len

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.n_dense_layers

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    # trains on a CPU in seconds; a faster bias update balances within its short runs
    "debug": ModelConfig(bias_update_speed=1e-2),
    # about 0.9B total / 0.2B activated parameters: one or two GPUs
    "mini": ModelConfig(
        vocab_size=32768,
        dim=1024,
        inter_dim=4096,
        moe_inter_dim=512,
        n_layers=12,
        n_dense_layers=1,
        n_heads=16,
        n_routed_experts=32,
        n_shared_experts=1,
        n_activated_experts=4,
        n_expert_groups=4,
        n_limited_groups=2,
        route_scale=1.0,
        q_lora_rank=512,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        max_seq_len=2048,
        original_seq_len=2048,
        mtp_depth=1,
    ),
    # the layout of DeepSeek-V2-Lite (about 16B total / 2.4B activated), sigmoid routing
    "lite": ModelConfig(
        vocab_size=102400,
        dim=2048,
        inter_dim=10944,
        moe_inter_dim=1408,
        n_layers=27,
        n_dense_layers=1,
        n_heads=16,
        n_routed_experts=64,
        n_shared_experts=2,
        n_activated_experts=6,
        n_expert_groups=1,
        n_limited_groups=1,
        route_scale=1.0,
        q_lora_rank=0,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        max_seq_len=4096,
        original_seq_len=4096,
        mtp_depth=0,
    ),
    # the published DeepSeek-V3 configuration
    "v3-671b": ModelConfig(
        vocab_size=129280,
        dim=7168,
        inter_dim=18432,
        moe_inter_dim=2048,
        n_layers=61,
        n_dense_layers=3,
        n_heads=128,
        n_routed_experts=256,
        n_shared_experts=1,
        n_activated_experts=8,
        n_expert_groups=8,
        n_limited_groups=4,
        route_scale=2.5,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        max_seq_len=16384,
        original_seq_len=4096,
        rope_factor=40.0,
        mtp_depth=1,
        mtp_loss_weight=0.3,
    ),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """A copy of the named preset with `overrides` applied (and validated)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise ValueError(
            f"ModelConfig has no field {', '.join(map(repr, unknown))}; model_overrides may set "
            f"{sorted(f.name for f in dataclasses.fields(ModelConfig))}"
        )
    return PRESETS[name].replace(**overrides)


@dataclass
class ParallelConfig:
    """The (pp, dp, ep) layout of a run and how its pipeline is scheduled.

    `dp=None` is inferred from the world size. World = pp * dp * ep; ep is the innermost mesh
    dimension. `n_microbatches` micro-batches of the per-rank batch go through the pipeline each step.
    The step runs the pipeline runtime when `pipelined`: with pp > 1, and at pp = 1 under
    `schedule="dualpipev"`, whose V then puts both of its half-model chunks on the one rank so that
    one micro-batch's forward overlaps another's backward (DeepSeek's dual-micro-batch overlap:
    one's expert all-to-all runs during the other's compute). Any other schedule at pp = 1 runs
    forward then backward per micro-batch.

    Communication: `dispatch_codec` packs the expert dispatch payload ("fp8" or "int8", one scale per
    128 channels; its gradient travels exact unless `quantize_dispatch_grad`); `grad_codec` compresses
    the data-parallel gradient reduction ("topk" or "powersgd", keyword arguments of TopKCodec /
    PowerSGDCodec in `grad_codec_options`); `ranks_per_node` says how many consecutive ranks share a
    node, and when an ep group spans nodes its dispatch goes in two hops (`hierarchical_dispatch`,
    default on then) and `max_nodes_per_token` limits each token's experts to that many nodes;
    `bucket_bytes` caps the gradient buckets. See `lightning_dsv3.parallel.comm`.
    """

    pp: int = 1
    dp: int | None = None
    ep: int = 1
    schedule: Schedule = "1f1b"
    n_microbatches: int | None = None
    zero: bool = True
    dispatch_codec: str | None = None  # payload codec of the expert dispatch ("fp8", "int8"), None = off
    quantize_dispatch_grad: bool = False  # pack the dispatch's gradient too (default: exact)
    grad_codec: str | None = None  # "topk" or "powersgd" for data-parallel reductions, None = exact
    grad_codec_options: dict[str, Any] = field(default_factory=dict)
    ranks_per_node: int | None = None  # None: devices per node on several nodes, else all on one node
    max_nodes_per_token: int | None = None  # node-limited routing (None: off)
    hierarchical_dispatch: bool | None = None  # None: when the ep group spans nodes
    bucket_bytes: int | None = None  # gradient bucket cap (None: from the network probe, else no cap)
    # how layers are cut into stages: one cost per decoder layer (a tuple) or measured
    # `pipeline.costs.StageCosts`; None: the FLOP model (see `lightning_dsv3.pipeline.partition`)
    layer_costs: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pipelined(self) -> bool:
        """Whether the step runs a pipeline schedule (see the class docstring): pp > 1, or DualPipeV's
        one-rank V at pp = 1 (the only schedule whose single-rank program overlaps micro-batches)."""
        return self.pp > 1 or self.schedule == "dualpipev"

    @property
    def microbatches(self) -> int:
        """Micro-batches per step: `n_microbatches` as given, else 1 without a pipeline and 2 * pp with
        one, so 2 for the one-rank V, the fewest with an overlapped pair (the strategy, the planner and
        the recipes all read it here)."""
        if self.n_microbatches:
            return self.n_microbatches
        return 2 * self.pp if self.pipelined else 1

    def __post_init__(self) -> None:
        for name in ("pp", "ep"):
            if getattr(self, name) < 1:
                raise ValueError(f"ParallelConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.dp is not None and self.dp < 1:
            raise ValueError(f"ParallelConfig: dp must be >= 1 (or None to infer), got {self.dp}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"ParallelConfig: unknown schedule {self.schedule!r}; choose one of {SCHEDULES}")
        if self.n_microbatches is not None and self.n_microbatches < 1:
            raise ValueError(f"ParallelConfig: n_microbatches must be >= 1, got {self.n_microbatches}")
        choices = {"dispatch_codec": (None, "fp8", "int8"), "grad_codec": (None, "topk", "powersgd")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"ParallelConfig: {name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        for name in ("ranks_per_node", "max_nodes_per_token", "bucket_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"ParallelConfig: {name} must be >= 1 (or None), got {value}")
        if self.grad_codec_options and self.grad_codec is None:
            raise ValueError("ParallelConfig: grad_codec_options were given without a grad_codec; name one")
        if self.ranks_per_node is not None:
            rpn, ep = self.ranks_per_node, self.ep
            if (ep % rpn if rpn < ep else rpn % ep) != 0:
                raise ValueError(
                    f"ParallelConfig: ranks_per_node={rpn} and ep={ep} cut expert groups unevenly "
                    "across nodes; one must divide the other"
                )

    def resolve(self, world_size: int) -> ParallelConfig:
        """Fill in dp from the world size, or explain why the mesh cannot cover it."""
        dp = self.dp
        if dp is None:
            if world_size % (self.pp * self.ep) != 0:
                raise ValueError(
                    f"world size {world_size} is not divisible by pp*ep = {self.pp}*{self.ep}; "
                    f"choose pp and ep whose product divides {world_size}"
                )
            dp = world_size // (self.pp * self.ep)
        if self.pp * dp * self.ep != world_size:
            raise ValueError(
                f"mesh pp*dp*ep = {self.pp}*{dp}*{self.ep} = {self.pp * dp * self.ep} does not match the "
                f"world size {world_size}; leave dp unset to infer it or pick factors of {world_size}"
            )
        return dataclasses.replace(self, dp=dp)


def count_parameters(config: ModelConfig) -> dict[str, int]:
    """Parameter counts of the main model and of the MTP modules, built on the meta device (no memory).

    "total" and "activated" exclude MTP, as the DeepSeek-V3 report's 671B / 37B do; "activated"
    counts what one token touches: every dense weight plus `n_activated_experts` routed experts per
    MoE layer (shared experts are dense). "mtp" is what the MTP modules add on top.
    """
    import torch

    from lightning_dsv3.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(config)
    per_expert = 3 * config.dim * config.moe_inter_dim
    inactive_per_layer = (config.n_routed_experts - config.n_activated_experts) * per_expert
    main = mtp = mtp_inactive = 0
    for name, param in model.named_parameters():
        if name.startswith("mtp."):
            mtp += param.numel()
        else:
            main += param.numel()
    if config.mtp_depth and config.is_moe_layer(config.n_layers):
        mtp_inactive = config.mtp_depth * inactive_per_layer
    return {
        "total": main,
        "activated": main - config.n_moe_layers * inactive_per_layer,
        "mtp": mtp,
        "mtp_activated": mtp - mtp_inactive,
    }
