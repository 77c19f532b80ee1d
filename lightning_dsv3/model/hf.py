"""Import and export of Hugging Face DeepSeek-V3 checkpoints (the layout of `DeepseekV3ForCausalLM`).

Names. Ours follow the DeepSeek reference code; the checkpoint's follow transformers:

    embed.weight                          model.embed_tokens.weight
    layers.{i}.attn_norm.weight           model.layers.{i}.input_layernorm.weight
    layers.{i}.attn.wq_a / q_norm / wq_b  model.layers.{i}.self_attn.q_a_proj / q_a_layernorm / q_b_proj
    layers.{i}.attn.wq                    model.layers.{i}.self_attn.q_proj            (q_lora_rank = 0)
    layers.{i}.attn.wkv_a / kv_norm       model.layers.{i}.self_attn.kv_a_proj_with_mqa / kv_a_layernorm
    layers.{i}.attn.wkv_b / wo            model.layers.{i}.self_attn.kv_b_proj / o_proj
    layers.{i}.ffn_norm.weight            model.layers.{i}.post_attention_layernorm.weight
    layers.{i}.ffn.w1 / w3 / w2           model.layers.{i}.mlp.gate_proj / up_proj / down_proj   (dense)
    layers.{i}.ffn.router.weight          model.layers.{i}.mlp.gate.weight
    layers.{i}.ffn.router.e_score_correction_bias  model.layers.{i}.mlp.gate.e_score_correction_bias
    layers.{i}.ffn.experts.w1[j] (w3, w2) model.layers.{i}.mlp.experts.{j}.gate_proj (up_proj, down_proj)
    layers.{i}.ffn.shared_experts.w1 ...  model.layers.{i}.mlp.shared_experts.gate_proj ...
    norm.weight / head.weight             model.norm.weight / lm_head.weight
    mtp.{k}.enorm / hnorm / eh_proj       model.layers.{n_layers + k}.enorm / hnorm / eh_proj
    mtp.{k}.norm.weight                   model.layers.{n_layers + k}.shared_head.norm.weight
    mtp.{k}.block.*                       model.layers.{n_layers + k}.*  (the block keys above)
    (embed.weight, head.weight)           model.layers.{n_layers + k}.embed_tokens / shared_head.head
                                          (copies written on export; on import the main model's
                                          are used, with a warning where a copy differs)

Routed experts are stacked here, (E, hidden, dim) for w1/w3 and (E, dim, hidden) for w2, and one
tensor per expert in the checkpoint (transformers >= 5 fuses them in memory, as
mlp.experts.gate_up_proj / down_proj, and converts on from_pretrained / save_pretrained; we import
both and export the checkpoint layout, so load our export into transformers with from_pretrained).

Rotary layout. Our `apply_rope` rotates interleaved pairs (x[2i], x[2i+1]), as DeepSeek's reference
code does and as the published weights expect. transformers' DeepseekV3 with `rope_interleave=True`
(its default, and what the published config implies) rotates the same pairs
(`apply_rotary_pos_emb_interleave`) and only reorders its output, identically for queries and keys,
which leaves q.k unchanged: no permutation of weights is needed. A checkpoint written with
`rope_interleave=False` stores the rotary rows of q_b_proj (q_proj) and kv_a_proj_with_mqa in the
"rotate half" layout (pair (i, i + d/2)); those rows are permuted on import and export.

YaRN and mscale. Our softmax scale is qk_head_dim**-0.5 * m**2 with m = 0.1 * mscale * ln(factor) + 1,
applied to the whole q.k (DeepSeek's reference). transformers computes the same softmax factor from
`rope_scaling.mscale_all_dim`, and in addition multiplies cos/sin (so only the rotary part of q and k)
by attention_factor = m(mscale) / m(mscale_all_dim) (or an explicit `attention_factor`, or m(1) when
either mscale is unset). So our `mscale` is transformers' `mscale_all_dim`; we export
mscale = mscale_all_dim (attention_factor 1, as in every published DeepSeek config), and on import an
attention_factor other than 1 is folded exactly into the rotary rows of q_b_proj and
kv_a_proj_with_mqa (rotation is linear, so scaling its input scales its output).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_dsv3.config import ModelConfig

__all__ = [
    "config_from_hf",
    "config_to_hf",
    "dequantize_fp8",
    "from_hf_state_dict",
    "hf_rope_attention_factor",
    "load_hf_checkpoint",
    "save_hf_checkpoint",
    "state_dict_for",
    "to_hf_state_dict",
]

FP8_BLOCK = (128, 128)  # DeepSeek-V3's published weight_block_size
_SCALE_SUFFIX = "_scale_inv"  # "x.weight" is dequantized with "x.weight_scale_inv"
_INDEX_NAME = "model.safetensors.index.json"

# our key inside a block -> the transformers key inside model.layers.{i}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.router.weight": "mlp.gate.weight",
    "ffn.router.e_score_correction_bias": "mlp.gate.e_score_correction_bias",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
}
_EXPERT_NAMES = {"ffn.experts.w1": "gate_proj", "ffn.experts.w2": "down_proj", "ffn.experts.w3": "up_proj"}
_MTP_NAMES = {
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "eh_proj.weight": "eh_proj.weight",
    "norm.weight": "shared_head.norm.weight",
}
_TOP_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
}


# ---- configuration ------------------------------------------------------------------------------


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _rope_params(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The rope scaling dict of a config, old ("rope_scaling", "type") or new ("rope_parameters")."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    params["rope_type"] = "default" if kind in (None, "default") else kind
    return params


def hf_rope_attention_factor(hf: Mapping[str, Any]) -> float:
    """The factor transformers multiplies cos/sin by (the rotary part of q and of k), as it computes it.

    1.0 without YaRN or when mscale == mscale_all_dim. `from_hf_state_dict(rope_scale=...)` folds it
    into the weights, since our model has no such factor.
    """
    params = _rope_params(hf)
    if params["rope_type"] != "yarn":
        return 1.0
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    factor = params.get("factor")
    if factor is None:
        original = params.get("original_max_position_embeddings") or hf["max_position_embeddings"]
        factor = hf["max_position_embeddings"] / original
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    return _yarn_mscale(factor)


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """A transformers `DeepseekV3Config` dict (config.json) -> ModelConfig, `overrides` applied last.

    Raises ValueError for what our model cannot compute the same way: another model_type, GQA
    (num_key_value_heads != num_attention_heads), biases, an activation other than silu, MoE on every
    k-th layer only (moe_layer_freq != 1), unnormalised top-k gates (norm_topk_prob false), tied
    embeddings, a rope type other than YaRN, or YaRN that transformers would apply although the
    context is not extended (we apply YaRN only when max_position_embeddings exceeds
    original_max_position_embeddings, as DeepSeek's reference code does).

    Training-only fields (bias_update_speed, mtp_loss_weight, attn_pad_v, and aux_loss_alpha when
    absent) come from the "lightning_dsv3" entry that `config_to_hf` writes, else our defaults.
    Note: transformers uses rms_norm_eps for the layer norms only and 1e-6 for q_a_layernorm and
    kv_a_layernorm; we use norm_eps for all of them (the same for every published config).
    """

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ValueError(f"config_from_hf: {msg}")

    model_type = hf.get("model_type", "deepseek_v3")
    need(model_type == "deepseek_v3", f"model_type={model_type!r}; only 'deepseek_v3' configs are supported")
    heads = hf["num_attention_heads"]
    need(
        hf.get("num_key_value_heads") in (None, heads),
        f"num_key_value_heads={hf.get('num_key_value_heads')} != num_attention_heads={heads}: MLA has no GQA",
    )
    need(
        not hf.get("attention_bias", False),
        "attention_bias=true is not supported (our projections have no bias)",
    )
    need(
        hf.get("hidden_act", "silu") == "silu",
        f"hidden_act={hf.get('hidden_act')!r}; only 'silu' is supported",
    )
    need(hf.get("moe_layer_freq", 1) == 1, f"moe_layer_freq={hf.get('moe_layer_freq')}; only 1 is supported")
    need(
        hf.get("norm_topk_prob", True) is not False,
        "norm_topk_prob=false is not supported: our router always normalises the chosen sigmoid gates",
    )
    need(not hf.get("tie_word_embeddings", False), "tie_word_embeddings=true is not supported")
    need(
        hf.get("topk_method", "noaux_tc") == "noaux_tc",
        f"topk_method={hf.get('topk_method')!r}; only 'noaux_tc' (DeepSeek-V3 routing) is supported",
    )

    max_seq_len = hf["max_position_embeddings"]
    params = _rope_params(hf)
    rope_theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    yarn: dict[str, Any] = {"original_seq_len": max_seq_len, "rope_factor": 1.0}
    if params["rope_type"] == "yarn":
        original = params.get("original_max_position_embeddings") or max_seq_len
        factor = params.get("factor") or max_seq_len / original
        need(
            factor <= 1 or max_seq_len > original,
            f"rope_scaling has YaRN factor {factor} but max_position_embeddings={max_seq_len} does not "
            f"exceed original_max_position_embeddings={original}: transformers would apply YaRN and we "
            "would not; raise max_position_embeddings or drop rope_scaling",
        )
        yarn = {
            "original_seq_len": original,
            "rope_factor": float(max(factor, 1.0)),
            "beta_fast": params.get("beta_fast") or 32,
            "beta_slow": params.get("beta_slow") or 1,
            # transformers' softmax factor uses mscale_all_dim (none when unset); ours uses mscale
            "mscale": float(params.get("mscale_all_dim") or 0.0),
        }
    else:
        need(
            params["rope_type"] == "default",
            f"rope type {params['rope_type']!r} is not supported; use 'yarn' or none",
        )

    extra = dict(hf.get("lightning_dsv3") or {})
    fields: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        inter_dim=hf["intermediate_size"],
        moe_inter_dim=hf["moe_intermediate_size"],
        n_layers=hf["num_hidden_layers"],
        n_dense_layers=hf.get("first_k_dense_replace") or 0,
        n_heads=heads,
        n_routed_experts=hf.get("n_routed_experts") or 0,
        n_shared_experts=hf.get("n_shared_experts") or 0,
        n_activated_experts=hf.get("num_experts_per_tok") or 0,
        n_expert_groups=hf.get("n_group") or 1,
        n_limited_groups=hf.get("topk_group") or 1,
        score_func=hf.get("scoring_func", "sigmoid"),
        route_scale=float(hf.get("routed_scaling_factor", 1.0)),
        q_lora_rank=hf.get("q_lora_rank") or 0,
        kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        max_seq_len=max_seq_len,
        rope_theta=float(rope_theta),
        mtp_depth=hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or 0,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        init_std=hf.get("initializer_range", 0.02),
        **yarn,
    )
    if "aux_loss_alpha" in hf:
        fields["aux_loss_alpha"] = float(hf["aux_loss_alpha"])
    for name in ("bias_update_speed", "mtp_loss_weight", "attn_pad_v", "aux_loss_alpha"):
        if name in extra:
            fields[name] = extra[name]
    fields.update(overrides)
    return ModelConfig(**fields)


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> a transformers `DeepseekV3Config` dict (config.json of DeepSeek's layout).

    YaRN is written only when it is active (`config.uses_yarn`): transformers applies a YaRN
    rope_scaling whatever the context length, so an inactive one (rope_factor > 1 without an extended
    context) is dropped rather than exported as a different model. Fields transformers has no name for
    go under "lightning_dsv3" (transformers keeps them as plain attributes).
    """
    if config.score_func != "sigmoid":
        raise ValueError(
            f"config_to_hf: score_func={config.score_func!r}; transformers' DeepseekV3 routes with sigmoid "
            "scores only, so this model would compute something else there"
        )
    rope_scaling = None
    if config.uses_yarn:
        rope_scaling = {
            "type": "yarn",
            "rope_type": "yarn",
            "factor": config.rope_factor,
            "original_max_position_embeddings": config.original_seq_len,
            "beta_fast": config.beta_fast,
            "beta_slow": config.beta_slow,
            "mscale": config.mscale,
            "mscale_all_dim": config.mscale,
        }
        if not config.mscale:  # transformers would fall back to attention_factor = m(1) on cos/sin
            rope_scaling["attention_factor"] = 1.0
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.inter_dim,
        "moe_intermediate_size": config.moe_inter_dim,
        "num_hidden_layers": config.n_layers,
        "num_nextn_predict_layers": config.mtp_depth,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_heads,
        "first_k_dense_replace": config.n_dense_layers,
        "moe_layer_freq": 1,
        "n_routed_experts": config.n_routed_experts,
        "n_shared_experts": config.n_shared_experts,
        "num_experts_per_tok": config.n_activated_experts,
        "n_group": config.n_expert_groups,
        "topk_group": config.n_limited_groups,
        "topk_method": "noaux_tc",
        "scoring_func": config.score_func,
        "norm_topk_prob": True,
        "routed_scaling_factor": config.route_scale,
        "aux_loss_alpha": config.aux_loss_alpha,
        "seq_aux": True,
        "q_lora_rank": config.q_lora_rank or None,
        "kv_lora_rank": config.kv_lora_rank,
        "qk_nope_head_dim": config.qk_nope_head_dim,
        "qk_rope_head_dim": config.qk_rope_head_dim,
        "v_head_dim": config.v_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope_scaling,
        "rope_interleave": True,
        "rms_norm_eps": config.norm_eps,
        "initializer_range": config.init_std,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "lightning_dsv3": {
            "bias_update_speed": config.bias_update_speed,
            "mtp_loss_weight": config.mtp_loss_weight,
            "attn_pad_v": config.attn_pad_v,
            "aux_loss_alpha": config.aux_loss_alpha,
        },
    }


# ---- key names ----------------------------------------------------------------------------------


def _hf_names(key: str, config: ModelConfig) -> tuple[str, ...]:
    """The checkpoint keys our `key` is made of: one, or one per expert for stacked expert weights."""
    if key in _TOP_NAMES:
        return (_TOP_NAMES[key],)
    parts = key.split(".")
    if parts[0] == "layers":
        prefix, rest = f"model.layers.{parts[1]}.", ".".join(parts[2:])
    elif parts[0] == "mtp":
        prefix, rest = f"model.layers.{config.n_layers + int(parts[1])}.", ".".join(parts[2:])
        if rest in _MTP_NAMES:
            return (prefix + _MTP_NAMES[rest],)
        rest = rest.removeprefix("block.")
    else:
        rest = ""
    if rest in _BLOCK_NAMES:
        return (prefix + _BLOCK_NAMES[rest],)
    if rest in _EXPERT_NAMES:
        proj = _EXPERT_NAMES[rest]
        return tuple(f"{prefix}mlp.experts.{j}.{proj}.weight" for j in range(config.n_routed_experts))
    raise KeyError(f"lightning_dsv3.model.hf has no checkpoint name for model key {key!r}")


def _mtp_aliases(config: ModelConfig) -> dict[str, str]:
    """Checkpoint keys that repeat a main-model tensor in each MTP layer -> our key of that tensor."""
    aliases = {}
    for k in range(config.mtp_depth):
        prefix = f"model.layers.{config.n_layers + k}."
        aliases[prefix + "embed_tokens.weight"] = "embed.weight"
        aliases[prefix + "shared_head.head.weight"] = "head.weight"
    return aliases


_FUSED = re.compile(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)")


def _fused_names(key: str, n_experts: int) -> tuple[str, ...]:
    """Per-expert checkpoint keys held by a fused in-memory key of transformers >= 5, else ()."""
    match = _FUSED.fullmatch(key)
    if match is None:
        return ()
    prefix, kind = match.groups()
    projs = ("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",)
    return tuple(f"{prefix}.{j}.{proj}.weight" for proj in projs for j in range(n_experts))


def _unfuse_experts(hf_sd: Mapping[str, torch.Tensor], n_experts: int) -> dict[str, torch.Tensor]:
    """Split transformers >= 5's in-memory expert tensors into the checkpoint's per-expert tensors.

    `DeepseekV3ForCausalLM.state_dict()` holds mlp.experts.gate_up_proj (E, 2 * hidden, dim), gate rows
    first, and mlp.experts.down_proj (E, dim, hidden); its checkpoints hold one tensor per expert.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in hf_sd.items():
        names = _fused_names(key, n_experts)
        if not names or tensor.dim() != 3 or tensor.shape[0] != n_experts:
            out[key] = tensor
            continue
        parts = tensor.chunk(2, dim=1) if key.endswith("gate_up_proj") else (tensor,)
        for name, expert in zip(names, (e for part in parts for e in part.unbind(0)), strict=True):
            out[name] = expert
    return out


def _plan(config: ModelConfig) -> dict[str, tuple[tuple[str, ...], torch.Size]]:
    """Every key of the whole model's state dict -> (its checkpoint keys, its shape). Built on meta."""
    from lightning_dsv3.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(config)
    return {key: (_hf_names(key, config), t.shape) for key, t in model.state_dict().items()}


def _listing(names: Iterable[str], limit: int = 5) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _check_names(
    keys: Iterable[str], plan: Mapping[str, tuple[tuple[str, ...], Any]], config: ModelConfig
) -> None:
    """Raise KeyError naming checkpoint keys that belong to no tensor of this config."""
    known = {name for names, _ in plan.values() for name in names} | set(_mtp_aliases(config))
    unknown = [
        k
        for k in keys
        if k not in known and not (k.endswith(_SCALE_SUFFIX) and k[: -len(_SCALE_SUFFIX)] in known)
    ]
    if unknown:
        expected = [names[0] for names, _ in plan.values()]
        raise KeyError(
            f"unexpected checkpoint keys for this config: {_listing(unknown)}; expected names such as "
            f"{_listing(expected[:3] + expected[-3:], 6)} (check n_layers, mtp_depth, q_lora_rank and "
            "n_routed_experts against the checkpoint's config.json)"
        )


# ---- rotary rows --------------------------------------------------------------------------------


def _rope_rows(key: str, weight: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, int] | None:
    """View of `weight` as (groups, rows, in) and the offset of its rotary rows, for q and kv_a weights."""
    if key.endswith(("attn.wq_b.weight", "attn.wq.weight")):
        return weight.unflatten(0, (config.n_heads, config.qk_head_dim)), config.qk_nope_head_dim
    if key.endswith("attn.wkv_a.weight"):
        return weight.unsqueeze(0), config.kv_lora_rank
    return None


def _convert_rope(
    sd: dict[str, torch.Tensor], config: ModelConfig, perm: torch.Tensor | None, scale: float
) -> None:
    """In place on `sd` (new tensors): permute the rotary rows by `perm` and multiply them by `scale`."""
    if perm is None and scale == 1.0:
        return
    d = config.qk_rope_head_dim
    for key, weight in sd.items():
        found = _rope_rows(key, weight, config)
        if found is None:
            continue
        grouped, start = found
        grouped = grouped.clone()
        rope = grouped[:, start : start + d]
        if perm is not None:
            rope = rope[:, perm]
        if scale != 1.0:
            rope = (rope.float() * scale).to(rope.dtype)
        grouped[:, start : start + d] = rope
        sd[key] = grouped.reshape(weight.shape)


def _half_to_interleaved(d: int) -> torch.Tensor:
    """Rows of a "rotate half" rotary layout, (i, i + d/2) paired, put in interleaved (2i, 2i+1) order."""
    return torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], dim=-1).flatten()


def _interleaved_to_half(d: int) -> torch.Tensor:
    return torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])


# ---- FP8 ----------------------------------------------------------------------------------------


def dequantize_fp8(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block_size: tuple[int, int] = FP8_BLOCK,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Block-quantized weight -> `dtype`: weight (out, in), e.g. float8_e4m3fn, times its block's scale.

    scale_inv: (ceil(out / block_rows), ceil(in / block_cols)) float32, one factor per block, the last
    blocks cropped to the weight (DeepSeek-V3's `weight_scale_inv`, 128x128 blocks).
    """
    rows, cols = weight.shape
    br, bc = block_size
    expected = (-(-rows // br), -(-cols // bc))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"dequantize_fp8: scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} for a "
            f"({rows}, {cols}) weight in {br}x{bc} blocks; check weight_block_size in quantization_config"
        )
    scale = scale_inv.float().repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
    return (weight.float() * scale).to(dtype)


def _dequantize_all(
    hf_sd: Mapping[str, torch.Tensor], block_size: tuple[int, int], dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in hf_sd.items():
        if key.endswith(_SCALE_SUFFIX):
            if key[: -len(_SCALE_SUFFIX)] not in hf_sd:
                raise KeyError(f"{key!r} has no weight {key[: -len(_SCALE_SUFFIX)]!r} to dequantize")
            continue
        scale_inv = hf_sd.get(key + _SCALE_SUFFIX)
        if scale_inv is not None:
            tensor = dequantize_fp8(tensor, scale_inv, block_size, dtype or torch.float32)
        elif tensor.dtype.itemsize == 1 and tensor.is_floating_point():
            raise KeyError(
                f"{key!r} is {tensor.dtype} but the checkpoint has no {key + _SCALE_SUFFIX!r} "
                "to dequantize it with"
            )
        out[key] = tensor
    return out


# ---- state dicts --------------------------------------------------------------------------------


def from_hf_state_dict(
    hf_sd: Mapping[str, torch.Tensor],
    config: ModelConfig,
    *,
    strict: bool = True,
    rope_interleave: bool = True,
    rope_scale: float = 1.0,
    fp8_block_size: tuple[int, int] = FP8_BLOCK,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """A transformers-layout state dict -> ours, loadable with `Transformer(config).load_state_dict`.

    Takes the checkpoint layout (one tensor per expert) or transformers >= 5's in-memory layout
    (`DeepseekV3ForCausalLM.state_dict()`, experts fused into mlp.experts.gate_up_proj / down_proj).

    FP8 weights with a `weight_scale_inv` are dequantized (to `dtype`, float32 when None); `dtype`
    also casts every other floating tensor. Keys that belong to no tensor of `config` raise KeyError;
    so do missing ones when `strict` (pass strict=False for a partial checkpoint, e.g. one stage's
    keys, then `state_dict_for(stage, sd)`). `rope_interleave` is the checkpoint's config flag (False:
    rotary rows in "rotate half" order); `rope_scale` is `hf_rope_attention_factor(config.json)`.
    `load_hf_checkpoint` sets both from config.json.
    """
    plan = _plan(config)
    hf_sd = _unfuse_experts(hf_sd, config.n_routed_experts)
    _check_names(hf_sd.keys(), plan, config)
    tensors = _dequantize_all(hf_sd, fp8_block_size, dtype)
    aliases = _mtp_aliases(config)
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []  # tensors absent altogether: an error only when strict
    partial: list[str] = []  # stacked experts with some experts absent: always an error
    bad_shapes: list[str] = []
    for key, (names, shape) in plan.items():
        present = [n for n in names if n in tensors]
        if not present:
            copies = [a for a, target in aliases.items() if target == key and a in tensors]
            if not copies:
                missing.append(names[0] if len(names) == 1 else f"{names[0]} ... {names[-1]}")
                continue
            names = present = copies[:1]  # a partial checkpoint holding only an MTP layer's copy
        if len(present) < len(names):
            partial.extend(n for n in names if n not in tensors)
            continue
        tensor = tensors[names[0]] if len(names) == 1 else torch.stack([tensors[n] for n in names])
        if tensor.shape != shape:
            bad_shapes.append(f"{names[0]}: {tuple(tensor.shape)} in the checkpoint, {tuple(shape)} expected")
            continue
        out[key] = tensor
    if bad_shapes:
        raise ValueError(f"checkpoint shapes do not match the config: {_listing(bad_shapes, 3)}")
    if partial:
        raise KeyError(
            f"checkpoint lacks {len(partial)} expert tensor(s) of layers it has other experts of: "
            f"{_listing(partial)}"
        )
    if strict and missing:
        raise KeyError(
            f"checkpoint lacks {len(missing)} tensor(s) this config needs: {_listing(missing)} "
            "(pass strict=False to load a partial checkpoint)"
        )
    for alias, target in aliases.items():
        if alias in tensors and target in out and tensors[alias] is not out[target]:
            if not torch.equal(tensors[alias].to(out[target].dtype), out[target]):
                warnings.warn(
                    f"{alias} differs from the main model's {_TOP_NAMES[target]}; our MTP shares the main "
                    "model's embedding and head, so the main model's are used",
                    stacklevel=2,
                )
    perm = None if rope_interleave else _half_to_interleaved(config.qk_rope_head_dim)
    _convert_rope(out, config, perm, rope_scale)
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    return out


def to_hf_state_dict(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    config: ModelConfig,
    *,
    strict: bool = True,
    rope_interleave: bool = True,
) -> dict[str, torch.Tensor]:
    """Our model (or state dict) -> a transformers-layout state dict of new, contiguous tensors.

    Experts are unstacked, and each MTP layer gets copies of the embedding and head as in DeepSeek's
    published checkpoint. With `strict`, every key of the whole model must be there (pass
    strict=False to export one pipeline stage's keys). `rope_interleave=False` writes the rotary rows
    in transformers' "rotate half" order (then set rope_interleave false in config.json).
    """
    if isinstance(model_or_state_dict, nn.Module):
        sd = dict(model_or_state_dict.state_dict())
    else:
        sd = dict(model_or_state_dict)
    plan = _plan(config)
    unknown = [k for k in sd if k not in plan]
    if unknown:
        raise KeyError(
            f"keys that are not part of a model of this config: {_listing(unknown)}; "
            f"expected names such as {_listing(list(plan)[:4])}"
        )
    missing = [k for k in plan if k not in sd]
    if strict and missing:
        raise KeyError(
            f"state dict lacks {len(missing)} key(s) of the whole model: {_listing(missing)} "
            "(pass strict=False to export a pipeline stage)"
        )
    sd = {k: v.detach() for k, v in sd.items()}
    perm = None if rope_interleave else _interleaved_to_half(config.qk_rope_head_dim)
    _convert_rope(sd, config, perm, 1.0)
    out: dict[str, torch.Tensor] = {}
    for key, (names, shape) in plan.items():
        if key not in sd:
            continue
        tensor = sd[key]
        if tensor.shape != shape:
            raise ValueError(
                f"{key} has shape {tuple(tensor.shape)}, expected {tuple(shape)} for this config "
                "(expert-parallel shards must be gathered before export)"
            )
        if len(names) == 1:
            out[names[0]] = tensor.clone(memory_format=torch.contiguous_format)
        else:
            for name, part in zip(names, tensor.unbind(0), strict=True):
                out[name] = part.clone(memory_format=torch.contiguous_format)
    for alias, target in _mtp_aliases(config).items():
        if target in sd:
            out[alias] = sd[target].clone(memory_format=torch.contiguous_format)
    return out


def state_dict_for(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of `state_dict` that `model` (the whole model or a pipeline stage) has.

    Raises KeyError if `model` needs keys `state_dict` lacks, ValueError on shape mismatches.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    if missing:
        raise KeyError(f"state dict lacks {len(missing)} key(s) this model needs: {_listing(missing)}")
    bad = [
        f"{k}: {tuple(state_dict[k].shape)} given, {tuple(t.shape)} expected"
        for k, t in own.items()
        if state_dict[k].shape != t.shape
    ]
    if bad:
        raise ValueError(
            f"shape mismatch for {_listing(bad, 3)} (expert-parallel models hold a slice of "
            "the experts: slice the stacked expert weights first)"
        )
    return {k: state_dict[k] for k in own}


# ---- files --------------------------------------------------------------------------------------


def _checkpoint_files(path: Path) -> tuple[Path, list[Path]]:
    """(directory, safetensors files) for a directory, an index json or one .safetensors file."""
    if path.is_dir():
        directory, index = path, path / _INDEX_NAME
    elif path.name.endswith(".index.json"):
        directory, index = path.parent, path
    elif path.suffix == ".safetensors":
        return path.parent, [path]
    else:
        raise FileNotFoundError(f"{path} is not a directory, a .safetensors file or a safetensors index")
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [directory / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
    return directory, files


def load_hf_checkpoint(
    path_or_dir: str | Path,
    config: ModelConfig | None = None,
    *,
    model: nn.Module | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a transformers DeepSeek-V3 checkpoint -> (ModelConfig, our state dict).

    `path_or_dir`: a directory with config.json and *.safetensors (model.safetensors.index.json when
    present picks the files), the index itself, or one .safetensors file. `config` defaults to
    `config_from_hf(config.json)`; rope_interleave, the YaRN attention factor and the FP8
    weight_block_size always come from config.json when it exists. With `model` (e.g. a pipeline
    stage) only the tensors it holds are read and returned. `dtype` casts floating tensors (and is
    the dtype FP8 weights are dequantized to; float32 when None).
    """
    from safetensors import safe_open

    directory, files = _checkpoint_files(Path(path_or_dir))
    config_path = directory / "config.json"
    hf_config = json.loads(config_path.read_text()) if config_path.is_file() else None
    keys_by_file = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            keys_by_file[file] = list(handle.keys())
    if config is None:
        if hf_config is None:
            raise FileNotFoundError(f"no config.json in {directory}; pass config= to load_hf_checkpoint")
        config = config_from_hf(hf_config)
        mtp_prefix = f"model.layers.{config.n_layers}."
        if config.mtp_depth and not any(k.startswith(mtp_prefix) for ks in keys_by_file.values() for k in ks):
            warnings.warn(
                f"{directory} declares {config.mtp_depth} MTP layer(s) but holds none (transformers' "
                "save_pretrained drops them); loading with mtp_depth=0",
                stacklevel=2,
            )
            config = config.replace(mtp_depth=0)
    hf_config = hf_config or {}
    block = tuple((hf_config.get("quantization_config") or {}).get("weight_block_size") or FP8_BLOCK)

    plan = _plan(config)
    n_experts = config.n_routed_experts
    all_keys = [k for keys in keys_by_file.values() for k in keys]
    _check_names([name for k in all_keys for name in _fused_names(k, n_experts) or (k,)], plan, config)
    wanted: set[str] | None = None
    if model is not None:
        wanted = {name for key in model.state_dict() for name in plan.get(key, ((),))[0]}
        wanted |= {name + _SCALE_SUFFIX for name in wanted}
    tensors: dict[str, torch.Tensor] = {}
    for file, keys in keys_by_file.items():
        with safe_open(str(file), framework="pt") as handle:
            for key in keys:
                fused = _fused_names(key, n_experts)
                if wanted is None or key in wanted or (fused and fused[0] in wanted):
                    tensors[key] = handle.get_tensor(key)
    sd = from_hf_state_dict(
        tensors,
        config,
        strict=model is None,
        rope_interleave=hf_config.get("rope_interleave", True) is not False,
        rope_scale=hf_rope_attention_factor(hf_config) if hf_config else 1.0,
        fp8_block_size=block,  # type: ignore[arg-type]
        dtype=dtype,
    )
    if model is not None:
        sd = state_dict_for(model, sd)
    return config, sd


def save_hf_checkpoint(
    model: nn.Module | Mapping[str, torch.Tensor],
    config: ModelConfig,
    directory: str | Path,
    *,
    max_shard_bytes: int = 5 * 10**9,
    dtype: torch.dtype | None = None,
    rope_interleave: bool = True,
) -> list[Path]:
    """Write config.json and model.safetensors (or model-0000i-of-0000n.safetensors + index json).

    Shards are filled in key order up to `max_shard_bytes` (a bigger tensor gets a shard of its own).
    `dtype` casts floating tensors (e.g. torch.bfloat16). Earlier model*.safetensors files and the
    index in `directory` are removed first, so the directory always holds one consistent checkpoint.
    Returns the files written.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_sd = to_hf_state_dict(model, config, rope_interleave=rope_interleave)
    if dtype is not None:
        hf_sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in hf_sd.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in hf_sd.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.cpu()
        size += nbytes
    for old in [*directory.glob("model*.safetensors"), directory / _INDEX_NAME]:
        if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?", old.name) and old.exists():
            old.unlink()

    written = []
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        written.append(directory / name)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in hf_sd.values())},
            "weight_map": {key: name for name, shard in zip(names, shards, strict=True) for key in shard},
        }
        (directory / _INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
        written.append(directory / _INDEX_NAME)
    hf_config = config_to_hf(config)
    hf_config["rope_interleave"] = rope_interleave
    saved_dtype = next((t.dtype for t in hf_sd.values() if t.is_floating_point()), torch.float32)
    hf_config["torch_dtype"] = str(saved_dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2))
    written.append(directory / "config.json")
    return written
