"""FP8 training through torchao (`DeepSeekV3Module(float8=...)`, lightning_dsv3/float8.py).

torch._scaled_mm runs on the CPU build of torch (2.13), so conversion, checkpoints and the numerics of
a short fit are checked here on CPU, with the device check (fp8 tensor cores) patched out where a
test trains; the GPU test trains in bf16 under torch.compile where an fp8-capable GPU exists.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

import lightning_dsv3.module as module_file
from lightning_dsv3 import DSV3Strategy
from lightning_dsv3.config import get_preset
from lightning_dsv3.data import DSV3DataModule
from lightning_dsv3.float8 import check_float8, check_float8_device, convert_to_float8
from lightning_dsv3.model.block import Block
from lightning_dsv3.model.moe import GroupedExperts
from lightning_dsv3.model.transformer import Transformer
from lightning_dsv3.module import DeepSeekV3Module

torchao = pytest.importorskip("torchao", reason="float8 needs torchao: pip install 'lightning-dsv3[fp8]'")
from torchao.float8.float8_linear import Float8Linear  # noqa: E402

SEQ = 32


def _float8_names(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, Float8Linear)}


def _expected_debug_names(model: Transformer) -> set[str]:
    """Every linear of attention and of the dense MLP / shared experts, in every decoder layer and the
    MTP layer, and MTP's eh_proj; not `head`, and not `wkv_a`, whose 16 + 8 = 24 outputs are no
    multiple of 16 in the debug preset."""
    names = set()
    blocks = [f"layers.{i}" for i in model.layer_ids] + [f"mtp.{k}.block" for k in range(len(model.mtp))]
    for prefix in blocks:
        names |= {f"{prefix}.attn.{w}" for w in ("wq_a", "wq_b", "wkv_b", "wo")}
        ffn = f"{prefix}.ffn.shared_experts" if prefix != "layers.0" else f"{prefix}.ffn"
        names |= {f"{ffn}.{w}" for w in ("w1", "w2", "w3")}
    return names | {f"mtp.{k}.eh_proj" for k in range(len(model.mtp))}


# ---- conversion -----------------------------------------------------------------------------------
def test_conversion_replaces_exactly_the_intended_linears() -> None:
    model = DeepSeekV3Module(float8="tensorwise").build_chunk()
    converted = _float8_names(model)
    # debug: 5 layers (4 + MTP's) x 4 attention linears, 3 dense-MLP + 4 x 3 shared-expert linears, eh_proj
    assert len(converted) == 5 * 4 + 3 + 4 * 3 + 1 == 36
    assert converted == _expected_debug_names(model)
    plain = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    assert plain == {"head"} | {n for n in plain if n.endswith("attn.wkv_a")}
    assert len(plain) == 1 + 5  # the head and the five wkv_a
    for _, moe in model.moe_layers():  # routed experts and the router gate: plain parameters, fp32
        assert type(moe.experts) is GroupedExperts and type(moe.experts.w1) is nn.Parameter
        assert type(moe.router.weight) is nn.Parameter


def test_conversion_counts_on_the_mini_preset_and_a_pipeline_stage() -> None:
    with torch.device("meta"):
        mini = Transformer(get_preset("mini"))
    names = convert_to_float8(mini, "rowwise")
    # 13 layers x 5 attention linears (wkv_a: 256 + 32 = 288 outputs, a multiple of 16), dense MLP,
    # 12 x 3 shared-expert linears, eh_proj
    assert len(names) == 13 * 5 + 3 + 12 * 3 + 1 == 105
    assert not any(n == "head" or "router" in n or ".ffn.experts" in n for n in names)

    stage = DeepSeekV3Module(float8="rowwise").build_chunk([2, 3], with_embedding=False, with_head=True)
    assert _float8_names(stage) == _expected_debug_names(stage)
    assert len(_float8_names(stage)) == 3 * (4 + 3) + 1


def test_conversion_comes_before_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []  # for each layer compiled: were its linears fp8 already?
    compile_module = nn.Module.compile

    def record(self: nn.Module, *args: Any, **kw: Any) -> None:
        if isinstance(self, Block):
            seen.append(isinstance(self.attn.wq_a, Float8Linear))
        compile_module(self, *args, **kw)

    monkeypatch.setattr(nn.Module, "compile", record)
    DeepSeekV3Module(float8="tensorwise", compile=True).build_chunk()
    assert seen == [True] * 5  # 4 decoder layers and the MTP layer


def test_names_state_dict_and_values_do_not_change() -> None:
    plain = DeepSeekV3Module().build_chunk()
    fp8 = DeepSeekV3Module(float8="rowwise").build_chunk()
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in fp8.named_parameters()]
    plain_sd, fp8_sd = plain.state_dict(), fp8.state_dict()
    assert list(plain_sd) == list(fp8_sd)
    for key, value in plain_sd.items():
        assert type(fp8_sd[key]) is torch.Tensor and fp8_sd[key].dtype == value.dtype
        torch.testing.assert_close(fp8_sd[key], value, rtol=0, atol=0)  # same init: seeded by name
    with torch.no_grad():  # either loads the other's state dict, strictly
        for p in fp8.parameters():
            p.add_(1.0)
    plain.load_state_dict(fp8.state_dict())
    torch.testing.assert_close(plain.state_dict(), fp8.state_dict(), rtol=0, atol=0)
    fresh = DeepSeekV3Module().build_chunk().state_dict()
    fp8.load_state_dict(fresh)
    torch.testing.assert_close(fp8.state_dict(), fresh, rtol=0, atol=0)


# ---- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["fp8", "e4m3", "TENSORWISE", True])
def test_unknown_recipe_is_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"choose 'tensorwise' \(fastest\), 'rowwise'.* or None"):
        DeepSeekV3Module(float8=bad)


def test_missing_or_old_torchao_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    DeepSeekV3Module(float8=None)  # off: torchao is never imported
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "torchao", None)  # import torchao -> ImportError
        missing = r"torchao, which is not installed; pip install 'lightning-dsv3\[fp8\]'"
        with pytest.raises(ImportError, match=missing):
            DeepSeekV3Module(float8="tensorwise")
        DeepSeekV3Module(float8=None)
    monkeypatch.setattr(torchao, "__version__", "0.10.0+cu126")
    with pytest.raises(ImportError, match=r"torchao >= 0.18 .* found 0.10.0\+cu126"):
        check_float8("rowwise")


def test_devices_without_fp8_tensor_cores_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RuntimeError, match=r"compute capability >= 8.9.*this run is on cpu.*float8=None"):
        check_float8_device(torch.device("cpu"), "tensorwise")
    check_float8_device(torch.device("cpu"), None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(RuntimeError, match=r">= 8.9 .*NVIDIA A100-SXM4-80GB has 8.0; pass float8=None"):
        check_float8_device(torch.device("cuda", 0), "rowwise")
    for ok in [(8, 9), (9, 0), (10, 0)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, ok=ok: ok)
        check_float8_device(torch.device("cuda", 0), "rowwise")


def test_fit_on_cpu_is_refused_before_the_model_is_built(tmp_path: Path) -> None:
    module = DeepSeekV3Module(float8="tensorwise")
    with pytest.raises(RuntimeError, match="compute capability >= 8.9"):
        _trainer(steps=1, strategy=DSV3Strategy(), default_root_dir=tmp_path).fit(module, _data())
    assert module.model is None


# ---- training -------------------------------------------------------------------------------------
class _Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, *args: Any) -> None:
        self.losses.append(float(outputs["loss"]))


def _data() -> DSV3DataModule:
    return DSV3DataModule(seq_len=SEQ, batch_size=4, max_bytes=2**20, seed=0)


def _trainer(steps: int, **kw: Any) -> L.Trainer:
    args = dict(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip
    return L.Trainer(**{**args, **kw})


@pytest.fixture
def cpu_fp8(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let fp8 train on the CPU (torch._scaled_mm runs there, slowly): the tests check numbers, not speed."""
    monkeypatch.setattr(module_file, "check_float8_device", lambda device, recipe: None)


def _fit(float8: str | None, steps: int, **kw: Any) -> tuple[list[float], DeepSeekV3Module]:
    L.seed_everything(0)
    losses = _Losses()
    module = DeepSeekV3Module(lr=3e-3, warmup_steps=2, float8=float8)
    _trainer(steps, strategy=DSV3Strategy(), callbacks=[losses], **kw).fit(module, _data())
    return losses.losses, module


def _cpu_rowwise_scaled_mm() -> bool:
    """Whether this torch's CPU `_scaled_mm` takes rowwise scales (torch 2.13 does, 2.11 does not)."""
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(
            a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32
        )
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_training_tracks_fp32(cpu_fp8: None, recipe: str) -> None:
    """20 steps of the debug model, fp8 against fp32 on the same seed and batches.

    Tolerances: e4m3 keeps 3 mantissa bits (relative rounding error up to 2^-4 per element), which the
    GEMMs' sums average down; the first loss (same weights, only the forward differs) moves by about
    1e-4 relative and the curves stay within 0.3% over 20 steps on this machine. The bounds are 1e-3
    for the first step and the issue's 2% target for every step: loose enough for other CPUs' GEMM
    orders, tight enough that a wrong scale (a factor of 2 or more in a layer) fails.
    """
    if recipe == "rowwise" and not _cpu_rowwise_scaled_mm():
        pytest.skip(f"torch {torch.__version__}'s CPU _scaled_mm takes per-tensor scales only")
    reference, _ = _fit(None, 20)
    losses, module = _fit(recipe, 20)
    assert len(_float8_names(module.model)) == 36
    assert losses[0] == pytest.approx(reference[0], rel=1e-3)
    assert losses[-1] < reference[0] - 2.0  # it trains: from 7.2 (ln 256 x 1.3 with MTP) to about 3.5
    for step, (ours, ref) in enumerate(zip(losses, reference)):
        assert ours == pytest.approx(ref, rel=0.02), f"step {step}"


@pytest.mark.parametrize("first, second", [("tensorwise", None), (None, "rowwise")])
def test_checkpoints_load_with_and_without_fp8(
    cpu_fp8: None, tmp_path: Path, first: Any, second: Any
) -> None:
    """A DSV3Strategy checkpoint of an fp8 run resumes without fp8, and the other way round."""
    _, saved = _fit(first, 3)
    ckpt = tmp_path / "step3.ckpt"
    saved.trainer.save_checkpoint(ckpt)
    L.seed_everything(0)
    resumed = DeepSeekV3Module(lr=3e-3, warmup_steps=2, float8=second)
    trainer = _trainer(3, strategy=DSV3Strategy())
    trainer.fit(resumed, _data(), ckpt_path=ckpt)  # at max_steps already: restores, takes no step
    assert trainer.global_step == 3
    assert (len(_float8_names(resumed.model)) == 36) == (second is not None)
    torch.testing.assert_close(resumed.model.state_dict(), saved.model.state_dict(), rtol=0, atol=0)


def _fp8_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.gpu
@pytest.mark.skipif(not _fp8_gpu(), reason="needs a GPU of compute capability >= 8.9")
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_training_tracks_bf16_on_gpu(recipe: str) -> None:
    """bf16-mixed, decoder layers compiled: the path the benchmark times, within the same 2%."""

    def fit(float8: str | None) -> list[float]:
        L.seed_everything(0)
        losses = _Losses()
        module = DeepSeekV3Module(lr=3e-3, warmup_steps=2, float8=float8, compile=True)
        trainer = _trainer(
            20, accelerator="gpu", precision="bf16-mixed", strategy=DSV3Strategy(), callbacks=[losses]
        )
        trainer.fit(module, _data())
        return losses.losses

    reference, losses = fit(None), fit(recipe)
    assert losses[-1] < reference[0] - 2.0
    for step, (ours, ref) in enumerate(zip(losses, reference)):
        assert ours == pytest.approx(ref, rel=0.02), f"step {step}"
