"""Sparse methods against the float64 reference under their pattern, written out independently.

Each pattern's expected dense mask is built here from its definition (the paper's rule, in
index arithmetic), not from the mask's own ``mask_fn``; ``reference`` with that dense mask is
the oracle for outputs and for all three gradients.
"""

import warnings
import zlib

import pytest
import torch

import attnmem
from attnmem import masks as M
from attnmem import registry
from attnmem.reference import reference_attention

from ..conftest import compare_with_reference, rand_qkv, rel_err
from ..masks.test_masks import check_block_map

TOL = 1e-10
SPARSE = ["sliding_window", "dilated", "longformer", "bigbird", "strided"]


# --- the patterns, written out from their definitions --------------------------------------


def _rel(nq, nk):
    """rel[i, j] = j - (i + nk - nq): key offset from the bottom-right aligned query."""
    return torch.arange(nk)[None, :] - (torch.arange(nq)[:, None] + nk - nq)


def expected_pattern(method, nq, nk, heads, **o):
    """(1, 1 or heads, nq, nk) bool: which pairs the method's pattern allows."""
    rel = _rel(nq, nk)
    if method in ("sliding_window", "longformer"):
        w = o.get("window", 256)
        left, right = (w, w) if isinstance(w, int) else w
        allowed = (rel >= -left) & (rel <= right)
        if method == "longformer":
            g = torch.tensor(o.get("global_tokens", (0,)))
            allowed = allowed | torch.isin(torch.arange(nq), g)[:, None] | torch.isin(torch.arange(nk), g)[None]
        return allowed[None, None]
    if method == "dilated":
        w = o.get("window", 256)
        left, right = (w, w) if isinstance(w, int) else w
        dil = o.get("dilation", 2)
        dils = dil if isinstance(dil, tuple) else (dil,)
        per_head = [(rel % d == 0) & (rel >= -left * d) & (rel <= right * d) for d in dils]
        return torch.stack(per_head)[None]
    if method == "strided" and o.get("pattern", "strided") == "strided":
        s = o.get("stride", 128)
        return ((rel.abs() < s) | (rel % s == 0))[None, None]
    if method == "strided":
        blk, c = o.get("stride", 128), o.get("summary", 8)
        p = torch.arange(nq)[:, None] + nk - nq
        j = torch.arange(nk)[None, :]
        return ((torch.div(p, blk, rounding_mode="floor") == j // blk) | (j % blk >= blk - c))[None, None]
    if method == "bigbird":
        blk = o.get("block", 64)
        mask = M.bigbird(blk, o.get("window_blocks", 3), o.get("global_blocks", 2), o.get("random_blocks", 3),
                         o.get("seed", 0))
        gq, gk, rnd = mask.tables(nq, nk)  # the random draw is part of the pattern's definition
        nqb, nkb = len(gq), len(gk)
        layout = (torch.arange(nkb)[None] - torch.arange(nqb)[:, None]).abs() <= o.get("window_blocks", 3) // 2
        layout |= gq[:, None] | gk[None, :]
        for i in range(nqb):
            for j in rnd[i].tolist():
                if j >= 0:
                    layout[i, j] = True
        qb, kb = torch.arange(nq) // blk, torch.arange(nk) // blk
        return layout[qb][:, kb][None, None]
    raise AssertionError(method)


def assert_matches_pattern(method, q, k, v, *, causal=False, mask=None, tol=TOL, **opts):
    """The method (given only its options) equals reference with the written-out pattern."""
    B, H, nq, _ = q.shape
    nk = k.shape[2]
    out = attnmem.attention(q, k, v, method=method, causal=causal, mask=mask, **opts)
    allowed = expected_pattern(method, nq, nk, H, **opts).expand(B, H, nq, nk)
    if causal:
        allowed = allowed & (_rel(nq, nk) <= 0)
    if mask is not None:
        allowed = allowed & M.as_mask(mask).to_dense(nq, nk, B, H)
    ref = reference_attention(q, k, v, mask=M.dense(allowed), scale=None)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= tol, f"output rel err {rel_err(out, ref)}"
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for name, a, b in zip("qkv", got, want):
        assert torch.isfinite(a).all(), f"d{name} has NaN/inf"
        assert rel_err(a, b) <= tol, f"d{name} rel err {rel_err(a, b)}"
    return out


# --- outputs and gradients over random parameters -------------------------------------------

SHAPES = [  # (B, Hq, Hkv, Nq, Nk, D): N not a multiple of the tiles; GQA; Nq != Nk both ways
    (1, 2, 2, 45, 45, 16),
    (2, 4, 2, 70, 70, 8),
    (1, 4, 1, 37, 83, 16),
    (1, 2, 2, 83, 37, 16),
]


def _random_options(method, n, gen):
    def ri(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    tiles = dict(q_tile=16, kv_tile=ri(1, 3) * 8)
    if method == "sliding_window":
        return {**tiles, "window": (ri(0, 12), ri(0, 12))}
    if method == "dilated":
        return {**tiles, "window": ri(0, 6), "dilation": ri(1, 4)}
    if method == "longformer":
        return {**tiles, "window": ri(0, 8), "global_tokens": (0, ri(1, n - 1), n - 1)}
    if method == "bigbird":
        return dict(block=8, window_blocks=2 * ri(0, 1) + 1, global_blocks=ri(0, 3),
                    random_blocks=ri(0, 3), seed=ri(0, 99), q_tile=16, kv_tile=8 * ri(1, 2))
    if method == "strided":
        if ri(0, 1):
            return {**tiles, "pattern": "fixed", "stride": ri(2, 12), "summary": 2}
        return {**tiles, "stride": ri(1, 12)}
    raise AssertionError(method)


@pytest.mark.parametrize("method", SPARSE)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
def test_against_reference_random_parameters(method, shape, causal):
    B, Hq, Hkv, nq, nk, D = shape
    gen = torch.Generator().manual_seed(zlib.crc32(f"{method}{shape}{causal}".encode()))
    q, k, v = rand_qkv(B, Hq, Hkv, nq, nk, D, seed=nq + nk)
    opts = _random_options(method, min(nq, nk), gen)
    assert_matches_pattern(method, q, k, v, causal=causal, **opts)


@pytest.mark.parametrize("window", [0, (0, 0), 500, (3, 0), (0, 5)])
def test_window_edge_cases(window):
    """Window 0 (only the diagonal), a window wider than N (full attention), one-sided."""
    q, k, v = rand_qkv(1, 2, 2, 50, 50, 16)
    assert_matches_pattern("sliding_window", q, k, v, window=window, q_tile=16, kv_tile=16)
    assert_matches_pattern("longformer", q, k, v, window=window, global_tokens=(0, 49),
                           q_tile=16, kv_tile=16)


def test_wide_window_is_full_attention():
    q, k, v = rand_qkv(1, 2, 2, 40, 40, 16)
    out = attnmem.attention(q, k, v, method="sliding_window", window=500)
    ref = reference_attention(q, k, v, mask=None, scale=0.25)
    assert rel_err(out, ref) <= TOL


def test_per_head_dilation_and_gqa():
    q, k, v = rand_qkv(1, 4, 2, 60, 60, 8)
    assert_matches_pattern("dilated", q, k, v, window=(4, 2), dilation=(1, 2, 3, 4), q_tile=16, kv_tile=16)
    assert_matches_pattern("dilated", q, k, v, causal=True, window=3, dilation=(4, 3, 2, 1))


def test_causal_sliding_window_equals_causal_flag():
    """window=(w, 0) is causal local attention: the same output as (w, w) with causal=True."""
    q, k, v = rand_qkv(1, 2, 2, 64, 64, 16, grad=False)
    a = attnmem.attention(q, k, v, method="sliding_window", window=(7, 0))
    b = attnmem.attention(q, k, v, method="sliding_window", window=7, causal=True)
    assert rel_err(a, b) <= TOL


def test_user_mask_composes():
    """The pattern is ANDed with the call's own mask (compare_with_reference gets it whole)."""
    q, k, v = rand_qkv(1, 2, 2, 48, 48, 16)
    doc = M.document(torch.arange(48) // 20)
    assert_matches_pattern("longformer", q, k, v, mask=doc, window=3, global_tokens=(0, 47),
                           q_tile=16, kv_tile=16)
    assert_matches_pattern("bigbird", q, k, v, causal=True, mask=doc, block=8, q_tile=16, kv_tile=16)
    pattern = M.sliding_window(5, 2)
    compare_with_reference("sliding_window", q, k, v, mask=pattern, window=(5, 2), q_tile=16)


def test_rows_with_nothing_to_attend_are_zero():
    """Nq > Nk with causal: the first rows see no key; zeros and zero gradients, never NaN."""
    q, k, v = rand_qkv(1, 2, 2, 40, 20, 16)
    for method, opts in [("sliding_window", dict(window=3)), ("strided", dict(stride=4)),
                         ("bigbird", dict(block=8, q_tile=16, kv_tile=16))]:
        out = assert_matches_pattern(method, q, k, v, causal=True, **opts)
        assert (out[:, :, :20] == 0).all()


def test_fused_and_torch_kernels_agree_with_reference():
    q, k, v = rand_qkv(1, 4, 2, 70, 70, 16)
    for kernel in ("fused", "torch"):
        assert_matches_pattern("bigbird", q, k, v, block=8, q_tile=16, kv_tile=16, kernel=kernel)
        assert_matches_pattern("strided", q, k, v, causal=True, pattern="fixed", stride=10, summary=3,
                               kernel=kernel, q_tile=16, kv_tile=16)


def test_default_options_run():
    """`attnmem compare` runs every method with its defaults."""
    q, k, v = rand_qkv(1, 2, 2, 300, 300, 16)
    for method in SPARSE:
        assert_matches_pattern(method, q, k, v)


# --- the patterns themselves -------------------------------------------------------------------


def test_bigbird_random_blocks_deterministic_and_distinct():
    a, b = M.bigbird(16, 3, 2, 3, seed=5), M.bigbird(16, 3, 2, 3, seed=5)
    _, _, ra = a.tables(1024, 1024)
    assert torch.equal(ra, b.tables(1024, 1024)[2])
    assert not torch.equal(ra, M.bigbird(16, 3, 2, 3, seed=6).tables(1024, 1024)[2])
    gq, gk, _ = a.tables(1024, 1024)
    assert gq[0] and gq[-1] and gq.sum() == 2  # first and last block are global
    for i, row in enumerate(ra.tolist()):
        picked = [j for j in row if j >= 0]
        if gq[i]:
            assert not picked  # global rows see everything already
            continue
        assert len(picked) == 3 and len(set(picked)) == 3
        assert all(abs(j - i) > 1 and not gk[j] for j in picked)


def test_global_tokens_at_the_ends():
    q, k, v = rand_qkv(1, 2, 2, 33, 33, 16)
    out = assert_matches_pattern("longformer", q, k, v, window=0, global_tokens=(0, 32), q_tile=16, kv_tile=16)
    assert out.shape == q.shape


# --- block maps ----------------------------------------------------------------------------------

MASKS = {
    "dilated": lambda: M.dilated((3, 2), 2),
    "dilated_heads": lambda: M.dilated(2, (1, 3)),
    "global": lambda: M.global_tokens([0, 5, 19]),
    "global_keys": lambda: M.global_tokens([0, 19], queries=False),
    "longformer": lambda: M.longformer(3, [0, 44]),
    "bigbird": lambda: M.bigbird(4, 3, 2, 2, seed=1),
    "bigbird_wide": lambda: M.bigbird(5, 5, 1, 3),
    "strided": lambda: M.strided(4),
    "fixed": lambda: M.fixed(5, 2),
    "causal_bigbird": lambda: M.causal() & M.bigbird(3, 1, 1, 1, seed=2),
}


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("nq,nk", [(7, 7), (33, 33), (20, 45), (45, 20)])
@pytest.mark.parametrize("tiles", [(1, 1), (4, 4), (8, 3), (5, 7)])
def test_block_maps(name, nq, nk, tiles):
    mask = MASKS[name]()
    check_block_map(mask, nq, nk, *tiles, heads=2 if name == "dilated_heads" else 1)


def test_block_maps_cost_o_n_w():
    """At N = 2**18 (1024 tiles a side) every table the methods' tiled path uses is a few tiles
    wide: the band, plus the global key tiles, plus the random blocks' tiles (bounds below)."""
    n, tile = 2**18, 256
    methods = registry.get("longformer"), registry.get("bigbird")
    longformer = methods[0].split(methods[0].make_options(dict(window=256, global_tokens=tuple(range(16)))), n)[0]
    bigbird = methods[1].split(methods[1].make_options(dict(q_tile=256, kv_tile=256)), n)[0]
    for mask, width in [(M.dilated(64, 2), 3),  # span 128 each side: at most 3 tiles
                        (longformer, 3 + 1),  # 3 window tiles + tile 0 of the global keys
                        (bigbird, 3 + 2 + 4 * 3)]:  # 3 window, 2 global, 4 blocks × 3 random
        bm = mask.block_map(n, n, tile)
        assert bm.kv_indices.shape[0] == n // tile
        assert bm.kv_indices.shape[1] <= width, (mask, bm.kv_indices.shape)


def test_flex_block_mask_conversion_and_cpu_flex():
    """The BlockMap -> FlexAttention BlockMask conversion, checked by FlexAttention itself
    (its unfused CPU path) against the reference."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    from attnmem.kernels import flex_block_mask

    q, k, v = rand_qkv(1, 4, 2, 64, 64, 16, grad=False)
    masks = [M.longformer(4, [0, 33]), M.bigbird(8), M.causal() & M.fixed(8, 2), M.strided(5)]
    # One FlexAttention call (each costs seconds of tracing) on a union of every mask_mod kind.
    masks.append(M.causal() & (M.longformer(2, [40]) | M.dilated(2, (1, 2, 3, 4)) | M.bigbird(8, 1, 0, 1)
                               | M.fixed(16, 1) | M.strided(9)))
    for mask in masks:
        bm = mask.block_map(64, 64, 16, 16, heads=4)
        block_mask = flex_block_mask(bm, mask.mask_fn(64, 64))
        computed = block_mask.to_dense()[0, 0].bool()
        assert torch.equal(computed, bm.dense_states() != M.EMPTY)
        assert torch.equal(block_mask.full_kv_num_blocks[0, 0].long(), bm.kv_full.sum(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "called without torch.compile"
        out = flex.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    ref = reference_attention(q, k, v, mask=M.dense(mask.to_dense(64, 64, heads=4)), scale=0.25)
    assert rel_err(out, ref) <= TOL


# --- registry and errors --------------------------------------------------------------------------


def test_registered_with_memory_and_never_auto():
    infos = {m.name: m for m in attnmem.methods()}
    for name in SPARSE:
        assert infos[name].family == "sparse" and infos[name].exact
        assert "N·" in infos[name].memory
        assert name not in registry.AUTO_PRIORITY


@pytest.mark.parametrize("method,opts,match", [
    ("sliding_window", dict(window=-1), "window"),
    ("sliding_window", dict(window=(3, -2)), "window"),
    ("sliding_window", dict(window=(1, 2, 3)), "window"),
    ("dilated", dict(dilation=0), "dilation"),
    ("dilated", dict(dilation=(1, 0)), "dilation"),
    ("longformer", dict(global_tokens=(-1,)), "non-negative"),
    ("bigbird", dict(block=64, q_tile=96), "multiple of block"),
    ("bigbird", dict(window_blocks=2), "odd"),
    ("bigbird", dict(block=0), "block"),
    ("strided", dict(stride=0), "stride"),
    ("strided", dict(pattern="fixed", stride=4, summary=5), "summary"),
    ("strided", dict(pattern="axial"), "pattern"),
])
def test_invalid_options(method, opts, match):
    q, k, v = rand_qkv(1, 2, 2, 16, 16, 8)
    with pytest.raises(ValueError, match=match):
        attnmem.attention(q, k, v, method=method, **opts)


def test_errors_depending_on_inputs():
    q, k, v = rand_qkv(1, 2, 2, 16, 16, 8)
    with pytest.raises(ValueError, match="per-head dilations"):
        attnmem.attention(q, k, v, method="dilated", dilation=(1, 2, 3))
    with pytest.raises(ValueError, match="outside the sequences"):
        attnmem.attention(q, k, v, method="longformer", global_tokens=(0, 16))
    with pytest.raises(ValueError, match="dilated: dilation"):
        M.dilated(3, 0)
    with pytest.raises(ValueError, match="window"):
        M.dilated(-3)


@pytest.mark.parametrize("nq,nk,causal,stride,hkv", [
    (64, 64, False, 8, 4), (64, 64, True, 8, 4), (61, 61, True, 5, 4), (37, 70, False, 6, 4),
    (70, 37, False, 6, 4), (50, 50, False, 7, 2), (9, 9, True, 16, 4), (40, 40, True, 1, 4),
])
def test_strided_residue_class_split_matches_reference(monkeypatch, nq, nk, causal, stride, hkv):
    # The fused-kernel path splits the pattern into the band without its centre plus one dense
    # (or causal) call per residue class; check it is taken and exact, gradients included.
    from attnmem.mechanisms import sparse

    taken = []
    real = sparse._StridedSplit.apply
    monkeypatch.setattr(sparse._StridedSplit, "apply", lambda *a: taken.append(1) or real(*a))
    q = torch.randn(2, 4, nq, 16, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, hkv, nk, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert_matches_pattern("strided", q, k, v, causal=causal, stride=stride, q_tile=16, kv_tile=16)
    assert taken == [1]
