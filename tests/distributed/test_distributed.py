"""Ring attention on 2 and 4 gloo ranks against single-process float64 reference attention.

Each test starts its ranks (``multiprocessing``'s forkserver context, a ``FileStore`` in ``tmp_path``,
a short process-group timeout). The ranks build the same global inputs from a seed, run
``ring_attention`` on their shard and save their output and gradients; the parent unshards
them and compares with ``reference_attention`` on the whole sequence (the expected values).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from attnmem import masks as M
from attnmem.distributed import ring_attention, shard, unshard
from attnmem.distributed.layout import local_lengths, positions
from attnmem.nn import Transformer
from attnmem.reference import reference_attention

from ..conftest import rel_err
from .ranks import VOCAB, peer_exit_error, spawn_ranks, transformer_inputs

TOL = 1e-10
# How long a rank waits on a silent peer: long enough for a slow rank on a loaded machine
# (a 6 s timeout fired spuriously at load 20 on 2 cores), short in the test of the timeout.
PG_TIMEOUT_S = 30
SILENT_TIMEOUT_S = 5
JOIN_TIMEOUT_S = 90  # the test fails (instead of hanging) past this

# (name, B, Hq, Hkv, N, D, causal, layout, heads_per_pass)
CASES = [
    ("full", 1, 2, 2, None, 8, False, "contiguous", None),
    ("full_passes_differ", 1, 4, 4, None, 8, False, "zigzag", "2 + rank % 2"),
    ("causal", 1, 2, 2, None, 8, True, "contiguous", 2),
    ("causal_gqa_zigzag", 1, 4, 2, None, 8, True, "zigzag", 1),
    ("full_zigzag_b2", 2, 2, 1, None, 8, False, "zigzag", 1),
    ("causal_uneven", 1, 2, 1, "uneven", 8, True, "contiguous", 2),
    ("full_uneven_mqa", 2, 3, 1, "uneven", 5, False, "contiguous", 1),
]


def _length(spec, world: int) -> int:
    # 6 tokens per rank for even cases (zigzag needs a multiple of 2·world); uneven adds 3.
    return 6 * world + (3 if spec == "uneven" else 0)


def _inputs(case, world, seed=0):
    _, B, Hq, Hkv, spec, D, _, _, _ = case
    n = _length(spec, world)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, n, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, n, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, n, D, generator=g, dtype=torch.float64)
    dout = torch.randn(B, Hq, n, D, generator=g, dtype=torch.float64)
    return q, k, v, dout


def _transformer(**kw):
    torch.manual_seed(0)
    return Transformer(VOCAB, 16, 2, 2, kv_heads=1, causal=True, **kw).double()


def _transformer_inputs(world):
    return transformer_inputs(6 * world)


# --- what each rank runs -------------------------------------------------------------------


def _correctness(rank, world, out_dir: Path):
    for case in CASES:
        name, *_, causal, layout, per_pass = case
        per_pass = 2 + rank % 2 if per_pass == "2 + rank % 2" else per_pass  # ranks agree on the smallest
        q, k, v, dout = (shard(t, world, rank, layout=layout).clone() for t in _inputs(case, world))
        for t in (q, k, v):
            t.requires_grad_(True)
        out = ring_attention(q, k, v, causal=causal, layout=layout, heads_per_pass=per_pass)
        out.backward(dout)
        torch.save({"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad},
                   out_dir / f"{name}_{rank}.pt")
    # attnmem.nn.Transformer with sequence_parallel=True (zigzag shards of the tokens).
    tokens, dlogits = _transformer_inputs(world)
    model = _transformer(sequence_parallel=True)
    logits = model(shard(tokens, world, rank, layout="zigzag", dim=1))
    logits.backward(shard(dlogits, world, rank, layout="zigzag", dim=1))
    for p in model.parameters():
        dist.all_reduce(p.grad)
    torch.save({"logits": logits.detach(), **{n: p.grad for n, p in model.named_parameters()}},
               out_dir / f"transformer_{rank}.pt")
    # A subgroup ring (global ranks differ from group ranks): two independent 2-rank rings.
    if world == 4:
        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        group = groups[rank // 2]
        case = CASES[2]
        q, k, v, _ = (shard(t, 2, rank % 2, layout="zigzag") for t in _inputs(case, 2))
        out = ring_attention(q, k, v, causal=True, layout="zigzag", group=group)
        torch.save({"out": out}, out_dir / f"subgroup_{rank}.pt")
    # Ranks that disagree: every rank raises the same ValueError.
    q = torch.randn(1, 2, 4 + rank, 8, dtype=torch.float64)
    try:
        ring_attention(q, q, q, layout="zigzag")
    except ValueError as e:
        (out_dir / f"mismatch_{rank}.txt").write_text(str(e))
    q = torch.randn(1, 2 + rank % 2, 4, 8, dtype=torch.float64)
    try:
        ring_attention(q, q, q)
    except ValueError as e:
        (out_dir / f"heads_{rank}.txt").write_text(str(e))


def _peer_exits(rank, world, out_dir: Path):
    """Rank 1 dies between the forward and the backward; rank 0 must fail, not hang."""
    q = torch.randn(1, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    out = ring_attention(q, q, q, causal=True)
    if rank == 1:
        os._exit(3)
    time.sleep(0.5)
    out.sum().backward()


def _peer_silent(rank, world, out_dir: Path):
    """Rank 1 is alive but never joins; rank 0 must time out with a clear error."""
    if rank == 1:
        time.sleep(4 * SILENT_TIMEOUT_S)
        return
    q = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    ring_attention(q, q, q)


SCENARIOS = {"correctness": _correctness, "peer_exits": _peer_exits, "peer_silent": _peer_silent}


def _spawn(tmp_path: Path, world: int, scenario: str, wait_for=None) -> dict[int, str | None]:
    """``spawn_ranks`` of a scenario by name; the silent-peer one waits only SILENT_TIMEOUT_S."""
    timeout_s = SILENT_TIMEOUT_S if scenario == "peer_silent" else PG_TIMEOUT_S
    return spawn_ranks(tmp_path, world, SCENARIOS[scenario], pg_timeout_s=timeout_s, join_timeout_s=JOIN_TIMEOUT_S,
                       wait_for=wait_for)


def _reference(case, world):
    q, k, v, dout = (t.clone().requires_grad_(True) for t in _inputs(case, world))
    causal = case[6]
    out = reference_attention(q, k, v, mask=M.causal() if causal else None, scale=q.shape[-1] ** -0.5)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    return {"out": out.detach(), "dq": dq, "dk": dk, "dv": dv}


@pytest.mark.parametrize("world", [2, 4])
def test_ring_matches_reference(tmp_path, world):
    errors = _spawn(tmp_path, world, "correctness")
    assert all(e is None for e in errors.values()), "\n".join(f"rank {r}: {e}" for r, e in errors.items())
    for case in CASES:
        name, layout = case[0], case[7]
        want = _reference(case, world)
        parts = [torch.load(tmp_path / f"{name}_{r}.pt") for r in range(world)]
        for key, ref in want.items():
            got = unshard([p[key] for p in parts], layout=layout)
            assert got.shape == ref.shape, (name, key)
            assert torch.isfinite(got).all(), (name, key)
            assert rel_err(got, ref) <= TOL, f"{name} {key}: rel err {rel_err(got, ref)}"
    tokens, dlogits = _transformer_inputs(world)
    model = _transformer()
    logits = model(tokens)
    logits.backward(dlogits)
    parts = [torch.load(tmp_path / f"transformer_{r}.pt") for r in range(world)]
    got = unshard([p["logits"] for p in parts], layout="zigzag", dim=1)
    assert rel_err(got, logits.detach()) <= TOL
    for name, p in model.named_parameters():
        assert rel_err(parts[0][name], p.grad) <= TOL, f"transformer grad {name}"
    if world == 4:
        want = _reference(CASES[2], 2)["out"]
        for pair in ([0, 1], [2, 3]):
            got = unshard([torch.load(tmp_path / f"subgroup_{r}.pt")["out"] for r in pair], layout="zigzag")
            assert rel_err(got, want) <= TOL
    for r in range(world):
        assert "needs one even local length on every rank" in (tmp_path / f"mismatch_{r}.txt").read_text()
        assert "same Hq" in (tmp_path / f"heads_{r}.txt").read_text()


def test_peer_that_exits_fails_the_others(tmp_path):
    err = peer_exit_error(tmp_path, _peer_exits, pg_timeout_s=PG_TIMEOUT_S, join_timeout_s=JOIN_TIMEOUT_S)
    assert err.startswith("RingAttentionError"), err
    assert "rank 0 of 2" in err and "backward" in err


def test_silent_peer_times_out(tmp_path):
    errors = _spawn(tmp_path, 2, "peer_silent", wait_for=[0])
    assert errors[0] is not None and errors[0].startswith("RingAttentionError"), errors[0]
    assert "timeout" in errors[0]


# --- no process group needed -----------------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_unshard_round_trip(layout, world):
    n = 4 * world if layout == "zigzag" else 4 * world + 3
    x = torch.arange(2 * n).reshape(1, 2, n, 1)
    parts = [shard(x, world, r, layout=layout) for r in range(world)]
    assert [p.shape[2] for p in parts] == local_lengths(n, world, layout)
    assert torch.equal(unshard(parts, layout=layout), x)
    for r, p in enumerate(parts):
        assert torch.equal(p[0, 0, :, 0], positions(n, world, r, layout=layout))


def test_zigzag_layout_is_balanced_and_matches_the_picture():
    # The picture in attnmem.distributed.layout: P = 4, chunks held 0 1 2 3 3 2 1 0.
    n, world = 8, 4
    owner = torch.empty(n, dtype=torch.int64)
    for r in range(world):
        owner[positions(n, world, r, layout="zigzag")] = r
    assert owner.tolist() == [0, 1, 2, 3, 3, 2, 1, 0]
    # Causal work of a rank = number of (query, key) pairs with key <= query among its queries.
    work = [int((positions(64, world, r, layout="zigzag") + 1).sum()) for r in range(world)]
    assert len(set(work)) == 1


def test_layout_errors():
    x = torch.zeros(1, 1, 10, 4)
    with pytest.raises(ValueError, match="2·world_size = 4 equal chunks, but the sequence length is 10"):
        shard(x, 2, 0, layout="zigzag")
    with pytest.raises(ValueError, match="layout must be one of"):
        shard(x, 2, 0, layout="striped")
    with pytest.raises(ValueError, match="rank must be"):
        shard(x, 2, 2)


def test_needs_a_process_group():
    q = torch.zeros(1, 1, 4, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ring_attention(q, q, q)
