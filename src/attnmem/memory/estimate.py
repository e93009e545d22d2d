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
* **formula**: a closed form per method (``FORMULAS``, registered with ``@formula``) that states
  the method's asymptotics in bytes. It answers where tracing would be slow — the tile loop of
  ``chunked`` runs O((N/tile)²) Python iterations even on fake tensors — and is tested against
  the trace at moderate N. ``how="auto"`` uses the closed form wherever the method has one for
  the call's options, and traces otherwise. (``trace_work``, roughly the Python-level operator
  calls of one trace, tells how slow the trace it replaces would be.)

The breakdown splits the peak into ``inputs`` (q, k, v), ``saved`` (held between forward and
backward beyond the inputs: the output and what autograd keeps; 0 without training) and
``transient`` (the rest of the peak: gradients, the incoming output gradient, working buffers).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from .. import registry
from ..api import validate
from .measure import LiveTensorTracker, MiB

if TYPE_CHECKING:
    from ..distributed.estimate import RankEstimate

# Tensors up to this many elements that do not depend on q, k, v stay real, so index code
# (block maps, .tolist(), .item()) runs; 2**20 int64 elements are 8 MiB.
SMALL_NUMEL = 2**20
# Operator calls one segment of chunked's tile loop makes in forward and backward together.
OPS_PER_SEGMENT = 80
HOWS = ("auto", "trace", "formula")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


@dataclass(frozen=True)
class Shape:
    """One attention call's sizes, as the formulas see them."""

    batch: int
    heads: int
    kv_heads: int
    seq_len: int
    head_dim: int
    itemsize: int
    dtype: str
    training: bool
    causal: bool
    masked: bool  # a user mask besides causal

    @property
    def q_bytes(self) -> int:
        return self.batch * self.heads * self.seq_len * self.head_dim * self.itemsize

    @property
    def kv_bytes(self) -> int:
        return self.batch * self.kv_heads * self.seq_len * self.head_dim * self.itemsize

    @property
    def inputs_bytes(self) -> int:
        return self.q_bytes + 2 * self.kv_bytes


@dataclass(frozen=True)
class Estimate:
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

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / MiB

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = asdict(self.shape)
        d["peak_mib"] = self.peak_mib
        return d

    def __str__(self) -> str:
        return (f"{self.method}: peak {self.peak_mib:.1f} MiB = inputs {self.inputs_bytes / MiB:.1f} + saved "
                f"{self.saved_bytes / MiB:.1f} + transient {self.transient_bytes / MiB:.1f} MiB ({self.source})")


# --- closed forms -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Formula:
    """``bytes(shape, opts) -> (saved, transient)``; ``trace_work(shape, opts)`` estimates
    how many operator calls a trace of the same call would make."""

    fn: Callable[[Shape, Any], tuple[int, int] | None]  # None: no closed form for these options
    trace_work: Callable[[Shape, Any], int]
    doc: str


FORMULAS: dict[str, Formula] = {}


def formula(name: str, *, trace_work: Callable[[Shape, Any], int] | None = None):
    """Register the closed form of method ``name``; its docstring is the documented formula."""
    def deco(fn):
        FORMULAS[name] = Formula(fn, trace_work or (lambda s, o: 0), (fn.__doc__ or "").strip())
        return fn
    return deco


def _lse_bytes(s: Shape) -> int:
    """One float32 log-sum-exp per query row (float64 for float64 inputs)."""
    return s.batch * s.heads * s.seq_len * (8 if s.itemsize == 8 else 4)


@formula("sdpa")
def _sdpa(s: Shape, opts) -> tuple[int, int]:
    """Training: saved = O + lse; transient = dO + dQ + dK + dV − lse (lse is freed before
    the last gradient appears). Forward only: transient = O. No N² term."""
    if not s.training:
        return 0, s.q_bytes
    return s.q_bytes + _lse_bytes(s), 2 * s.q_bytes + 2 * s.kv_bytes - _lse_bytes(s)


@formula("reference")
def _reference(s: Shape, opts) -> tuple[int, int]:
    """With NN = B·H·N²·itemsize (one score matrix) and NB = B·H·N² bytes (one bool mask).
    Training without a mask: saved = P + O, transient = dO + dP + dS = Q + 2·NN. With a mask
    (causal included): saved = S + P + O + NB, transient = dP + the negated mask = NN + NB.
    Forward only: S + P + O without a mask; 3·NN + NB with one. O(N²) either way."""
    nn_ = s.batch * s.heads * s.seq_len * s.seq_len * s.itemsize
    masked = s.causal or s.masked
    nb = nn_ // s.itemsize if masked else 0
    if not s.training:
        return 0, (3 * nn_ + nb) if masked else (2 * nn_ + s.q_bytes)
    if masked:
        return 2 * nn_ + s.q_bytes + nb, nn_ + nb
    return nn_ + s.q_bytes, 2 * nn_ + s.q_bytes


def _chunked_kernel(s: Shape, opts) -> str:
    if opts.kernel != "auto":
        return opts.kernel
    return "fused" if s.dtype in ("float32", "float64", "bfloat16") else "torch"


def _grouped_causal(s: Shape) -> bool:
    from ..kernels.tiled import grouped_causal_fits

    return grouped_causal_fits(s.batch, s.heads, s.kv_heads, s.seq_len, s.head_dim, s.itemsize)


def _chunked_segments(s: Shape, opts) -> tuple[int, int, int]:
    """(query tiles, segments per query tile, widest masked segment in keys)."""
    from ..kernels import MAX_SEGMENT, MIN_Q_TILE

    nqt = math.ceil(s.seq_len / max(opts.q_tile, MIN_Q_TILE))
    nkt = math.ceil(s.seq_len / opts.kv_tile)
    if _chunked_kernel(s, opts) == "fused":
        if not s.masked and (not s.causal or s.heads == s.kv_heads or _grouped_causal(s)):
            return 1, 1, 0  # one operator call (unmasked or plain causal; per KV head under GQA)
        run = max(MAX_SEGMENT, opts.kv_tile)
        width = opts.kv_tile if not s.masked else min(s.seq_len, run)
        return nqt, math.ceil(s.seq_len / run) + 1, width
    return nqt, nkt, opts.kv_tile if (s.causal or s.masked) else 0


def _chunked_work(s: Shape, opts) -> int:
    nqt, per_tile, _ = _chunked_segments(s, opts)
    return OPS_PER_SEGMENT * nqt * per_tile


def _chunked_grouped_causal(s: Shape) -> tuple[int, int]:
    """Causal GQA, fused kernel: one call per KV head (its G query heads against the head
    expanded as a view). Saved O + lse; one head group's output, lse (forward) and
    dQ, dK, dV expanded to G heads plus three more such buffers (backward) are transient.
    Read off traces (tests check formula == trace)."""
    group_q = s.q_bytes // s.kv_heads
    lse = _lse_bytes(s)
    if not s.training:
        return 0, s.q_bytes + lse + 2 * (group_q + lse // s.kv_heads)
    grads = s.q_bytes + 2 * s.kv_bytes
    return s.q_bytes + lse, grads + 6 * group_q + lse + 2 * s.itemsize


@formula("chunked", trace_work=_chunked_work)
def _chunked(s: Shape, opts) -> tuple[int, int]:
    """Fused kernel without a mask, or plain causal without GQA: one operator call, as sdpa.
    Tiled, with G = Hq/Hkv,
    t = B·Hq·q_tile·D elements (one query tile), R = min(N − kv_tile, 2·2048) keys (two consecutive
    merged runs of full tiles; kv_tile for the plain kernel), W = kv_tile keys per masked
    segment (causal; other masks up to 2048, an upper bound):

    saved = O + lse;
    transient = dQ + dK + dV (dK, dV in float32 for half inputs) + 2·lse + four tile copies
    (q, O, dO, dQ; plus a float32 dQ tile for half inputs) + dK, dV of one run
    (2·B·Hkv·R·D) + the masked tile's bias (q_tile·W); for G > 1 also dK, dV of the masked
    segment and the G-stacked bias and bools (G·q_tile·W·(itemsize + 1)).
    Linear in N. Forward only: O + lse + five tile buffers in the accumulation dtype.
    The plain-PyTorch kernel (kernel="torch", float16) has no closed form here: it is traced.
    These terms were read off traces of the tiled code (tests check formula ≈ trace)."""
    nqt, _, width = _chunked_segments(s, opts)
    kernel = _chunked_kernel(s, opts)
    if nqt == 1 and width == 0 and kernel == "fused":
        if s.causal and s.heads != s.kv_heads:
            return _chunked_grouped_causal(s)
        return _sdpa(s, opts)
    if kernel == "torch":
        return None  # the plain kernel's working set has not been written down: it is traced
    from ..kernels import MAX_SEGMENT, MIN_Q_TILE

    acc = 8 if s.itemsize == 8 else 4
    q_tile = min(max(opts.q_tile, MIN_Q_TILE), s.seq_len)
    tile = s.batch * s.heads * q_tile * s.head_dim
    lse = _lse_bytes(s)
    if not s.training:
        return 0, s.q_bytes + lse + 5 * tile * acc
    g = s.heads // s.kv_heads
    if kernel == "fused":
        # Two consecutive merged runs of full tiles (the previous one's dK, dV are still alive).
        run = max(min(s.seq_len - opts.kv_tile, 2 * max(MAX_SEGMENT, opts.kv_tile)), opts.kv_tile)
    else:
        run = opts.kv_tile
    per_key = 2 * s.batch * s.kv_heads * s.head_dim * s.itemsize  # dK and dV of one key
    half = s.itemsize == 2
    grads = s.q_bytes + 2 * s.kv_bytes * (acc // s.itemsize if half else 1)
    work = 4 * tile * s.itemsize + (tile * acc if half else 0)  # tile copies; half: dQ tile in float32
    if g == 1:
        work += run * per_key + q_tile * width * s.itemsize
    else:
        work += (run + width) * per_key + g * q_tile * width * (s.itemsize + 1)
    return s.q_bytes + lse, grads + 2 * lse + work


# --- tracing ---------------------------------------------------------------------------------


class _SmallRealMode(TorchDispatchMode):
    """Runs operators on real tensors only when their results are small; the rest go fake."""

    def __init__(self, fake_mode):
        super().__init__()
        self.fake_mode = fake_mode

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._subclasses.fake_tensor import FakeTensor

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
    rest on ``fake_mode``'s fake ones (for callers that trace their own code, e.g. a whole model)."""
    return _SmallRealMode(fake_mode)


def _no_generator(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Fake tensors refuse random operators given a ``torch.Generator`` (``hard``'s seeded
    Gumbel noise); a fake result has no values, so the generator can go without changing memory."""
    if kwargs.get("generator") is None:
        return kwargs
    return {k: v for k, v in kwargs.items() if k != "generator"}


def _to_meta(x):
    return x.to("meta") if isinstance(x, torch.Tensor) else x


def _attention_fn(name: str, causal: bool, mask: Any, opts_dict: dict[str, Any], module):
    from ..api import attention

    def call(q, k, v):
        if module is not None:
            return module(q, k, v, causal=causal, mask=mask)
        return attention(q, k, v, method=name, causal=causal, mask=mask, **opts_dict)

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
             scheme: str = "ring", ulysses: int | None = None, **options: Any) -> Estimate | RankEstimate:
    """Predicted peak bytes of one ``attnmem.attention`` call (forward, + backward when
    ``training``), inputs included, without allocating the tensors.

    Args:
        method: a registered name or "auto" (resolved as ``attnmem.attention`` would).
        batch, heads, seq_len, head_dim: B, Hq, N, D; ``kv_heads`` Hkv (default Hq).
        dtype: a torch dtype or its name ("float32", "bfloat16", ...).
        training: forward + ``out.sum().backward()`` with q, k, v requiring grad; else
            forward under ``torch.no_grad()``.
        causal, mask: as in ``attnmem.attention`` (mask: an ``attnmem.masks.Mask``).
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
    if world_size is not None:
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
    if method == "auto":
        method = registry.choose(inp, options).method.name
    m = registry.get(method)
    if "max_len" in getattr(m.Options, "__dataclass_fields__", {}) and "max_len" not in options:
        # A module with a maximum length (linformer) is estimated as built for this sequence.
        options = {**options, "max_len": max(seq_len, m.Options.__dataclass_fields__["max_len"].default)}
    opts = m.make_options(options)
    if training and not m.caps.backward:
        raise ValueError(f"method {method!r} has no backward; estimate it with training=False")
    shape = Shape(batch, heads, kv_heads, seq_len, head_dim, dt.itemsize, str(dt).removeprefix("torch."),
                  bool(training), bool(causal),
                  mask is not None)
    # Stateful methods state their limits too (their modules would raise them mid-trace).
    reasons = m.not_supported_reasons(inp, opts)
    if reasons and not (training and reasons == ["has no backward; call it under torch.no_grad()"]):
        raise ValueError(f"method {method!r} cannot run these inputs: {'; '.join(reasons)}")
    f = FORMULAS.get(method)
    if f is not None and f.fn(shape, opts) is None:
        f = None
    # Every closed form is tested against the trace (within 5 %, most to the byte) and answers in
    # milliseconds to about a second at any N, while a trace costs the fake-tensor import on
    # its first call and grows with the number of tiles: "auto" takes the closed form wherever
    # one exists for these options, and traces the rest.
    use_formula = how == "formula" or (how == "auto" and f is not None)
    if use_formula:
        if f is None:
            raise ValueError(f"method {method!r} has no closed-form estimate for these options; use how='trace'")
        saved, transient = f.fn(shape, opts)
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
    call = _attention_fn(method, causal, mask, dict(options), module)
    try:
        with _SmallRealMode(fake_mode):
            peak, inputs, after_forward = trace_peak(call, q, k, v, training)
    except Exception as e:  # noqa: BLE001  whatever a method does that fake tensors cannot follow
        if f is not None and how == "auto":
            saved, transient = f.fn(shape, opts)
            return Estimate(method, shape.inputs_bytes + saved + transient, shape.inputs_bytes, saved,
                            transient, "formula", shape, dict(options))
        raise ValueError(f"no estimate for method {method!r}: it cannot be traced on fake tensors "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                         + ("" if f is not None else " and has no closed form in attnmem.memory.estimate.FORMULAS")
                         ) from e
    saved = after_forward - inputs
    return Estimate(method, peak, inputs, saved, peak - inputs - saved, "trace", shape, dict(options))
# The closed forms of the other methods register themselves with @formula on import.
from . import formulas_approx, formulas_memory, formulas_sparse  # noqa: E402,F401
