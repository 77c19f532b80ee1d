"""The whole model: causality, MTP, stage cuts, initialisation and parameter counts."""

import pytest
import torch

from lightning_dsv3.config import ModelConfig, ParallelConfig, count_parameters, get_preset
from lightning_dsv3.model import Transformer


def _model(**overrides) -> Transformer:
    m = Transformer(get_preset("debug", **overrides))
    m.init_weights(0)
    return m


def test_causality_later_tokens_never_change_earlier_logits() -> None:
    model = _model()
    tokens = torch.randint(0, 256, (2, 16))
    changed = tokens.clone()
    changed[:, 10:] = torch.randint(0, 256, (2, 6))
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_loss_combines_next_token_and_mtp() -> None:
    model = _model(mtp_depth=2, mtp_loss_weight=0.5)
    tokens = torch.randint(0, 256, (2, 17))
    out = model.training_loss(tokens)
    assert len(out.mtp) == 2
    torch.testing.assert_close(out.loss.detach(), out.ce + 0.5 * torch.stack(out.mtp).mean())
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_mtp_is_causal() -> None:
    """The depth-1 MTP loss at position i may see tokens up to i+1 only."""
    model = _model(mtp_depth=1)
    tokens = torch.randint(0, 256, (1, 12))
    h = model.run_layers(model.embed_tokens(tokens[:, :-1]))
    cos, sin = model.rope(10)
    h1 = model.mtp[0](h[:, :10], model.embed(tokens[:, 1:11]), cos, sin)
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 256
    h_c = model.run_layers(model.embed_tokens(changed[:, :-1]))
    h1_c = model.mtp[0](h_c[:, :10], model.embed(changed[:, 1:11]), cos, sin)
    torch.testing.assert_close(h1[:, :7], h1_c[:, :7])  # position i sees tokens <= i + 1 <= 7


def test_stages_compose_to_the_whole_model() -> None:
    cfg = get_preset("debug")
    whole = _model()
    first = Transformer(cfg, layer_ids=[0, 1], with_embedding=True, with_head=False)
    last = Transformer(cfg, layer_ids=[2, 3], with_embedding=False, with_head=True)
    for stage in (first, stage_last := last):
        stage.init_weights(0)  # name-seeded: equals the whole model's values
        sd = whole.state_dict()
        for name, t in stage.state_dict().items():
            torch.testing.assert_close(t, sd[name])
    tokens = torch.randint(0, 256, (2, 9))
    h = first.run_layers(first.embed_tokens(tokens[:, :-1]))
    staged = stage_last.loss(stage_last.run_layers(h), tokens)
    torch.testing.assert_close(staged.loss, whole.training_loss(tokens).loss)
    with pytest.raises(RuntimeError, match="whole model"):
        first(tokens)


def test_init_is_seeded() -> None:
    a, b, c = _model(), _model(), Transformer(get_preset("debug"))
    c.init_weights(1)
    for (n, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), n
    assert not all(torch.equal(x, z) for x, z in zip(a.parameters(), c.parameters()))


def test_v3_671b_parameter_counts() -> None:
    counts = count_parameters(get_preset("v3-671b"))
    assert counts["total"] == pytest.approx(671e9, rel=0.01)
    # The report rounds to 37B; the layer-by-layer sum (embedding and head included) is 37.55B.
    assert counts["activated"] == pytest.approx(37e9, rel=0.015)
    assert counts["mtp"] == pytest.approx(
        11.6e9, rel=0.01
    )  # 685B on the hub = 671B + MTP + its embed/head copies


@pytest.mark.parametrize("name", ["debug", "mini", "lite", "v3-671b"])
def test_presets_build_on_meta(name: str) -> None:
    counts = count_parameters(get_preset(name))
    assert 0 < counts["activated"] <= counts["total"]
    if name == "mini":
        assert 0.5e9 <= counts["total"] <= 1e9


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"n_routed_experts": 10, "n_expert_groups": 4}, "equal groups"),
        ({"n_activated_experts": 9}, "n_activated_experts"),
        ({"n_limited_groups": 1, "n_activated_experts": 3}, "raise n_limited_groups"),
        ({"qk_rope_head_dim": 7}, "even"),
        ({"n_dense_layers": 9}, "n_dense_layers"),
        ({"mtp_depth": -1}, "mtp_depth"),
    ],
)
def test_invalid_model_configs(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ModelConfig(**overrides)


def test_sequence_longer_than_rope_table_is_refused() -> None:
    model = _model(max_seq_len=8, original_seq_len=8)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(torch.randint(0, 256, (1, 9)))


def test_parallel_config_resolves_dp_and_refuses_bad_meshes() -> None:
    assert ParallelConfig(pp=2, ep=2).resolve(8).dp == 2
    with pytest.raises(ValueError, match="not divisible"):
        ParallelConfig(pp=3, ep=2).resolve(8)
    with pytest.raises(ValueError, match="does not match the world size"):
        ParallelConfig(pp=2, dp=3, ep=2).resolve(8)
    with pytest.raises(ValueError, match="unknown schedule"):
        ParallelConfig(schedule="zigzag")


@pytest.mark.parametrize("k", [1, 4])
def test_permuted_rows_gather_in_both_directions_like_indexing(k: int) -> None:
    """The layer's routed-row permutation (a gather whose backward gathers too) gives the values and
    gradients of plain indexing, whose backward scatter-adds."""
    from lightning_dsv3.model.block import _PermuteRows

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    order = torch.randperm(6 * k, generator=gen)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    upstream = torch.randn(6 * k, 5, dtype=torch.float64, generator=gen)

    rows = _PermuteRows.apply(x, order, inverse, k)
    (grad,) = torch.autograd.grad(rows, x, upstream)
    reference = x[order // k]
    (reference_grad,) = torch.autograd.grad(reference, x, upstream)
    assert torch.equal(rows, reference)
    torch.testing.assert_close(grad, reference_grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("pipelined", [False, True])
def test_cuda_graph_modes_stay_off_what_a_pipeline_keeps_alive(monkeypatch, pipelined: bool) -> None:
    """A pipeline keeps several micro-batches' outputs of each compiled piece alive; CUDA graphs'
    static outputs would overwrite them, so a pipelined chunk compiles nothing in those modes and asks
    the pipeline runtime for its own graphs (one capture per micro-batch in flight) instead."""
    modes: list[str | None] = []

    def record(fn, mode=None, **kwargs):
        modes.append(mode)
        return fn

    monkeypatch.setattr(torch, "compile", record)
    chunk = Transformer(get_preset("debug"), [1, 2], with_embedding=False, with_head=True)
    chunk.compile_parts("reduce-overhead", pipelined=pipelined)
    assert chunk.cuda_graphs is pipelined
    n_blocks = len(list(chunk.all_blocks()))
    assert len(modes) == 3 * n_blocks + 1  # each layer, its attention and mlp, the cross-entropy
    whole = [m for i, m in enumerate(modes[:-1]) if i % 3 == 0] + [modes[-1]]
    parts = [m for i, m in enumerate(modes[:-1]) if i % 3 != 0]
    assert all(m is None for m in parts)
    assert all(m == (None if pipelined else "reduce-overhead") for m in whole)
