"""What a method costs in quality, measured on a trained model's own attention inputs.

Three measurements, each on a model trained with exact attention (``attnmem.tasks.fit``):

* ``swap_attention(model, method, options)`` — the same weights with every attention layer's
  method replaced (the way users try sparse or top-k attention on a pretrained model). Its
  task quality (bits per byte, MQAR accuracy) is the *swapped* figure; a model trained with the
  method from scratch gives the *trained* figure.
* ``capture_attention_inputs(model, tokens)`` — the q, k, v (and the causal flag and mask) that
  reach every ``MultiHeadAttention`` in one forward pass, layer by layer, through forward hooks.
* ``captured_error(captures, method, options)`` — the method's output on those inputs against
  full exact attention *under the call's own mask* (what the user would otherwise compute):
  for ``sliding_window`` that is all causal keys, not the window, so a window that drops keys
  the model attends to shows an error. Relative Frobenius error per layer.

Stateful methods run through their module form (``attnmem.bench.cases.attend_fn``: freshly
built, untrained parameters, memory cleared); a method that cannot take the inputs (for
example a non-causal-only method on a causal model) is reported as not applicable, with the
method's own reasons.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import registry
from ..api import attention, validate
from ..nn.attention import MultiHeadAttention
from .cases import attend_fn

EXACT_PEER = "chunked"  # full exact attention under the mask: the oracle of captured_error


@dataclass(frozen=True)
class Captured:
    """The inputs of one attention call of a model: q (B, Hq, N, D), k and v (B, Hkv, N, D)."""

    layer: int
    q: Tensor
    k: Tensor
    v: Tensor
    causal: bool
    mask: Any


def attention_modules(model: nn.Module) -> list[MultiHeadAttention]:
    """Every ``MultiHeadAttention`` of ``model``, in forward order of registration."""
    return [m for m in model.modules() if isinstance(m, MultiHeadAttention)]


def swap_attention(model: nn.Module, method: str, options: dict[str, Any] | None = None, *,
                   seed: int = 0) -> nn.Module:
    """A copy of ``model`` whose every attention layer runs ``method`` with ``options``; the
    projections (all learned weights) are kept. A method with a module form of its own gets it
    built here, from ``seed`` (its parameters, if any, untrained).

    Raises:
        ValueError: an unknown method or a model without ``MultiHeadAttention`` layers.
        TypeError: an option the method does not take.
    """
    options = dict(options or {})
    m = registry.get(method)
    opts = m.make_options(options)
    swapped = copy.deepcopy(model)
    layers = attention_modules(swapped)
    if not layers:
        raise ValueError(f"swap_attention: {type(model).__name__} has no attnmem.nn.MultiHeadAttention layer")
    for i, attn in enumerate(layers):
        if attn.sequence_parallel is not None:
            raise ValueError("swap_attention: a sequence-parallel layer runs ring attention, not a method")
        attn.method, attn.options = method, dict(options)
        attn.inner = None
        if m.stateful or m.has_module:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + i)
                inner = m.build_module(heads=attn.n_heads, kv_heads=attn.kv_heads, head_dim=attn.head_dim,
                                       opts=opts)
            attn.inner = inner.to(attn.q_proj.weight.device, attn.q_proj.weight.dtype)
    return swapped


@torch.no_grad()
def capture_attention_inputs(model: nn.Module, tokens: Tensor, **forward_kwargs: Any) -> list[Captured]:
    """Run ``model(tokens)`` once and return what every attention layer received.

    Raises:
        ValueError: a model without ``MultiHeadAttention`` layers.
    """
    layers = attention_modules(model)
    if not layers:
        raise ValueError(f"capture_attention_inputs: {type(model).__name__} has no attnmem.nn.MultiHeadAttention")
    captured: list[Captured] = []

    def hook(module: MultiHeadAttention, args: tuple, kwargs: dict, output: Tensor) -> None:
        q, k, v = module.project(args[0], kwargs.get("positions"))  # (B, Hq, N, D), (B, Hkv, N, D) ×2
        captured.append(Captured(layer=len(captured), q=q, k=k, v=v, causal=module.causal,
                                 mask=kwargs.get("mask")))

    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in layers]
    was_training = model.training
    model.eval()
    try:
        model(tokens, **forward_kwargs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return captured


def relative_error(approx: Tensor, exact: Tensor) -> float:
    """‖approx − exact‖_F / ‖exact‖_F, in float64."""
    return float((approx.double() - exact.double()).norm() / exact.double().norm().clamp_min(1e-300))


def not_applicable_reasons(method: str, options: dict[str, Any], cap: Captured) -> list[str]:
    """Why ``method`` cannot run on captured inputs, asked of the method itself."""
    m = registry.get(method)
    # A stateful method's module may refuse more when it runs (captured_error reports that too).
    return m.not_supported_reasons(validate(cap.q, cap.k, cap.v, causal=cap.causal, mask=cap.mask),
                                   m.make_options(options))


@torch.no_grad()
def captured_error(captures: list[Captured], method: str, options: dict[str, Any] | None = None, *,
                   seed: int = 0) -> dict[str, Any]:
    """The error of ``method`` on every captured layer against full exact attention under that
    layer's mask (``EXACT_PEER``).

    Returns ``{"status": "ok", "error_mean", "error_max", "error_per_layer"}``, or
    ``{"status": "not applicable", "reason"}`` when the method refuses the inputs.
    """
    options = dict(options or {})
    m = registry.get(method)
    if not captures:
        raise ValueError("captured_error needs at least one captured layer")
    reasons = not_applicable_reasons(method, options, captures[0])
    if reasons:
        return {"status": "not applicable", "reason": "; ".join(reasons)}
    errors = []
    for cap in captures:
        exact = attention(cap.q, cap.k, cap.v, method=EXACT_PEER, causal=cap.causal, mask=cap.mask)
        attend = attend_fn(method, heads=cap.q.shape[1], kv_heads=cap.k.shape[1], head_dim=cap.q.shape[3],
                           seq_len=cap.q.shape[2], options=options, seed=seed + cap.layer)
        try:
            approx = attend(cap.q, cap.k, cap.v, cap.causal, cap.mask)
        except (ValueError, TypeError, NotImplementedError) as e:
            return {"status": "not applicable", "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        errors.append(relative_error(approx, exact))
    note = "module form, untrained parameters" if m.stateful else ""
    return {"status": "ok", "error_mean": sum(errors) / len(errors), "error_max": max(errors),
            "error_per_layer": errors, "note": note}


# --- trained models: load, score, swap, capture -------------------------------------------

def method_specs(seq_len: int) -> list[str]:
    """One option set per registered method, scaled to ``seq_len`` (a power of two >= 64): the
    sparse and selective methods keep about an eighth of the keys, so that a method that fits
    in far less memory than full attention also has something to lose."""
    w = max(seq_len // 8, 4)
    specs = ["reference", "sdpa", "chunked", f"sliding_window:window={w}", f"dilated:window={w // 2},dilation=2",
             f"longformer:window={w}", f"bigbird:block={max(seq_len // 16, 4)}", f"strided:stride={w}",
             f"topk:topk={w}", "hard", "linear", "performer:features=64", f"hierarchical:block={max(seq_len // 16, 4)}",
             f"adaptive_span_fixed:spans={w}", f"adaptive_span:max_span={w}", f"nystrom:landmarks={w}",
             f"linformer:max_len={seq_len},k={w}", f"recurrent_memory:segment={seq_len // 4},memory={seq_len // 4}",
             f"knn_memory:segment={seq_len // 4},capacity={seq_len},topk={w}"]
    missing = sorted(set(registry.names()) - {s.partition(":")[0] for s in specs})
    return specs + missing  # a method registered later is still measured, with its defaults


def load_trained(run_dir: str):
    """(config, model, final metrics) of a run written by ``attnmem.tasks.fit`` with ``out_dir``.

    Raises:
        ValueError: no checkpoint in ``run_dir``.
    """
    from ..training import CHECKPOINT, TrainConfig, build, load_checkpoint

    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        raise ValueError(f"no checkpoint at {path}; train first")
    state = load_checkpoint(path)
    config = TrainConfig(**state["config"])
    _, model, _, _ = build(config)
    model.load_state_dict(state["model"])
    model.eval()
    history = state["history"]
    return config, model, {**(history[-1] if history else {}), "steps": state["step"],
                           "train_time_s": state["train_time"], "wall_s": state["wall_s"],
                           "peak_mib": (state["peak_bytes"] or 0) / 2**20}


def _reset(model: nn.Module) -> None:
    net = getattr(model, "net", model)
    if callable(getattr(net, "reset_memory", None)):
        net.reset_memory()  # memory attention: each evaluation batch is a new document


@torch.no_grad()
def score(model: nn.Module, task: Any, inputs: Tensor, labels: Tensor, batch_size: int = 8) -> dict[str, float]:
    """Bits per byte (text) or accuracy over labelled positions (MQAR and other tasks) of a
    ``TaskModel`` on fixed held-out inputs, each batch a fresh document for memory methods."""
    from ..tasks import IGNORE
    from ..tasks.text import LN2

    model.eval()
    nats, correct, counted = 0.0, 0, 0
    for a in range(0, inputs.shape[0], batch_size):
        _reset(model)
        logits, target = model.scored(inputs[a:a + batch_size], labels[a:a + batch_size])  # (M, C), (M,)
        keep = target != IGNORE
        nats += float(nn.functional.cross_entropy(logits.double(), target, ignore_index=IGNORE, reduction="sum"))
        correct += int((logits.argmax(-1)[keep] == target[keep]).sum())
        counted += int(keep.sum())
    out = {"loss": nats / counted, "accuracy": correct / counted}
    if hasattr(task, "validation_windows"):  # a byte-level text task
        out["bpb"] = out["loss"] / LN2
    return out


def held_out_inputs(config: Any, task: Any, *, text_bytes: int, examples: int) -> tuple[Tensor, Tensor]:
    """The fixed held-out set a model is scored on: the first ``text_bytes`` validation bytes
    in windows of ``seq_len`` (text), or ``examples`` sequences from the held-out seed."""
    from ..training import EVAL_SEED_OFFSET

    if hasattr(task, "validation_windows"):
        return task.held_out().validation_windows(text_bytes)
    return task.sample(examples, torch.Generator().manual_seed(config.seed + EVAL_SEED_OFFSET))


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    from ..method_spec import parse_method_spec

    return parse_method_spec(spec)


# --- long context against short: the text target ------------------------------------------

def seed_stats(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value) and range (max − min) over seeds.

    Raises:
        ValueError: no values.
    """
    if not values:
        raise ValueError("seed_stats needs at least one value")
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return {"mean": mean, "std": var ** 0.5, "range": max(values) - min(values), "n": len(values)}


def context_margin(long: list[float], short: list[float], baseline: float, *, factor: float = 3.0) -> dict[str, Any]:
    """Whether a long context beats a short one by more than seed noise, and a baseline.

    ``long`` and ``short`` are one figure per seed (bits per byte: lower is better). The margin
    is ``mean(short) − mean(long)``; the spread is the larger of the two groups' ranges
    (max − min over seeds, the stricter of range and standard deviation for a few seeds). The
    target is met when the margin is at least ``factor`` × that spread and every long-context
    seed is below ``baseline``.
    """
    a, b = seed_stats(long), seed_stats(short)
    spread = max(a["range"], b["range"])
    margin = b["mean"] - a["mean"]
    return {"long": a, "short": b, "margin": margin, "spread": spread, "factor": factor,
            "margin_over_spread": margin / spread if spread > 0 else float("inf"),
            "beats_short": margin >= factor * spread and margin > 0,
            "baseline": baseline, "beats_baseline": max(long) < baseline,
            "short_beats_baseline": max(short) < baseline}


POSITION_EDGES = (0, 8, 32, 64, 128, 256, 512, 1024)  # the buckets of BENCHMARKS.md's by-position table


@torch.no_grad()
def bpb_by_position(model: nn.Module, inputs: Tensor, labels: Tensor, edges: tuple[int, ...] = POSITION_EDGES,
                    batch_size: int = 8) -> dict[str, float]:
    """Bits per byte of a byte-level ``TaskModel`` by position in its window: ``"a-b"`` is the
    mean over predictions at positions a .. b - 1 of every window (buckets past the window are
    left out). A model that reads its context gets better with position; one at bigram quality
    does not.

    Raises:
        ValueError: edges that are not increasing from 0.
    """
    from ..tasks.text import LN2

    if edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"edges must increase from 0, got {edges!r}")
    model.eval()
    N = inputs.shape[1]
    nats = torch.zeros(N, dtype=torch.float64)
    for a in range(0, inputs.shape[0], batch_size):
        _reset(model)
        logits = model(inputs[a:a + batch_size]).double()  # (b, N, 256)
        nats += nn.functional.cross_entropy(logits.transpose(1, 2), labels[a:a + batch_size],
                                            reduction="none").sum(0)  # (N,)
    nats /= inputs.shape[0]
    return {f"{lo}-{min(hi, N)}": float(nats[lo:hi].mean()) / LN2 for lo, hi in zip(edges, edges[1:]) if lo < N}
