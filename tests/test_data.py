"""The data layer: corpora, split, windows, tokenizers, and the errors a user can hit."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_dsv3.data import ByteTokenizer, DSV3DataModule, is_validation

SMALL = 256 * 2**10  # a stdlib prefix big enough for both splits, small enough to read in milliseconds


def _first_batch(dm: DSV3DataModule) -> torch.Tensor:
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def _write_folder(root: Path, n_files: int = 12, chars: int = 400) -> None:
    """A folder of distinct text files, nested, with files the default globs must skip."""
    for i in range(n_files):
        sub = root / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"doc{i:02d}.txt").write_text(f"document {i}: " + "lorem ipsum dolor " * (chars // 18))
    (root / "notes.bin").write_bytes(b"\x00" * 10_000)
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.txt").write_text("x" * 10_000)


def test_default_corpus_is_the_stdlib() -> None:
    dm = DSV3DataModule(seq_len=64, batch_size=4)
    dm.setup("fit")
    assert dm.vocab_size == 256
    assert "standard library" in dm.source
    assert len(dm.train_dataset) > 1000 and len(dm.val_dataset) > 0
    assert all(name.endswith(".py") for name in dm.train_documents + dm.val_documents)
    assert not any(
        part in {"site-packages", "test", "tests"} for n in dm.train_documents for part in n.split("/")
    )
    assert dm.train_documents == sorted(dm.train_documents)  # read in sorted order
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, 65) and batch.dtype == torch.long
    assert int(batch.max()) < dm.vocab_size


def test_train_and_val_documents_are_disjoint() -> None:
    dm = DSV3DataModule(seq_len=32, max_bytes=SMALL)
    dm.setup()
    assert dm.val_documents and dm.train_documents
    assert not set(dm.train_documents) & set(dm.val_documents)


def test_same_seed_same_batches_other_seed_other_order() -> None:
    first = _first_batch(DSV3DataModule(seq_len=32, max_bytes=SMALL, seed=7))
    again = _first_batch(DSV3DataModule(seq_len=32, max_bytes=SMALL, seed=7))
    other = _first_batch(DSV3DataModule(seq_len=32, max_bytes=SMALL, seed=8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_split_of_a_document_does_not_depend_on_the_cap(tmp_path: Path) -> None:
    _write_folder(tmp_path, n_files=40)
    small = DSV3DataModule(
        data_path=str(tmp_path), seq_len=16, batch_size=1, val_fraction=0.3, max_bytes=6000
    )
    large = DSV3DataModule(
        data_path=str(tmp_path), seq_len=16, batch_size=1, val_fraction=0.3, max_bytes=None
    )
    small.setup()
    large.setup()
    assert len(small.train_documents) + len(small.val_documents) < 40
    for name in small.val_documents:
        assert is_validation(name, 0.3) and name in large.val_documents
    assert set(small.train_documents) <= set(large.train_documents)


def test_windows_are_contiguous_and_targets_shift_inputs(tmp_path: Path) -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    path = tmp_path / "alphabet.txt"
    path.write_text(text)
    dm = DSV3DataModule(data_path=str(path), seq_len=9, batch_size=2, val_fraction=0.1)
    dm.setup()
    assert dm.train_documents == dm.val_documents == ["alphabet.txt"]  # one file: split by position
    assert len(dm.train_dataset) == 900 // 10 and len(dm.val_dataset) == 100 // 10
    window = dm.train_dataset[3]
    assert window.shape == (10,) and window.dtype == torch.long
    assert dm.tokenizer.decode(window) == text[30:40]
    assert dm.tokenizer.decode(dm.val_dataset[0]) == text[900:910]
    inputs, targets = window[:-1], window[1:]
    assert torch.equal(targets[:-1], inputs[1:])
    with pytest.raises(IndexError):
        dm.train_dataset[len(dm.train_dataset)]


def test_byte_tokenizer_round_trips_unicode() -> None:
    tok = ByteTokenizer()
    text = "héllo wörld, ünïcode 🚀 日本語 ∑x²\n"
    ids = tok.encode(text)
    assert ids.dtype == torch.uint8 and ids.numel() == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(ids.long().tolist()) == text
    assert tok.encode("").numel() == 0


def test_data_path_folder_reads_matching_files_recursively(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    (tmp_path / "README.md").write_text("# readme\n" * 50)
    dm = DSV3DataModule(data_path=str(tmp_path), seq_len=32, batch_size=2, val_fraction=0.2)
    dm.setup()
    names = sorted(dm.train_documents + dm.val_documents)
    assert names == ["README.md"] + [
        f"part{i % 3}/doc{i:02d}.txt" for i in sorted(range(12), key=lambda i: i % 3)
    ]
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (2, 33)


def test_validation_is_never_empty(tmp_path: Path) -> None:
    _write_folder(tmp_path, n_files=3)
    dm = DSV3DataModule(data_path=str(tmp_path), seq_len=16, batch_size=1, val_fraction=1e-9)
    dm.setup()
    assert dm.val_documents == ["part2/doc02.txt"]  # no hash hit: the last document
    assert len(dm.val_dataset) > 0


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data_path .*nope does not exist.*standard library"):
        DSV3DataModule(data_path=str(tmp_path / "nope"))


def test_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "only.bin").write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match=r"holds no \*\.py / \*\.txt / \*\.md files.*file_globs"):
        DSV3DataModule(data_path=str(tmp_path))


def test_too_short_corpus_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("x" * 100)
    dm = DSV3DataModule(data_path=str(path), seq_len=256)
    with pytest.raises(
        ValueError, match=r"corpus .*short\.txt has 100 tokens but seq_len\+1=257 .*lower seq_len"
    ):
        dm.setup()


def test_too_few_windows_for_a_batch_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("y" * 500)
    dm = DSV3DataModule(data_path=str(tmp_path / "a.txt"), seq_len=31, batch_size=64)
    with pytest.raises(ValueError, match=r"fewer than batch_size=64"):
        dm.setup()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seq_len": 0}, "seq_len"),
        ({"batch_size": 0}, "batch_size"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"max_bytes": 0}, "max_bytes"),
        ({"num_workers": -1}, "num_workers"),
        ({"file_globs": ()}, "file_globs"),
        ({"data_path": ".", "hf_dataset": "wikitext"}, "not both"),
        ({"hf_dataset": "wikitext", "hf_text_field": ""}, "hf_text_field"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DSV3DataModule(**kwargs)


def test_dataloader_before_setup_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="setup"):
        DSV3DataModule().train_dataloader()


def test_tokenizer_json(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    words = "the quick brown fox jumps over the lazy dog".split()
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(sorted(set(words)))}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok_path = tmp_path / "tokenizer.json"
    tok.save(str(tok_path))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"{i}.txt").write_text(" ".join(words * (10 + i)))
    dm = DSV3DataModule(
        data_path=str(corpus), tokenizer_path=str(tok_path), seq_len=8, batch_size=2, val_fraction=0.3
    )
    assert dm.vocab_size == len(vocab) == 9
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (2, 9) and int(batch.max()) < dm.vocab_size
    assert dm.tokenizer.decode(dm.tokenizer.encode("the lazy dog")) == "the lazy dog"


def test_bad_tokenizer_json_is_a_clear_error(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    path = tmp_path / "tokenizer.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a tokenizer.json"):
        DSV3DataModule(tokenizer_path=str(path))


def test_hf_dataset_without_datasets_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    dm = DSV3DataModule(hf_dataset="wikitext:wikitext-2-raw-v1")
    with pytest.raises(ImportError, match=r"needs the `datasets` package.*data_path"):
        dm.setup()


def _fake_datasets(monkeypatch: pytest.MonkeyPatch, load_dataset: object) -> None:
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


def test_hf_dataset_download_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("no network")

    _fake_datasets(monkeypatch, offline)
    dm = DSV3DataModule(hf_dataset="someone/corpus")
    with pytest.raises(RuntimeError, match=r"could not load hf_dataset='someone/corpus'.*no network"):
        dm.setup()


def test_hf_dataset_records(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_dataset(path: str, config: str | None, split: str, streaming: bool) -> list[dict]:
        calls.append((path, config, split, streaming))
        return [{"text": f"record {i} " * 20, "id": i} for i in range(30)]

    _fake_datasets(monkeypatch, load_dataset)
    dm = DSV3DataModule(hf_dataset="wikitext:wikitext-2-raw-v1", seq_len=16, batch_size=2, max_bytes=3000)
    dm.setup()
    assert calls == [("wikitext", "wikitext-2-raw-v1", "train", True)]
    n_tokens = dm.train_dataset.tokens.numel() + dm.val_dataset.tokens.numel()
    assert n_tokens == 3000 and dm.val_documents

    bad_field = DSV3DataModule(hf_dataset="wikitext", hf_text_field="content")
    with pytest.raises(ValueError, match=r"no field 'content'.*\['id', 'text'\]"):
        bad_field.setup()


class _TinyLM(L.LightningModule):
    """The smallest next-token model, to check the data module inside a real Trainer loop."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, 8)
        self.head = torch.nn.Linear(8, vocab_size)

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.embed(batch[:, :-1]))  # (batch, seq, vocab)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self._loss(batch)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trains_in_a_lightning_trainer() -> None:
    dm = DSV3DataModule(seq_len=16, batch_size=4, max_bytes=SMALL)
    trainer = L.Trainer(
        max_steps=3,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    model = _TinyLM(dm.vocab_size)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 3
    (metrics,) = trainer.validate(model, datamodule=dm, verbose=False)
    assert metrics["val_loss"] > 0
