"""Bytes each rank sends per training step (forward + backward of one attention call).

Closed forms of what ``comm``'s counters measure (payload only: the shape handshakes, a few
int64 per rank and call, are left out). ``lengths`` are every rank's local sequence lengths
(``Partition.lengths``), ``e`` the element size, ``n_r`` rank r's length, ``N = Σ n``:

* ring (P ranks, Hkv key/value heads): the forward sends the k/v block it holds at each of
  the P-1 steps; the backward sends them again, and the block's dk/dv at every one of P steps::

      2·B·Hkv·D·e · (2·Σ_{t<P-1} n_{r-t} + Σ_{t<P} n_{r-t})        ≈ (6P - 4) · B·Hkv·n·D·e

* Ulysses (P ranks, h = Hq/P query heads and h_kv key/value heads per rank: Hkv/P, or 1 when
  KV heads are replicated): q, k, v go out as head shards of my n_r positions, the output
  comes back for the other ranks' positions; the backward does the same with dout, dq, dk, dv::

      B·D·e · ((P-1)·n_r·(2h + 2h_kv) + (N - n_r)·(2h + 2h_kv))

  which for equal slices and sharded KV heads is ``4·(P-1)/P · B·n·D·e·(Hq + Hkv)``. With
  ``heads_per_pass`` = c (passes recomputed in the backward) the backward sends each pass's
  q, k, v out again, and a KV head read by several passes (c < Hq/Hkv) goes out once per
  pass: with h'_kv = (h/c) · (KV heads of a pass)::

      B·D·e · ((P-1)·n_r·(3h + 4h'_kv) + (N - n_r)·(2h + 2h'_kv))

  Query blocks (``query_blocks`` > 1) send each of those elements once too, in more
  messages: the same bytes as the passes path (without ``heads_per_pass`` they are one pass
  of all h heads).

* hybrid (U × R): the Ulysses terms inside my group of U, plus the ring terms over R with
  Hkv/U (or 1) key/value heads on the ring parts' lengths; with Ulysses passes, the ring's
  forward runs twice (``3·Σ_{t<R-1}`` blocks instead of 2) on h'_kv key/value heads. The
  ring's ``kv_blocks`` (pieces of each block, one rotation each) change no byte: at every step
  the pieces of one block sum to the block;
* linear context parallel: the state (B, Hkv, F, D+1) all-gathered forward and its gradient
  backward: ``2·(P-1)·B·Hkv·F·(D+1)·e`` (F = D for elu/relu features).
"""

from __future__ import annotations

from collections.abc import Sequence


def ring_bytes(*, lengths: Sequence[int], rank: int, batch: int, heads: int, kv_heads: int, head_dim: int,
               element_size: int, forwards: int = 1) -> int:
    """Bytes rank ``rank`` sends in one ring_attention backward and ``forwards`` forwards
    (2 when a Ulysses pass recomputes it)."""
    world = len(lengths)
    if world == 1:
        return 0
    held = [lengths[(rank - t) % world] for t in range(world)]  # block held at step t
    # k/v at P-1 steps of every forward and of the backward, dk/dv at every step
    elements = (forwards + 1) * sum(held[:world - 1]) + sum(held)
    return 2 * batch * kv_heads * head_dim * element_size * elements


def _ulysses_kv_heads(heads: int, kv_heads: int, world: int) -> int:
    return kv_heads // world if kv_heads % world == 0 else 1


def sent_kv_heads(heads: int, kv_heads: int, world: int, heads_per_pass: int | None) -> int:
    """Key/value heads a rank's passes exchange in all: h_kv, or more when passes of
    ``heads_per_pass`` query heads share a KV head (each pass sends it)."""
    h, h_kv = heads // world, _ulysses_kv_heads(heads, kv_heads, world)
    if heads_per_pass is None:
        return h_kv
    group = h // h_kv
    per_pass = heads_per_pass // group if heads_per_pass >= group else 1
    return h // heads_per_pass * per_pass


def ulysses_bytes(*, lengths: Sequence[int], rank: int, batch: int, heads: int, kv_heads: int, head_dim: int,
                  element_size: int, heads_per_pass: int | None = None, query_blocks: int = 1) -> int:
    """Bytes rank ``rank`` sends in one ulysses_attention forward + backward.

    Query blocks send every element of the passes path once, in more messages: the same bytes
    (``query_blocks`` > 1 without passes is one pass of all Hq/P heads).
    """
    world = len(lengths)
    if query_blocks > 1 and heads_per_pass is None:
        heads_per_pass = heads // world
    h, h_kv = heads // world, sent_kv_heads(heads, kv_heads, world, heads_per_pass)
    mine, others = lengths[rank], sum(lengths) - lengths[rank]
    # forward: q, k, v out (my positions to P-1 ranks), out back (their positions, my heads);
    # backward: dout out, dq, dk, dv back (and, with passes, q, k, v out again).
    out_heads = 2 * h + 2 * h_kv if heads_per_pass is None else 3 * h + 4 * h_kv
    per_position = (world - 1) * mine * out_heads + others * (2 * h + 2 * h_kv)
    return batch * head_dim * element_size * per_position


def hybrid_bytes(*, lengths: Sequence[int], rank: int, ulysses: int, ring: int, batch: int, heads: int,
                 kv_heads: int, head_dim: int, element_size: int, ulysses_heads_per_pass: int | None = None) -> int:
    """Bytes rank ``rank`` (= j·U + u) sends in one sequence_parallel_attention forward + backward."""
    j, u = divmod(rank, ulysses)
    group = list(lengths[j * ulysses:(j + 1) * ulysses])
    ring_lengths = [sum(lengths[i * ulysses:(i + 1) * ulysses]) for i in range(ring)]
    shape = dict(batch=batch, head_dim=head_dim, element_size=element_size)
    return (ulysses_bytes(lengths=group, rank=u, heads=heads, kv_heads=kv_heads, heads_per_pass=ulysses_heads_per_pass,
                          **shape)
            + ring_bytes(lengths=ring_lengths, rank=j, heads=heads // ulysses,
                         kv_heads=sent_kv_heads(heads, kv_heads, ulysses, ulysses_heads_per_pass),
                         forwards=1 if ulysses_heads_per_pass is None else 2, **shape))


def linear_bytes(*, world: int, batch: int, heads: int, kv_heads: int, head_dim: int, element_size: int,
                 features: int | None = None) -> int:
    """Bytes each rank sends in one linear_context_parallel forward + backward."""
    f = head_dim if features is None else features
    return 2 * (world - 1) * batch * kv_heads * f * (head_dim + 1) * element_size


def scheme_bytes(scheme: str, *, lengths: Sequence[int], rank: int, batch: int, heads: int, kv_heads: int,
                 head_dim: int, element_size: int, ulysses: int | None = None,
                 ulysses_heads_per_pass: int | None = None) -> int:
    """Bytes for ``scheme`` in "ring", "ulysses", "hybrid" (``ulysses`` = U) or "linear";
    ``ulysses_heads_per_pass``: the ``heads_per_pass`` of Ulysses or of the hybrid's Ulysses level."""
    shape = dict(batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim, element_size=element_size)
    if scheme == "ring":
        return ring_bytes(lengths=lengths, rank=rank, **shape)
    if scheme == "ulysses":
        return ulysses_bytes(lengths=lengths, rank=rank, heads_per_pass=ulysses_heads_per_pass, **shape)
    if scheme == "hybrid":
        if ulysses is None or len(lengths) % ulysses:
            raise ValueError(f"scheme='hybrid' needs ulysses= dividing the {len(lengths)} ranks, got {ulysses!r}")
        return hybrid_bytes(lengths=lengths, rank=rank, ulysses=ulysses, ring=len(lengths) // ulysses,
                            ulysses_heads_per_pass=ulysses_heads_per_pass, **shape)
    if scheme == "linear":
        return linear_bytes(world=len(lengths), **shape)
    raise ValueError(f"scheme must be one of ring, ulysses, hybrid, linear, got {scheme!r}")
