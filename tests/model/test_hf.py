"""Hugging Face DeepSeek-V3 import/export: names, round trips, files, FP8, configs, transformers itself."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lightning_dsv3.config import PRESETS, get_preset
from lightning_dsv3.model.hf import (
    config_from_hf,
    config_to_hf,
    dequantize_fp8,
    from_hf_state_dict,
    hf_rope_attention_factor,
    load_hf_checkpoint,
    save_hf_checkpoint,
    state_dict_for,
    to_hf_state_dict,
)
from lightning_dsv3.model.transformer import Transformer

# config.json of deepseek-ai/DeepSeek-V3 (quantization_config and auto_map left out)
PUBLISHED_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "v_head_dim": 128,
    "vocab_size": 129280,
}


def _model(cfg, seed: int = 0) -> Transformer:
    """init_weights, then norms and router biases moved off 1 and 0 so that a swapped name shows."""
    model = Transformer(cfg)
    model.init_weights(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
        for _, router in model.routers():
            bias = router.e_score_correction_bias
            bias.copy_(0.05 * torch.randn(bias.shape, generator=gen))
    return model.eval()


def _tokens(cfg, batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(7))


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def debug():
    cfg = get_preset("debug")
    return cfg, _model(cfg)


# ---- names ----------------------------------------------------------------------------------------


def test_key_names_of_a_dense_and_a_moe_layer(debug):
    cfg, model = debug
    hf = to_hf_state_dict(model, cfg)
    attn = [
        "input_layernorm.weight",
        "self_attn.q_a_proj.weight",
        "self_attn.q_a_layernorm.weight",
        "self_attn.q_b_proj.weight",
        "self_attn.kv_a_proj_with_mqa.weight",
        "self_attn.kv_a_layernorm.weight",
        "self_attn.kv_b_proj.weight",
        "self_attn.o_proj.weight",
        "post_attention_layernorm.weight",
    ]
    dense = ["mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
    moe = [
        "mlp.gate.weight",
        "mlp.gate.e_score_correction_bias",
        *[f"mlp.experts.{j}.{p}.weight" for j in range(8) for p in ("gate_proj", "up_proj", "down_proj")],
        "mlp.shared_experts.gate_proj.weight",
        "mlp.shared_experts.up_proj.weight",
        "mlp.shared_experts.down_proj.weight",
    ]
    mtp = [
        "enorm.weight",
        "hnorm.weight",
        "eh_proj.weight",
        "shared_head.norm.weight",
        "shared_head.head.weight",
        "embed_tokens.weight",
    ]
    assert {k.removeprefix("model.layers.0.") for k in hf if k.startswith("model.layers.0.")} == {
        *attn,
        *dense,
    }
    assert {k.removeprefix("model.layers.1.") for k in hf if k.startswith("model.layers.1.")} == {*attn, *moe}
    assert {k.removeprefix("model.layers.4.") for k in hf if k.startswith("model.layers.4.")} == {
        *attn,
        *moe,
        *mtp,
    }
    assert {k for k in hf if not k.startswith("model.layers.")} == {
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
    }
    assert len(hf) == 3 + (len(attn) + len(dense)) + 4 * (len(attn) + len(moe)) + len(mtp)
    # what each name holds
    sd = model.state_dict()
    assert torch.equal(hf["model.layers.1.mlp.experts.5.gate_proj.weight"], sd["layers.1.ffn.experts.w1"][5])
    assert torch.equal(hf["model.layers.1.mlp.experts.5.up_proj.weight"], sd["layers.1.ffn.experts.w3"][5])
    assert torch.equal(hf["model.layers.1.mlp.experts.5.down_proj.weight"], sd["layers.1.ffn.experts.w2"][5])
    assert torch.equal(hf["model.layers.0.mlp.up_proj.weight"], sd["layers.0.ffn.w3.weight"])
    assert torch.equal(hf["model.layers.4.shared_head.norm.weight"], sd["mtp.0.norm.weight"])
    assert torch.equal(hf["model.layers.4.self_attn.o_proj.weight"], sd["mtp.0.block.attn.wo.weight"])
    assert torch.equal(hf["model.layers.4.embed_tokens.weight"], sd["embed.weight"])
    assert torch.equal(hf["model.layers.4.shared_head.head.weight"], sd["head.weight"])
    # exported tensors are copies: safetensors refuses shared storage, and the model must not change
    ptrs = {t.untyped_storage().data_ptr() for t in hf.values()}
    assert len(ptrs) == len(hf) and not ptrs & {t.untyped_storage().data_ptr() for t in sd.values()}


def test_full_query_projection_is_q_proj():
    cfg = get_preset("debug", q_lora_rank=0, mtp_depth=0)
    hf = to_hf_state_dict(_model(cfg), cfg)
    assert "model.layers.0.self_attn.q_proj.weight" in hf
    assert not any("q_a_proj" in k or "q_b_proj" in k or "q_a_layernorm" in k for k in hf)
    assert not any(k.startswith("model.layers.4.") for k in hf)


# ---- round trips ----------------------------------------------------------------------------------


def test_round_trip_gives_identical_state_and_logits(debug):
    cfg, model = debug
    sd = from_hf_state_dict(to_hf_state_dict(model, cfg), cfg)
    _assert_same_state(sd, model.state_dict())
    clone = Transformer(cfg)
    clone.load_state_dict(sd)
    clone.eval()
    tokens = _tokens(cfg)
    with torch.no_grad():
        assert torch.equal(clone(tokens), model(tokens))
        full = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
        assert torch.equal(clone.training_loss(full).loss, model.training_loss(full).loss)  # MTP too


def test_rotate_half_layout_permutes_only_rope_rows(debug):
    cfg, model = debug
    inter = to_hf_state_dict(model, cfg)
    half = to_hf_state_dict(model, cfg, rope_interleave=False)
    nope, rope, lora = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    changed = {k for k in inter if not torch.equal(inter[k], half[k])}
    assert changed == {
        f"model.layers.{i}.self_attn.{p}.weight" for i in range(5) for p in ("q_b_proj", "kv_a_proj_with_mqa")
    }
    q_i = inter["model.layers.0.self_attn.q_b_proj.weight"].unflatten(0, (cfg.n_heads, -1))
    q_h = half["model.layers.0.self_attn.q_b_proj.weight"].unflatten(0, (cfg.n_heads, -1))
    assert torch.equal(q_h[:, :nope], q_i[:, :nope])
    assert torch.equal(q_h[:, nope : nope + rope // 2], q_i[:, nope::2])  # even rows first, then odd
    assert torch.equal(q_h[:, nope + rope // 2 :], q_i[:, nope + 1 :: 2])
    kv_i, kv_h = (d["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] for d in (inter, half))
    assert torch.equal(kv_h[lora : lora + rope // 2], kv_i[lora::2])
    _assert_same_state(from_hf_state_dict(half, cfg, rope_interleave=False), model.state_dict())


def test_rope_scale_is_folded_into_rope_rows_only(debug):
    cfg, model = debug
    hf = to_hf_state_dict(model, cfg)
    sd = from_hf_state_dict(hf, cfg, rope_scale=1.5)
    ref = model.state_dict()
    nope, lora = cfg.qk_nope_head_dim, cfg.kv_lora_rank
    q, q_ref = (d["layers.2.attn.wq_b.weight"].unflatten(0, (cfg.n_heads, -1)) for d in (sd, ref))
    assert torch.equal(q[:, :nope], q_ref[:, :nope]) and torch.allclose(q[:, nope:], 1.5 * q_ref[:, nope:])
    kv, kv_ref = sd["layers.2.attn.wkv_a.weight"], ref["layers.2.attn.wkv_a.weight"]
    assert torch.equal(kv[:lora], kv_ref[:lora]) and torch.allclose(kv[lora:], 1.5 * kv_ref[lora:])
    assert torch.equal(sd["layers.2.attn.wkv_b.weight"], ref["layers.2.attn.wkv_b.weight"])


# ---- files ----------------------------------------------------------------------------------------


def test_save_and_load_sharded_and_single_file(debug, tmp_path):
    cfg, model = debug
    files = save_hf_checkpoint(model, cfg, tmp_path, max_shard_bytes=200_000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json") in files
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "float32"
    loaded_cfg, sd = load_hf_checkpoint(tmp_path)
    assert loaded_cfg == cfg
    _assert_same_state(sd, model.state_dict())

    save_hf_checkpoint(model, cfg, tmp_path, dtype=torch.bfloat16)  # replaces the shards
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    _, sd16 = load_hf_checkpoint(tmp_path / "model.safetensors", cfg)
    assert all(v.dtype == torch.bfloat16 for v in sd16.values())
    assert torch.equal(sd16["head.weight"], model.head.weight.detach().bfloat16())


def test_load_for_a_pipeline_stage(debug, tmp_path):
    cfg, model = debug
    save_hf_checkpoint(model, cfg, tmp_path, max_shard_bytes=200_000)
    stage = Transformer(cfg, layer_ids=[2, 3], with_embedding=False, with_head=True)
    _, sd = load_hf_checkpoint(tmp_path, model=stage)
    stage.load_state_dict(sd)  # strict
    full = model.state_dict()
    assert sd.keys() == stage.state_dict().keys() and "embed.weight" in sd  # the MTP's embedding
    assert all(torch.equal(v, full[k]) for k, v in sd.items())

    first = Transformer(cfg, layer_ids=[0, 1], with_embedding=True, with_head=False)
    partial = {k: v for k, v in to_hf_state_dict(model, cfg).items() if not k.startswith("model.layers.3.")}
    with pytest.raises(KeyError, match="model.layers.3"):
        from_hf_state_dict(partial, cfg)
    first.load_state_dict(state_dict_for(first, from_hf_state_dict(partial, cfg, strict=False)))
    with pytest.raises(KeyError, match="layers.3"):
        state_dict_for(stage, from_hf_state_dict(partial, cfg, strict=False))


def test_unknown_missing_and_misshapen_keys_raise_clearly(debug):
    cfg, model = debug
    hf = to_hf_state_dict(model, cfg)
    with pytest.raises(KeyError, match=r"model\.layers\.9\.self_attn\.o_proj\.weight.*expected names"):
        from_hf_state_dict({**hf, "model.layers.9.self_attn.o_proj.weight": torch.zeros(1)}, cfg)
    missing = {k: v for k, v in hf.items() if k != "model.layers.2.self_attn.kv_b_proj.weight"}
    with pytest.raises(KeyError, match=r"lacks 1 tensor.*model\.layers\.2\.self_attn\.kv_b_proj\.weight"):
        from_hf_state_dict(missing, cfg)
    no_expert = {k: v for k, v in hf.items() if k != "model.layers.3.mlp.experts.6.up_proj.weight"}
    with pytest.raises(KeyError, match=r"experts\.6\.up_proj"):
        from_hf_state_dict(no_expert, cfg, strict=False)
    bad = {**hf, "model.norm.weight": torch.ones(cfg.dim + 1)}
    with pytest.raises(ValueError, match=r"model\.norm\.weight: \(65,\) in the checkpoint, \(64,\) expected"):
        from_hf_state_dict(bad, cfg)
    with pytest.raises(KeyError, match="not part of a model"):
        to_hf_state_dict({**model.state_dict(), "layers.0.attn.bogus": torch.zeros(1)}, cfg)
    with pytest.raises(KeyError, match="lacks 1 key"):
        to_hf_state_dict({k: v for k, v in model.state_dict().items() if k != "norm.weight"}, cfg)


def test_mtp_copies_that_differ_warn(debug):
    cfg, model = debug
    hf = to_hf_state_dict(model, cfg)
    hf["model.layers.4.shared_head.head.weight"] += 1.0
    with pytest.warns(UserWarning, match="shared_head.head.weight differs"):
        sd = from_hf_state_dict(hf, cfg)
    assert torch.equal(sd["head.weight"], model.head.weight.detach())


# ---- FP8 ------------------------------------------------------------------------------------------


def _quantize_fp8(weight: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax quantization to float8_e4m3fn, as DeepSeek-V3's published weights are."""
    rows, cols = weight.shape
    scale = torch.empty(math.ceil(rows / block), math.ceil(cols / block))
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = weight[i * block : (i + 1) * block, j * block : (j + 1) * block]
            scale[i, j] = tile.abs().max() / torch.finfo(torch.float8_e4m3fn).max
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = (tile / scale[i, j]).to(q.dtype)
    return q, scale


def test_fp8_block_dequantization():
    weight = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    weight[130:, 140:] *= 50.0  # blocks of very different ranges
    q, scale_inv = _quantize_fp8(weight)
    assert scale_inv.shape == (3, 2)
    out = dequantize_fp8(q, scale_inv)
    assert out.dtype == torch.float32 and out.shape == weight.shape
    for i, j in [(0, 0), (1, 1), (2, 0), (2, 1)]:  # each block: its fp8 values times its own factor
        rows, cols = slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128)
        assert torch.equal(out[rows, cols], q[rows, cols].float() * scale_inv[i, j])
    assert torch.allclose(out, weight, rtol=0.07, atol=1e-6 * weight.abs().max())  # e4m3: 3 mantissa bits
    with pytest.raises(ValueError, match=r"scale_inv has shape \(2, 2\), expected \(3, 2\)"):
        dequantize_fp8(q, scale_inv[:2])


def test_fp8_checkpoint_is_dequantized_on_load(debug, tmp_path):
    from safetensors.torch import save_file

    cfg, model = debug
    hf = to_hf_state_dict(model, cfg)
    quantized, expected = {}, model.state_dict()
    for key, tensor in hf.items():  # like the published checkpoint: linear weights only
        if key.endswith("proj.weight") or "_proj." in key:
            quantized[key], quantized[key + "_scale_inv"] = _quantize_fp8(tensor, block=16)
        else:
            quantized[key] = tensor
    reference = dict(hf)
    for key in hf:
        if key + "_scale_inv" in quantized:
            reference[key] = dequantize_fp8(quantized[key], quantized[key + "_scale_inv"], (16, 16))
    save_file(quantized, str(tmp_path / "model.safetensors"))
    hf_config = {
        **config_to_hf(cfg),
        "quantization_config": {"quant_method": "fp8", "weight_block_size": [16, 16]},
    }
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    _, sd = load_hf_checkpoint(tmp_path)
    _assert_same_state(sd, from_hf_state_dict(reference, cfg))
    w1 = sd["layers.1.ffn.experts.w1"]
    assert w1.dtype == torch.float32 and not torch.equal(w1, expected["layers.1.ffn.experts.w1"])
    assert torch.allclose(w1, expected["layers.1.ffn.experts.w1"], rtol=0.07, atol=1e-3)
    del quantized["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    with pytest.raises(KeyError, match=r"o_proj\.weight.*float8_e4m3fn.*weight_scale_inv"):
        from_hf_state_dict(quantized, cfg, fp8_block_size=(16, 16))


# ---- configs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_round_trip(name):
    cfg = get_preset(name, aux_loss_alpha=1e-4, attn_pad_v=True)
    hf = json.loads(json.dumps(config_to_hf(cfg)))  # what config.json holds
    assert config_from_hf(hf) == cfg
    assert (hf["rope_scaling"] is not None) == cfg.uses_yarn
    assert hf["q_lora_rank"] == (cfg.q_lora_rank or None)


def test_published_v3_config():
    cfg = config_from_hf(PUBLISHED_V3)
    assert cfg == get_preset("v3-671b", max_seq_len=163840, aux_loss_alpha=0.001, mscale=1.0)
    assert cfg.uses_yarn and hf_rope_attention_factor(PUBLISHED_V3) == 1.0
    # transformers >= 5 writes rope_parameters (with rope_theta inside) instead of rope_scaling
    params = {**PUBLISHED_V3["rope_scaling"], "rope_type": "yarn", "rope_theta": 10000.0}
    new_style = {k: v for k, v in PUBLISHED_V3.items() if k not in ("rope_scaling", "rope_theta")}
    assert config_from_hf({**new_style, "rope_parameters": params}) == cfg


def test_yarn_mscale_mapping():
    hf = {
        **PUBLISHED_V3,
        "rope_scaling": {**PUBLISHED_V3["rope_scaling"], "mscale": 1.0, "mscale_all_dim": 0.7},
    }
    assert config_from_hf(hf).mscale == 0.7  # our softmax mscale is transformers' mscale_all_dim
    m = lambda s: 0.1 * s * math.log(40) + 1.0
    assert hf_rope_attention_factor(hf) == pytest.approx(m(1.0) / m(0.7))
    cfg = get_preset("debug", max_seq_len=256, original_seq_len=64, rope_factor=4.0, mscale=0.0)
    out = config_to_hf(cfg)
    assert out["rope_scaling"]["attention_factor"] == 1.0 and hf_rope_attention_factor(out) == 1.0
    assert config_from_hf(out) == cfg


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"norm_topk_prob": False}, "norm_topk_prob"),
        ({"num_key_value_heads": 16}, "num_key_value_heads"),
        ({"moe_layer_freq": 2}, "moe_layer_freq"),
        ({"model_type": "deepseek_v2"}, "model_type"),
        ({"max_position_embeddings": 4096}, "YaRN factor 40"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope type 'linear'"),
    ],
)
def test_unsupported_configs_raise(change, match):
    with pytest.raises(ValueError, match=match):
        config_from_hf({**PUBLISHED_V3, **change})


def test_softmax_routing_is_not_exported():
    with pytest.raises(ValueError, match="sigmoid"):
        config_to_hf(get_preset("debug", score_func="softmax"))


# ---- against transformers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transformers():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("transformers.models.deepseek_v3")
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield transformers
    transformers.logging.set_verbosity(level)


def _from_pretrained(transformers, path):
    model, info = transformers.DeepseekV3ForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    return model.eval(), info


def test_transformers_logits_and_mtp_match_ours(debug, transformers, tmp_path):
    """Our export loaded by transformers' DeepseekV3ForCausalLM (and its MtpModel) computes what we do."""
    cfg, model = debug
    save_hf_checkpoint(model, cfg, tmp_path)
    hf, info = _from_pretrained(transformers, tmp_path)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert all(k.startswith(f"model.layers.{cfg.n_layers}.") for k in info["unexpected_keys"])  # the MTP
    tokens = _tokens(cfg)
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), rtol=0, atol=1e-5)

    try:
        from transformers.modeling_layers import MtpModel  # recent transformers 5.x
    except ImportError:
        pytest.skip(f"transformers {transformers.__version__} has no MtpModel to check the MTP layer against")
    # transformers reads MTP layers at model.layers.61 only (DeepSeek-V3's number); point it at ours
    hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{cfg.n_layers}\..*"]
    mtp = MtpModel.from_pretrained(hf).eval()  # raises if any MTP weight is missing
    k, seq = 1, tokens.shape[1]
    with torch.no_grad():
        h = model.run_layers(model.embed_tokens(tokens))
        module = model.mtp[0]
        ours = module.norm(module(h[:, : seq - k], model.embed(tokens[:, k:]), *model.rope(seq - k)))
        theirs = mtp.forward_layer(
            0, h[:, : seq - k], torch.arange(seq - k)[None], None, input_ids=tokens[:, k:]
        )
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("rope_interleave", [True, False])
def test_transformers_matches_with_yarn_full_q_and_rotate_half(transformers, tmp_path, rope_interleave):
    cfg = get_preset(
        "debug",
        q_lora_rank=0,
        max_seq_len=256,
        original_seq_len=64,
        rope_factor=4.0,
        mscale=0.707,
        route_scale=2.5,
        mtp_depth=0,
    )
    model = _model(cfg, seed=3)
    save_hf_checkpoint(model, cfg, tmp_path, rope_interleave=rope_interleave)
    hf, info = _from_pretrained(transformers, tmp_path)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokens = _tokens(cfg, seq=100)  # beyond original_seq_len
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), rtol=0, atol=1e-5)


def test_import_from_a_transformers_model(transformers, tmp_path):
    """A model built and saved by transformers (mscale != mscale_all_dim, so its rope factor is not 1)."""
    ours_cfg = get_preset("debug", max_seq_len=256, original_seq_len=64, rope_factor=4.0, route_scale=2.5)
    hf_config = config_to_hf(ours_cfg)
    hf_config["rope_scaling"].update(mscale=1.0, mscale_all_dim=0.707)
    assert hf_rope_attention_factor(hf_config) != 1.0
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**hf_config)).float().eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn(param.shape))
        for layer in hf.model.layers[ours_cfg.n_dense_layers :]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="holds none"):  # config.json keeps num_nextn_predict_layers=1
        cfg, sd = load_hf_checkpoint(tmp_path)
    assert cfg == ours_cfg.replace(mscale=0.707, mtp_depth=0)
    model = Transformer(cfg)
    model.load_state_dict(sd)
    model.eval()
    tokens = _tokens(cfg, seq=100)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=0, atol=1e-5)
    # transformers >= 5 keeps experts fused in memory; that layout imports too
    in_memory = from_hf_state_dict(hf.state_dict(), cfg, rope_scale=hf_rope_attention_factor(hf_config))
    _assert_same_state(in_memory, sd)
