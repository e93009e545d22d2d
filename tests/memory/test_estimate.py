"""attnmem.estimate predicts what attnmem.measure measures, for every registered method.

Expected values come from real runs (``attnmem.measure`` on CPU tensors of the same shape) or,
for the closed forms, from the fake-tensor trace of the same call.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import attnmem
from attnmem import masks as M
from attnmem import registry
from attnmem.api import validate
from attnmem.kernels import native_gqa
from attnmem.memory.estimate import estimate, resolve_dtype

SIZES = (192, 384, 640)  # awkward lengths: one to three query tiles of chunked's default 256
B, H, D = 1, 4, 32


def _call_config(method):
    """(causal, training) every method can run: causal where supported, backward where it has one."""
    return method.caps.causal, method.caps.backward


def _measured(method, n, causal, training):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=g).requires_grad_(training) for _ in range(3))
    module = None
    if method.stateful:
        # Built as estimate builds it for this length (linformer: max_len = N).
        opts = method.make_options(method.options_for_length({}, n))
        module = method.build_module(heads=H, kv_heads=H, head_dim=D, opts=opts)

    def call(q, k, v):
        if module is not None:
            return module(q, k, v, causal=causal, mask=None)
        return attnmem.attention(q, k, v, method=method.name, causal=causal)

    def run(q, k, v):
        if not training:
            with torch.no_grad():
                call(q, k, v)
            return
        out = call(q, k, v)
        out.sum().backward()

    return attnmem.measure(run, q, k, v, repeats=0, warmup=0).peak_bytes


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", registry.names())
def test_estimate_within_5_percent_of_measure(name, n):
    method = registry.get(name)
    causal, training = _call_config(method)
    est = estimate(name, batch=B, heads=H, seq_len=n, head_dim=D, causal=causal, training=training,
                   how="trace")
    real = _measured(method, n, causal, training)
    assert abs(est.peak_bytes - real) <= 0.05 * real, f"estimate {est.peak_bytes} vs measured {real}"
    assert est.peak_bytes == est.inputs_bytes + est.saved_bytes + est.transient_bytes
    assert est.inputs_bytes == 3 * B * H * n * D * 4  # q, k, v in float32
    assert est.saved_bytes >= 0 and est.transient_bytes >= 0


FORMULA_CASES = [
    dict(seq_len=640, causal=True),
    dict(seq_len=1024, causal=True, kv_heads=2),
    dict(seq_len=640, causal=False),
    dict(seq_len=768, causal=True, training=False),
    dict(seq_len=512, causal=True, dtype=torch.float64),
]


def _refusals(method, case) -> list[str]:
    """The method's own reasons against this call (what estimate must refuse it with)."""
    n, kv = case["seq_len"], case.get("kv_heads", 8)
    dt = resolve_dtype(case.get("dtype", torch.float32))
    one = torch.empty((), dtype=dt)
    q, k, v = (one.expand(1, h, n, 64) for h in (8, kv, kv))
    inp = validate(q, k, v, causal=case["causal"])
    opts = method.make_options(method.options_for_length({}, n))
    return method.not_supported_reasons(inp, opts)


@pytest.mark.parametrize("case", FORMULA_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("name", registry.names())
def test_closed_form_agrees_with_trace(name, case):
    # Every registered method: a call it cannot run is refused with its own reasons; inside its
    # memory model's declared domain the closed form is within 5 % of the trace; outside it
    # "formula" is refused naming why, and "auto" traces.
    method = registry.get(name)
    kw = dict(batch=1, heads=8, head_dim=64, **case)
    reasons = [r for r in _refusals(method, case)
               if not (case.get("training", True) and r.startswith("has no backward"))]
    if reasons:
        with pytest.raises(ValueError, match="cannot run these inputs") as err:
            estimate(name, how="trace", **kw)
        assert all(r in str(err.value) for r in reasons), (reasons, err.value)
        return  # a call the method cannot run: its refusal above is what this case checks
    traced = estimate(name, how="trace", **kw)
    assert traced.source == "trace"
    s = traced.shape
    outside = method.memory_domain_reasons(s, method.make_options(traced.options))
    if outside:
        with pytest.raises(ValueError, match="no closed-form estimate") as err:
            estimate(name, how="formula", **kw)
        assert outside[0] in str(err.value)
        return  # outside the declared domain: the refusal above is the check (auto traces it)
    closed = estimate(name, how="formula", **kw)
    assert closed.source == "formula"
    assert abs(closed.peak_bytes - traced.peak_bytes) <= 0.05 * traced.peak_bytes, (closed, traced)


def test_formula_is_used_where_tracing_would_be_slow():
    # chunked with a causal mask and GQA loops over O((N/256)²/2) tiles in Python; at N = 2**20
    # the closed form answers instead, and it is linear in N.
    kw = dict(batch=1, heads=8, kv_heads=2, head_dim=64, causal=True)
    big = estimate("chunked", seq_len=2**20, **kw)
    half = estimate("chunked", seq_len=2**19, **kw)
    assert big.source == "formula"
    assert 1.9 < big.peak_bytes / half.peak_bytes < 2.1
    floor = (3 * 8 + 4 * 2) * 2**20 * 64 * 4  # q, out, dq (8 heads); k, v, dk, dv (2 heads)
    if native_gqa():
        # One fused call over every head (not bounded by the per-KV-head loop's gate): as SDPA,
        # its backward also holds a whole dO.
        floor += 8 * 2**20 * 64 * 4
    assert floor <= big.peak_bytes <= 1.2 * floor


def test_trace_allocates_nothing_at_a_million_tokens():
    # A real reference call at N = 2**20 would need 2**40 floats per head; the trace does not.
    est = estimate("reference", batch=1, heads=1, seq_len=2**20, head_dim=64, how="trace")
    assert est.source == "trace"
    assert est.peak_bytes > 2 * 2**40 * 4  # at least S and dS of one head's N×N scores
    closed = estimate("reference", batch=1, heads=1, seq_len=2**20, head_dim=64, how="formula")
    assert abs(est.peak_bytes - closed.peak_bytes) <= 64  # the formula leaves out the scalar loss


def test_auto_method_resolves_like_attention():
    est = estimate("auto", batch=1, heads=2, seq_len=64, head_dim=16)
    assert est.method == "sdpa"


def test_forward_only_has_nothing_saved():
    est = estimate("chunked", batch=1, heads=2, seq_len=300, head_dim=16, causal=True, training=False)
    assert est.saved_bytes == 0 and est.peak_bytes > est.inputs_bytes


@pytest.mark.parametrize("kwargs, match", [
    (dict(heads=6, kv_heads=4), "not divisible by kv_heads"),
    (dict(seq_len=-3), "seq_len must be an int >= 1, got -3"),
    (dict(batch=0), "batch must be"),
    (dict(dtype="float8"), "dtype must be"),
    (dict(how="guess"), "how must be one of"),
    (dict(method="nope"), "unknown method 'nope'"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    kw = dict(method="chunked", batch=1, heads=4, seq_len=64, head_dim=16)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        estimate(kw.pop("method"), **kw)


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="unknown option"):
        estimate("chunked", batch=1, heads=2, seq_len=64, head_dim=16, window=3)


def test_untraceable_method_without_formula_says_so(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class Peeker(registry.Method):
        name = "peeker"
        family = "test"

        def forward(self, inp, opts):
            if float(inp.q.detach().sum()) > 0:  # looks at the data: fake tensors have none
                return inp.q * 1
            return inp.q * 2

    monkeypatch.setitem(registry._REGISTRY, "peeker", Peeker())
    with pytest.raises(ValueError, match="no estimate for method 'peeker'.*no closed form for these options"):
        estimate("peeker", batch=1, heads=2, seq_len=64, head_dim=16)


@pytest.mark.parametrize("spec", ["window:64", "document:100"])
def test_structured_masks_trace_like_they_measure(spec):
    # Block maps and per-document ids are index tensors that stay real under the trace.
    from attnmem.bench.cases import Case, case_fn, make_inputs, parse_mask

    case = Case("chunked", 384, heads=2, head_dim=16, mask=spec)
    causal, mask = parse_mask(spec, 384)
    real = attnmem.measure(case_fn(case), *make_inputs(case), repeats=0, warmup=0).peak_bytes
    est = estimate("chunked", batch=1, heads=2, seq_len=384, head_dim=16, causal=causal, mask=mask, how="trace")
    assert est.source == "trace"
    assert abs(est.peak_bytes - real) <= 0.05 * real, (est.peak_bytes, real)


@pytest.mark.parametrize("case", [
    dict(causal=True), dict(causal=False, kv_heads=1), dict(causal=True, kv_heads=2, dtype=torch.float16),
    dict(causal=True, q_tile=64, kv_tile=32, dtype=torch.bfloat16), dict(causal=True, seq_len=250, training=False),
], ids=str)
def test_plain_kernel_closed_form_equals_trace(case):
    # The plain-PyTorch tile kernel (kernel="torch", and float16 under "auto"): one key tile per
    # call, its float32 copies and score tiles read off kernels/tile.py (``torch_tile_bytes``).
    kw = {**dict(batch=1, heads=2, seq_len=256, head_dim=16, kernel="torch", q_tile=64, kv_tile=64), **case}
    traced = estimate("chunked", how="trace", **kw)
    closed = estimate("chunked", **kw)
    assert closed.source == "formula"
    assert closed.saved_bytes == traced.saved_bytes
    assert abs(closed.peak_bytes - traced.peak_bytes) <= 16, (closed, traced)  # to the scalar loss


def test_plain_kernel_with_a_user_mask_is_traced():
    kw = dict(batch=1, heads=2, seq_len=256, head_dim=16, kernel="torch", mask=M.sliding_window(8))
    assert estimate("chunked", **kw).source == "trace"
    with pytest.raises(ValueError, match="no closed-form estimate for these options"):
        estimate("chunked", how="formula", **kw)


@pytest.mark.parametrize("name, opts", [
    ("hard", dict(mode="stochastic", seed=1)),  # seeded Gumbel noise: a generator on fake tensors
    ("adaptive_span", dict(init_span=40.0, ramp=8)),  # band width read from the learned span
])
def test_traced_options_match_measure(name, opts):
    method = registry.get(name)
    n, causal = 320, True
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g).requires_grad_(True) for _ in range(3))
    if method.stateful:
        module = method.build_module(heads=2, kv_heads=2, head_dim=16, opts=method.make_options(opts))
        call = lambda q, k, v: module(q, k, v, causal=causal)  # noqa: E731
    else:
        call = lambda q, k, v: attnmem.attention(q, k, v, method=name, causal=causal, **opts)  # noqa: E731
    real = attnmem.measure(lambda q, k, v: call(q, k, v).sum().backward(), q, k, v, repeats=0, warmup=0).peak_bytes
    est = estimate(name, batch=1, heads=2, seq_len=n, head_dim=16, causal=causal, how="trace", **opts)
    assert est.source == "trace"
    assert abs(est.peak_bytes - real) <= 0.05 * real, (est.peak_bytes, real)


def test_factory_operators_are_probed_without_allocating():
    # 2**40 float32 elements is 4 TiB: a real allocation of it fails on any machine here, so
    # getting a fake tensor back shows the size probe ran on the meta device.
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from attnmem.memory.estimate import _SmallRealMode

    with _SmallRealMode(FakeTensorMode(allow_non_fake_inputs=True)):
        z = torch.zeros(2**40)
        f = torch.full((2**20, 2**20), 1.0)
    assert isinstance(z, FakeTensor) and isinstance(f, FakeTensor)
