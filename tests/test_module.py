"""The LightningModule with Lightning's own strategy: fit, validate, resume, balancing, the recipe."""

from pathlib import Path

import lightning as L
import pytest
import torch
from recipe_checks import load_train

from lightning_dsv3.data import DSV3DataModule
from lightning_dsv3.module import DeepSeekV3Module, lr_factor

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _data(**kw) -> DSV3DataModule:
    return DSV3DataModule(**{"seq_len": 32, "batch_size": 4, "max_bytes": 2**20, **kw})


def _trainer(tmp_path: Path, **kw) -> L.Trainer:
    args = dict(
        accelerator="cpu",
        devices=1,
        max_steps=8,
        limit_val_batches=2,
        val_check_interval=4,
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="run"),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    args.update(kw)
    return L.Trainer(**args)


def test_lr_schedule_warms_up_then_decays() -> None:
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)


def test_fit_lowers_the_loss_and_moves_the_router_bias(tmp_path: Path) -> None:
    L.seed_everything(0)
    module = DeepSeekV3Module(lr=3e-3, warmup_steps=2)
    trainer = _trainer(tmp_path, max_steps=30, val_check_interval=30)
    trainer.fit(module, _data())
    metrics = trainer.logged_metrics
    assert metrics["train_loss"] < 4.0  # from ln(256) = 5.55
    assert "val_loss" in metrics and "val_ppl" in metrics and "balance/max_violation" in metrics
    biases = [r.e_score_correction_bias for _, r in module.model.routers()]
    assert all(b.abs().sum() > 0 for b in biases)


def test_resume_continues_from_the_checkpoint(tmp_path: Path) -> None:
    L.seed_everything(0)
    trainer = _trainer(tmp_path, max_steps=4)
    module = DeepSeekV3Module()
    trainer.fit(module, _data())
    ckpt = tmp_path / "step4.ckpt"
    trainer.save_checkpoint(ckpt)
    bias = [r.e_score_correction_bias.clone() for _, r in module.model.routers()]

    resumed = DeepSeekV3Module()
    trainer2 = _trainer(tmp_path, max_steps=6)
    trainer2.fit(resumed, _data(), ckpt_path=ckpt)
    assert trainer2.global_step == 6
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    routers = [k for k in state if k.endswith("e_score_correction_bias")]
    assert len(routers) == len(bias)
    for key, b in zip(routers, bias):
        torch.testing.assert_close(state[key], b)


def test_vocab_larger_than_the_model_is_refused(tmp_path: Path) -> None:
    module = DeepSeekV3Module(model_overrides={"vocab_size": 128})
    with pytest.raises(ValueError, match="vocab_size"):
        _trainer(tmp_path).fit(module, _data())


def test_debug_recipe_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    main = load_train().main
    monkeypatch.chdir(tmp_path)
    cli = main(
        [
            "fit",
            "--config",
            str(RECIPES / "configs" / "debug.yaml"),
            "--trainer.max_steps=3",
            "--trainer.val_check_interval=3",
            "--trainer.limit_val_batches=1",
            "--data.seq_len=32",
            "--data.max_bytes=1048576",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert cli.trainer.global_step == 3
    assert list(tmp_path.glob("runs/debug/version_0/checkpoints/last.ckpt"))
    assert (tmp_path / "runs/debug/version_0/metrics.csv").exists()


def test_compile_takes_a_mode_and_reaches_the_cross_entropy() -> None:
    """Also the layers' parts, which a pipeline calls one by one instead of the layer's forward."""
    with pytest.raises(ValueError, match="reduce-overhead"):
        DeepSeekV3Module(compile="fast")
    for mode in ("max-autotune", "max-autotune-no-cudagraphs"):  # they fail on the grouped GEMM: say so
        with pytest.raises(ValueError, match="grouped-GEMM template.*compile=True"):
            DeepSeekV3Module(compile=mode)
    plain = DeepSeekV3Module().build_chunk()
    chunk = DeepSeekV3Module(compile="reduce-overhead").build_chunk()  # compiled lazily: nothing traced yet
    assert chunk.cross_entropy is not plain.cross_entropy
    assert all(block._compiled_call_impl is not None for block in chunk.all_blocks())
    assert all(hasattr(b.attention, "_torchdynamo_orig_callable") for b in chunk.all_blocks())
    assert all(hasattr(b.mlp, "_torchdynamo_orig_callable") for b in chunk.all_blocks())
    tokens = torch.randint(0, chunk.config.vocab_size, (2, 9))
    logits = torch.randn(2, 8, chunk.config.vocab_size)
    torch.testing.assert_close(
        chunk.cross_entropy(logits, tokens[:, 1:]), plain.cross_entropy(logits, tokens[:, 1:])
    )


@pytest.mark.parametrize("bar", [True, False])
def test_losses_go_to_the_progress_bar_only_where_one_shows_them(tmp_path: Path, bar: bool) -> None:
    """Lightning reads progress-bar values back to the host after every batch: without a bar, none."""
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=0, enable_progress_bar=bar)
    trainer.fit(DeepSeekV3Module(), _data())
    assert ("train_loss" in trainer.progress_bar_metrics) is bar
    assert "train_loss" in trainer.logged_metrics


def test_compiled_parts_compute_what_the_eager_parts_do() -> None:
    """The pipeline's way through a layer (attention, dispatch, mlp, combine) with the parts compiled:
    the same hidden states and gradients as eager, to fp32 reordering."""
    eager = DeepSeekV3Module().build_chunk()
    compiled = DeepSeekV3Module(compile=True).build_chunk()
    tokens = torch.randint(0, eager.config.vocab_size, (2, 17))
    outs = []
    for chunk in (eager, compiled):
        h = chunk.embed_tokens(tokens[:, :-1])
        cos, sin = chunk.rope(16)
        for block in chunk.blocks():
            h = block.combine(block.mlp(block.dispatch(block.attention(h, cos, sin))))
        h.square().mean().backward()
        outs.append((h.detach(), {n: p.grad for n, p in chunk.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    assert outs[1][1].keys() == outs[0][1].keys()
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
