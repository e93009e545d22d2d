"""``attnmem.estimate``: the peak memory of one attention call, predicted without allocating.

Two ways to the same number:

* **trace** (the default): the method really runs, on fake tensors
  (``torch._subclasses.fake_tensor.FakeTensorMode``), under the very ``LiveTensorTracker`` that
  ``attnmem.measure`` uses, so an estimate and a measurement share one definition of "peak".
  Fake tensors carry shapes and dtypes but no data. Code that *looks* at data (a block map turned
  into a Python list, ``bool(mask.any())``) cannot run on them, so a small mode under the tracker
  keeps every tensor of at most ``SMALL_NUMEL`` elements that does not depend on q, k, v real
  (index tensors, masks of one tile), and makes every larger one fake. Nothing O(N·D) or O(N²)
  is ever allocated.
* **formula**: the method's own closed form (``Method.memory_model``, written beside its kernel
  under ``mechanisms/``), which holds inside the domain the method declares
  (``Method.memory_domain_reasons``: the dtypes, options and shapes it was read off and checked
  for). It answers where tracing would be slow — the tile loop of ``chunked`` runs
  O((N/tile)²) Python iterations even on fake tensors — and is tested against the trace inside
  its domain. ``how="auto"`` uses the closed form wherever the method declares one for the
  call, and traces otherwise. Score modifications (``Shape.mods``, ``Shape.sinks``) are in the
  closed forms of the methods that declare ``Method.models_mods`` (chunked, the sparse
  patterns), which name in their domain reasons what they leave to the trace (a generic
  score_mod, whose temporaries are its own). A trace stops past ``TRACE_OP_LIMIT`` operator calls with an
  error that says so (``how="trace"`` of a tiled method at N = 2**20 would run for minutes).

The breakdown splits the peak into ``inputs`` (q, k, v), ``saved`` (held between forward and
backward beyond the inputs: the output and what autograd keeps; 0 without training) and
``transient`` (the rest of the peak: gradients, the incoming output gradient, working buffers).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from .. import registry
from ..api import validate, validate_mods
from ..kernels import acc_dtype, captured_tensors, fast_kind
from .measure import LiveTensorTracker, MiB, Peak
from .model import Shape

if TYPE_CHECKING:
    from ..distributed.estimate import RankEstimate

# Tensors up to this many elements that do not depend on q, k, v stay real, so index code
# (block maps, .tolist(), .item()) runs; 2**20 int64 elements are 8 MiB.
SMALL_NUMEL = 2**20
# A trace stops past this many operator calls (forward and backward together) or this many
# seconds, whichever comes first, so that ``how="trace"`` is bounded. Calls per second vary
# a hundredfold between methods (a tile's small index tensors are computed for real): measured
# 66-175 calls/s for adaptive_span_fixed under load (BENCHMARKS.md, "Memory models beside the methods").
TRACE_OP_LIMIT = 200_000
TRACE_SECONDS_LIMIT = 120.0
HOWS = ("auto", "trace", "formula")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


@dataclass(frozen=True)
class Estimate(Peak):
    """Predicted peak bytes of one attention call and where they go.

    ``peak_bytes == inputs_bytes + saved_bytes + transient_bytes``; ``source`` is "trace" or
    "formula".
    """

    method: str
    peak_bytes: int
    inputs_bytes: int
    saved_bytes: int
    transient_bytes: int
    source: str
    shape: Shape
    options: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = asdict(self.shape)
        d["peak_mib"] = self.peak_mib
        return d

    def __str__(self) -> str:
        return (f"{self.method}: peak {self.peak_mib:.1f} MiB = inputs {self.inputs_bytes / MiB:.1f} + saved "
                f"{self.saved_bytes / MiB:.1f} + transient {self.transient_bytes / MiB:.1f} MiB ({self.source})")


# --- tracing ---------------------------------------------------------------------------------


class TraceTooLong(RuntimeError):
    """A trace passed ``TRACE_OP_LIMIT`` operator calls or ``TRACE_SECONDS_LIMIT`` seconds."""

    def __init__(self, ops: int, seconds: float):
        super().__init__(f"trace stopped after {ops} operator calls, {seconds:.0f} s")
        self.ops, self.seconds = ops, seconds


class _SmallRealMode(TorchDispatchMode):
    """Runs operators on real tensors only when their results are small; the rest go fake.
    Counts the operator calls, and stops the trace past ``TRACE_OP_LIMIT``."""

    def __init__(self, fake_mode, op_limit: int | None = None, seconds_limit: float | None = None):
        super().__init__()
        self.fake_mode = fake_mode
        self.ops = 0
        self.op_limit = TRACE_OP_LIMIT if op_limit is None else op_limit
        self.deadline = time.monotonic() + (TRACE_SECONDS_LIMIT if seconds_limit is None else seconds_limit)
        self.start = time.monotonic()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._subclasses.fake_tensor import FakeTensor

        # Only operators that return tensors count and may stop the trace: metadata queries
        # (prim.device, sym_size, ...) are also called from C++ code that cannot unwind.
        if _returns_tensors(func):
            self.ops += 1
            if self.ops > self.op_limit or time.monotonic() > self.deadline:
                raise TraceTooLong(self.ops, time.monotonic() - self.start)
        kwargs = kwargs or {}
        if any(isinstance(x, FakeTensor) for x in tree_flatten((args, kwargs))[0]):
            out = func(*args, **_no_generator(kwargs))  # depends on q, k, v: fake
            # An in-place update of a small real tensor by fake operands (an accumulator
            # ``dk[:, :, a:b] += dk_s``) returns a fake copy with a new storage; hand back the
            # real tensor so its storage is counted once.
            schema = func._schema
            if schema.is_mutable and args and isinstance(args[0], torch.Tensor) \
                    and not isinstance(args[0], FakeTensor):
                alias = schema.arguments[0].alias_info
                if alias is not None and alias.is_write:
                    return args[0]
            target = kwargs.get("out")
            if isinstance(target, torch.Tensor) and not isinstance(target, FakeTensor):
                return target
            return out
        # Probe the result's size on the meta device (shapes only, C++ kernels: cheap).
        try:
            meta_args, meta_kwargs = tree_map(_to_meta, (args, kwargs))
            if any(a.name == "device" for a in func._schema.arguments):
                # Factory operators (zeros, full, empty) take no tensor: probe them on meta too,
                # or the probe itself would allocate the full result.
                meta_kwargs["device"] = torch.device("meta")
            probe = func(*meta_args, **meta_kwargs)
        except Exception:  # noqa: BLE001  data-dependent output shapes: only the real op can tell
            return func(*args, **kwargs)
        # Storage, not view, sizes: a view of a small real tensor (an index expanded along D) is
        # small too, and making it fake would count a copy that the real run never allocates.
        sizes = [x.untyped_storage().nbytes() // x.element_size() for x in tree_flatten(probe)[0]
                 if isinstance(x, torch.Tensor)]
        if all(n <= SMALL_NUMEL for n in sizes):
            return func(*args, **kwargs)
        with self.fake_mode:
            return func(*args, **_no_generator(kwargs))


def small_real_mode(fake_mode) -> TorchDispatchMode:
    """The tracing mode of ``estimate``: operators with small results run on real tensors, the
    rest on ``fake_mode``'s fake ones (for callers that trace their own code, e.g. a whole model:
    unbounded, unlike an attention call's trace)."""
    return _SmallRealMode(fake_mode, op_limit=sys.maxsize, seconds_limit=math.inf)


def _returns_tensors(func) -> bool:
    return any("Tensor" in str(r.type) for r in func._schema.returns)


def _no_generator(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Fake tensors refuse random operators given a ``torch.Generator`` (``hard``'s seeded
    Gumbel noise); a fake result has no values, so the generator can go without changing memory."""
    if kwargs.get("generator") is None:
        return kwargs
    return {k: v for k, v in kwargs.items() if k != "generator"}


def _to_meta(x):
    return x.to("meta") if isinstance(x, torch.Tensor) else x


def mods_kind(score_mod: Any, dropout_p: float, dtype: torch.dtype) -> str | None:
    """``Shape.mods`` of a call: None without score_mod and dropout, else ``fast_kind``."""
    if score_mod is None and not dropout_p:
        return None
    captured = captured_tensors(score_mod, acc_dtype(dtype), torch.device("cpu")) if score_mod is not None else ()
    return fast_kind(score_mod, captured, dropout_p)


def bias_kind(score_mod: Any) -> str | None:
    """``Shape.bias``: which built-in additive bias ``score_mod`` is (its memory per tile is
    known), else None (no score_mod, or one of another kind or class)."""
    from ..scores import ALiBi, RelativeBias

    if type(score_mod) is ALiBi:
        return "alibi" if score_mod.offset == 0 else None  # the row path's tiles assume offset 0
    return "relative_bias" if type(score_mod) is RelativeBias else None


def _attention_fn(name: str, causal: bool, mask: Any, opts_dict: dict[str, Any], module,
                  mods: dict[str, Any] | None = None):
    from ..api import attention

    def call(q, k, v):
        if module is not None:
            return module(q, k, v, causal=causal, mask=mask)
        return attention(q, k, v, method=name, causal=causal, mask=mask, **opts_dict, **(mods or {}))

    return call


def trace_peak(call: Callable, q, k, v, training: bool) -> tuple[int, int, int]:
    """(peak, inputs, live after forward) of ``call(q, k, v)`` (+ ``out.sum().backward()``),
    counted by ``LiveTensorTracker`` exactly as ``attnmem.measure`` counts a real run."""
    tracker = LiveTensorTracker()
    tracker.track_tree((q, k, v))
    inputs = tracker.live
    with tracker:
        if training:
            out = call(q, k, v)
            after_forward = tracker.live
            out.sum().backward()
            del out
        else:
            with torch.no_grad():
                out = call(q, k, v)
            after_forward = inputs
            del out
    return tracker.peak, inputs, after_forward


def _check_int(name: str, val: Any, minimum: int = 1) -> int:
    if not isinstance(val, int) or isinstance(val, bool) or val < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {val!r}")
    return val


def resolve_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be a torch.dtype or one of {', '.join(DTYPES)}, got {dtype!r}")


def estimate(method: str, *, batch: int, heads: int, seq_len: int, head_dim: int,
             dtype: Any = torch.float32, training: bool = True, kv_heads: int | None = None,
             causal: bool = False, mask: Any = None, how: str = "auto", world_size: int | None = None,
             scheme: str = "ring", ulysses: int | None = None, score_mod: Any = None, sinks: Any = None,
             dropout_p: float = 0.0, **options: Any) -> Estimate | RankEstimate:
    """Predicted peak bytes of one ``attnmem.attention`` call (forward, + backward when
    ``training``), inputs included, without allocating the tensors.

    Args:
        method: a registered name or "auto" (resolved as ``attnmem.attention`` would).
        batch, heads, seq_len, head_dim: B, Hq, N, D; ``kv_heads`` Hkv (default Hq).
        dtype: a torch dtype or its name ("float32", "bfloat16", ...).
        training: forward + ``out.sum().backward()`` with q, k, v requiring grad; else
            forward under ``torch.no_grad()``.
        causal, mask: as in ``attnmem.attention`` (mask: an ``attnmem.masks.Mask``).
        score_mod, sinks, dropout_p: as in ``attnmem.attention`` (sinks a (heads,) tensor); the
            kernel path they take (``kernels.plan_call``) is the one the estimate models.
        how: "trace" (fake tensors), "formula" (closed form) or "auto" (the closed form where
            the method has one for these options, else the trace).
        world_size, scheme, ulysses: with ``world_size`` = P, the peak of ONE rank of the
            sequence split over P ranks by ``scheme`` ("ring", "ulysses", or "hybrid" with
            ``ulysses`` ranks per Ulysses group), and the bytes each rank sends per step:
            ``attnmem.distributed.estimate.per_rank`` (training only; ``method`` is the
            local method of Ulysses).
        **options: the method's options.

    Returns:
        An ``Estimate``: ``peak_bytes`` and the inputs / saved / transient breakdown (with
        ``world_size``, an ``attnmem.distributed.estimate.RankEstimate``: ``peak_bytes`` of one
        rank and ``sent_bytes`` per rank).

    Raises:
        ValueError: non-positive sizes, heads not divisible by kv_heads, unknown method, dtype
            or ``how``, a method that cannot run these inputs, or no way to estimate it.
        TypeError: unknown options.
    """
    for name, val in (("batch", batch), ("heads", heads), ("seq_len", seq_len), ("head_dim", head_dim)):
        _check_int(name, val)
    mods = {name: val for name, val in (("score_mod", score_mod), ("sinks", sinks)) if val is not None}
    if not (isinstance(dropout_p, (int, float)) and not isinstance(dropout_p, bool) and dropout_p == 0):
        mods["dropout_p"] = dropout_p
    if world_size is not None:
        if mods:
            raise ValueError(f"{', '.join(mods)}: the per-rank estimate (world_size) does not model them")
        from ..distributed.estimate import rank_estimate

        return rank_estimate(method, local_estimate=estimate, scheme=scheme, world_size=world_size, ulysses=ulysses,
                             batch=batch, heads=heads, seq_len=seq_len, head_dim=head_dim, kv_heads=kv_heads,
                             dtype=resolve_dtype(dtype), training=training, causal=causal, mask=mask, **options)
    kv_heads = heads if kv_heads is None else _check_int("kv_heads", kv_heads)
    if heads % kv_heads:
        raise ValueError(f"heads={heads} is not divisible by kv_heads={kv_heads}")
    if how not in HOWS:
        raise ValueError(f"how must be one of {', '.join(HOWS)}, got {how!r}")
    dt = resolve_dtype(dtype)
    # Validation and dispatch read shapes only: one real element broadcast to each shape
    # stands in, so a closed-form answer never pays for importing fake tensors.
    one = torch.empty((), dtype=dt)
    q, k, v = (one.expand(batch, h, seq_len, head_dim) for h in (heads, kv_heads, kv_heads))  # (B, H, N, D)
    inp = validate(q, k, v, causal=causal, mask=mask)
    if mods:
        inp = validate_mods(inp, **mods)
    if method == "auto":
        method = registry.choose(inp, options).method.name
    m = registry.get(method)
    # A module with a maximum length (linformer) is estimated as built for this sequence.
    options = m.options_for_length(dict(options), seq_len)
    opts = m.make_options(options)
    if training and not m.caps.backward:
        raise ValueError(f"method {method!r} has no backward; estimate it with training=False")
    shape = Shape(batch, heads, kv_heads, seq_len, head_dim, dt.itemsize, str(dt).removeprefix("torch."),
                  bool(training), bool(causal),
                  mask is not None, mods_kind(score_mod, dropout_p, dt), sinks is not None,
                  score_mod is not None, bias_kind(score_mod), bool(dropout_p),
                  sinks is not None and bool(training) and sinks.requires_grad)
    # Stateful methods state their limits too (their modules would raise them mid-trace).
    reasons = m.not_supported_reasons(inp, opts)
    if reasons and not (training and reasons == ["has no backward; call it under torch.no_grad()"]):
        raise ValueError(f"method {method!r} cannot run these inputs: {'; '.join(reasons)}")
    outside = m.memory_domain_reasons(shape, opts)
    if (shape.mods is not None or shape.sinks) and not m.models_mods:
        # A method whose closed form does not model score_mod, sinks or dropout: its tiles and
        # kernel (kernels.plan_call) are traced, which follows the very path the call takes.
        # One that does (``Method.models_mods``) names what it leaves out in its domain reasons.
        outside = [*outside, "score_mod, sinks and dropout are not in this method's closed form (traced)"]
    # A method's closed form is tested against the trace inside its declared domain (within 5 %,
    # most to the byte) and answers in milliseconds at any N, while a trace grows with the number
    # of tiles: "auto" takes the closed form wherever the method declares one, and traces the rest.
    if how == "formula" or (how == "auto" and not outside):
        if outside:
            raise ValueError(f"method {method!r} has no closed-form estimate for these options "
                             f"({'; '.join(outside)}); use how='trace'")
        saved, transient = m.memory_model(shape, opts)
        return Estimate(method, shape.inputs_bytes + saved + transient, shape.inputs_bytes, saved, transient,
                        "formula", shape, dict(options))
    # Imported here: FakeTensorMode pulls in much of torch's compiler stack (seconds, once).
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        q = torch.empty(batch, heads, seq_len, head_dim, dtype=dt)  # (B, Hq, N, D)
        k = torch.empty(batch, kv_heads, seq_len, head_dim, dtype=dt)  # (B, Hkv, N, D)
        v = torch.empty(batch, kv_heads, seq_len, head_dim, dtype=dt)
    module = None
    if m.stateful:
        # Parameters do not depend on q, k, v: small ones stay real like any other small tensor,
        # so code that reads them (adaptive_span's band width is its largest learned span) runs.
        with _SmallRealMode(fake_mode):
            module = m.build_module(heads=heads, kv_heads=kv_heads, head_dim=head_dim, opts=opts)
    if training:
        for t in (q, k, v):
            t.requires_grad_(True)
    call = _attention_fn(method, causal, mask, dict(options), module, mods)
    try:
        with _SmallRealMode(fake_mode):
            peak, inputs, after_forward = trace_peak(call, q, k, v, training)
    except TraceTooLong as e:
        hint = ("use how='auto' (the closed form)" if not outside else
                f"its closed form does not cover these options ({'; '.join(outside)}): a smaller seq_len traces faster")
        raise ValueError(f"estimate of method {method!r} stopped: the trace ran {e.ops:,} operator calls in "
                         f"{e.seconds:.0f} s at seq_len={seq_len}, past its bound (attnmem.memory.estimate."
                         f"TRACE_OP_LIMIT = {TRACE_OP_LIMIT:,} calls, TRACE_SECONDS_LIMIT = "
                         f"{TRACE_SECONDS_LIMIT:.0f} s); {hint}") from None
    except Exception as e:  # noqa: BLE001  whatever a method does that fake tensors cannot follow
        raise ValueError(f"no estimate for method {method!r}: it cannot be traced on fake tensors "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                         f" and has no closed form for these options ({'; '.join(outside) or 'none'})") from e
    saved = after_forward - inputs
    return Estimate(method, peak, inputs, saved, peak - inputs - saved, "trace", shape, dict(options))
