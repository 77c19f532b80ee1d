"""Corpora, tokenizers and the LightningDataModule for next-token training.

With nothing named, the data module trains on the Python standard library's own source files: real
text that every machine with Python has, so the recipe, the tests and the notebook run offline and
need no download. A text file or folder (`data_path`) or a Hugging Face dataset (`hf_dataset`) can
be named instead. Tokens are UTF-8 bytes by default (vocab 256, nothing to train or ship); a
`tokenizers` tokenizer.json can be named with `tokenizer_path`.

Each split's token stream is cut into non-overlapping windows of seq_len + 1 tokens and held as a
map-style dataset. The training loader is resumable: its sampler (a DistributedSampler, so Lightning
injects none) shuffles the windows by seed and epoch and deals them to the data-parallel ranks, and
its position in the epoch is saved in Lightning's checkpoints, so a resumed run reads exactly the
batches an uninterrupted one would have read, on the same mesh or another one.
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import math
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

# Directories left out of the default corpus: installed packages and the test suites are most of the
# standard library's bytes on some installs and would make the corpus depend on what is installed.
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
_ALWAYS_SKIP_DIRS = frozenset({"__pycache__"})

Document = tuple[str, bytes]  # (stable name: relative path or record index, raw UTF-8 bytes)


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, any text encodes losslessly, nothing to train or ship."""

    vocab_size: int = 256

    def encode(self, text: str) -> torch.Tensor:
        """Returns the (n_bytes,) uint8 tensor of `text`'s UTF-8 bytes."""
        return self.encode_documents([text.encode("utf-8")])

    def encode_documents(self, documents: Sequence[bytes]) -> torch.Tensor:
        """Concatenates the documents into one (n_tokens,) uint8 stream without a per-byte loop."""
        data = bytearray(b"".join(documents))  # writable, so frombuffer shares it without a warning
        if not data:  # frombuffer rejects an empty buffer
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(data, dtype=torch.uint8)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Inverse of `encode`; a window cut inside a multi-byte character decodes to U+FFFD there."""
        return bytes(torch.as_tensor(ids).tolist()).decode("utf-8", errors="replace")


class JSONTokenizer:
    """A `tokenizers` tokenizer.json (BPE, WordPiece, ...), imported lazily so it stays optional."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        try:
            import tokenizers
        except ImportError as err:
            raise ImportError(
                f"tokenizer_path={str(path)!r} needs the `tokenizers` package (pip install tokenizers); "
                "or leave tokenizer_path unset for byte-level tokens"
            ) from err
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:
            raise ValueError(
                f"tokenizer_path {path} is not a tokenizer.json the `tokenizers` library can load ({err}); "
                "save one with Tokenizer.save(), or leave tokenizer_path unset for byte-level tokens"
            ) from err
        # Added (special) tokens can have ids past the base vocab, and the model must embed them too.
        self.vocab_size: int = self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> torch.Tensor:
        """Returns the (n_tokens,) int32 ids of `text`."""
        return torch.tensor(self._tokenizer.encode(text).ids, dtype=torch.int32)

    def encode_documents(self, documents: Sequence[bytes]) -> torch.Tensor:
        """Encodes the documents in parallel (Rust threads) and concatenates them: (n_tokens,) int32."""
        texts = [doc.decode("utf-8", errors="replace") for doc in documents]
        encodings = self._tokenizer.encode_batch(texts)
        return torch.tensor(list(itertools.chain.from_iterable(e.ids for e in encodings)), dtype=torch.int32)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Inverse of `encode`, up to the tokenizer's normalisation."""
        return self._tokenizer.decode(torch.as_tensor(ids).tolist())


Tokenizer = ByteTokenizer | JSONTokenizer


class TokenWindows(Dataset[torch.Tensor]):
    """Non-overlapping windows of `seq_len + 1` tokens over one split's token stream.

    Item i is tokens[i * (seq_len + 1) : (i + 1) * (seq_len + 1)] as a (seq_len + 1,) int64 tensor;
    inputs are item[:-1] and targets item[1:]. The tail shorter than one window is dropped.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        self.tokens = tokens  # (n_tokens,) uint8 for bytes, int32 for a tokenizer.json
        self.window = seq_len + 1

    def __len__(self) -> int:
        return self.tokens.numel() // self.window

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        start = index * self.window
        return self.tokens[start : start + self.window].long()


class ResumableSampler(DistributedSampler):
    """Windows shuffled by (seed, epoch), dealt round-robin to `num_replicas` ranks, from any position.

    An epoch is one permutation of the dataset; `start` windows of it (counted over every rank) are
    skipped, and rank r reads every num_replicas-th of the rest from its r-th. The consumed prefix is
    the same set whatever the number of replicas, which is what lets a run resume on another mesh.
    `start` applies to the epoch it was set for: `set_epoch` to another epoch clears it.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.start = 0

    def permutation(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.dataset), generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        rest = self.permutation()[self.start :]
        return iter(rest[self.rank : len(rest) // self.num_replicas * self.num_replicas : self.num_replicas])

    def __len__(self) -> int:
        return (len(self.dataset) - self.start) // self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0
        super().set_epoch(epoch)


class ResumableLoader(DataLoader):
    """The training DataLoader whose position in the epoch is saved in Lightning's checkpoints.

    Lightning saves `state_dict()` of every train loader that has one (fit loop, "combined_loader")
    and hands it back to `load_state_dict` before iterating on resume. The position counts windows
    of the epoch's permutation consumed by all ranks together, advanced as batches are handed to the
    training loop (not as workers prefetch them). While a resumed epoch runs, `len()` is what is
    left of it, so Lightning's last-batch bookkeeping sees the true end.
    """

    def __init__(
        self, dataset: Dataset, batch_size: int, sampler: ResumableSampler, num_workers: int
    ) -> None:
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
        )
        self._position = (sampler.epoch, 0)  # (epoch, windows consumed by all ranks)

    def __iter__(self) -> Iterator[torch.Tensor]:
        sampler = self.sampler
        epoch, consumed = sampler.epoch, sampler.start
        per_batch = self.batch_size * sampler.num_replicas
        self._position = (epoch, consumed)
        for batch in super().__iter__():
            consumed += per_batch
            self._position = (epoch, consumed)
            yield batch
        sampler.start = 0  # a finished pass: the next one starts at the top

    def state_dict(self) -> dict[str, int]:
        epoch, consumed = self._position
        if epoch != self.sampler.epoch:  # set_epoch moved on before this epoch's first batch
            epoch, consumed = self.sampler.epoch, self.sampler.start
        return {"epoch": epoch, "consumed": consumed, "windows": len(self.dataset), "seed": self.sampler.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self.sampler
        epoch, consumed = state["epoch"], state["consumed"]
        if (state["windows"], state["seed"]) != (len(self.dataset), sampler.seed):
            rank_zero_warn(
                f"the checkpoint's data position is for {state['windows']} windows shuffled with seed "
                f"{state['seed']}, this data has {len(self.dataset)} with seed {sampler.seed}: the resumed "
                f"run continues epoch {epoch} at the same position, but not with the same batches"
            )
        if len(self.dataset) - consumed < sampler.num_replicas * self.batch_size:
            epoch, consumed = epoch + 1, 0  # saved at the end of an epoch
        sampler.set_epoch(epoch)
        sampler.start = min(consumed, len(self.dataset))
        self._position = (epoch, sampler.start)


def is_validation(name: str, val_fraction: float) -> bool:
    """Whether a document belongs to the validation split.

    A hash of the document's name (not Python's salted `hash`) gives the same answer on every machine
    and run, and one document's split never depends on which other documents were read.
    """
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def _iter_files(root: Path, file_globs: Sequence[str], skip_dirs: frozenset[str]) -> Iterator[Path]:
    """Files under `root` whose name matches a glob; skipped and hidden directories are not entered."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith(".")]
        for name in filenames:
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in file_globs):
                yield Path(dirpath, name)


def read_text_files(
    root: Path,
    file_globs: Sequence[str],
    max_bytes: int | None,
    skip_dirs: frozenset[str] = _ALWAYS_SKIP_DIRS,
) -> list[Document]:
    """Reads a file, or a folder's matching files sorted by relative path, until `max_bytes` in all.

    Sorting by the relative POSIX path makes the corpus the same on every machine and file system;
    the file that reaches the cap is cut there. Empty files are left out.
    """
    if root.is_file():
        named = [(root.name, root)]
    else:
        found = (
            (path.relative_to(root).as_posix(), path) for path in _iter_files(root, file_globs, skip_dirs)
        )
        named = sorted(found)
    documents: list[Document] = []
    total_bytes = 0
    for name, path in named:
        remaining = -1 if max_bytes is None else max_bytes - total_bytes
        if remaining == 0:
            break
        with open(path, "rb") as f:
            data = f.read(remaining)
        if data:
            documents.append((name, data))
            total_bytes += len(data)
    return documents


def read_hf_dataset(name: str, text_field: str, max_bytes: int | None) -> list[Document]:
    """Streams the train split of a Hugging Face dataset ("path" or "path:config") until `max_bytes`.

    Streaming reads only the records kept under the cap instead of downloading the whole dataset.
    """
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"hf_dataset={name!r} needs the `datasets` package (pip install datasets); or pass data_path= "
            "a text file or folder, or neither to train on the Python standard library"
        ) from err
    path, _, config = name.partition(":")
    documents: list[Document] = []
    fields: list[str] | None = None  # set when a record lacks text_field
    try:
        total_bytes = 0
        for index, record in enumerate(
            datasets.load_dataset(path, config or None, split="train", streaming=True)
        ):
            if text_field not in record:
                fields = sorted(record)
                break
            data = str(record[text_field]).encode("utf-8")
            if max_bytes is not None:
                data = data[: max_bytes - total_bytes]
            if data:
                documents.append((f"{name}/train/{index}", data))
                total_bytes += len(data)
            if max_bytes is not None and total_bytes >= max_bytes:
                break
    except Exception as err:
        raise RuntimeError(
            f"could not load hf_dataset={name!r} ({type(err).__name__}: {err}); check the name (use "
            "'path:config' for a config), the network, or pass data_path= a local text file or folder"
        ) from err
    if fields is not None:
        raise ValueError(
            f"hf_dataset={name!r} records have no field {text_field!r}; set hf_text_field to one of {fields}"
        )
    return documents


class DSV3DataModule(L.LightningDataModule):
    """Next-token training data: fixed-length windows of a real text corpus.

    The corpus is, in order of precedence, `data_path` (a text file, or a folder read recursively for
    `file_globs`), `hf_dataset` (a Hugging Face dataset name, "path" or "path:config"), or else the
    Python standard library's *.py files (no site-packages, no test suites). At most `max_bytes`
    bytes are read, in sorted order. Documents go to validation by a hash of their name with
    probability `val_fraction` (the last document if none does); a single document is split by
    position instead, its last `val_fraction` of tokens for validation.

    Batches are (batch_size, seq_len + 1) int64 tensors, `batch_size` per process. The train loader
    shuffles by `seed` and the epoch, deals the windows to the strategy's data-parallel ranks
    (`distributed_sampler_kwargs`; Lightning injects no sampler of its own), drops the last partial
    batch, and resumes mid-epoch from a checkpoint (see `ResumableLoader`).
    """

    def __init__(
        self,
        seq_len: int = 128,
        batch_size: int = 8,
        data_path: str | None = None,
        hf_dataset: str | None = None,
        hf_text_field: str = "text",
        tokenizer_path: str | None = None,
        val_fraction: float = 0.05,
        max_bytes: int | None = 8 * 2**20,
        num_workers: int = 0,
        seed: int = 1234,
        file_globs: tuple[str, ...] = ("*.py", "*.txt", "*.md"),
    ) -> None:
        super().__init__()
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        if batch_size < 1:
            raise ValueError(f"batch_size (per process) must be at least 1, got {batch_size}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(
                f"val_fraction must be in (0, 1), got {val_fraction}; use Trainer(limit_val_batches=0) "
                "to skip validation"
            )
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be positive or None (no cap), got {max_bytes}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be 0 (load in the main process) or more, got {num_workers}")
        if data_path is not None and hf_dataset is not None:
            raise ValueError(
                f"name one corpus: data_path={data_path!r} or hf_dataset={hf_dataset!r}, not both"
            )
        if hf_dataset is not None and not hf_text_field:
            raise ValueError("hf_text_field must name the records' text field, e.g. 'text'")
        if not file_globs:
            raise ValueError('file_globs must name at least one pattern, e.g. ("*.txt",)')
        self.save_hyperparameters()
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.data_path = data_path
        self.hf_dataset = hf_dataset
        self.hf_text_field = hf_text_field
        self.val_fraction = val_fraction
        self.max_bytes = max_bytes
        self.num_workers = num_workers
        self.seed = seed
        self.file_globs = tuple(file_globs)

        # Cheap checks now, so a wrong path fails before any process group starts.
        if hf_dataset is None:
            if data_path is None:
                self._root = Path(sysconfig.get_paths()["stdlib"])
                self._skip_dirs = _STDLIB_SKIP_DIRS
                self.source = f"the Python standard library at {self._root}"
                globs = ("*.py",)
            else:
                self._root = Path(data_path).expanduser()
                self._skip_dirs = _ALWAYS_SKIP_DIRS
                self.source = str(self._root)
                globs = self.file_globs
            self._globs = globs
            if not self._root.exists():
                raise ValueError(
                    f"data_path {self._root} does not exist; name a text file or a folder of "
                    f"{' / '.join(self.file_globs)} files, or leave data_path unset to train on the "
                    "Python standard library"
                )
            if self._root.is_dir() and next(_iter_files(self._root, globs, self._skip_dirs), None) is None:
                raise ValueError(
                    f"{self.source} holds no {' / '.join(globs)} files (searched recursively, hidden and "
                    "__pycache__ folders skipped); add text files, set file_globs, or name a single file"
                )
        else:
            self.source = f"hf_dataset {hf_dataset!r}"

        self.tokenizer: Tokenizer = (
            ByteTokenizer() if tokenizer_path is None else JSONTokenizer(tokenizer_path)
        )
        self.train_dataset: TokenWindows | None = None
        self.val_dataset: TokenWindows | None = None
        self.train_documents: list[str] = []  # names of the documents in each split
        self.val_documents: list[str] = []

    @property
    def vocab_size(self) -> int:
        """Number of token ids the model must embed (256 for bytes)."""
        return self.tokenizer.vocab_size

    def setup(self, stage: str | None = None) -> None:
        """Reads and tokenizes the corpus once; later calls (fit, then validate, ...) reuse it."""
        if self.train_dataset is not None:
            return
        if self.hf_dataset is not None:
            documents = read_hf_dataset(self.hf_dataset, self.hf_text_field, self.max_bytes)
        else:
            documents = read_text_files(self._root, self._globs, self.max_bytes, self._skip_dirs)
        window = self.seq_len + 1
        if len(documents) == 1:
            name, data = documents[0]
            tokens = self.tokenizer.encode_documents([data])
            self._check_length("corpus", tokens.numel(), "lower seq_len or add text")
            n_val = max(window, math.ceil(self.val_fraction * tokens.numel()))
            train_tokens, val_tokens = tokens[:-n_val], tokens[-n_val:]
            self.train_documents, self.val_documents = [name], [name]
        else:
            val_flags = [is_validation(name, self.val_fraction) for name, _ in documents]
            if documents and not any(val_flags):
                val_flags[-1] = True
            train = [doc for doc, is_val in zip(documents, val_flags, strict=True) if not is_val]
            val = [doc for doc, is_val in zip(documents, val_flags, strict=True) if is_val]
            train_tokens = self.tokenizer.encode_documents([data for _, data in train])
            val_tokens = self.tokenizer.encode_documents([data for _, data in val])
            self.train_documents = [name for name, _ in train]
            self.val_documents = [name for name, _ in val]
            self._check_length(
                "corpus", train_tokens.numel() + val_tokens.numel(), "lower seq_len or add text"
            )
        self._check_length(
            "train split of", train_tokens.numel(), "lower seq_len or val_fraction, or add text"
        )
        self._check_length(
            f"validation split ({len(self.val_documents)} documents) of",
            val_tokens.numel(),
            "lower seq_len, raise val_fraction, or add text",
        )

        # With drop_last, fewer windows than one batch on every data-parallel rank is an empty epoch.
        replicas = self._data_parallel()[0]
        n_train_windows = train_tokens.numel() // window
        if n_train_windows < self.batch_size * replicas:
            raise ValueError(
                f"train split of {self.source} has {n_train_windows} windows of seq_len+1={window} "
                f"tokens, fewer than batch_size={self.batch_size} per process x {replicas} data-parallel "
                "replicas; lower batch_size or seq_len, or add text (raise max_bytes)"
            )
        self.train_dataset = TokenWindows(train_tokens, self.seq_len)
        self.val_dataset = TokenWindows(val_tokens, self.seq_len)

    def _check_length(self, what: str, n_tokens: int, fix: str) -> None:
        """Raises if `n_tokens` is shorter than one training sample."""
        if n_tokens < self.seq_len + 1:
            raise ValueError(
                f"{what} {self.source} has {n_tokens} tokens but seq_len+1={self.seq_len + 1} are needed per "
                f"sample; {fix}"
            )

    def _data_parallel(self) -> tuple[int, int]:
        """(replicas, this rank's replica) of the strategy's data parallelism; (1, 0) without one."""
        kwargs = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) if self.trainer else None
        return (kwargs or {}).get("num_replicas", 1), (kwargs or {}).get("rank", 0)

    def train_dataloader(self) -> ResumableLoader:
        """Shuffled (seeded) windows of this rank, the last partial batch dropped so every step has one
        shape; resumable mid-epoch."""
        dataset = self._built(self.train_dataset)
        replicas, rank = self._data_parallel()
        sampler = ResumableSampler(dataset, num_replicas=replicas, rank=rank, seed=self.seed)
        return ResumableLoader(dataset, self.batch_size, sampler, self.num_workers)

    def val_dataloader(self) -> DataLoader[torch.Tensor]:
        """Every validation window in order."""
        return DataLoader(
            self._built(self.val_dataset),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def test_dataloader(self) -> DataLoader[torch.Tensor]:
        """The validation windows: the default corpus keeps no third split."""
        return self.val_dataloader()

    def _built(self, dataset: TokenWindows | None) -> TokenWindows:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader (Trainer.fit does this)")
        return dataset
