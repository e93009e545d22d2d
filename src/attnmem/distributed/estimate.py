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
  pass), one pass of dout, and the local ``chunked`` kernel's transient on one (N/P)² pair
  (from ``attnmem.estimate``);
* Ulysses, the largest of: the forward all-to-alls (I + I_h + the send and receive buffers
  of one tensor: they run one tensor at a time), the local method on the full sequence of
  H/P heads (its ``attnmem.estimate`` peak, + I + one head shard of dout), the backward
  all-to-alls (2·I + I_h + two buffers: the head shards' gradients, which autograd holds
  until the exchange ends, and the sequence shards' being filled);
* hybrid: the same with the ring (on N/R positions of H/U heads) as the local method.

``benchmarks/distributed.py`` compares the prediction with the measured peaks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..memory.measure import MiB, Peak
from . import traffic as T
from .ulysses import check_heads

SCHEMES = ("ring", "ulysses", "hybrid")
# Key/value heads' worth of buffers per head in a ring pass (backward): the block, the next,
# dk/dv travelling in and out and this rank's share of them (k and v each).
_RING_BUFFERS = 10


# ``attnmem.estimate`` (the one-process estimate of a method), passed in by the caller: the
# memory package calls this module, so this module does not import it back.
LocalEstimate = Callable[..., Any]


def _ring_peak(local_estimate: LocalEstimate, *, batch: int, heads: int, kv_heads: int, n: int, head_dim: int,
               dtype: torch.dtype, heads_per_pass: int) -> int:
    e = torch.empty((), dtype=dtype).element_size()
    acc = 8 if dtype == torch.float64 else 4
    q = batch * heads * n * head_dim * e
    kv = batch * kv_heads * n * head_dim * e
    group = heads // kv_heads
    per_pass_kv = batch * heads_per_pass * n * head_dim * e
    pair = local_estimate("chunked", batch=batch, heads=group * heads_per_pass, kv_heads=heads_per_pass,
                           seq_len=n, head_dim=head_dim, dtype=dtype, training=True)
    return (2 * (q + 2 * kv) + q + batch * heads * n * acc + _RING_BUFFERS * per_pass_kv
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


def default_heads_per_pass(kv_heads: int, batch: int, threads: int) -> int:
    """``ring_attention``'s default on CPU: the fewest KV heads that give each thread a (b, h) pair."""
    return min(kv_heads, max(1, math.ceil(threads / batch)))


def per_rank(scheme: str, *, local_estimate: LocalEstimate, world_size: int, batch: int, heads: int, seq_len: int,
             head_dim: int, kv_heads: int | None = None, dtype: torch.dtype = torch.float32, causal: bool = False,
             layout: str = "contiguous", documents: Any = None, ulysses: int | None = None,
             method: str = "chunked", heads_per_pass: int | None = None, threads_per_rank: int = 1,
             **options: Any) -> dict[str, Any]:
    """Predicted per-rank peak and bytes sent of one training step of ``scheme``.

    Args:
        scheme: "ring", "ulysses" or "hybrid" (``ulysses`` = U ranks per Ulysses group).
        local_estimate: ``attnmem.estimate``, for the local method's one-process peak.
        world_size: ranks P.
        batch, heads, seq_len, head_dim, kv_heads, dtype, causal: the whole problem (N = seq_len).
        layout: "contiguous", "zigzag" or "documents" (with ``documents``), for the ranks' lengths.
        method, **options: the local method of Ulysses (default ``chunked``).
        heads_per_pass: the ring's; default ``ring_attention``'s on CPU for ``threads_per_rank``.

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
    sent = [T.scheme_bytes(scheme, lengths=lengths, rank=i, batch=batch, heads=heads, kv_heads=kv_heads,
                           head_dim=head_dim, element_size=e, ulysses=u) for i in range(world_size)]
    n = max(lengths)
    n_ring = max(sum(lengths[j * u:(j + 1) * u]) for j in range(r))
    hq = heads // u
    hkv = kv_heads // u if kv_heads % u == 0 else 1
    seq_bytes = batch * n * head_dim * e * (heads + 2 * kv_heads)
    head_bytes = batch * n_ring * head_dim * e * (hq + 2 * hkv)
    dout_head = batch * n_ring * head_dim * e * hq
    hpp = heads_per_pass or default_heads_per_pass(hkv, batch, threads_per_rank)
    if scheme == "ring":
        peak = _ring_peak(local_estimate, batch=batch, heads=heads, kv_heads=kv_heads, n=n, head_dim=head_dim, dtype=dt,
                          heads_per_pass=hpp)
    elif scheme == "ulysses":
        local = local_estimate(method, batch=batch, heads=hq, kv_heads=hkv, seq_len=seq_len, head_dim=head_dim,
                                dtype=dt, training=True, causal=causal, **options)
        peak = _ulysses_peak(local.peak_bytes, seq_bytes=seq_bytes, head_bytes=head_bytes, dout_head_bytes=dout_head,
                             largest_head_bytes=dout_head)
    else:
        ring = _ring_peak(local_estimate, batch=batch, heads=hq, kv_heads=hkv, n=n_ring, head_dim=head_dim, dtype=dt,
                          heads_per_pass=hpp)
        peak = _ulysses_peak(ring, seq_bytes=seq_bytes, head_bytes=head_bytes, dout_head_bytes=dout_head,
                             largest_head_bytes=dout_head)
    return {"scheme": scheme, "world_size": world_size, "ulysses": u, "ring": r, "peak_bytes": int(peak),
            "sent_bytes": sent, "lengths": lengths, "heads_per_pass": hpp}


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


__all__ = ["per_rank", "rank_estimate", "RankEstimate", "SCHEMES"]
