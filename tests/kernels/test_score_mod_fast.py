"""The fast paths of the built-in score_mods, against the dense reference and the generic path.

ALiBi and a fixed T5 table run the fused CPU operator with a per-tile bias; softcap runs its own
tile kernel with the derivative written out. Each must agree with the written-out definition
(``dense_reference``) in float64 as the generic path does, and in float32 be within
FlashAttention's rule of the generic path's own error (both against float64).
"""

from __future__ import annotations

import math

import pytest
import torch

import attnmem
from attnmem import masks as M
from attnmem import scores as S
from attnmem.kernels import make_mods, plan_call
from attnmem.kernels.tile import NEGLIGIBLE, _drop_negligible_

from ..conftest import rand_qkv, rel_err
from .test_score_mod import allowed_of, check, dense_reference


def _fixed_table(heads=4, buckets=32):
    return torch.randn(buckets, heads, dtype=torch.float64, generator=torch.Generator().manual_seed(7))


BUILTINS = {
    "softcap": lambda: S.softcap(0.9),
    "alibi": lambda: S.alibi(4, offset=12),
    "relative": lambda: S.relative_bias(_fixed_table(), 32, 40, bidirectional=True),
}


@pytest.mark.parametrize("name", list(BUILTINS))
def test_builtins_take_their_fast_path(name):
    q, _, _ = rand_qkv(Hq=4, Nq=8, D=4, dtype=torch.float32)
    mods = make_mods(BUILTINS[name](), 0.0, None, q)
    want = "softcap" if name == "softcap" else "bias"
    assert mods.fast == want
    kw = dict(device="cpu", mask=M.causal(), batch=1, nq=64, nk=64, q_heads=4, kv_heads=4, head_dim=8)
    plan = plan_call("auto", dtype=torch.float32, mods=mods.fast, **kw)
    if name == "softcap":
        # the native kernel (one call over the causal window), else the torch-ops tiles
        assert plan.kernel == "softcap_native" and plan.single_call and plan.window == (None, 0, None)
        plan = plan_call("auto", dtype=torch.float32, mods=mods.fast, native=False, **kw)
        assert plan.kernel == "softcap" and not plan.single_call
        def kernel_under(mask):
            return plan_call("auto", dtype=torch.float32, mods=mods.fast, **{**kw, "mask": mask})

        window = kernel_under(M.sliding_window(8, 0))
        assert window.kernel == "softcap_native" and window.window == (8, 0, None)  # skips what it leaves out
        assert kernel_under(M.causal() & M.key_padding(torch.ones(1, 64, dtype=torch.bool))).kernel == "softcap_native"
        even = M.from_mod(lambda b, h, q_idx, kv_idx: kv_idx % 2 == 0, name="even keys")
        assert kernel_under(even).kernel == "softcap"
    else:
        assert plan.kernel == "fused" and not plan.single_call
    # An explicit kernel="torch" runs the generic path; bfloat16 never adds a rounded bias.
    assert plan_call("torch", dtype=torch.float32, mods=mods.fast, **kw).kernel == "torch"
    bf16 = plan_call("auto", dtype=torch.bfloat16, mods=mods.fast, **kw).kernel
    assert bf16 == ("softcap" if name == "softcap" else "torch")


def test_learned_parameters_or_dropout_take_the_generic_path():
    q, _, _ = rand_qkv(Hq=4, Nq=8, D=4)
    learned = S.alibi(S.alibi_slopes(4).double().requires_grad_())
    assert make_mods(learned, 0.0, None, q).fast == ""
    assert make_mods(S.softcap(3.0), 0.1, 0, q).fast == ""
    assert make_mods(lambda s, b, h, i, j: s * 2, 0.0, None, q).fast == ""


FAST_CASES = [
    ("chunked", {"q_tile": 16, "kv_tile": 16}, {"causal": True, "Nk": 52}),
    ("chunked", {"q_tile": 16, "kv_tile": 16}, {"causal": False, "Nk": 52, "Hkv": 1}),
    ("chunked", {}, {"causal": True, "Nk": 40}),
    ("sliding_window", {"window": (9, 3), "q_tile": 16, "kv_tile": 16}, {"causal": False, "Nk": 52}),
    ("longformer", {"window": 5, "global_tokens": (0, 17), "q_tile": 16, "kv_tile": 16}, {"causal": True, "Nk": 52}),
]


@pytest.mark.parametrize("name", list(BUILTINS))
@pytest.mark.parametrize(("method", "options", "shape"), FAST_CASES,
                         ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(FAST_CASES)])
def test_fast_paths_float64_against_the_definition(name, method, options, shape):
    """Outputs, lse and every gradient (sinks included) at 1e-10, GQA and Nq != Nk among them."""
    sinks = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_()
    check(method, options, Nq=40, score_mod=BUILTINS[name](), sinks=sinks,
          scale=1.0 if name == "relative" else None, **shape)


def _errors(score_mod, kernel, q, k, v, causal, tile=32):
    """The float32 call's output and gradient errors against the float64 definition."""
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = attnmem.attention(q32, k32, v32, method="chunked", causal=causal, score_mod=score_mod, kernel=kernel,
                            q_tile=tile, kv_tile=tile)
    allowed = allowed_of("chunked", {}, causal, q.shape[2], k.shape[2], 1, q.shape[1])
    ref, _ = dense_reference(q, k, v, allowed=allowed, score_mod=score_mod)
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, (q32, k32, v32), g.float())
    want = torch.autograd.grad(ref, (q, k, v), g)
    return [rel_err(out.double(), ref)] + [rel_err(a.double(), b) for a, b in zip(got, want)]


@pytest.mark.parametrize("name", ["softcap", "alibi_steep", "relative"])
def test_fast_paths_float32_within_twice_the_generic_error(name):
    """FlashAttention's rule against the generic path, with ALiBi slopes steep enough that the
    backward drops negligible pairs (``NEGLIGIBLE``)."""
    q, k, v = rand_qkv(Hq=4, Nq=96, Nk=96, D=16, seed=3)
    mod = S.alibi(torch.tensor([2.0, 1.0, 0.5, 0.25])) if name == "alibi_steep" else BUILTINS[name]()
    fast = _errors(mod, "auto", q, k, v, causal=True)
    generic = _errors(mod, "torch", q, k, v, causal=True)
    for what, a, b in zip(("out", "dq", "dk", "dv"), fast, generic):
        assert a <= 2 * b + 1e-7, f"{what}: fast {a:.3g} > 2 x generic {b:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dropped_pairs_are_provably_negligible(dtype):
    """Every pair the backward drops has P < exp(-NEGLIGIBLE), P from the dense definition."""
    q, k, v = rand_qkv(Hq=2, Nq=24, Nk=300, D=8, seed=4, grad=False)
    q = q * 3  # wide scores: the bound must hold for them too
    slopes = torch.tensor([0.9, 0.3], dtype=torch.float64)
    mod = S.alibi(slopes)
    _, lse = dense_reference(q, k, v, score_mod=mod)  # (1, 2, 24)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    qi, ki = torch.arange(24).view(1, 1, 24, 1), torch.arange(300).view(1, 1, 1, 300)
    bias = mod.additive_bias(torch.arange(2).view(1, 2, 1, 1), qi, ki, dtype)  # (1, 2, 24, 300)
    dropped = torch.isneginf(_drop_negligible_(bias.clone(), q.to(dtype), k.to(dtype), lse.to(dtype),
                                               1 / math.sqrt(8)))
    assert dropped.any() and not dropped.all()
    p = torch.exp(s + bias.double() - lse.unsqueeze(-1))  # (1, 2, 24, 300)
    assert p[dropped].max() < math.exp(-NEGLIGIBLE[dtype])


def test_sliding_window_with_alibi_skips_tiles_outside():
    """The bias path runs only the block map's tiles: count the fused calls per pass."""
    q, k, v = rand_qkv(Hq=2, Nq=256, D=8, dtype=torch.float32)
    calls = []
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    class Count(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is op:
                calls.append(args[2].shape[2])  # keys per call
            return func(*args, **(kwargs or {}))

    with Count():
        attnmem.attention(q, k, v, method="sliding_window", window=(32, 0), score_mod=S.alibi(2), q_tile=32,
                          kv_tile=32)
    # 8 query tiles, each its diagonal tile plus at most one tile of the window behind it.
    assert 8 <= len(calls) <= 16 and max(calls) <= 64, calls


@pytest.mark.parametrize(("q_first", "q_last", "keys", "side"), [
    (40, 47, [0, 1, 5, 30, 40], "before"),   # gathered keys, the last one on row 40's diagonal
    (10, 17, [17, 20, 63], "after"),
    (10, 17, [5, 15], None),                  # straddles row 10..17's diagonals
])
@pytest.mark.parametrize("offset", [0, 3])
def test_alibi_row_bias_is_the_bias(q_first, q_last, keys, side, offset):
    """``row - shift`` is exactly the dense ALiBi bias on the block; None when keys straddle."""
    mod = S.alibi(torch.tensor([0.5, 0.0625, 3.0]), offset=offset)
    keys = torch.tensor(keys) + (offset if side is not None else 0)
    h = torch.arange(3).view(1, 3, 1, 1)
    kv = keys.view(1, 1, 1, -1)
    got = mod.row_bias(h, q_first, q_last, kv, int(keys.min()), int(keys.max()), torch.float64)
    if side is None:
        assert got is None
        return
    row, shift = got  # (1, 3, 1, Tk), (1, 3, Tq)
    assert row.max() <= 0 and shift.min() >= 0
    qi = torch.arange(q_first, q_last + 1).view(1, 1, -1, 1)
    want = mod.additive_bias(h, qi, kv, torch.float64)  # (1, 3, Tq, Tk)
    torch.testing.assert_close(row - shift.unsqueeze(-1), want, rtol=0, atol=0)


def _count_row_calls(monkeypatch):
    from attnmem.kernels import tile

    calls = {"forward": 0, "backward": 0}
    for name in calls:
        inner = getattr(tile, f"_row_bias_{name}")

        def counted(*args, _inner=inner, _name=name):
            calls[_name] += 1
            return _inner(*args)

        monkeypatch.setattr(tile, f"_row_bias_{name}", counted)
    return calls


@pytest.mark.parametrize(("nq", "nk", "causal", "offset"),
                         [(700, 700, True, 0), (40, 300, True, 260), (40, 2100, False, 0)])
def test_alibi_row_path_float64_against_the_definition(monkeypatch, nq, nk, causal, offset):
    """Query tiles of 512 see whole key blocks before (and, unmasked past 2048 keys, after) their diagonal:
    those take the row bias in both passes; output and gradients at 1e-10."""
    calls = _count_row_calls(monkeypatch)
    q, k, v = rand_qkv(Hq=4, Nq=nq, Nk=nk, D=8, seed=6)
    mod = S.alibi(torch.tensor([2.0, 0.5, 1 / 16, 1 / 256]), offset=offset)
    out = attnmem.attention(q, k, v, method="chunked", causal=causal, score_mod=mod)
    ref, _ = dense_reference(q, k, v, allowed=allowed_of("chunked", {}, causal, nq, nk, 1, 4), score_mod=mod)
    assert rel_err(out, ref) <= 1e-10
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for got, want in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert rel_err(got, want) <= 1e-10
    assert calls["forward"] and calls["backward"]


def test_alibi_row_path_float32_within_twice_the_generic_error(monkeypatch):
    """FlashAttention's rule on the row path, with slopes steep enough (2 … 1/256) that far rows
    of a tile would sit at exp(-slope·distance) and the backward drops negligible pairs."""
    calls = _count_row_calls(monkeypatch)
    q, k, v = rand_qkv(Hq=4, Nq=600, Nk=600, D=16, seed=3)
    mod = S.alibi(torch.tensor([2.0, 0.5, 1 / 16, 1 / 256]))
    fast = _errors(mod, "auto", q, k, v, causal=True)
    assert calls["forward"] and calls["backward"]
    generic = _errors(mod, "torch", q, k, v, causal=True, tile=200)
    for what, a, b in zip(("out", "dq", "dk", "dv"), fast, generic):
        assert a <= 2 * b + 1e-7, f"{what}: fast {a:.3g} > 2 x generic {b:.3g}"


def _spy_reach(monkeypatch):
    """Records, per call, the head groups ``reach_groups`` formed: [(first, stop, reach, keys)],
    keys = the keys the group's forward plan computes; None where nothing was skipped."""
    from attnmem.kernels import tiled

    seen = []
    inner = tiled.reach_groups

    def spy(c, q, k):
        groups = inner(c, q, k)
        seen.append(None if groups is None else [
            (hs.start, hs.stop, g.reach and g.reach[0],
             sum(s.size * (qb - qa) for qa, qb, segs in g.plan for s in segs))
            for hs, g in groups])
        return groups

    monkeypatch.setattr(tiled, "reach_groups", spy)
    return seen


STEEP = torch.tensor([8.0, 2.0, 1 / 16, 1 / 256])


@pytest.mark.parametrize(("nq", "nk", "causal", "offset"),
                         [(1300, 1300, True, 0), (300, 1500, True, 1200), (600, 1800, False, 600)])
def test_alibi_skips_key_tiles_beyond_reach_float64(monkeypatch, nq, nk, causal, offset):
    """Steep heads skip the key tiles their bias makes negligible (below exp(-200) of the row's
    sum in float64), before the diagonal and, unmasked, after it: output and every gradient
    still equal the definition at 1e-10, and the steep heads compute fewer keys than the flat."""
    seen = _spy_reach(monkeypatch)
    q, k, v = rand_qkv(Hq=4, Nq=nq, Nk=nk, D=8, seed=8)
    mod = S.alibi(STEEP, offset=offset)
    out = attnmem.attention(q, k, v, method="chunked", causal=causal, score_mod=mod, kv_tile=64)
    ref, _ = dense_reference(q, k, v, allowed=allowed_of("chunked", {}, causal, nq, nk, 1, 4), score_mod=mod)
    assert rel_err(out, ref) <= 1e-10
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for got, want in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert rel_err(got, want) <= 1e-10
    groups = seen[-1]
    assert groups is not None, "no tile was skipped"
    reaches = {first: reach for first, _, reach, _ in groups}
    assert reaches[0] is not None and reaches[0] < reaches[1] and reaches[2] is None
    keys = {first: n for first, _, _, n in groups}
    assert keys[0] < keys[1] < keys[2]


def test_alibi_reach_follows_the_norms(monkeypatch):
    """Larger scores need more keys: with q, k scaled up the reach grows, down to no skipping."""
    seen = _spy_reach(monkeypatch)
    q, k, v = rand_qkv(Hq=4, Nq=1300, D=8, seed=8, grad=False)
    mod = S.alibi(STEEP)
    reach = []
    for factor in (1.0, 3.0, 30.0):
        attnmem.attention(q * factor, k * factor, v, method="chunked", causal=True, score_mod=mod, kv_tile=64)
        reach.append(None if seen[-1] is None else seen[-1][0][2])
    assert reach[0] < reach[1] and reach[2] is None, reach


@pytest.mark.parametrize("case", ["gqa", "offset", "half"])
def test_alibi_reach_needs_a_centre_every_row_sees(monkeypatch, case):
    """No skipping where the bound does not hold or the path differs: GQA (no row-bias tiles), a
    causal offset other than the mask's (the zero-bias key may be masked), half precision."""
    seen = _spy_reach(monkeypatch)
    Hkv = 2 if case == "gqa" else 4
    dtype = torch.bfloat16 if case == "half" else torch.float64
    q, k, v = rand_qkv(Hq=4, Hkv=Hkv, Nq=1300, D=8, seed=8, grad=False, dtype=dtype)
    mod = S.alibi(STEEP, offset=5 if case == "offset" else 0)
    attnmem.attention(q, k, v, method="chunked", causal=True, score_mod=mod)
    assert all(g is None for g in seen)


def test_alibi_reach_lowers_the_peak_never_raises_it(monkeypatch):
    """The estimate (no values, so whole rows) bounds the measured peak of a call that skips."""
    seen = _spy_reach(monkeypatch)
    q, k, v = rand_qkv(Hq=4, Nq=1300, D=16, seed=9, dtype=torch.float32)
    mod = S.alibi(STEEP)

    def step(q, k, v):
        attnmem.attention(q, k, v, method="chunked", causal=True, score_mod=mod).sum().backward()

    measured = attnmem.measure(step, q, k, v, repeats=0, warmup=0).peak_bytes
    assert any(g is not None for g in seen)
    est = attnmem.estimate("chunked", batch=1, heads=4, seq_len=1300, head_dim=16, causal=True, score_mod=mod,
                           how="trace")
    assert measured <= est.peak_bytes


def test_alibi_reach_with_lse_gradient_and_sinks_float64(monkeypatch):
    """A gradient on the returned lse replaces rowsum(dO ∘ O) in the backward, which the head
    groups then run on the generic kernel, still reading each group's own slopes: output, lse
    and every gradient (the sinks' included) equal the definition at 1e-10 with tiles skipped."""
    seen = _spy_reach(monkeypatch)
    q, k, v = rand_qkv(Hq=4, Nq=1300, D=8, seed=8)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64, requires_grad=True)
    mod = S.alibi(STEEP)
    out, lse = attnmem.attention(q, k, v, method="chunked", causal=True, score_mod=mod, sinks=sinks, kv_tile=64,
                                 return_lse=True)
    assert seen[-1] is not None, "no tile was skipped"
    ref, ref_lse = dense_reference(q, k, v, allowed=allowed_of("chunked", {}, True, 1300, 1300, 1, 4),
                                   score_mod=mod, sinks=sinks)
    assert rel_err(out, ref) <= 1e-10 and rel_err(lse, ref_lse) <= 1e-10
    gen = torch.Generator().manual_seed(3)
    g, gl = torch.randn(out.shape, dtype=torch.float64, generator=gen), torch.randn(lse.shape, dtype=torch.float64,
                                                                                    generator=gen)
    got = torch.autograd.grad((out * g).sum() + (lse * gl).sum(), (q, k, v, sinks))
    want = torch.autograd.grad((ref * g).sum() + (ref_lse * gl).sum(), (q, k, v, sinks))
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-10


# --- softcap's fixed reference: rows whose terms underflow run again with their row max ------

def _spy_softcap_max(monkeypatch):
    import attnmem.kernels.tile as tile

    calls = []
    real = tile._softcap_forward_max

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(tile, "_softcap_forward_max", spy)
    return calls


def _far_below_cap(dtype, cap, depth):
    """q, k, v whose query 5 scores every key at about -depth·cap (the rest standard normal)."""
    q, k, v = rand_qkv(Hq=2, Hkv=2, Nq=40, Nk=40, D=8, seed=11, grad=False)
    k = k * 0.2 + torch.tensor([1.0] + [0.0] * 7, dtype=k.dtype)  # every key near e0
    q = q.clone()
    q[:, :, 5] = 0.0
    q[:, :, 5, 0] = -depth * cap * math.sqrt(8)  # score = -depth·cap·(k·e0) ≈ -depth·cap
    return (t.to(dtype).requires_grad_() for t in (q, k, v))


@pytest.mark.parametrize("native", [False, True], ids=["torch-ops", "native"])
@pytest.mark.parametrize("dtype,cap", [(torch.float64, 400.0), (torch.float32, 60.0)])
def test_softcap_underflowing_rows_run_with_their_max(monkeypatch, dtype, cap, native):
    """2·cap past the exp's normal range (float64 700, float32 80) and a row scored far below
    -cap: the torch-ops kernel's fixed reference underflows there, so that tile runs again with
    its row max (the native kernel always keeps a running row max); the result still meets the
    definition (float64 1e-10) or the generic path's error (float32)."""
    if not native:
        monkeypatch.setattr("attnmem.kernels.native.available", lambda: False)
    calls = _spy_softcap_max(monkeypatch)
    q, k, v = _far_below_cap(dtype, cap, depth=3.0)
    mod = S.softcap(cap)
    if dtype == torch.float64:
        out, lse = attnmem.attention(q, k, v, method="chunked", causal=True, score_mod=mod, return_lse=True,
                                     q_tile=16, kv_tile=16)
        ref, ref_lse = dense_reference(q, k, v, allowed=allowed_of("chunked", {}, True, 40, 40, 1, 2),
                                       score_mod=mod)
        assert rel_err(out, ref) <= 1e-10 and (lse - ref_lse).abs().max() <= 1e-10
        g = torch.randn_like(out)
        got = torch.autograd.grad((out * g).sum(), (q, k, v))
        for a, b in zip(got, torch.autograd.grad((ref * g).sum(), (q, k, v))):
            assert rel_err(a, b) <= 1e-10
    else:
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        fast = _errors(mod, "auto", q64, k64, v64, causal=True, tile=16)
        generic = _errors(mod, "torch", q64, k64, v64, causal=True, tile=16)
        for what, a, b in zip(("out", "dq", "dk", "dv"), fast, generic):
            assert a <= 2 * b + 1e-7, f"{what}: fast {a:.3g} > 2 x generic {b:.3g}"
    if native:
        assert not calls, "the native kernel ran the torch-ops tiles"
    else:
        assert calls, "the row far below the cap did not run with its row max"


def test_softcap_typical_rows_keep_the_fixed_reference(monkeypatch, torch_ops_softcap):
    """Gemma 2's cap (50) on standard normal inputs, causal: no tile runs twice. A row with no
    key allowed sums to exactly 0 and is not taken for an underflow: it stays empty (lse -inf)."""
    from types import SimpleNamespace

    import attnmem.kernels.tile as tile

    calls = _spy_softcap_max(monkeypatch)
    q, k, v = rand_qkv(Hq=2, Hkv=2, Nq=64, Nk=64, D=8, seed=12, dtype=torch.float32)
    attnmem.attention(q, k, v, method="chunked", causal=True, score_mod=S.softcap(50.0), q_tile=16, kv_tile=16)
    assert calls == []
    allowed = torch.ones(64, 64, dtype=torch.bool).tril()
    allowed[7] = False  # row 7 sees no key in this tile
    tm = SimpleNamespace(mods=SimpleNamespace(score_mod=S.softcap(50.0)))
    out, lse = tile.softcap_forward(q.detach(), k.detach(), v.detach(), allowed, 8 ** -0.5, tm)
    assert calls == []
    assert torch.isneginf(lse[..., 7]).all() and (out[..., 7, :] == 0).all()
    assert torch.isfinite(lse[..., :7]).all() and torch.isfinite(lse[..., 8:]).all()
