"""Byte-level language modelling on real text every install already has: the Python standard
library's own sources.

The corpus is the ``*.py`` files under the running interpreter's ``sysconfig.get_paths()["stdlib"]``
(``site-packages`` and ``__pycache__`` left out), in sorted order of their relative paths. Each
file belongs to the validation split when the first byte of ``sha256(relative path)`` falls
below ``validation_percent`` percent of 256, else to the training split, so the split is by
file (no file is in both) and does not move when files are added elsewhere. Each file
contributes at most ``max_file_bytes`` (its first bytes), and each split stops growing at its
cap. ``Corpus.sha256`` hashes every file used (path and bytes, in order): it is recorded with
every result, so a figure names the exact text it was measured on.

Quality is reported in bits per byte (the cross-entropy in base 2, per predicted byte). The
baseline is an order-``k`` byte n-gram (``NGram``, default order 2: the next byte given the two
before it) with add-``alpha`` smoothing, fit on the training split and scored on the same
validation bytes as the models (``validation_stream``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..checks import check_positive_int

BYTES = 256
EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__")
LN2 = math.log(2.0)


@dataclass(frozen=True)
class Corpus:
    """The two splits as byte tensors, which files went where, and the content hash."""

    root: str
    train: Tensor  # (T,) uint8: the training files, concatenated in path order
    validation: Tensor  # (V,) uint8
    train_files: tuple[str, ...]
    validation_files: tuple[str, ...]
    sha256: str

    def describe(self) -> dict[str, object]:
        """What a result row records about the text it was measured on."""
        return {"corpus": "python-stdlib", "corpus_root": self.root, "corpus_sha256": self.sha256,
                "train_bytes": int(self.train.numel()), "validation_bytes": int(self.validation.numel()),
                "train_files": len(self.train_files), "validation_files": len(self.validation_files)}


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def python_files(root: str) -> list[str]:
    """Relative posix paths of every ``*.py`` under ``root``, sorted, third-party dirs pruned."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        rel = Path(dirpath).relative_to(root)
        found.extend((rel / f).as_posix() for f in filenames if f.endswith(".py"))
    return sorted(found)


def is_validation(rel_path: str, validation_percent: float) -> bool:
    """The split of one file: a deterministic function of its relative path alone."""
    return hashlib.sha256(rel_path.encode()).digest()[0] < validation_percent / 100 * 256


@functools.lru_cache(maxsize=4)
def load_corpus(root: str | None = None, *, max_file_bytes: int = 65536, max_train_bytes: int = 8 << 20,
                max_validation_bytes: int = 1 << 20, validation_percent: float = 10.0) -> Corpus:
    """Read the corpus (cached per arguments: tasks are built many times per run).

    Raises:
        ValueError: a cap that is not positive, a percentage outside (0, 100), or a root
            without enough ``*.py`` files to fill both splits with something.
    """
    for name, val in (("max_file_bytes", max_file_bytes), ("max_train_bytes", max_train_bytes),
                      ("max_validation_bytes", max_validation_bytes)):
        check_positive_int(name, val, where="text")
    if not 0 < validation_percent < 100:
        raise ValueError(f"text: validation_percent must be in (0, 100), got {validation_percent!r}")
    root = root or stdlib_root()
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    names: dict[bool, list[str]] = {False: [], True: []}
    caps = {False: max_train_bytes, True: max_validation_bytes}
    used = {False: 0, True: 0}
    digest = hashlib.sha256()
    for rel in python_files(root):
        val = is_validation(rel, validation_percent)
        if used[val] >= caps[val]:
            if used[not val] >= caps[not val]:
                break
            continue
        data = (Path(root) / rel).read_bytes()[:min(max_file_bytes, caps[val] - used[val])]
        if not data:
            continue
        parts[val].append(data)
        names[val].append(rel)
        used[val] += len(data)
        digest.update(rel.encode() + b"\0" + data + b"\0")
    if not parts[False] or not parts[True]:
        raise ValueError(f"text: {root!r} has too few *.py files for a training and a validation split")

    def tensor(chunks: list[bytes]) -> Tensor:
        return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)

    return Corpus(root=root, train=tensor(parts[False]), validation=tensor(parts[True]),
                  train_files=tuple(names[False]), validation_files=tuple(names[True]), sha256=digest.hexdigest())


@dataclass(frozen=True)
class TextLM:
    """Next-byte prediction on windows of the corpus; ``sample`` draws a batch.

    Args:
        seq_len: bytes per input window; the labels are the same window shifted by one.
        split: "train" or "validation": which files the windows come from.
        max_file_bytes, max_train_bytes, max_validation_bytes, validation_percent: the corpus
            caps and split (``load_corpus``).
        root: the directory of ``*.py`` files; default the running interpreter's stdlib.

    Raises:
        ValueError: an option out of range, or a split shorter than one window.
    """

    seq_len: int = 1024
    split: str = "train"
    max_file_bytes: int = 65536
    max_train_bytes: int = 8 << 20
    max_validation_bytes: int = 1 << 20
    validation_percent: float = 10.0
    root: str | None = None

    kind = "lm"
    vocab_size = BYTES
    num_outputs = BYTES

    def __post_init__(self):
        check_positive_int("seq_len", self.seq_len, where="text")
        if self.split not in ("train", "validation"):
            raise ValueError(f"text: split must be 'train' or 'validation', got {self.split!r}")
        if self.data.numel() < self.seq_len + 1:
            raise ValueError(f"text: the {self.split} split has {self.data.numel()} bytes, fewer than one "
                             f"window of seq_len + 1 = {self.seq_len + 1}")

    @property
    def corpus(self) -> Corpus:
        return load_corpus(self.root, max_file_bytes=self.max_file_bytes, max_train_bytes=self.max_train_bytes,
                           max_validation_bytes=self.max_validation_bytes,
                           validation_percent=self.validation_percent)

    @property
    def data(self) -> Tensor:
        return self.corpus.train if self.split == "train" else self.corpus.validation

    def held_out(self) -> TextLM:
        """The same task on the validation files: what the training loop evaluates on."""
        return dataclasses.replace(self, split="validation")

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` windows at uniform random offsets: inputs and labels (n, seq_len) int64."""
        data = self.data
        starts = torch.randint(data.numel() - self.seq_len, (n, 1), generator=generator)  # (n, 1)
        window = data[starts + torch.arange(self.seq_len + 1)].long()  # (n, seq_len + 1)
        return window[:, :-1], window[:, 1:]

    def validation_windows(self, total_bytes: int) -> tuple[Tensor, Tensor]:
        """The first ``total_bytes`` predictions of the validation split, cut into consecutive
        windows of ``seq_len``: every model, whatever its ``seq_len`` (a divisor of
        ``total_bytes``), predicts the same bytes, each with the context its window allows.

        Returns inputs and labels (total_bytes / seq_len, seq_len) int64.

        Raises:
            ValueError: ``total_bytes`` not a multiple of ``seq_len`` or beyond the split.
        """
        if total_bytes % self.seq_len:
            raise ValueError(f"total_bytes={total_bytes} must be a multiple of seq_len={self.seq_len}")
        stream = validation_stream(self.corpus, total_bytes)
        return stream[:-1].view(-1, self.seq_len), stream[1:].view(-1, self.seq_len)  # (W, seq_len)


def validation_stream(corpus: Corpus, total_bytes: int) -> Tensor:
    """The first ``total_bytes + 1`` validation bytes (int64): ``total_bytes`` predictions.

    Raises:
        ValueError: the validation split is shorter than that.
    """
    if not 0 < total_bytes < corpus.validation.numel():
        raise ValueError(f"total_bytes must be in (0, {corpus.validation.numel()}) for this corpus's "
                         f"validation split, got {total_bytes}")
    return corpus.validation[:total_bytes + 1].long()


def bits_per_byte(logits: Tensor, targets: Tensor) -> float:
    """Mean cross-entropy of ``logits`` (..., 256) against byte ``targets`` (...), in bits."""
    nats = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), targets.reshape(-1))
    return float(nats) / LN2


@torch.no_grad()
def model_bits_per_byte(model: torch.nn.Module, inputs: Tensor, labels: Tensor, batch_size: int = 8) -> float:
    """Bits per byte of a ``TaskModel`` (or any tokens -> logits module) over given windows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for a in range(0, inputs.shape[0], batch_size):
        logits = model(inputs[a:a + batch_size]).double()  # (b, N, 256)
        target = labels[a:a + batch_size]
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, BYTES), target.reshape(-1),
                                                         reduction="sum"))
        count += target.numel()
    model.train(was_training)
    return total / count / LN2


@dataclass(frozen=True)
class NGram:
    """An order-``order`` byte model: p(next | the ``order`` bytes before it), add-``alpha``.

    ``p(c | h) = (count(h, c) + alpha) / (count(h) + 256 · alpha)``; counts come from ``fit``.
    The first ``order`` bytes of a stream have too little history and are not scored.
    """

    order: int = 2
    alpha: float = 0.1
    counts: Tensor | None = None  # (256**order, 256) float64 after fit

    def __post_init__(self):
        if not isinstance(self.order, int) or isinstance(self.order, bool) or not 0 <= self.order <= 3:
            raise ValueError(f"order must be an int in [0, 3], got {self.order!r}")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}")

    def _events(self, stream: Tensor) -> Tensor:
        """(L,) bytes -> (L - order,) flat indices history · 256 + next."""
        stream = stream.long()
        index = torch.zeros(stream.numel() - self.order, dtype=torch.int64)
        for j in range(self.order + 1):  # the history's oldest byte first, the predicted byte last
            index = index * BYTES + stream[j:stream.numel() - self.order + j]
        return index

    def fit(self, stream: Tensor) -> NGram:
        counts = torch.bincount(self._events(stream), minlength=BYTES ** (self.order + 1))
        return NGram(order=self.order, alpha=self.alpha, counts=counts.view(-1, BYTES).double())

    def bits_per_byte(self, stream: Tensor) -> float:
        """Mean bits per predicted byte of ``stream`` (its bytes from position ``order`` on).

        Raises:
            ValueError: called before ``fit``, or a stream no longer than ``order``.
        """
        if self.counts is None:
            raise ValueError("NGram.bits_per_byte needs a fitted model: call fit(train_bytes) first")
        if stream.numel() <= self.order:
            raise ValueError(f"stream must be longer than order={self.order}, got {stream.numel()} bytes")
        events = self._events(stream)
        history, nxt = events // BYTES, events % BYTES
        num = self.counts[history, nxt] + self.alpha
        den = self.counts.sum(1)[history] + BYTES * self.alpha
        return float(-(num / den).log2().mean())
