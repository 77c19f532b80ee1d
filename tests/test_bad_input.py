"""Invalid configurations and inputs: each is answered with one clear error and leaves nothing behind.

Every case prepares its inputs in a fresh folder, then acts; the act must raise the expected type with
a message that names the culprit and the fix, and the folder must hold exactly what it held before
the act (no log folder, no checkpoint or temporary folder, no half-written file).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from fault_checks import own_process_group
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader

from lightning_dsv3 import checkpoint as ckpt
from lightning_dsv3.checkpoint import CorruptCheckpointError
from lightning_dsv3.data import DSV3DataModule
from lightning_dsv3.model import Transformer
from lightning_dsv3.module import DeepSeekV3Module
from lightning_dsv3.strategy import DSV3Strategy

SEQ = 16
SMALL = {"max_seq_len": SEQ, "original_seq_len": SEQ, "n_layers": 2}

Act = Callable[[], Any]


def _trainer(tmp: Path, devices: int = 1, logger: bool = False, **kw: Any) -> L.Trainer:
    strategy = kw.pop("strategy", None) or DSV3Strategy()
    return L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=1, default_root_dir=tmp,
        logger=CSVLogger(tmp, name="logs") if logger else False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        **kw,
    )  # fmt: skip


def _module(**overrides: Any) -> DeepSeekV3Module:
    return DeepSeekV3Module(model_overrides={**SMALL, **overrides})


def _data(**kw: Any) -> DSV3DataModule:
    return DSV3DataModule(**{"seq_len": SEQ, "batch_size": 2, "max_bytes": 2**15, **kw})


@pytest.fixture(autouse=True, scope="module")
def _no_process_group_left() -> Iterator[None]:
    with own_process_group():
        yield


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint folder of the small model after one step, written by DSV3Strategy in one process."""
    path = tmp_path_factory.mktemp("good") / "step1.ckpt"
    trainer = _trainer(path.parent)
    trainer.fit(_module(), _data())
    trainer.save_checkpoint(path)
    return path


def _validate(world: int, model: dict[str, Any] | None = None, **strategy: Any) -> Act:
    """The strategy's pre-launch checks against a module, on a world of `world` ranks."""

    def act() -> None:
        s = DSV3Strategy(**strategy)
        s._lightning_module = _module(**(model or {}))  # what Trainer.fit's connect does
        s._validate(world)

    return act


def _copy(good: Path, tmp: Path, spoil: Callable[[Path], None]) -> Path:
    path = tmp / good.name
    shutil.copytree(good, path)
    spoil(path)
    return path


def _truncate(path: Path) -> None:
    shard = next(path.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:64])


def _newer_format(path: Path) -> None:
    meta = torch.load(path / ckpt.META_FILE, weights_only=False)
    meta["dsv3"]["format_version"] = ckpt.FORMAT_VERSION + 1
    torch.save(meta, path / ckpt.META_FILE)


def _garble(name: str) -> Callable[[Path], None]:
    return lambda path: (path / name).write_bytes(b"\x00garbled" * 8)


def _delete(name: str) -> Callable[[Path], None]:
    return lambda path: (path / name).unlink()


def _delete_shard(path: Path) -> None:
    next(path.glob("*.distcp")).unlink()


def _verify(spoil: Callable[[Path], None]) -> Callable[[Path, Path], Act]:
    def prepare(tmp: Path, good: Path) -> Act:
        path = _copy(good, tmp, spoil)
        return lambda: ckpt.verify(path)

    return prepare


def _resume(spoil: Callable[[Path], None] | None, **model: Any) -> Callable[[Path, Path], Act]:
    """trainer.fit(ckpt_path=<a copy of the good checkpoint, spoiled>) with a module of `model` overrides."""

    def prepare(tmp: Path, good: Path) -> Act:
        path = _copy(good, tmp, spoil or (lambda p: None))
        return lambda: _trainer(tmp).fit(_module(**model), _data(), ckpt_path=path)

    return prepare


def _tokens_beyond_vocab(tmp: Path, good: Path) -> Act:
    batch = torch.randint(0, 256, (4, SEQ + 1))
    batch[1, 5] = 300
    return lambda: _trainer(tmp).fit(_module(), DataLoader(list(batch), batch_size=4))


def _fp16_scaler(tmp: Path, good: Path) -> Act:
    scaler = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    return lambda: _trainer(tmp, logger=True, plugins=[scaler]).fit(_module(), _data())


def _fit(module: Callable[[], Any], data: Callable[[], Any]) -> Callable[[Path, Path], Act]:
    """A fit with a CSV logger: an error before training must not even create the log folder."""
    return lambda tmp, good: lambda: _trainer(tmp, logger=True).fit(module(), data())


def _now(act: Act) -> Callable[[Path, Path], Act]:
    return lambda tmp, good: act


def _empty_folder(tmp: Path, good: Path) -> Act:
    (tmp / "corpus").mkdir()
    (tmp / "corpus" / "image.png").write_bytes(b"\x89PNG")
    return lambda: DSV3DataModule(data_path=str(tmp / "corpus"))


def _tiny_corpus(tmp: Path, good: Path) -> Act:
    (tmp / "tiny.txt").write_text("too short")
    return lambda: DSV3DataModule(data_path=str(tmp / "tiny.txt"), seq_len=SEQ).setup("fit")


def _trainer_with(devices: int = 1, **strategy: Any) -> Callable[[Path, Path], Act]:
    return lambda tmp, good: lambda: _trainer(tmp, devices=devices, strategy=DSV3Strategy(**strategy))


CASES = [
    # the mesh and the schedule, refused before any process starts
    pytest.param(
        _trainer_with(3, ep=2),
        ValueError,
        r"world size 3 is not divisible by pp\*ep = 1\*2",
        id="world-not-divisible",
    ),
    pytest.param(
        _trainer_with(2, dp=2, ep=2), ValueError, "does not match the world size 2", id="mesh-not-the-world"
    ),
    pytest.param(_now(lambda: DSV3Strategy(pp=0)), ValueError, "pp must be >= 1, got 0", id="pp-zero"),
    pytest.param(_now(lambda: DSV3Strategy(ep=0)), ValueError, "ep must be >= 1, got 0", id="ep-zero"),
    pytest.param(
        _now(lambda: DSV3Strategy(dp=0)), ValueError, r"dp must be >= 1 \(or None to infer\)", id="dp-zero"
    ),
    pytest.param(
        _now(lambda: DSV3Strategy(schedule="zigzag")),
        ValueError,
        "unknown schedule 'zigzag'",
        id="unknown-schedule",
    ),
    pytest.param(
        _now(lambda: DSV3Strategy(n_microbatches=0)),
        ValueError,
        "n_microbatches must be >= 1",
        id="no-microbatches",
    ),
    pytest.param(
        _now(_validate(2, pp=2, schedule="dualpipe", n_microbatches=1)),
        ValueError,
        r"dualpipe needs an even n_microbatches >= 2\(pp-1\) = 2.*use n_microbatches=2",
        id="dualpipe-too-few",
    ),
    pytest.param(
        _now(_validate(2, pp=2, schedule="interleaved_1f1b", n_microbatches=3)),
        ValueError,
        "interleaved_1f1b needs n_microbatches divisible by pp=2",
        id="interleaved-not-multiple",
    ),
    pytest.param(
        _now(_validate(4, pp=4)),
        ValueError,
        "n_layers=2 cannot fill 4 pipeline stages",
        id="more-stages-than-layers",
    ),
    pytest.param(
        _now(_validate(3, ep=3)),
        ValueError,
        r"ep=3 does not divide n_routed_experts=8",
        id="ep-not-dividing-experts",
    ),
    pytest.param(
        _now(
            lambda: DSV3Strategy(n_microbatches=3).split_microbatches(
                torch.zeros(4, SEQ + 1, dtype=torch.long)
            )
        ),
        ValueError,
        "does not split into n_microbatches=3",
        id="microbatches-not-dividing-batch",
    ),
    # communication and fault options
    pytest.param(
        _now(lambda: DSV3Strategy(dispatch_codec="fp4")),
        ValueError,
        "dispatch_codec must be one of",
        id="bad-dispatch-codec",
    ),
    pytest.param(
        _now(lambda: DSV3Strategy(grad_codec="zip")),
        ValueError,
        "grad_codec must be one of",
        id="bad-grad-codec",
    ),
    pytest.param(
        _now(lambda: DSV3Strategy(grad_codec_options={"ratio": 0.1})),
        ValueError,
        "grad_codec_options were given without a grad_codec",
        id="codec-options-without-codec",
    ),
    pytest.param(
        _now(lambda: DSV3Strategy(start_method="thread")),
        ValueError,
        "start_method must be 'popen', 'spawn' or 'fork'",
        id="bad-start-method",
    ),
    pytest.param(
        _now(lambda: DSV3Strategy(nonfinite="ignore")),
        ValueError,
        r"nonfinite must be one of \('skip', 'raise', 'off'\)",
        id="bad-nonfinite-policy",
    ),
    pytest.param(
        _now(lambda: DSV3Strategy(max_consecutive_nonfinite=0)),
        ValueError,
        "max_consecutive_nonfinite must be >= 1",
        id="zero-consecutive-nonfinite",
    ),
    pytest.param(
        _now(lambda: DSV3Strategy(timeout=timedelta(0))),
        ValueError,
        "timeout must be a positive timedelta",
        id="zero-timeout",
    ),
    # precision
    pytest.param(
        lambda tmp, good: lambda: _trainer(tmp, precision="bf17"),
        ValueError,
        "Precision 'bf17' is invalid",
        id="unknown-precision",
    ),
    pytest.param(
        _fp16_scaler, ValueError, "gradient scaler cannot scale the loss.*bf16-mixed", id="fp16-loss-scaler"
    ),
    # presets and model configs
    pytest.param(
        _now(lambda: DeepSeekV3Module(preset="v4")), ValueError, "unknown preset 'v4'", id="unknown-preset"
    ),
    pytest.param(
        _now(lambda: _module(n_expert=4)),
        ValueError,
        "ModelConfig has no field 'n_expert'",
        id="unknown-override",
    ),
    pytest.param(
        _now(lambda: _module(n_activated_experts=9)),
        ValueError,
        r"n_activated_experts=9 must lie in \[1, n_routed_experts=8\]",
        id="too-many-active-experts",
    ),
    pytest.param(
        _now(lambda: _module(qk_rope_head_dim=7)),
        ValueError,
        "qk_rope_head_dim=7 must be a positive even number",
        id="odd-rope-dim",
    ),
    pytest.param(
        _now(lambda: DeepSeekV3Module(warmup_steps=-1)),
        ValueError,
        "warmup_steps must be >= 0",
        id="negative-warmup",
    ),
    # data
    pytest.param(
        _now(lambda: DSV3DataModule(seq_len=0)), ValueError, "seq_len must be at least 1", id="zero-seq-len"
    ),
    pytest.param(
        _now(lambda: DSV3DataModule(batch_size=0)),
        ValueError,
        "batch_size .* must be at least 1",
        id="zero-batch",
    ),
    pytest.param(
        _now(lambda: DSV3DataModule(val_fraction=1.0)),
        ValueError,
        r"val_fraction must be in \(0, 1\)",
        id="all-validation",
    ),
    pytest.param(
        lambda tmp, good: lambda: DSV3DataModule(data_path=str(tmp / "nowhere")),
        ValueError,
        "nowhere does not exist",
        id="missing-data-path",
    ),
    pytest.param(
        _empty_folder, ValueError, r"holds no \*.py / \*.txt / \*.md files", id="empty-corpus-folder"
    ),
    pytest.param(
        _tiny_corpus,
        ValueError,
        r"has 9 tokens but seq_len\+1=17 are needed",
        id="corpus-shorter-than-a-window",
    ),
    pytest.param(
        _now(lambda: DSV3DataModule(data_path=".", hf_dataset="wikitext")),
        ValueError,
        "name one corpus",
        id="two-corpora",
    ),
    pytest.param(
        lambda tmp, good: lambda: DSV3DataModule(tokenizer_path=str(tmp / "tok.json")),
        ValueError,
        r"tok\.json is not a tokenizer\.json",
        id="missing-tokenizer",
    ),
    # data against the model, refused before the process group and the log folder
    pytest.param(
        _fit(_module, lambda: _data(seq_len=4 * SEQ)),
        ValueError,
        r"seq_len=64 exceeds the model's max_seq_len=16 \(the length of its rotary table\)",
        id="seq-beyond-rope-table",
    ),
    pytest.param(
        _fit(lambda: _module(vocab_size=128), _data),
        ValueError,
        "tokenizer has 256 token ids but the model's vocab_size is 128",
        id="vocab-beyond-embedding",
    ),
    pytest.param(
        _tokens_beyond_vocab,
        ValueError,
        r"token id 300, outside the model's vocabulary of 256 ids",
        id="token-id-beyond-vocab",
    ),
    pytest.param(
        _now(
            lambda: Transformer(_module().config).training_loss(torch.zeros(1, 2 * SEQ + 1, dtype=torch.long))
        ),
        ValueError,
        "sequence length 32 exceeds max_seq_len=16",
        id="sequence-beyond-rope-table",
    ),
    # checkpoints
    pytest.param(
        lambda tmp, good: lambda: _trainer(tmp).fit(_module(), _data(), ckpt_path=tmp / "x.ckpt"),
        FileNotFoundError,
        r"x\.ckpt does not exist",
        id="missing-checkpoint",
    ),
    pytest.param(
        lambda tmp, good: (
            (tmp / "model.ckpt").write_bytes(b"PK") and (lambda: ckpt.verify(tmp / "model.ckpt"))
        ),
        ValueError,
        "is a file, not a lightning-dsv3 checkpoint folder",
        id="checkpoint-is-a-file",
    ),
    pytest.param(
        _resume(None, n_layers=3),
        ValueError,
        r"written for another model: it lacks \d+ entries.*n_layers=2 \(this model: 3\)",
        id="checkpoint-of-another-model",
    ),
    pytest.param(
        _resume(_delete("meta.pt")),
        CorruptCheckpointError,
        r"step1\.ckpt/meta\.pt is missing",
        id="checkpoint-meta-missing",
    ),
    pytest.param(
        _verify(_garble("meta.pt")),
        CorruptCheckpointError,
        r"meta\.pt cannot be read",
        id="checkpoint-meta-garbled",
    ),
    pytest.param(
        _verify(_delete(".metadata")),
        CorruptCheckpointError,
        r"\.metadata is missing",
        id="checkpoint-index-missing",
    ),
    pytest.param(
        _verify(_garble(".metadata")),
        CorruptCheckpointError,
        r"\.metadata cannot be read",
        id="checkpoint-index-garbled",
    ),
    pytest.param(
        _resume(_truncate),
        CorruptCheckpointError,
        r"__0_0\.distcp is truncated: 64 bytes, \.metadata needs",
        id="checkpoint-shard-truncated",
    ),
    pytest.param(
        _verify(_delete_shard),
        CorruptCheckpointError,
        r"__0_0\.distcp is missing \(\.metadata lists it\)",
        id="checkpoint-shard-missing",
    ),
    pytest.param(
        _verify(_newer_format),
        ValueError,
        rf"format version {ckpt.FORMAT_VERSION + 1}; this lightning-dsv3 reads up to version \d",
        id="checkpoint-from-the-future",
    ),
]


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize(("prepare", "error", "match"), CASES)
def test_bad_input_is_refused_clearly_and_leaves_nothing_behind(
    tmp_path: Path, good_checkpoint: Path, prepare: Callable[[Path, Path], Act], error: type, match: str
) -> None:
    act = prepare(tmp_path, good_checkpoint)
    before = _listing(tmp_path)
    with pytest.raises(error, match=match):
        act()
    assert _listing(tmp_path) == before


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)
