"""The stdlib text task: the split by file, the content hash, bits per byte, the n-gram baseline."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from attnmem.tasks import IGNORE, make_task
from attnmem.tasks.text import NGram, bits_per_byte, is_validation, load_corpus, python_files, scored_stream


@pytest.fixture
def tiny_root(tmp_path):
    """Forty small *.py files in two packages, plus files the corpus must skip."""
    for i in range(40):
        pkg = tmp_path / ("pkg_a" if i % 2 else "pkg_b")
        pkg.mkdir(exist_ok=True)
        (pkg / f"mod_{i:02d}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 20)
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "third_party.py").write_text("not stdlib\n")
    (tmp_path / "notes.txt").write_text("not python\n")
    return tmp_path


def _load(root, **caps):
    load_corpus.cache_clear()
    return load_corpus(None if root is None else str(root), **caps)


def test_split_is_by_file_deterministic_and_hashed(tiny_root):
    files = python_files(str(tiny_root))
    assert len(files) == 40 and not any("site-packages" in f for f in files)
    a = _load(tiny_root, validation_percent=25.0)
    b = _load(tiny_root, validation_percent=25.0)
    assert a.sha256 == b.sha256 and torch.equal(a.train, b.train)
    assert set(a.train_files).isdisjoint(a.validation_files)
    assert sorted(a.train_files + a.validation_files) == files
    for rel in files:  # the split is the path's hash alone
        assert (rel in a.validation_files) == (hashlib.sha256(rel.encode()).digest()[0] < 64)
    # The hash covers the bytes: one changed file changes it.
    (tiny_root / a.train_files[0]).write_text("changed = True\n")
    assert _load(tiny_root, validation_percent=25.0).sha256 != a.sha256


def test_caps_bound_each_file_and_split(tiny_root):
    c = _load(tiny_root, max_file_bytes=100, max_train_bytes=1000, max_validation_bytes=300,
              validation_percent=25.0)
    assert c.train.numel() == 1000 and c.validation.numel() == 300
    assert bytes(c.train[:100].tolist()) == (tiny_root / c.train_files[0]).read_bytes()[:100]


def test_stdlib_corpus_is_stable_and_split_by_path():
    c1 = _load(None, max_train_bytes=1 << 16, max_validation_bytes=1 << 14)
    c2 = _load(None, max_train_bytes=1 << 16, max_validation_bytes=1 << 14)
    assert c1.sha256 == c2.sha256 and len(c1.sha256) == 64
    assert all(is_validation(f, 10.0) for f in c1.validation_files)
    assert not any(is_validation(f, 10.0) for f in c1.train_files)


def test_text_task_windows_and_held_out_split(tiny_root):
    task = make_task("text", seq_len=16, root=str(tiny_root), validation_percent=25.0)
    x, y = task.sample(4, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    held = task.held_out()
    assert held.split == "validation" and torch.equal(held.data, task.corpus.validation)
    wx, wy = held.validation_windows(64)
    assert wx.shape == (4, 16) and torch.equal(wx.flatten()[1:], wy.flatten()[:-1])
    with pytest.raises(ValueError, match="split"):
        make_task("text", seq_len=16, split="test", root=str(tiny_root))


def test_uniform_model_has_eight_bits_per_byte():
    targets = torch.randint(256, (3, 50), generator=torch.Generator().manual_seed(0))
    assert bits_per_byte(torch.zeros(3, 50, 256), targets) == pytest.approx(8.0, abs=1e-12)
    # A model certain of the right byte costs nothing.
    sure = torch.full((3, 50, 256), -1e4).scatter(-1, targets[..., None], 0.0)
    assert bits_per_byte(sure, targets) == pytest.approx(0.0, abs=1e-9)


def test_ngram_against_hand_computed_counts():
    stream = torch.tensor(list(b"abab"), dtype=torch.uint8)
    # order 1: events a->b twice, b->a once; p(b | a) = (2 + 1) / (2 + 256).
    bigram = NGram(order=1, alpha=1.0).fit(stream)
    assert bigram.bits_per_byte(torch.tensor(list(b"ab"))) == pytest.approx(-math.log2(3 / 258))
    # order 2 on "abcabc": ab->c twice; p(c | ab) = (2 + 0.5) / (2 + 128); p(a | bc) = 1.5 / 129.
    trigram = NGram(order=2, alpha=0.5).fit(torch.tensor(list(b"abcabc")))
    expected = -(math.log2(2.5 / 130) + math.log2(1.5 / 129)) / 2
    assert trigram.bits_per_byte(torch.tensor(list(b"abca"))) == pytest.approx(expected)
    with pytest.raises(ValueError, match="fit"):
        NGram().bits_per_byte(stream)


def test_scored_windows_give_every_context_the_same_bytes_with_full_context(tiny_root):
    stream = _load(tiny_root, validation_percent=25.0).validation.long()
    scored = {}
    for seq_len, stride in ((32, 4), (8, 2), (8, 8)):
        held = make_task("text", seq_len=seq_len, root=str(tiny_root), validation_percent=25.0).held_out()
        x, y = held.scored_windows(40, stride=stride, offset=32)
        assert x.shape == y.shape == (40 // stride, seq_len)
        keep = y != IGNORE
        assert keep.sum() == 40 and keep[:, -stride:].all() and not keep[:, :-stride].any()
        # Each window is the stream itself: inputs at positions e - seq_len .. e - 1, labels one on.
        for j in range(x.shape[0]):
            end = 32 + stride * (j + 1)
            assert torch.equal(x[j], stream[end - seq_len:end])
            assert torch.equal(y[j][keep[j]], stream[end - stride + 1:end + 1])
        scored[(seq_len, stride)] = y[keep]
    # Whatever the context and stride: the same 40 bytes, the ones an n-gram is scored on too.
    assert all(torch.equal(v, stream[33:73]) for v in scored.values())
    assert torch.equal(scored_stream(held.corpus, 40, 32, order=2), stream[31:73])
    with pytest.raises(ValueError, match="stride"):
        held.scored_windows(40, stride=9, offset=32)
    with pytest.raises(ValueError, match="multiple"):
        held.scored_windows(41, stride=2, offset=32)
    with pytest.raises(ValueError, match="offset"):
        held.scored_windows(40, stride=2, offset=5)
