"""How much memory a training step takes: measured (``step_peak``, ``linear_peak_fn``) or
predicted without allocating (``estimated_peak_fn``), and the largest batch under a budget."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..memory.measure import MiB
from ..tasks import IGNORE, make_task
from .loop import TrainConfig, build, step_peak


def linear_peak_fn(config: TrainConfig, probe_batches: tuple[int, int] = (4, 8)) -> Callable[[int], int]:
    """A peak-bytes-of-a-training-step function of the batch size: two real steps measured
    with ``attnmem.measure`` at ``probe_batches``, extrapolated linearly (peak ≈ fixed + b · per
    sample). The probes must be large enough that activations, which grow with the batch, set
    the peak rather than the optimizer update (parameters, gradients and AdamW state, which do
    not); at the tiniest batches the update dominates and the line would be too flat.

    ``attnmem train --max-batch-under`` uses ``estimated_peak_fn`` instead (``attnmem.plan``'s
    prediction, nothing allocated); ``max_batch_under`` takes either.

    Raises:
        ValueError: probe batches that are not two increasing positive ints.
    """
    b1, b2 = probe_batches
    if not 0 < b1 < b2:
        raise ValueError(f"probe_batches must be two increasing positive ints, got {probe_batches!r}")
    task, model, opt, _ = build(config)
    g = torch.Generator().manual_seed(config.seed)
    peaks = [step_peak(model, opt, *task.sample(b, g))[0] for b in (b1, b2)]
    per_sample = max((peaks[1] - peaks[0]) / (b2 - b1), 0.0)
    fixed = peaks[0] - b1 * per_sample
    return lambda b: int(math.ceil(fixed + b * per_sample))


def plan_config(config: TrainConfig, batch_size: int | None = None):
    """``config``'s training step as an ``attnmem.memory.plan.ModelConfig`` (AdamW, float32): the
    same ``Transformer`` shape, the task's vocabulary and head width, the rows that reach the head
    (the labelled positions of a language-model task, the last token of a classification), the
    method, its options and mask."""
    from ..memory.plan import ModelConfig

    task = make_task(config.task, seq_len=config.seq_len, **config.task_options)
    if task.kind == "classify":
        rows = 1
    else:  # the most labelled positions of a few examples (MQAR: num_pairs, selective copy: num_tokens)
        _, labels = task.sample(8, torch.Generator().manual_seed(config.seed))
        rows = max(int((labels != IGNORE).sum(1).max()), 1)
    return ModelConfig(layers=config.n_layers, d_model=config.d_model, heads=config.n_heads,
                       vocab=task.vocab_size, num_outputs=task.num_outputs, head_rows=rows,
                       seq_len=config.seq_len, batch=batch_size or config.batch_size, dtype="float32",
                       training=True, checkpointing=config.checkpointing, causal=True,
                       options=config.attention_options(), mask=config.mask())


def estimated_peak_fn(config: TrainConfig) -> Callable[[int], int]:
    """Peak bytes of one training step (weights, gradients, AdamW moments, activations) as a
    function of the batch size, predicted by ``attnmem.memory.plan.model_peak`` (closed forms
    plus ``attnmem.estimate`` for the attention; nothing is allocated)."""
    from ..memory.plan import model_peak

    base = plan_config(config)
    return lambda b: model_peak(base.replace(batch=b), config.method)["peak"]


def max_batch_under(budget_bytes: int, peak_fn: Callable[[int], int], *, limit: int = 1 << 20) -> int:
    """The largest batch ``b <= limit`` with ``peak_fn(b) <= budget_bytes``, assuming the peak
    grows with ``b``: doubling to bracket it, then bisection (O(log b) calls of ``peak_fn``).

    Raises:
        ValueError: a non-positive budget, or when even a batch of 1 does not fit.
    """
    if budget_bytes <= 0:
        raise ValueError(f"budget must be positive, got {budget_bytes} bytes")
    first = peak_fn(1)
    if first > budget_bytes:
        raise ValueError(f"a batch of 1 needs {first / MiB:.1f} MiB, more than the budget of "
                         f"{budget_bytes / MiB:.1f} MiB")
    lo, hi = 1, 2  # peak_fn(lo) fits; hi is the first candidate not yet known to fit
    while hi <= limit and peak_fn(hi) <= budget_bytes:
        lo, hi = hi, hi * 2
    if hi > limit:
        hi = limit + 1
        if peak_fn(limit) <= budget_bytes:
            return limit
    while hi - lo > 1:  # invariant: lo fits, hi does not
        mid = (lo + hi) // 2
        if peak_fn(mid) <= budget_bytes:
            lo = mid
        else:
            hi = mid
    return lo
