"""Block maps must agree with the dense mask they summarise, and never need N×N."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnmem import masks as M


def check_block_map(mask, nq, nk, q_tile, kv_tile, batch=1, heads=1):
    """Every listed tile's state is exact or safely PARTIAL; no non-empty tile is left out."""
    bm = mask.block_map(nq, nk, q_tile, kv_tile, batch=batch, heads=heads)
    dense = mask.to_dense(nq, nk, batch=batch, heads=heads)
    states = bm.dense_states()
    for i in range(states.shape[0]):
        for j in range(states.shape[1]):
            blk = dense[..., i * q_tile:(i + 1) * q_tile, j * kv_tile:(j + 1) * kv_tile]
            if not blk.any():
                assert states[i, j] in (M.EMPTY, M.PARTIAL), (i, j)
            elif blk.all():
                assert states[i, j] in (M.FULL, M.PARTIAL), (i, j)
            else:
                assert states[i, j] == M.PARTIAL, (i, j)
    return bm


LENGTHS = [(1, 1), (7, 7), (33, 33), (20, 45), (45, 20)]


@pytest.mark.parametrize("nq,nk", LENGTHS)
@pytest.mark.parametrize("tiles", [(1, 1), (4, 4), (8, 3), (64, 64)])
@pytest.mark.parametrize("make", [
    M.causal,
    lambda: M.sliding_window(3, 2),
    lambda: M.sliding_window(0, 0),
    lambda: M.sliding_window(100, 0),
    lambda: M.causal() & M.sliding_window(5),
    lambda: M.sliding_window(2, 0) | M.from_mod(lambda b, h, q, k: k < 3),
])
def test_structured_block_maps(make, nq, nk, tiles):
    check_block_map(make(), nq, nk, *tiles)


def test_structured_block_map_is_exact_for_band():
    bm = M.sliding_window(4, 4).block_map(64, 64, 8, 8)
    states = bm.dense_states()
    # A window of 4 each side around a diagonal of 8×8 tiles touches only the neighbours.
    for i in range(8):
        assert states[i, i] == M.PARTIAL
        for j in range(8):
            if abs(i - j) > 1:
                assert states[i, j] == M.EMPTY


def test_causal_full_tiles_below_diagonal():
    states = M.causal().block_map(32, 32, 8).dense_states()
    assert (states.tril(-1)[torch.ones(4, 4).tril(-1).bool()] == M.FULL).all()
    assert (states.diagonal() == M.PARTIAL).all()
    assert (states.triu(1) == M.EMPTY).all()


def test_causal_alignment_bottom_right():
    d = M.causal().to_dense(2, 5)[0, 0]
    assert d.tolist() == [[True, True, True, True, False], [True] * 5]
    d = M.causal().to_dense(5, 2)[0, 0]
    assert d[:3].sum() == 0 and d[3].tolist() == [True, False] and d[4].all()


def test_document_mask():
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    d = M.document(ids).to_dense(10, 10)[0, 0]
    assert torch.equal(d, ids[:, None] == ids[None, :])
    bm = check_block_map(M.document(ids), 10, 10, 2, 2)
    assert bm.dense_states()[0, 4] == M.EMPTY
    check_block_map(M.document(torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])), 4, 4, 2, 2, batch=2)
    check_block_map(M.document(torch.tensor([3, 1, 3, 1, 2])), 5, 5, 2, 2)  # unsorted ids


def test_head_dependent_mod_block_map_covers_all_heads():
    mask = M.from_mod(lambda b, h, q, k: (h == 1) | (k <= q))
    bm = check_block_map(mask, 16, 16, 4, 4, heads=2)
    assert (bm.kv_counts == 4).all()  # head 1 attends everywhere, so no tile is empty


@settings(max_examples=40, deadline=None)
@given(nq=st.integers(1, 40), nk=st.integers(1, 40), qt=st.integers(1, 9), kt=st.integers(1, 9),
       left=st.integers(0, 12), right=st.integers(0, 12), density=st.floats(0, 1))
def test_block_maps_property(nq, nk, qt, kt, left, right, density):
    g = torch.Generator().manual_seed(nq * 100 + nk)
    check_block_map(M.sliding_window(left, right), nq, nk, qt, kt)
    check_block_map(M.dense(torch.rand(nq, nk, generator=g) < density), nq, nk, qt, kt)
    check_block_map(M.causal() | M.sliding_window(left, right), nq, nk, qt, kt)


def test_structured_block_map_never_builds_n_squared():
    # N = 2**20 keys: a dense bool mask would be 1 TiB; the block map lists only a band.
    n = 2**20
    bm = M.sliding_window(256, 256).block_map(n, n, 256)
    assert bm.kv_indices.shape == (n // 256, 3)
    assert bm.kv_indices.numel() * 8 < 2**20 * 8


def test_mask_errors():
    with pytest.raises(ValueError, match="left"):
        M.sliding_window(-1)
    with pytest.raises(TypeError, match="bool tensor"):
        M.dense(torch.zeros(3, 3))
    with pytest.raises(TypeError, match="callable"):
        M.from_mod(3)
    with pytest.raises(TypeError, match="integer tensor"):
        M.document(torch.zeros(4))
    with pytest.raises(ValueError, match="tile sizes"):
        M.causal().block_map(4, 4, 0)
    with pytest.raises(TypeError, match="Mask or a bool tensor|bool tensor or an attnmem"):
        M.causal() & 3


@pytest.mark.parametrize("tiles", [(4, 4), (8, 4), (3, 5), (16, 16)])
def test_block_sparse(tiles):
    mask = M.random_blocks(45, 37, 4, keep=0.5, seed=1)
    check_block_map(mask, 45, 37, *tiles)
    bm = mask.block_map(45, 37, 4, 4)
    assert torch.equal(bm.dense_states() != M.EMPTY, mask.layout)  # aligned tiles are exact
    with pytest.raises(ValueError, match="layout has shape"):
        mask.check(1, 1, 20, 37)
