"""The method registry: every attention method is a small object registered by name.

A method declares what it supports (``Capabilities``), its memory cost as a string, an options
dataclass, and answers ``not_supported_reasons(inputs)``. It also owns its memory model
(``memory_model`` inside ``memory_domain_reasons``' domain, asked by ``attnmem.estimate``), the
decode-cache kind that reproduces it (``decode_cache``) and its plot style (``style``).
``attnmem.attention`` validates the call once into an ``Inputs`` and dispatches by name, or, for
``method="auto"``, walks ``AUTO_PRIORITY`` and takes the first method with no reasons against it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .masks import Mask
from .memory.model import Footprint, Shape
from .reference import reference_attention


@dataclass(frozen=True)
class Inputs:
    """One validated attention call. Shapes: q (B, Hq, Nq, D); k, v (B, Hkv, Nk, D)."""

    q: Tensor
    k: Tensor
    v: Tensor
    causal: bool
    user_mask: Mask | None  # the mask the user gave, without causal
    mask: Mask | None  # the effective mask: causal and user_mask together
    scale: float
    # Second-wave options (``attnmem.attention`` documents them); defaults change nothing.
    score_mod: Callable | None = None
    sinks: Tensor | None = None  # (Hq,)
    dropout_p: float = 0.0
    dropout_seed: Any = None  # int | torch.Generator | None
    return_lse: bool = False

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def q_heads(self) -> int:
        return self.q.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def nq(self) -> int:
        return self.q.shape[2]

    @property
    def nk(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in (self.q, self.k, self.v))


@dataclass(frozen=True)
class Capabilities:
    causal: bool = True
    mask: bool = True
    backward: bool = True
    gqa: bool = True
    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    # Score modifications: a method honours each one it declares, and refuses the others.
    score_mod: bool = False
    sinks: bool = False
    dropout: bool = False
    return_lse: bool = False


@dataclass(frozen=True)
class Style:
    """A method's look in plots: ``colour`` (a matplotlib colour) and ``marker``."""

    colour: str
    marker: str


@dataclass(frozen=True)
class NoOptions:
    """This method takes no options."""


@dataclass(frozen=True)
class MethodInfo:
    """What ``attnmem.methods()`` returns for one method."""

    name: str
    family: str
    exact: bool
    supports: Capabilities
    memory: str
    summary: str
    options: tuple[str, ...]
    stateful: bool = False


class Method:
    """Base class of a registered attention method.

    Subclasses set the class attributes and implement ``forward(inputs, options)``; they add
    reasons in ``extra_reasons`` for what the capabilities cannot express.
    """

    name: str = ""
    family: str = ""
    exact: bool = True
    memory: str = ""
    summary: str = ""
    caps: Capabilities = Capabilities()
    Options: type = NoOptions
    # Methods with learned parameters or state are reachable only through attnmem.nn.
    stateful: bool = False
    # A method usable functionally that also has a module form with state of its own (e.g.
    # performer's random features and redraw()): attnmem.nn.MultiHeadAttention builds it.
    has_module: bool = False
    # True when the method always materialises an N×N tensor: never chosen by "auto".
    quadratic: bool = False
    # Options the registry-generated checks (tests/test_registry_matrix.py) run it with at
    # small N: small enough that an approximation differs from exact attention there.
    check_options: dict[str, Any] = {}
    # Relative error allowed against ``definition`` in float64 (rounding, or a documented
    # iteration that has not converged).
    definition_tolerance: float = 1e-10
    # The decode cache (attnmem.nn.cache kind) that reproduces this method one token at a time;
    # None: decoding falls back to the "full" KV cache.
    decode_cache: str | None = None
    # How reports and plots draw this method: a matplotlib colour and marker, distinct per method.
    style: Style = None  # type: ignore[assignment]  # set per method; a default is drawn at register

    def make_options(self, options: dict[str, Any]) -> Any:
        """Build this method's options dataclass; TypeError naming any unknown option."""
        names = {f.name for f in dataclasses.fields(self.Options)}
        unknown = sorted(set(options) - names)
        if unknown:
            valid = ", ".join(sorted(names)) or "none"
            raise TypeError(
                f"method {self.name!r} got unknown option(s) {', '.join(unknown)}; valid options: {valid}"
            )
        return self.Options(**options)

    def not_supported_reasons(self, inp: Inputs, opts: Any) -> list[str]:
        reasons = []
        c = self.caps
        if inp.causal and not c.causal:
            reasons.append("does not support causal=True")
        if inp.user_mask is not None and not c.mask:
            reasons.append("does not support masks")
        if inp.needs_grad and not c.backward:
            reasons.append("has no backward; call it under torch.no_grad()")
        if inp.q_heads != inp.kv_heads and not c.gqa:
            reasons.append(f"does not support GQA/MQA (Hq={inp.q_heads}, Hkv={inp.kv_heads})")
        if inp.q.device.type not in c.devices:
            reasons.append(f"does not run on {inp.q.device.type} (supports {', '.join(c.devices)})")
        if inp.q.dtype not in c.dtypes:
            reasons.append(f"does not support dtype {inp.q.dtype}")
        if inp.score_mod is not None and not c.score_mod:
            reasons.append("does not support score_mod")
        if inp.sinks is not None and not c.sinks:
            reasons.append("does not support sinks")
        if inp.dropout_p and not c.dropout:
            reasons.append("does not support dropout_p")
        if inp.return_lse and not c.return_lse:
            reasons.append("does not support return_lse")
        return reasons + self.extra_reasons(inp, opts)

    def extra_reasons(self, inp: Inputs, opts: Any) -> list[str]:
        return []

    def check_supported(self, inp: Inputs, opts: Any) -> None:
        """Raise ValueError listing every reason this method cannot run ``inp``."""
        reasons = self.not_supported_reasons(inp, opts)
        if reasons:
            raise ValueError(f"method {self.name!r} cannot run these inputs: {'; '.join(reasons)}")

    def quadratic_reason(self, inp: Inputs) -> str | None:
        """Why this call would build an N×N tensor, or None. "auto" skips such methods;
        asked for by name, they still run."""
        return "materialises the N×N score matrix" if self.quadratic else None

    def forward(self, inp: Inputs, opts: Any) -> Tensor:
        raise NotImplementedError

    def definition(self, inp: Inputs, opts: Any) -> Tensor | None:
        """What ``forward`` computes, written out densely (O(N²), meant for float64 at small N):
        the oracle of the registry-generated checks. Exact methods: the reference under their
        own mask. Approximate ones override it with their formula; None means none is written."""
        if not self.exact:
            return None
        return reference_attention(inp.q, inp.k, inp.v, mask=self.effective_mask(inp, opts), scale=inp.scale)

    def module_definition(self, module: torch.nn.Module, inp: Inputs, opts: Any) -> Tensor | None:
        """For stateful methods: what ``module`` (from ``build_module``) computes on ``inp``,
        written out densely from its parameters; None means none is written."""
        return None

    def effective_mask(self, inp: Inputs, opts: Any) -> Mask | None:
        """The mask an exact method is exact under: the call's, and its own pattern if any."""
        return inp.mask
    # --- memory model: what attnmem.estimate asks (attnmem.memory.model) ----------------------

    # Whether ``memory_model`` models score_mod, sinks and dropout (``Shape.mods``, ``Shape.sinks``,
    # naming in ``memory_domain_reasons`` the ones it does not); else estimate traces every such call.
    models_mods = False

    def memory_domain_reasons(self, shape: Shape, opts: Any) -> list[str]:
        """Why ``memory_model`` does not hold for this call; empty inside its declared domain
        (the dtypes, options and shapes its closed form was read off and checked for).
        Outside it, ``attnmem.estimate`` traces the call on fake tensors instead."""
        return ["has no closed-form memory model"]

    def memory_model(self, shape: Shape, opts: Any) -> Footprint:
        """Closed-form bytes of one call (forward, + ``out.sum().backward()`` when
        ``shape.training``) beyond its inputs; called only inside the declared domain."""
        raise NotImplementedError(f"method {self.name!r} has no closed-form memory model")

    def options_for_length(self, options: dict[str, Any], seq_len: int) -> dict[str, Any]:
        """The options a call of ``seq_len`` tokens is estimated and benchmarked with: a method
        whose module has a maximum length fills it in here when the user gives none."""
        return options

    def build_module(self, *, heads: int, kv_heads: int, head_dim: int, opts: Any) -> torch.nn.Module:
        """For stateful methods: the inner module ``attnmem.nn.MultiHeadAttention`` holds.

        Its ``forward(q, k, v, *, causal, mask)`` takes and returns the (B, H, N, D) layout.
        """
        raise NotImplementedError(f"method {self.name!r} has no module form")

    def info(self) -> MethodInfo:
        return MethodInfo(
            name=self.name,
            family=self.family,
            exact=self.exact,
            supports=self.caps,
            memory=self.memory,
            summary=self.summary,
            options=tuple(f.name for f in dataclasses.fields(self.Options)),
            stateful=self.stateful,
        )


_REGISTRY: dict[str, Method] = {}

# "auto" tries these in order; methods that are not listed are never chosen automatically.
AUTO_PRIORITY: list[str] = ["sdpa", "chunked"]


def register(method_cls: type[Method]) -> type[Method]:
    """Class decorator: instantiate and register a method under its name."""
    inst = method_cls()
    if not inst.name:
        raise ValueError(f"{method_cls.__name__} has no name")
    if inst.name in _REGISTRY:
        raise ValueError(f"method {inst.name!r} is already registered")
    if inst.style is None:
        inst.style = _unused_style()
    _REGISTRY[inst.name] = inst
    return method_cls


def unregister(name: str) -> Method:
    """Remove a registered method and return it; ValueError for an unknown name. For methods
    registered at test time (``registered`` below undoes its registration with it)."""
    method = get(name)
    del _REGISTRY[name]
    return method


@contextmanager
def registered(method_cls: type[Method]) -> Iterator[Method]:
    """Register ``method_cls`` for the duration of a ``with`` block; unregistered on exit."""
    register(method_cls)
    try:
        yield _REGISTRY[method_cls.name]
    finally:
        _REGISTRY.pop(method_cls.name, None)
# Colours (matplotlib's tab20) and markers for methods that do not choose a style.
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
            "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5")
_MARKERS = "osD^v<>pPX*hH+x"


def _unused_style() -> Style:
    """The first palette colour no registered method uses (then the first unused pairing)."""
    taken = {m.style for m in _REGISTRY.values()}
    colours = {st.colour for st in taken}
    for i, colour in enumerate(_PALETTE):
        if colour not in colours:
            return Style(colour, _MARKERS[i % len(_MARKERS)])
    for colour in _PALETTE:
        for marker in _MARKERS:
            if Style(colour, marker) not in taken:
                return Style(colour, marker)
    raise ValueError("no unused (colour, marker) pair left for a new method's style")


def get(name: str) -> Method:
    if not isinstance(name, str):
        raise TypeError(f"method must be a str, got {type(name).__name__}")
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(["auto", *sorted(_REGISTRY)])
        raise ValueError(f"unknown method {name!r}; known methods: {known}") from None


def names() -> list[str]:
    return list(_REGISTRY)


def methods() -> list[MethodInfo]:
    """Every registered method's name, family, exactness, capabilities and memory cost."""
    return [m.info() for m in _REGISTRY.values()]


@dataclass
class Dispatch:
    """The outcome of "auto": the chosen method, and why each earlier one was passed over."""

    method: Method
    passed_over: dict[str, list[str]] = field(default_factory=dict)


def choose(inp: Inputs, options: dict[str, Any]) -> Dispatch:
    """The first method of AUTO_PRIORITY that supports ``inp`` without an N×N tensor."""
    passed: dict[str, list[str]] = {}
    for name in AUTO_PRIORITY:
        m = _REGISTRY.get(name)
        if m is None:
            continue
        try:
            opts = m.make_options(options)
        except (TypeError, ValueError) as e:
            passed[name] = [str(e)]
            continue
        reasons = m.not_supported_reasons(inp, opts)
        quadratic = m.quadratic_reason(inp)
        if quadratic:
            reasons.append(quadratic)
        if not reasons:
            return Dispatch(m, passed)
        passed[name] = reasons
    for name in _REGISTRY:
        if name not in passed and name not in AUTO_PRIORITY:
            passed[name] = ["not in the automatic priority list; ask for it by name"]
    lines = "\n".join(f"  {n}: {'; '.join(r)}" for n, r in passed.items())
    raise ValueError(f"method='auto' found no method for these inputs:\n{lines}")


MethodFn = Callable[[Inputs, Any], Tensor]
