"""Task generators against their specs; every answer is recomputed independently here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnmem.tasks import IGNORE, MQAR, ListOps, SelectiveCopy, make_task
from attnmem.tasks.listops import CLOSE, DIGIT0, OP_TOKEN, PAD


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- MQAR (Arora et al. 2023) -------------------------------------------------------------

@pytest.mark.parametrize("seq_len,pairs,vocab", [(64, 4, 32), (256, 16, 8192), (203, 16, 64), (64, 16, 40)])
def test_mqar_queries_always_answerable(seq_len, pairs, vocab):
    task = MQAR(seq_len=seq_len, num_pairs=pairs, vocab_size=vocab)
    inputs, labels = task.sample(32, gen())
    assert inputs.shape == labels.shape == (32, seq_len)
    half = vocab // 2
    for x, y in zip(inputs.tolist(), labels.tolist()):
        keys, values = x[0:2 * pairs:2], x[1:2 * pairs:2]
        assert all(1 <= k < half for k in keys) and all(half <= v < vocab for v in values)
        assert len(set(keys)) == pairs and len(set(values)) == pairs  # drawn without replacement
        table = dict(zip(keys, values))
        queried = [(p, x[p], t) for p, t in enumerate(y) if t != IGNORE]
        assert len(queried) == pairs
        assert sorted(k for _, k, _ in queried) == sorted(keys)  # every key asked exactly once
        for p, key, target in queried:
            assert p >= 2 * pairs and (p - 2 * pairs) % 2 == 0  # after the context, on a query slot
            assert target == table[key]  # the value that followed the key in the context


def test_mqar_gaps_follow_a_power_law():
    # p(g) ∝ g^(a-1) with a = 0.01 puts most mass on short gaps; a uniform draw would put 1/4 of
    # the queries in the first quarter of the query slots. The power law's expectation for one
    # draw is about (ln 120 + γ)^-1 (ln 30 + γ) ≈ 0.74 (harmonic sums); without replacement a bit less.
    task = MQAR(seq_len=512, num_pairs=8, vocab_size=64)
    _, labels = task.sample(256, gen())
    pos = (labels != IGNORE).nonzero()[:, 1]
    slot = (pos - 2 * 8) // 2
    space = (512 - 16) // 2
    assert float((slot < space // 4).float().mean()) > 0.5
    flat = MQAR(seq_len=512, num_pairs=8, vocab_size=64, power_a=1.0)  # a = 1: uniform gaps
    _, labels = flat.sample(256, gen())
    slot = ((labels != IGNORE).nonzero()[:, 1] - 16) // 2
    assert 0.18 < float((slot < space // 4).float().mean()) < 0.32


def test_mqar_deterministic_and_noise_option():
    task = MQAR(seq_len=64, num_pairs=4, vocab_size=32)
    a, b = task.sample(4, gen(1)), task.sample(4, gen(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], task.sample(4, gen(2))[0])
    quiet = MQAR(seq_len=64, num_pairs=4, vocab_size=32, random_non_queries=False)
    x, y = quiet.sample(4, gen())
    used = torch.zeros_like(x, dtype=torch.bool)
    used[:, :8] = True
    used |= y != IGNORE
    assert (x[~used] == 0).all() and (x[used] != 0).all()


@pytest.mark.parametrize("options,word", [
    ({"vocab_size": 33}, "even"), ({"num_pairs": 20, "vocab_size": 32}, "num_pairs"),
    ({"seq_len": 60, "num_pairs": 16}, "seq_len"), ({"power_a": 0.0}, "power_a"), ({"seq_len": -1}, "seq_len"),
])
def test_mqar_bad_options(options, word):
    with pytest.raises(ValueError, match=word):
        MQAR(**options)


# --- ListOps (LRA) ------------------------------------------------------------------------

NAMES = {tok: op for op, tok in OP_TOKEN.items()}
LRA_OPS = {  # the definitions of LRA's listops.py, written independently of the generator
    "MIN": min, "MAX": max, "MED": lambda xs: int(np.median(xs)), "SM": lambda xs: sum(xs) % 10,
}


def evaluate_tokens(tokens):
    """Stack evaluation of a token sequence; returns (value, depth, largest argument count)."""
    stack, depth, max_depth, max_args = [], 0, 0, 0
    for t in tokens:
        if t in NAMES:
            stack.append((NAMES[t], []))
            depth += 1
            max_depth = max(max_depth, depth)
        elif t == CLOSE:
            op, args = stack.pop()
            max_args = max(max_args, len(args))
            assert len(args) >= 2
            value = LRA_OPS[op](args)
            depth -= 1
            if not stack:
                return value, max_depth, max_args
            stack[-1][1].append(value)
        else:
            assert DIGIT0 <= t < DIGIT0 + 10
            if not stack:
                return t - DIGIT0, 0, 0
            stack[-1][1].append(t - DIGIT0)
    raise AssertionError("unbalanced expression")


def test_listops_values_correct():
    task = ListOps(max_length=200, min_length=20, max_depth=4, max_args=5)
    inputs, labels = task.sample(64, gen())
    assert inputs.shape == (64, 200) and labels.shape == (64,)
    for x, label in zip(inputs.tolist(), labels.tolist()):
        length = next((i for i, t in enumerate(x) if t == PAD), len(x))
        assert 20 <= length <= 200 and all(t == PAD for t in x[length:])
        value, depth, args = evaluate_tokens(x[:length])
        assert value == label
        assert depth <= 4 - 1 and args <= 5  # operators sit at depths 1 .. max_depth - 1, as in LRA
    assert len(set(labels.tolist())) > 3  # not a constant answer


def test_listops_median_of_even_count_rounds_down_like_lra():
    from attnmem.tasks.listops import apply_op
    for xs in ([1, 2], [3, 8, 1, 0], [9, 9, 0, 1], [5, 6, 7, 8, 2, 2]):
        assert apply_op("MED", xs) == int(np.median(xs))


def test_listops_bad_options():
    with pytest.raises(ValueError, match="min_length"):
        ListOps(max_length=10, min_length=20)
    with pytest.raises(ValueError, match="max_args"):
        ListOps(max_args=1)
    with pytest.raises(ValueError, match="no expression"):
        ListOps(max_length=30, min_length=25, max_depth=1).sample(1, gen())


# --- selective copy -----------------------------------------------------------------------

@pytest.mark.parametrize("noise_vocab", [0, 5])
def test_selective_copy_answers_are_the_marked_tokens_in_order(noise_vocab):
    task = SelectiveCopy(seq_len=96, num_tokens=8, vocab_size=20, noise_vocab=noise_vocab)
    inputs, labels = task.sample(16, gen())
    body = 96 - 8
    data_start = 2 + noise_vocab
    for x, y in zip(inputs.tolist(), labels.tolist()):
        marked = [t for t in x[:body] if t >= data_start]
        assert len(marked) == 8
        assert y[body:] == marked and all(t == IGNORE for t in y[:body])
        assert x[body] == 1 and x[body + 1:] == marked[:-1]  # separator, then teacher forcing
        noise = [t for t in x[:body] if t < data_start]
        assert all(t == 0 for t in noise) if noise_vocab == 0 else all(2 <= t < data_start for t in noise)


def test_selective_copy_bad_options():
    with pytest.raises(ValueError, match="vocab_size"):
        SelectiveCopy(vocab_size=4, noise_vocab=2)
    with pytest.raises(ValueError, match="seq_len"):
        SelectiveCopy(seq_len=10, num_tokens=8)


def test_make_task_errors():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        make_task("nope")
    with pytest.raises(ValueError, match="unknown option.*pairs"):
        make_task("mqar", pairs=3)
    assert make_task("listops", seq_len=300).max_length == 300
