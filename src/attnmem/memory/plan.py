"""``attnmem.plan``: which attention methods fit a memory budget for a whole transformer.

The model is ``attnmem.nn.Transformer`` (token embedding, pre-norm blocks of attention and a GELU
MLP, final norm, linear head). Its peak is predicted from closed forms for everything but the
attention, and ``attnmem.estimate`` for the attention of one layer. With T = B·N tokens, s the
dtype's bytes, P the parameter count, Hkv·D = d_kv, F = ffn_mult·d_model and V the vocabulary:

* static: params P·s, plus AdamW's two moments 2·P·s when training.
* stored per layer (no checkpointing): block input, LN1 out, q, k, v, attention output
  (reshaped copy), residual, LN2 out and the two MLP hiddens = s·T·(5·d + 2·d_kv + 2·F), plus
  what the attention method saves (``Estimate.saved_bytes``: its output and, e.g., lse).
  With checkpointing: the block input s·T·d per layer, and one block's activations at a time.
* at the start of backward: every stored activation + logits, log-probs and their gradients
  (``LOGIT_COPIES``·T·V·s). A head that sees only ``head_rows`` positions per sequence (a task
  with a loss on a few labelled positions, ``attnmem.tasks``) with ``num_outputs`` = C classes
  has T_h = B·head_rows rows instead: ``LOGIT_COPIES``·T_h·C·s, plus the gathered rows s·T_h·d.
* in the last layer's backward (recomputed first when checkpointing): every stored
  activation + the logits the caller holds + the head's gradients + the residual gradient
  (2·s·T·d), then either an MLP hidden's gradient s·T·F or, in the attention (MLP half freed),
  the attention's transient (gradients of q, k, v and its working memory).
* at the optimizer step: params, moments, gradients P·s, and the update's temporaries
  (two copies of the largest parameter).

The peak is the largest of those moments. Inference (``training=False``): params, the KV cache
(2·L·B·N·d_kv·s) and one layer's working memory during a prefill of N tokens, plus the logits.
Validated against a real training step of a small ``Transformer`` (tests/test_plan.py).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import registry
from ..figures import pyplot, save
from .estimate import DTYPES, estimate
from .measure import GiB, MiB
from .units import parse_bytes

# logits, log-softmax output, and the gradient of each at the start of backward
LOGIT_COPIES = 4

PRESETS: dict[str, dict[str, Any]] = {
    # Shapes only (no weights); the MLP is attnmem.nn.Transformer's GELU MLP.
    "tiny": dict(layers=2, d_model=64, heads=4, vocab=256, seq_len=256, batch=2),
    "gpt2-small": dict(layers=12, d_model=768, heads=12, vocab=50257, seq_len=1024),
    "gpt2-medium": dict(layers=24, d_model=1024, heads=16, vocab=50257, seq_len=1024),
    "gpt2-large": dict(layers=36, d_model=1280, heads=20, vocab=50257, seq_len=1024),
    "gpt2-xl": dict(layers=48, d_model=1600, heads=25, vocab=50257, seq_len=1024),
    "llama2-7b": dict(layers=32, d_model=4096, heads=32, vocab=32000, seq_len=4096, dtype="bfloat16"),
    "llama3-8b": dict(layers=32, d_model=4096, heads=32, kv_heads=8, vocab=128256, seq_len=8192,
                      dtype="bfloat16"),
    "mistral-7b": dict(layers=32, d_model=4096, heads=32, kv_heads=8, vocab=32000, seq_len=8192,
                       dtype="bfloat16"),
}

def parse_budget(budget: int | float | str) -> int:
    """Bytes from ``24GiB``, ``80GB``, ``24G``, ``512 MiB``, ``1e9``: ``units.parse_bytes``, the
    parser every size flag shares."""
    return parse_bytes(budget, "budget")


@dataclass(frozen=True)
class ModelConfig:
    """A transformer to plan for; ``attnmem.nn.Transformer``'s shape.

    ``training``: one AdamW step (forward, backward, update) when True; a prefill of
    ``seq_len`` tokens into a KV cache when False. ``options``: the attention method's options.
    """

    layers: int
    d_model: int
    heads: int
    kv_heads: int | None = None
    ffn_mult: int = 4
    vocab: int = 32000
    seq_len: int = 2048
    batch: int = 1
    dtype: str = "float32"
    training: bool = True
    checkpointing: bool = False
    causal: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    num_outputs: int | None = None  # the head's width (default: vocab)
    head_rows: int | None = None  # positions per sequence that reach the head (default: seq_len)
    mask: Any = None  # an attnmem.masks.Mask besides causal, passed to attnmem.estimate
    # Inference only: the decoding cache, {"kind": ..., **options} (attnmem.nn.cache.KINDS); None: full.
    cache: dict[str, Any] | None = None

    def __post_init__(self):
        for name in ("layers", "d_model", "heads", "ffn_mult", "vocab", "seq_len", "batch"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        for name in ("num_outputs", "head_rows"):
            val = getattr(self, name)
            if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val <= 0):
                raise ValueError(f"{name} must be a positive int or None, got {val!r}")
        if self.head_rows is not None and self.head_rows > self.seq_len:
            raise ValueError(f"head_rows={self.head_rows} exceeds seq_len={self.seq_len}")
        kv = self.kv_heads
        if kv is not None and (not isinstance(kv, int) or isinstance(kv, bool) or kv <= 0):
            raise ValueError(f"kv_heads must be a positive int, got {kv!r}")
        if self.d_model % self.heads:
            raise ValueError(f"heads={self.heads} does not divide d_model={self.d_model}")
        if self.heads % self.hkv:
            raise ValueError(f"kv_heads={self.hkv} does not divide heads={self.heads}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    @property
    def hkv(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @property
    def outputs(self) -> int:
        return self.vocab if self.num_outputs is None else self.num_outputs

    @property
    def rows(self) -> int:
        return self.seq_len if self.head_rows is None else self.head_rows

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype].itemsize

    def params(self) -> int:
        """Parameter count of ``attnmem.nn.Transformer`` with this shape (no projection bias)."""
        d, dkv, f = self.d_model, self.hkv * self.head_dim, self.ffn_mult * self.d_model
        block = 2 * d * d + 2 * d * dkv + (d * f + f) + (f * d + d) + 4 * d
        return self.vocab * d + self.layers * block + 2 * d + d * self.outputs + self.outputs

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def load_config(source: str | dict[str, Any] | None = None, **overrides: Any) -> ModelConfig:
    """A ``ModelConfig`` from a preset name, a YAML/JSON file path or a dict, then overrides."""
    base: dict[str, Any] = {}
    if isinstance(source, dict):
        base = dict(source)
    elif isinstance(source, str):
        if source in PRESETS:
            base = dict(PRESETS[source])
        elif Path(source).is_file():
            text = Path(source).read_text()
            if source.endswith((".yaml", ".yml")):
                import yaml

                try:
                    base = yaml.safe_load(text) or {}
                except yaml.YAMLError as e:
                    raise ValueError(f"config file {source!r} is not valid YAML: {e}") from None
            else:
                try:
                    base = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ValueError(f"config file {source!r} is not valid JSON: {e}") from None
            if not isinstance(base, dict):
                raise ValueError(f"config file {source!r} must hold a mapping, got {type(base).__name__}")
        else:
            raise ValueError(f"unknown preset or missing file {source!r} (presets: attnmem plan --help)")
    elif source is not None:
        raise TypeError(f"config must be a preset name, a file path or a dict, got {type(source).__name__}")
    base.update({k: v for k, v in overrides.items() if v is not None})
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(base) - fields)
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
    missing = sorted(k for k in ("layers", "d_model", "heads") if k not in base)
    if missing:
        raise ValueError(f"config is missing {', '.join(missing)}")
    return ModelConfig(**base)


def _attention(cfg: ModelConfig, method: str, training: bool):
    """One layer's attention estimate: the method's closed form inside its declared domain
    (searches then cost microseconds per step), else a trace, remembered per shape."""
    key = (method, cfg.batch, cfg.heads, cfg.hkv, cfg.seq_len, cfg.head_dim, cfg.dtype, training, cfg.causal,
           json.dumps(cfg.options, sort_keys=True, default=repr), repr(cfg.mask))
    hit = _ESTIMATES.get(key)
    if hit is not None:
        return hit
    kw = dict(batch=cfg.batch, heads=cfg.heads, kv_heads=cfg.hkv, seq_len=cfg.seq_len, head_dim=cfg.head_dim,
              dtype=cfg.dtype, training=training, causal=cfg.causal, mask=cfg.mask, **cfg.options)
    est = estimate(method, how="auto", **kw)
    if len(_ESTIMATES) > 4096:
        _ESTIMATES.clear()
    _ESTIMATES[key] = est
    return est


# Estimates already made, by method and attention shape: the searches and the plot ask again.
_ESTIMATES: dict[tuple, Any] = {}


def model_peak(cfg: ModelConfig, method: str) -> dict[str, int]:
    """Predicted peak bytes of one step of ``cfg`` with ``method``, and its parts."""
    s, L = cfg.itemsize, cfg.layers
    T = cfg.batch * cfg.seq_len
    d, dkv, f, V = cfg.d_model, cfg.hkv * cfg.head_dim, cfg.ffn_mult * cfg.d_model, cfg.vocab
    C, TH = cfg.outputs, cfg.batch * cfg.rows  # head width; rows through the head
    gathered = s * TH * d if cfg.rows < cfg.seq_len else 0  # hidden[labelled] copies those rows
    P = cfg.params()
    params = P * s
    ln_stats = 2 * 2 * T * 4  # mean and rstd of two LayerNorms, float32
    if not cfg.training:
        att = _attention(cfg, method, training=False)
        kv_cache, prefill_kv = 2 * L * T * dkv * s, 0
        if cfg.cache is not None:  # another kind holds its own bytes, after the prefill's float K/V
            kv_cache, prefill_kv = inference_cache_bytes(cfg), 2 * s * T * dkv
        layer_work = s * T * (2 * d + 2 * f) + att.transient_bytes + prefill_kv
        peak = params + kv_cache + s * T * d + max(layer_work, gathered + TH * C * s)
        return dict(peak=peak, params=params, optimizer=0, activations=kv_cache, attention=att.transient_bytes,
                    logits=TH * C * s)
    att = _attention(cfg, method, training=True)
    optimizer = 2 * P * s
    static = params + optimizer
    layer_full = s * T * (5 * d + 2 * dkv + 2 * f) + att.saved_bytes + ln_stats
    stored = (L * s * T * d) if cfg.checkpointing else L * layer_full
    recompute = layer_full if cfg.checkpointing else 0
    head = 2 * s * T * d + gathered  # final norm's input and output (and the gathered rows)
    logits = LOGIT_COPIES * TH * C * s
    start_backward = static + stored + head + logits
    head_grads = (C * d + C + 2 * d) * s
    # In the last layer's backward (recomputed first, with checkpointing): the caller still
    # holds the logits; a gradient of the residual stream flows (and is copied once).
    in_layer = static + head_grads + stored + recompute + TH * C * s + 2 * s * T * d
    in_mlp = in_layer + s * T * f  # the gradient of one MLP hidden
    # In its attention: the MLP half is freed; the attention's transient joins.
    in_attention = in_layer - s * T * (2 * d + 2 * f) + att.transient_bytes
    largest_param = max(V * d, C * d, d * f) * s
    at_update = static + P * s + 2 * largest_param
    peak = max(start_backward, in_mlp, in_attention, at_update)
    return dict(peak=int(peak), params=params, optimizer=optimizer, activations=int(stored + recompute),
                attention=att.transient_bytes, logits=logits)


def inference_cache_bytes(cfg: ModelConfig) -> int:
    """Bytes of ``cfg.cache`` holding ``seq_len`` tokens per sequence, all layers
    (``attnmem.nn.cache.cache_bytes``: each kind's own formula)."""
    from ..nn.cache import cache_bytes

    opts = dict(cfg.cache or {"kind": "full"})
    kind = opts.pop("kind", None)
    if kind is None:
        raise ValueError(f"cache must name its kind, e.g. {{'kind': 'int4'}}, got {cfg.cache!r}")
    return cache_bytes(kind, batch=cfg.batch, layers=cfg.layers, kv_heads=cfg.hkv, head_dim=cfg.head_dim,
                       seq_len=cfg.seq_len, dtype=DTYPES[cfg.dtype], **opts)


def _largest(fits, lo: int, hi_limit: int, step: int) -> int | None:
    """Largest multiple of ``step`` in [lo, hi_limit] with ``fits`` true, assuming monotone."""
    if not fits(lo):
        return None
    hi = lo
    while hi * 2 <= hi_limit and fits(hi * 2):
        hi *= 2
    lo_ok, hi_bad = hi, min(hi * 2, hi_limit + step)
    while hi_bad - lo_ok > step:
        mid = (lo_ok + hi_bad) // 2 // step * step
        if mid <= lo_ok:
            break
        if fits(mid):
            lo_ok = mid
        else:
            hi_bad = mid
    return lo_ok


def seq_step(cfg: ModelConfig, method: str) -> int:
    """The sequence-length granularity of the search: the method's tile (256 by default)."""
    opts = cfg.options
    return int(opts.get("q_tile", 256)) if method == "chunked" else 256


def plan(config: ModelConfig | str | dict[str, Any], budget: int | float | str, *,
         methods: list[str] | None = None, max_seq_len: int = 2**24, max_batch: int = 2**16,
         on_method: Any = None) -> list[dict[str, Any]]:
    """For every method: predicted peak of ``config``, whether it fits ``budget``, and the longest
    sequence (a multiple of the method's tile) and largest batch that fit, both searched over
    the estimate (binary search; the estimate grows monotonically in N and B).

    Args:
        config: a ``ModelConfig``, a preset name, a YAML/JSON path or a dict.
        budget: bytes, or a size string such as ``"24GiB"`` or ``"80GB"``.
        methods: method names (default: every stateless method with a backward when training).
        on_method: called as ``on_method(name, index, total)`` before each method (progress).

    Raises:
        ValueError: a bad config, budget or method name.
    """
    cfg = config if isinstance(config, ModelConfig) else load_config(config)
    limit = parse_budget(budget)
    if methods is None:
        methods = [m.name for m in registry.methods()
                   if not m.stateful and (m.supports.backward or not cfg.training)]
    rows = []
    for i, name in enumerate(methods):
        if on_method is not None:
            on_method(name, i, len(methods))
        registry.get(name)
        try:
            parts = model_peak(cfg, name)
        except ValueError as e:
            rows.append(dict(method=name, status="error", reason=str(e).splitlines()[0]))
            continue
        step = seq_step(cfg, name)

        def fits_n(n, name=name):
            return model_peak(cfg.replace(seq_len=n), name)["peak"] <= limit

        def fits_b(b, name=name):
            return model_peak(cfg.replace(batch=b), name)["peak"] <= limit

        try:
            longest, largest = _largest(fits_n, step, max_seq_len, step), _largest(fits_b, 1, max_batch, 1)
        except ValueError as e:  # a search step the estimate refuses (a trace past its bound)
            rows.append(dict(method=name, status="error", reason=str(e).splitlines()[0]))
            continue
        rows.append(dict(method=name, status="ok", peak_bytes=parts["peak"], peak_gib=parts["peak"] / GiB,
                         fits=parts["peak"] <= limit, budget_bytes=limit,
                         max_seq_len=longest, max_batch=largest, parts=parts))
    return rows


def sweep(cfg: ModelConfig, methods: list[str], seq_lens: list[int]) -> dict[str, list[float]]:
    """Predicted peak MiB per method at each sequence length (for the plot)."""
    return {m: [model_peak(cfg.replace(seq_len=n), m)["peak"] / MiB for n in seq_lens] for m in methods}


def plot(cfg: ModelConfig, methods: list[str], budget_bytes: int, path: str | Path,
         seq_lens: list[int] | None = None) -> Path:
    """PNG of predicted peak memory against sequence length per method, with the budget line."""
    plt = pyplot()

    if seq_lens is None:
        seq_lens = [2**k for k in range(8, 21)]
    curves = sweep(cfg, methods, seq_lens)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "v", "D", "x"]
    for i, (m, ys) in enumerate(curves.items()):
        # Methods with equal peaks overlap; the line styles keep each visible.
        ax.plot(seq_lens, [y / 1024 for y in ys], marker=markers[i % len(markers)],
                linestyle=styles[i % len(styles)], label=m)
    ax.axhline(budget_bytes / GiB, color="red", linestyle="--", label=f"budget {budget_bytes / GiB:.1f} GiB")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("predicted peak (GiB)")
    mode = "training (AdamW)" if cfg.training else "inference (KV cache)"
    ax.set_title(f"{cfg.layers}L d={cfg.d_model} H={cfg.heads} B={cfg.batch} {cfg.dtype}, {mode}"
                 + (", checkpointing" if cfg.checkpointing else ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return save(fig, path)


def measure_step(cfg: ModelConfig, method: str, *, seed: int = 0) -> int:
    """Measured peak bytes of one real step of ``cfg`` with ``method`` (CPU), counted like the
    plan: parameters and AdamW moments included (one warm-up step creates the moments)."""
    import torch

    from ..memory.measure import measure
    from ..nn import Transformer

    torch.manual_seed(seed)
    dtype = DTYPES[cfg.dtype]
    model = Transformer(cfg.vocab, cfg.d_model, cfg.heads, cfg.layers, kv_heads=cfg.kv_heads,
                        ffn_mult=cfg.ffn_mult, method=method, causal=cfg.causal,
                        checkpointing=cfg.checkpointing, **cfg.options).to(dtype)
    tokens = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq_len))
    targets = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq_len))
    params = list(model.parameters())
    if not cfg.training:
        with torch.no_grad():
            return measure(lambda p: model(tokens), params, repeats=0, warmup=0).peak_bytes
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(params, state):
        logits = model(tokens)  # (B, N, V)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, cfg.vocab), targets.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(params, None)  # creates AdamW's moments
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return measure(step, params, state, repeats=0, warmup=0).peak_bytes
