"""Per-rank peak memory and bytes sent of the sequence-parallel schemes, without running them.

``per_rank(scheme, world_size=P, ...)`` answers for one training step (forward + backward of
one attention call, inputs requiring grad, as ``attnmem.estimate``). ``attnmem.estimate(...,
world_size=P, scheme=...)`` calls it.

Bytes sent are the closed forms of ``traffic`` (exact: the tests compare them with the
counters to the byte). The peak is a sum of the tensors alive in the phase that holds the
most, with I the rank's q, k, v shard (B, H, N/P, D each), I_h the head shards after the
Ulysses all-to-all (the same size, or larger when KV heads are replicated):

* ring: I and its gradients, out and lse, the ring's buffers (this pass's k/v block, the
  next, two travelling dk/dv and this block's share: 10 key/value heads' worth per head in a
  pass, of one piece's length with ``kv_blocks``), one pass of dout, and the local
  ``chunked`` kernel's transient on one (N/P)² pair (from ``attnmem.estimate``);
* Ulysses, the largest of: the forward all-to-alls (I + I_h + the send and receive buffers
  of one tensor: they run one tensor at a time), the local method on the full sequence of
  H/P heads (its ``attnmem.estimate`` peak, + I + one head shard of dout), the backward
  all-to-alls (2·I + I_h + two buffers: the head shards' gradients, which autograd holds
  until the exchange ends, and the sequence shards' being filled);
* hybrid: the same with the ring (on N/R positions of H/U heads) as the local method;
* with ``ulysses_heads_per_pass`` = c (passes recomputed in the backward), the largest of: the
  forward (I + the output shard + the local method's training peak on c heads), the local
  backward (I + the zeroed gradients I + one pass of dout + the local training peak on c
  heads) and the inverse exchange (2·I + the pass's head gradients + two buffers);
* with query blocks Q > 1 as well (``query_blocks``; by default Q = P for Ulysses with passes
  on the tiled kernel), the backward of a pass: 2·I + the pass's full-sequence k, v and their
  gradients (4 tensors of c_kv heads) + one block's q, dout, out and dq (N/Q positions of c
  heads) + the tiled kernel's training peak on one (N/Q)² block × key-chunk pair less that
  pair's inputs (views or counted). The forward and the final exchange of dk, dv hold less.

``benchmarks/distributed.py`` compares the prediction with the measured peaks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..memory.measure import MiB, Peak
from . import traffic as T
from .query_blocks import resolve_query_blocks
from .ulysses import check_heads

SCHEMES = ("ring", "ulysses", "hybrid")
# Key/value heads' worth of buffers per head in a ring pass (backward): the block, the next,
# dk/dv travelling in and out and this rank's share of them (k and v each).
_RING_BUFFERS = 10


# ``attnmem.estimate`` (the one-process estimate of a method), passed in by the caller: the
# memory package calls this module, so this module does not import it back.
LocalEstimate = Callable[..., Any]


def _ring_peak(local_estimate: LocalEstimate, *, batch: int, heads: int, kv_heads: int, n: int, head_dim: int,
               dtype: torch.dtype, heads_per_pass: int, kv_blocks: int = 1) -> int:
    e = torch.empty((), dtype=dtype).element_size()
    acc = 8 if dtype == torch.float64 else 4
    q = batch * heads * n * head_dim * e
    kv = batch * kv_heads * n * head_dim * e
    group = heads // kv_heads
    per_pass_kv = batch * heads_per_pass * n * head_dim * e
    piece_kv = batch * heads_per_pass * -(-n // kv_blocks) * head_dim * e  # one piece of a block
    pair = local_estimate("chunked", batch=batch, heads=group * heads_per_pass, kv_heads=heads_per_pass,
                           seq_len=n, head_dim=head_dim, dtype=dtype, training=True)
    return (2 * (q + 2 * kv) + q + batch * heads * n * acc + _RING_BUFFERS * piece_kv
            + group * per_pass_kv + pair.transient_bytes)


def _ulysses_peak(local_peak: int, *, seq_bytes: int, head_bytes: int, dout_head_bytes: int,
                  largest_head_bytes: int) -> int:
    # One tensor is exchanged at a time: its send and receive buffers besides what is held.
    buffers = 2 * largest_head_bytes
    forward_exchange = seq_bytes + head_bytes + buffers
    local = seq_bytes + local_peak + dout_head_bytes
    # The head shards' gradients (held by autograd until the exchange ends) and the sequence
    # shards' gradients being filled.
    backward_exchange = 2 * seq_bytes + head_bytes + buffers
    return max(forward_exchange, local, backward_exchange)


def _passes_peak(local_peak: int, *, seq_bytes: int, out_bytes: int, pass_bytes: int, dout_pass_bytes: int) -> int:
    forward = seq_bytes + out_bytes + local_peak
    backward = 2 * seq_bytes + dout_pass_bytes + local_peak
    inverse_exchange = 2 * seq_bytes + pass_bytes + 2 * dout_pass_bytes
    return max(forward, backward, inverse_exchange)


def default_heads_per_pass(kv_heads: int, batch: int, threads: int) -> int:
    """``ring_attention``'s default on CPU: the fewest KV heads that give each thread a (b, h) pair."""
    return min(kv_heads, max(1, math.ceil(threads / batch)))


def per_rank(scheme: str, *, local_estimate: LocalEstimate, world_size: int, batch: int, heads: int, seq_len: int,
             head_dim: int, kv_heads: int | None = None, dtype: torch.dtype = torch.float32, causal: bool = False,
             layout: str = "contiguous", documents: Any = None, ulysses: int | None = None,
             method: str = "chunked", heads_per_pass: int | None = None, threads_per_rank: int = 1,
             ulysses_heads_per_pass: int | None = None, query_blocks: int | None = None,
             kv_blocks: int | None = None, **options: Any) -> dict[str, Any]:
    """Predicted per-rank peak and bytes sent of one training step of ``scheme``.

    Args:
        scheme: "ring", "ulysses" or "hybrid" (``ulysses`` = U ranks per Ulysses group).
        local_estimate: ``attnmem.estimate``, for the local method's one-process peak.
        world_size: ranks P.
        batch, heads, seq_len, head_dim, kv_heads, dtype, causal: the whole problem (N = seq_len).
        layout: "contiguous", "zigzag" or "documents" (with ``documents``), for the ranks' lengths.
        method, **options: the local method of Ulysses (default ``chunked``).
        heads_per_pass: the ring's; default ``ring_attention``'s on CPU for ``threads_per_rank``.
        ulysses_heads_per_pass: ``heads_per_pass`` of Ulysses (or of the hybrid's Ulysses level):
            query heads per rank per pass, recomputed in the backward; None: all at once.
        query_blocks: Ulysses' ``query_blocks`` (None: its default, P blocks with passes on
            the tiled kernel, else 1).
        kv_blocks: the ring's (and the hybrid's ring's) ``kv_blocks`` (None: the default, 1 for
            the ring, 2 for the hybrid with passes, else 1).

    Returns:
        dict: ``peak_bytes`` (the largest rank's), ``sent_bytes`` (one per rank), ``lengths``
        (each rank's tokens), and the inputs of the prediction.

    Raises:
        ValueError: an unknown scheme, a grid that does not fit, heads that do not split.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size <= 0:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    dt = dtype
    e = torch.empty((), dtype=dt).element_size()
    kv_heads = heads if kv_heads is None else kv_heads
    u = {"ring": 1, "ulysses": world_size}.get(scheme, ulysses)
    if u is None or world_size % u:
        raise ValueError(f"scheme='hybrid' needs ulysses= dividing world_size={world_size}, got {ulysses!r}")
    r = world_size // u
    check_heads(heads, kv_heads, u, f"scheme={scheme!r}")
    from .hybrid import hybrid_partition

    lengths = hybrid_partition(layout, seq_len, ulysses=u, ring=r, documents=documents).lengths
    passes = None if scheme == "ring" else ulysses_heads_per_pass
    blocks = 1
    if scheme == "ulysses":
        blocks = resolve_query_blocks(query_blocks, passes, method, options, u, f"scheme={scheme!r}")
    elif query_blocks not in (None, 1):
        raise ValueError(f"query_blocks= is Ulysses'; scheme={scheme!r} takes kv_blocks=, got {query_blocks!r}")
    if scheme == "ulysses" and kv_blocks not in (None, 1):
        raise ValueError(f"kv_blocks= is the ring's; scheme='ulysses' takes query_blocks=, got {kv_blocks!r}")
    pieces = kv_blocks if kv_blocks is not None else (2 if scheme == "hybrid" and passes is not None else 1)
    sent = [T.scheme_bytes(scheme, lengths=lengths, rank=i, batch=batch, heads=heads, kv_heads=kv_heads,
                           head_dim=head_dim, element_size=e, ulysses=u, ulysses_heads_per_pass=passes)
            for i in range(world_size)]
    n = max(lengths)
    n_ring = max(sum(lengths[j * u:(j + 1) * u]) for j in range(r))
    hq = heads // u
    hkv = kv_heads // u if kv_heads % u == 0 else 1
    seq_bytes = batch * n * head_dim * e * (heads + 2 * kv_heads)
    head_bytes = batch * n_ring * head_dim * e * (hq + 2 * hkv)
    dout_head = batch * n_ring * head_dim * e * hq
    hpp = heads_per_pass or default_heads_per_pass(hkv, batch, threads_per_rank)
    if blocks > 1:
        peak = _blocks_rank_peak(local_estimate, passes or hq, blocks, batch=batch, hq=hq, hkv=hkv, seq_len=seq_len,
                                 head_dim=head_dim, dtype=dt, causal=causal, seq_bytes=seq_bytes, options=options)
    elif passes is not None:
        peak = _passes_rank_peak(scheme, local_estimate, passes, batch=batch, hq=hq, hkv=hkv, n=n, n_ring=n_ring,
                                 seq_len=seq_len, head_dim=head_dim, dtype=dt, causal=causal, method=method,
                                 seq_bytes=seq_bytes, out_bytes=batch * heads * n * head_dim * e,
                                 threads_per_rank=threads_per_rank, heads_per_pass=heads_per_pass,
                                 options=options, kv_blocks=pieces)
    elif scheme == "ring":
        peak = _ring_peak(local_estimate, batch=batch, heads=heads, kv_heads=kv_heads, n=n, head_dim=head_dim, dtype=dt,
                          heads_per_pass=hpp, kv_blocks=pieces)
    elif scheme == "ulysses":
        local = local_estimate(method, batch=batch, heads=hq, kv_heads=hkv, seq_len=seq_len, head_dim=head_dim,
                                dtype=dt, training=True, causal=causal, **options)
        peak = _ulysses_peak(local.peak_bytes, seq_bytes=seq_bytes, head_bytes=head_bytes, dout_head_bytes=dout_head,
                             largest_head_bytes=dout_head)
    else:
        ring = _ring_peak(local_estimate, batch=batch, heads=hq, kv_heads=hkv, n=n_ring, head_dim=head_dim, dtype=dt,
                          heads_per_pass=hpp, kv_blocks=pieces)
        peak = _ulysses_peak(ring, seq_bytes=seq_bytes, head_bytes=head_bytes, dout_head_bytes=dout_head,
                             largest_head_bytes=dout_head)
    return {"scheme": scheme, "world_size": world_size, "ulysses": u, "ring": r, "peak_bytes": int(peak),
            "sent_bytes": sent, "lengths": lengths, "heads_per_pass": hpp, "ulysses_heads_per_pass": passes,
            "query_blocks": blocks, "kv_blocks": pieces}


def _kv_per_pass(passes: int, hq: int, hkv: int) -> int:
    """KV heads one pass of ``passes`` query heads reads; ValueError unless the passes split the heads."""
    group = hq // hkv
    if passes <= 0 or hq % passes or (passes % group and group % passes):
        raise ValueError(f"ulysses_heads_per_pass must be a positive int dividing the {hq} query heads of each rank "
                         f"and a multiple or a divisor of the {group} query heads per key/value head; got {passes!r}")
    return passes // group if passes >= group else 1


def _blocks_rank_peak(local_estimate: LocalEstimate, passes: int, blocks: int, *, batch: int, hq: int, hkv: int,
                      seq_len: int, head_dim: int, dtype: torch.dtype, causal: bool, seq_bytes: int,
                      options: dict) -> int:
    """Per-rank peak of Ulysses with passes of ``passes`` heads and ``blocks`` query blocks
    (the backward of a pass, module docstring)."""
    kvc = _kv_per_pass(passes, hq, hkv)
    e = torch.empty((), dtype=dtype).element_size()
    block = -(-seq_len // blocks)  # the largest block (tensor_split sizes)
    full_kv = batch * seq_len * head_dim * e * kvc  # one full-sequence tensor of the pass's KV heads
    block_q = batch * block * head_dim * e * passes  # one block of the pass's query heads
    pair = local_estimate("chunked", batch=batch, heads=passes, kv_heads=kvc, seq_len=block, head_dim=head_dim,
                          dtype=dtype, training=True, causal=causal, **options)
    # The pair's own inputs are not new: its queries are the block's (counted), its keys views of k, v.
    return 2 * seq_bytes + 4 * full_kv + 4 * block_q + pair.peak_bytes - pair.inputs_bytes


def _passes_rank_peak(scheme: str, local_estimate: LocalEstimate, passes: int, *, batch: int, hq: int, hkv: int,
                      n: int, n_ring: int, seq_len: int, head_dim: int, dtype: torch.dtype, causal: bool, method: str,
                      seq_bytes: int, out_bytes: int, threads_per_rank: int, heads_per_pass: int | None,
                      options: dict, kv_blocks: int = 1) -> int:
    """Per-rank peak of Ulysses (or the hybrid) run ``passes`` query heads per rank at a time."""
    kvc = _kv_per_pass(passes, hq, hkv)
    e = torch.empty((), dtype=dtype).element_size()
    if scheme == "ulysses":
        local = local_estimate(method, batch=batch, heads=passes, kv_heads=kvc, seq_len=seq_len, head_dim=head_dim,
                               dtype=dtype, training=True, causal=causal, **options).peak_bytes
    else:
        hpp = heads_per_pass or default_heads_per_pass(kvc, batch, threads_per_rank)
        local = _ring_peak(local_estimate, batch=batch, heads=passes, kv_heads=kvc, n=n_ring, head_dim=head_dim,
                           dtype=dtype, heads_per_pass=hpp, kv_blocks=kv_blocks)
    position = batch * n_ring * head_dim * e  # one head over the positions a pass sees
    return _passes_peak(local, seq_bytes=seq_bytes, out_bytes=out_bytes,
                        pass_bytes=position * (passes + 2 * kvc), dout_pass_bytes=position * passes)


@dataclass(frozen=True)
class RankEstimate(Peak):
    """``attnmem.estimate(..., world_size=P)``: one rank's predicted peak and the bytes every
    rank sends per training step (``per_rank``); ``inputs_bytes`` is the rank's q, k, v shard."""

    method: str
    scheme: str
    world_size: int
    ulysses: int
    peak_bytes: int
    inputs_bytes: int
    sent_bytes: tuple[int, ...]
    lengths: tuple[int, ...]
    source: str = "formula (per rank)"

    def __str__(self) -> str:
        return (f"{self.scheme} over {self.world_size} ranks ({self.method} locally): per-rank peak "
                f"{self.peak_mib:.1f} MiB, sends {max(self.sent_bytes) / MiB:.1f} MiB per step ({self.source})")


def rank_estimate(method: str, *, local_estimate: LocalEstimate, scheme: str, world_size: int, ulysses: int | None,
                  batch: int, heads: int, seq_len: int, head_dim: int, kv_heads: int | None, dtype: torch.dtype,
                  training: bool, causal: bool, mask: Any, **options: Any) -> RankEstimate:
    """``per_rank`` as the answer of ``attnmem.estimate``'s ``world_size`` hook."""
    if not training:
        raise ValueError("estimate(world_size=...) predicts training steps (forward + backward); got training=False")
    if mask is not None:
        raise ValueError("estimate(world_size=...) predicts unmasked or causal attention; got a mask")
    if method == "auto":
        method = "chunked"
    if scheme != "ulysses" and method not in ("chunked", "reference", "sdpa"):
        raise ValueError(f"scheme={scheme!r} runs exact softmax attention (the chunked kernel); got method={method!r}")
    p = per_rank(scheme, local_estimate=local_estimate, world_size=world_size, ulysses=ulysses, batch=batch,
                 heads=heads, seq_len=seq_len, head_dim=head_dim, kv_heads=kv_heads, dtype=dtype, causal=causal,
                 method=method, **options)
    hkv = heads if kv_heads is None else kv_heads
    inputs = batch * max(p["lengths"]) * head_dim * (heads + 2 * hkv) * torch.empty((), dtype=dtype).element_size()
    return RankEstimate(method, scheme, world_size, p["ulysses"], p["peak_bytes"], inputs, tuple(p["sent_bytes"]),
                        tuple(p["lengths"]))




def default_ulysses(world_size: int, heads: int, kv_heads: int) -> int:
    """The hybrid's U by default (``SequenceParallel``'s rule): the largest proper divisor of
    the world size that splits the query heads and shards or replicates the KV heads (U = P when
    P is the only one, 1 when none splits)."""
    fits = [u for u in range(1, world_size + 1) if world_size % u == 0 and heads % u == 0
            and (kv_heads % u == 0 or u % kv_heads == 0)]
    proper = [u for u in fits if u < world_size] or fits
    return max(proper)


def plan_ranks(cfg: Any, budget: int, *, local_estimate: LocalEstimate, world_size: int,
               schemes: Sequence[str] | None = None, methods: Sequence[str] | None = None,
               ulysses: int | None = None, ulysses_heads_per_pass: int | None = None,
               layout: str = "zigzag") -> list[dict[str, Any]]:
    """``attnmem.plan(..., world_size=P)``: one layer's attention of ``cfg`` (a ``ModelConfig``)
    over P ranks, per scheme (and local method): the per-rank peak and the bytes every rank
    sends per training step, as ``attnmem.estimate(..., world_size=P)`` answers them (its
    ``local_estimate``); each layer makes one such call, so a step sends ``layers`` times the
    call's bytes. ``fits``: the per-rank attention peak (the call alone) within ``budget``.
    """
    if not cfg.training:
        raise ValueError("plan(world_size=...) predicts training steps; got a config with training=False")
    rows = []
    single: dict[str, int] = {}
    for scheme in schemes or SCHEMES:
        if scheme not in SCHEMES:
            raise ValueError(f"schemes must be among {', '.join(SCHEMES)}, got {scheme!r}")
        u = ulysses if ulysses is not None else default_ulysses(world_size, cfg.heads, cfg.hkv)
        for method in methods or ["chunked"]:
            row: dict[str, Any] = dict(scheme=scheme, method=method, world_size=world_size,
                                       ulysses=u if scheme == "hybrid" else None)
            try:
                if method not in single:
                    single[method] = local_estimate(method, **_shape(cfg)).peak_bytes
                est = local_estimate(method, **_shape(cfg), world_size=world_size, scheme=scheme,
                                     ulysses=u if scheme == "hybrid" else None, layout=layout,
                                     ulysses_heads_per_pass=ulysses_heads_per_pass)
            except ValueError as e:
                rows.append({**row, "status": "error", "reason": str(e).splitlines()[0]})
                continue
            rows.append({**row, "status": "ok", "ulysses": est.ulysses, "ring": world_size // est.ulysses,
                         "attention_peak_bytes": est.peak_bytes, "attention_peak_mib": est.peak_mib,
                         "single_process_peak_bytes": single[method],
                         "peak_ratio": est.peak_bytes / single[method], "fits": est.peak_bytes <= budget,
                         "budget_bytes": budget, "lengths": list(est.lengths),
                         "sent_bytes_per_layer": list(est.sent_bytes),
                         "sent_bytes_per_step": [cfg.layers * b for b in est.sent_bytes]})
    return rows


def _shape(cfg: Any) -> dict[str, Any]:
    """One layer's attention call of a ``ModelConfig``, as ``estimate``'s keywords."""
    return dict(batch=cfg.batch, heads=cfg.heads, kv_heads=cfg.hkv, seq_len=cfg.seq_len, head_dim=cfg.head_dim,
                dtype=cfg.dtype, training=True, causal=cfg.causal, mask=cfg.mask, **cfg.options)


__all__ = ["per_rank", "rank_estimate", "RankEstimate", "SCHEMES", "plan_ranks", "default_ulysses"]
