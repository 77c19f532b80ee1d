"""DeepSeekMoE: routing rules and the layer against a loop over tokens and experts."""

import torch

from lightning_dsv3.config import get_preset
from lightning_dsv3.model import Block
from lightning_dsv3.model.mla import rope_cos_sin
from lightning_dsv3.model.moe import MoE, Router


def _router(**overrides) -> Router:
    cfg = get_preset("debug", **overrides)
    torch.manual_seed(0)
    r = Router(cfg)
    torch.nn.init.normal_(r.weight, std=1.0)
    return r


def test_group_limited_routing_stays_inside_chosen_groups() -> None:
    r = _router(n_routed_experts=16, n_expert_groups=4, n_limited_groups=2, n_activated_experts=4)
    x = torch.randn(500, r.weight.shape[1])
    routing = r(x)
    per_group = 16 // 4
    choice = torch.sigmoid(x @ r.weight.T)
    group_score = choice.unflatten(-1, (4, per_group)).topk(2, dim=-1).values.sum(-1)
    allowed = group_score.topk(2, dim=-1).indices  # (T, 2)
    groups = routing.indices // per_group
    assert torch.all((groups.unsqueeze(-1) == allowed.unsqueeze(1)).any(-1))
    assert torch.all(routing.indices.sort(-1).values.diff(dim=-1) > 0)  # k distinct experts


def test_gates_are_normalised_and_scaled() -> None:
    r = _router(route_scale=2.5)
    routing = r(torch.randn(64, r.weight.shape[1]))
    torch.testing.assert_close(routing.weights.sum(-1), torch.full((64,), 2.5))


def test_bias_changes_selection_but_not_gate_values() -> None:
    r = _router(n_expert_groups=1, n_limited_groups=1)
    x = torch.randn(200, r.weight.shape[1])
    before = r(x)
    r.e_score_correction_bias[3] = 10.0  # make expert 3 always chosen
    after = r(x)
    assert torch.all((after.indices == 3).any(-1))
    assert not torch.equal(before.indices, after.indices)
    raw = torch.sigmoid(x @ r.weight.T)
    gathered = raw.gather(1, after.indices)
    torch.testing.assert_close(after.weights, gathered / gathered.sum(-1, keepdim=True))


def test_bias_update_moves_against_load() -> None:
    r = _router(bias_update_speed=0.1)
    load = torch.tensor([10.0, 0, 0, 0, 0, 0, 0, 30.0])
    r.update_bias(load)
    expected = 0.1 * torch.sign(load.mean() - load)
    torch.testing.assert_close(r.e_score_correction_bias, expected)
    assert r.expert_load.sum() == 0


def test_expert_load_counts_routed_tokens() -> None:
    r = _router()
    r.eval()
    r(torch.randn(50, r.weight.shape[1]))
    assert r.expert_load.sum() == 0  # evaluation does not move the balance
    r.train()
    routing = r(torch.randn(50, r.weight.shape[1]))
    assert r.expert_load.sum() == 50 * r.top_k
    assert torch.equal(r.expert_load, torch.bincount(routing.indices.flatten(), minlength=8).float())


def test_balance_loss_matches_definition() -> None:
    r = _router(aux_loss_alpha=0.01)
    batch, seq = 3, 10
    routing = r(torch.randn(batch * seq, r.weight.shape[1]))
    loss = 0.0
    for b in range(batch):
        s = routing.scores[b * seq : (b + 1) * seq]
        idx = routing.indices[b * seq : (b + 1) * seq]
        for i in range(r.n_experts):
            f = r.n_experts / (r.top_k * seq) * (idx == i).sum()
            p = (s[:, i] / s.sum(-1)).mean()
            loss += f * p
    torch.testing.assert_close(r.balance_loss(routing, batch), 0.01 * loss / batch)


def test_moe_layer_matches_token_expert_loop() -> None:
    cfg = get_preset("debug")
    torch.manual_seed(0)
    block = Block(cfg.n_dense_layers, cfg)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 6, cfg.dim)
    cos, sin = rope_cos_sin(cfg, 6)
    out = block(x, cos, sin)

    moe: MoE = block.ffn
    h = x + block.attn(block.attn_norm(x), cos, sin)
    xf = block.ffn_norm(h).flatten(0, 1)
    routing = moe.router(xf)
    e = moe.experts
    ref = torch.zeros_like(xf)
    for t in range(xf.shape[0]):
        for slot in range(moe.top_k):
            j = routing.indices[t, slot]
            y = e.w2[j] @ (torch.nn.functional.silu(e.w1[j] @ xf[t]) * (e.w3[j] @ xf[t]))
            ref[t] += routing.weights[t, slot] * y
        ref[t] += moe.shared_experts(xf[t])
    torch.testing.assert_close(out, h + ref.view_as(h), rtol=1e-5, atol=1e-5)


def test_four_parts_compose_to_forward() -> None:
    cfg = get_preset("debug")
    torch.manual_seed(1)
    for layer_id in (0, cfg.n_dense_layers):  # one dense, one MoE layer
        block = Block(layer_id, cfg)
        for p in block.parameters():
            torch.nn.init.normal_(p, std=0.1)
        x = torch.randn(2, 5, cfg.dim)
        cos, sin = rope_cos_sin(cfg, 5)
        parts = block.combine(block.mlp(block.dispatch(block.attention(x, cos, sin))))
        torch.testing.assert_close(parts, block(x, cos, sin))


def test_grouped_experts_equal_the_plain_loop() -> None:
    from lightning_dsv3.model.moe import GroupedExperts

    torch.manual_seed(0)
    experts = GroupedExperts(4, 8, 16)
    for p in experts.parameters():
        torch.nn.init.normal_(p)
    x, counts = torch.randn(10, 8), torch.tensor([3, 0, 5, 2])
    grouped = experts(x, counts)
    experts.impl = "loop"
    torch.testing.assert_close(experts(x, counts), grouped, rtol=1e-5, atol=1e-5)
