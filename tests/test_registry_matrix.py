"""Checks generated from the registry: every registered method, approximate ones included.

For each method (with its ``check_options``), each shape (odd sizes: N = 37, D = 24, GQA and
MQA, Nq != Nk) and each call (no mask, causal, causal with a user mask), the case is decided
at collection time by the method's own ``not_supported_reasons``:

- a case it can run goes to ``test_runs``: forward and backward in float64, output and every
  gradient (q, k, v, and a stateful module's parameters) against the method's ``definition``
  (exact methods: the float64 reference under their own mask; approximate ones: their
  written-out formula beside the method), within ``definition_tolerance``;
- a case it cannot run goes to ``test_refuses``: the call must raise ValueError quoting every
  reason. A refusal is a test of the refusal only, never a pass of the computation.

Stateful methods run through their module form (``Method.build_module``, what
``attnmem.nn.MultiHeadAttention`` holds), checked against ``Method.module_definition``.
A method with no written-out definition is named in ``NO_DEFINITION`` (checked both ways), and
its cases check that forward and backward run and give finite values of the right shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

import attnmem
from attnmem import masks as M
from attnmem import registry

from .conftest import rand_qkv, rel_err

# Memory-augmented methods whose definitions live in tests/mechanisms/test_memory.py (written
# per query, with the segment loop), not yet beside the method.
NO_DEFINITION = {"recurrent_memory", "knn_memory"}

SHAPES = {  # name: (B, Hq, Hkv, Nq, Nk, D)
    "mha-37": (1, 3, 3, 37, 37, 24),
    "gqa-37": (2, 4, 2, 37, 37, 24),
    "mqa-29x37": (1, 3, 1, 29, 37, 24),
}
CALLS = {  # name: (causal, user mask)
    "plain": (False, None),
    "causal": (True, None),
    "causal+window": (True, M.sliding_window(11, 3)),
}


@dataclass(frozen=True)
class Case:
    method: str
    shape: str
    call: str
    options: dict[str, Any]

    def inputs(self, grad: bool = True):
        B, Hq, Hkv, Nq, Nk, D = SHAPES[self.shape]
        return rand_qkv(B, Hq, Hkv, Nq, Nk, D, grad=grad, seed=Nq + 7 * Hq)

    def validate(self, q, k, v):
        causal, mask = CALLS[self.call]
        return attnmem.validate(q, k, v, causal=causal, mask=mask)


def _reasons(case: Case) -> list[str]:
    m = registry.get(case.method)
    inp = case.validate(*case.inputs())
    return m.not_supported_reasons(inp, m.make_options(case.options))


def generate() -> tuple[list, list]:
    """(runnable cases, refused cases) of every registered method, as pytest params."""
    runs, refusals = [], []
    for name in registry.names():
        m = registry.get(name)
        for shape in SHAPES:
            for call in CALLS:
                case = Case(name, shape, call, dict(m.check_options))
                param = pytest.param(case, id=f"{name}-{shape}-{call}")
                (refusals if _reasons(case) else runs).append(param)
    return runs, refusals


RUNS, REFUSALS = generate()


def _run(case: Case, q, k, v):
    """The method's output on the case and the tensors its gradients are taken for; with its
    definition (None when it has none)."""
    m = registry.get(case.method)
    opts = m.make_options(case.options)
    causal, mask = CALLS[case.call]
    inp = case.validate(q, k, v)
    if m.stateful:
        module = m.build_module(heads=q.shape[1], kv_heads=k.shape[1], head_dim=q.shape[3], opts=opts).double()
        out = module(q, k, v, causal=causal, mask=mask)
        return out, [q, k, v, *module.parameters()], m.module_definition(module, inp, opts)
    out = attnmem.attention(q, k, v, method=case.method, causal=causal, mask=mask, **case.options)
    return out, [q, k, v], m.definition(inp, opts)


@pytest.mark.parametrize("case", RUNS)
def test_runs(case: Case):
    q, k, v = case.inputs()
    m = registry.get(case.method)
    out, wrt, want = _run(case, q, k, v)
    assert out.shape == q.shape[:3] + (v.shape[-1],) and out.dtype == q.dtype
    assert torch.isfinite(out).all(), "output has NaN/inf"
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, wrt, g, allow_unused=True)
    for i, grad in enumerate(got):
        assert grad is None or torch.isfinite(grad).all(), f"gradient {i} has NaN/inf"
    assert any(grad is not None and grad.abs().sum() > 0 for grad in got[:3]), "no gradient reaches q, k or v"
    if want is None:
        assert case.method in NO_DEFINITION or (case.method == "hard" and case.options.get("mode") == "stochastic")
        return
    tol = m.definition_tolerance
    assert rel_err(out, want) <= tol, f"output: rel err {rel_err(out, want):.3g} against the definition"
    expected = torch.autograd.grad(want, wrt, g, allow_unused=True)
    for i, (a, b) in enumerate(zip(got, expected)):
        a = torch.zeros_like(wrt[i]) if a is None else a
        b = torch.zeros_like(wrt[i]) if b is None else b
        # Against norm 1 where the expected gradient vanishes (hard attention's dq, dk).
        err = (a - b).norm().item() / max(b.norm().item(), 1.0)
        assert err <= tol, f"gradient {i}: rel err {err:.3g} against the definition"


@pytest.mark.parametrize("case", REFUSALS)
def test_refuses(case: Case):
    q, k, v = case.inputs()
    m = registry.get(case.method)
    reasons = _reasons(case)
    with pytest.raises(ValueError) as err:
        _run(case, q, k, v)
    assert "cannot run" in str(err.value) or m.stateful, str(err.value)
    if not m.stateful:  # the functional path quotes every reason
        for reason in reasons:
            assert reason in str(err.value)


def test_every_method_is_generated_and_runs_somewhere():
    """Each registered method has cases, and at least one it actually runs: a method refusing
    every case would otherwise pass this matrix on refusals alone."""
    ran = {p.values[0].method for p in RUNS}
    listed = {p.values[0].method for p in RUNS + REFUSALS}
    assert listed == set(registry.names())
    assert ran == set(registry.names()), f"never run: {sorted(set(registry.names()) - ran)}"


def test_definitions_are_written_for_all_but_the_listed():
    """``NO_DEFINITION`` is exact: a method gaining a definition must leave the list."""
    missing = set()
    for name in registry.names():
        case = next(p.values[0] for p in RUNS if p.values[0].method == name)
        q, k, v = case.inputs(grad=False)
        _, _, want = _run(case, q, k, v)
        if want is None:
            missing.add(name)
    assert missing == NO_DEFINITION
