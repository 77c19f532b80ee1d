"""MLA against explicit softmax attention over decompressed keys and values."""

import math

import pytest
import torch

from lightning_dsv3.config import get_preset
from lightning_dsv3.model.mla import MLA, apply_rope, rope_cos_sin, rope_frequencies, softmax_scale


def _reference_mla(attn: MLA, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Per-head attention written out: decompress K/V from the latent, rotate, softmax with a mask."""
    b, s, _ = x.shape
    h, dn, dr, dv = attn.n_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.v_head_dim
    q = attn.wq_b(attn.q_norm(attn.wq_a(x))).view(b, s, h, dn + dr)
    ckv = attn.wkv_a(x)
    latent, k_rope = ckv[..., : attn.kv_lora_rank], ckv[..., attn.kv_lora_rank :]
    kv = attn.wkv_b(attn.kv_norm(latent)).view(b, s, h, dn + dv)
    out = torch.zeros(b, s, h, dv)
    for bi in range(b):
        for head in range(h):
            for i in range(s):
                qi = torch.cat([q[bi, i, head, :dn], _rot(q[bi, i, head, dn:], cos[i], sin[i])])
                logits = []
                for j in range(i + 1):  # causal: keys up to i
                    kj = torch.cat([kv[bi, j, head, :dn], _rot(k_rope[bi, j], cos[j], sin[j])])
                    logits.append((qi * kj).sum() * attn.scale)
                p = torch.softmax(torch.stack(logits), 0)
                out[bi, i, head] = (p[:, None] * kv[bi, : i + 1, head, dn:]).sum(0)
    return attn.wo(out.reshape(b, s, h * dv))


def _rot(v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs as complex numbers: (a + ib) * e^{i theta}."""
    z = torch.view_as_complex(v.reshape(-1, 2).contiguous()) * torch.polar(
        torch.ones_like(cos), torch.atan2(sin, cos)
    )
    return torch.view_as_real(z).flatten()


@pytest.mark.parametrize("pad_v", [False, True])
def test_mla_matches_explicit_attention(pad_v: bool) -> None:
    cfg = get_preset("debug", attn_pad_v=pad_v)
    torch.manual_seed(0)
    attn = MLA(cfg)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2) if p.dim() > 1 else None
    x = torch.randn(2, 7, cfg.dim)
    cos, sin = rope_cos_sin(cfg, 7)
    torch.testing.assert_close(attn(x, cos, sin), _reference_mla(attn, x, cos, sin), rtol=1e-5, atol=1e-5)


def test_rope_is_a_rotation_of_pairs() -> None:
    cfg = get_preset("debug")
    cos, sin = rope_cos_sin(cfg, 5)
    x = torch.randn(1, 5, 3, cfg.qk_rope_head_dim)
    y = apply_rope(x, cos, sin)
    pair_norm = lambda t: t.unflatten(-1, (-1, 2)).norm(dim=-1)
    torch.testing.assert_close(pair_norm(y), pair_norm(x))
    torch.testing.assert_close(y[:, 0], x[:, 0])  # position 0 is not rotated


def test_yarn_interpolates_long_wavelengths_only() -> None:
    base = get_preset("v3-671b").replace(rope_factor=1.0)
    yarn = get_preset("v3-671b")
    f0, f1 = rope_frequencies(base), rope_frequencies(yarn)
    assert torch.allclose(f1[0], f0[0])  # fastest frequency kept
    assert torch.allclose(f1[-1], f0[-1] / yarn.rope_factor)  # slowest divided by the factor
    assert torch.all(f1 <= f0 + 1e-12)
    expected_mscale = 0.1 * yarn.mscale * math.log(yarn.rope_factor) + 1.0
    assert softmax_scale(yarn) == pytest.approx(yarn.qk_head_dim**-0.5 * expected_mscale**2)
    assert softmax_scale(base) == pytest.approx(base.qk_head_dim**-0.5)
