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


def _case(name: str, prepare: Callable[[Path, Path], Act], match: str, error: type = ValueError) -> Any:
    """One row of the table; most refusals are ValueErrors, so only the others name their type."""
    return pytest.param(prepare, error, match, id=name)


def _init(factory: Callable[..., Any], **kwargs: Any) -> Callable[[Path, Path], Act]:
    """Constructing `factory(**kwargs)`: the constructor's own checks, before anything is written."""
    return _now(lambda: factory(**kwargs))


def _corrupt(name: str, prepare: Callable[[Path, Path], Act], match: str) -> Any:
    """A damaged checkpoint: refused with CorruptCheckpointError, which a resume loop can catch."""
    return _case(name, prepare, match, CorruptCheckpointError)


CASES = [
    # the mesh and the schedule, refused before any process starts
    _case("world-not-divisible", _trainer_with(3, ep=2), r"world size 3 is not divisible by pp\*ep = 1\*2"),
    _case("mesh-not-the-world", _trainer_with(2, dp=2, ep=2), "does not match the world size 2"),
    _case("pp-zero", _init(DSV3Strategy, pp=0), "pp must be >= 1, got 0"),
    _case("ep-zero", _init(DSV3Strategy, ep=0), "ep must be >= 1, got 0"),
    _case("dp-zero", _init(DSV3Strategy, dp=0), r"dp must be >= 1 \(or None to infer\)"),
    _case("unknown-schedule", _init(DSV3Strategy, schedule="zigzag"), "unknown schedule 'zigzag'"),
    _case("no-microbatches", _init(DSV3Strategy, n_microbatches=0), "n_microbatches must be >= 1"),
    _case(
        "dualpipe-too-few",
        _now(_validate(2, pp=2, schedule="dualpipe", n_microbatches=1)),
        r"dualpipe needs an even n_microbatches >= 2\(pp-1\) = 2.*use n_microbatches=2",
    ),
    _case(
        "interleaved-not-multiple",
        _now(_validate(2, pp=2, schedule="interleaved_1f1b", n_microbatches=3)),
        "interleaved_1f1b needs n_microbatches divisible by pp=2",
    ),
    _case("more-stages-than-layers", _now(_validate(4, pp=4)), "n_layers=2 cannot fill 4 pipeline stages"),
    _case(
        "pp1-dualpipev-one-layer",
        _now(_validate(1, {"n_layers": 1}, schedule="dualpipev")),
        r"n_layers=1 cannot fill 2 pipeline stages.*two under dualpipev, at pp=1 too",
    ),
    _case("ep-not-dividing-experts", _now(_validate(3, ep=3)), r"ep=3 does not divide n_routed_experts=8"),
    _case(
        "microbatches-not-dividing-batch",
        _now(
            lambda: DSV3Strategy(n_microbatches=3).split_microbatches(
                torch.zeros(4, SEQ + 1, dtype=torch.long)
            )
        ),
        "does not split into n_microbatches=3",
    ),
    # communication and fault options
    _case("bad-dispatch-codec", _init(DSV3Strategy, dispatch_codec="fp4"), "dispatch_codec must be one of"),
    _case("bad-grad-codec", _init(DSV3Strategy, grad_codec="zip"), "grad_codec must be one of"),
    _case(
        "codec-options-without-codec",
        _init(DSV3Strategy, grad_codec_options={"ratio": 0.1}),
        "grad_codec_options were given without a grad_codec",
    ),
    _case(
        "bad-start-method",
        _init(DSV3Strategy, start_method="thread"),
        "start_method must be 'popen', 'spawn' or 'fork'",
    ),
    _case(
        "bad-nonfinite-policy",
        _init(DSV3Strategy, nonfinite="ignore"),
        r"nonfinite must be one of \('skip', 'raise', 'off'\)",
    ),
    _case(
        "zero-consecutive-nonfinite",
        _init(DSV3Strategy, max_consecutive_nonfinite=0),
        "max_consecutive_nonfinite must be >= 1",
    ),
    _case("zero-timeout", _init(DSV3Strategy, timeout=timedelta(0)), "timeout must be a positive timedelta"),
    # precision
    _case(
        "unknown-precision",
        lambda tmp, good: lambda: _trainer(tmp, precision="bf17"),
        "Precision 'bf17' is invalid",
    ),
    _case("fp16-loss-scaler", _fp16_scaler, "gradient scaler cannot scale the loss.*bf16-mixed"),
    # presets and model configs
    _case("unknown-preset", _init(DeepSeekV3Module, preset="v4"), "unknown preset 'v4'"),
    _case("unknown-override", _init(_module, n_expert=4), "ModelConfig has no field 'n_expert'"),
    _case(
        "too-many-active-experts",
        _init(_module, n_activated_experts=9),
        r"n_activated_experts=9 must lie in \[1, n_routed_experts=8\]",
    ),
    _case(
        "odd-rope-dim",
        _init(_module, qk_rope_head_dim=7),
        "qk_rope_head_dim=7 must be a positive even number",
    ),
    _case("negative-warmup", _init(DeepSeekV3Module, warmup_steps=-1), "warmup_steps must be >= 0"),
    # data
    _case("zero-seq-len", _init(DSV3DataModule, seq_len=0), "seq_len must be at least 1"),
    _case("zero-batch", _init(DSV3DataModule, batch_size=0), "batch_size .* must be at least 1"),
    _case("all-validation", _init(DSV3DataModule, val_fraction=1.0), r"val_fraction must be in \(0, 1\)"),
    _case(
        "missing-data-path",
        lambda tmp, good: lambda: DSV3DataModule(data_path=str(tmp / "nowhere")),
        "nowhere does not exist",
    ),
    _case("empty-corpus-folder", _empty_folder, r"holds no \*.py / \*.txt / \*.md files"),
    _case("corpus-shorter-than-a-window", _tiny_corpus, r"has 9 tokens but seq_len\+1=17 are needed"),
    _case("two-corpora", _init(DSV3DataModule, data_path=".", hf_dataset="wikitext"), "name one corpus"),
    _case(
        "missing-tokenizer",
        lambda tmp, good: lambda: DSV3DataModule(tokenizer_path=str(tmp / "tok.json")),
        r"tok\.json is not a tokenizer\.json",
    ),
    # data against the model, refused before the process group and the log folder
    _case(
        "seq-beyond-rope-table",
        _fit(_module, lambda: _data(seq_len=4 * SEQ)),
        r"seq_len=64 exceeds the model's max_seq_len=16 \(the length of its rotary table\)",
    ),
    _case(
        "vocab-beyond-embedding",
        _fit(lambda: _module(vocab_size=128), _data),
        "tokenizer has 256 token ids but the model's vocab_size is 128",
    ),
    _case(
        "token-id-beyond-vocab",
        _tokens_beyond_vocab,
        r"token id 300, outside the model's vocabulary of 256 ids",
    ),
    _case(
        "sequence-beyond-rope-table",
        _now(
            lambda: Transformer(_module().config).training_loss(torch.zeros(1, 2 * SEQ + 1, dtype=torch.long))
        ),
        "sequence length 32 exceeds max_seq_len=16",
    ),
    # checkpoints
    _case(
        "missing-checkpoint",
        lambda tmp, good: lambda: _trainer(tmp).fit(_module(), _data(), ckpt_path=tmp / "x.ckpt"),
        r"x\.ckpt does not exist",
        FileNotFoundError,
    ),
    _case(
        "checkpoint-is-a-file",
        lambda tmp, good: (
            (tmp / "model.ckpt").write_bytes(b"PK") and (lambda: ckpt.verify(tmp / "model.ckpt"))
        ),
        "is a file, not a lightning-dsv3 checkpoint folder",
    ),
    _case(
        "checkpoint-of-another-model",
        _resume(None, n_layers=3),
        r"written for another model: it lacks \d+ entries.*n_layers=2 \(this model: 3\)",
    ),
    _corrupt("checkpoint-meta-missing", _resume(_delete("meta.pt")), r"step1\.ckpt/meta\.pt is missing"),
    _corrupt("checkpoint-meta-garbled", _verify(_garble("meta.pt")), r"meta\.pt cannot be read"),
    _corrupt("checkpoint-index-missing", _verify(_delete(".metadata")), r"\.metadata is missing"),
    _corrupt("checkpoint-index-garbled", _verify(_garble(".metadata")), r"\.metadata cannot be read"),
    _corrupt(
        "checkpoint-shard-truncated",
        _resume(_truncate),
        r"__0_0\.distcp is truncated: 64 bytes, \.metadata needs",
    ),
    _corrupt(
        "checkpoint-shard-missing",
        _verify(_delete_shard),
        r"__0_0\.distcp is missing \(\.metadata lists it\)",
    ),
    _case(
        "checkpoint-from-the-future",
        _verify(_newer_format),
        rf"format version {ckpt.FORMAT_VERSION + 1}; this lightning-dsv3 reads up to version \d",
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
