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

  which for equal slices and sharded KV heads is ``4·(P-1)/P · B·n·D·e·(Hq + Hkv)``;

* hybrid (U × R): the Ulysses terms inside my group of U, plus the ring terms over R with
  Hkv/U (or 1) key/value heads on the ring parts' lengths;
* linear context parallel: the state (B, Hkv, F, D+1) all-gathered forward and its gradient
  backward: ``2·(P-1)·B·Hkv·F·(D+1)·e`` (F = D for elu/relu features).
"""

from __future__ import annotations

from collections.abc import Sequence


def ring_bytes(*, lengths: Sequence[int], rank: int, batch: int, heads: int, kv_heads: int, head_dim: int,
               element_size: int) -> int:
    """Bytes rank ``rank`` sends in one ring_attention forward + backward."""
    world = len(lengths)
    if world == 1:
        return 0
    held = [lengths[(rank - t) % world] for t in range(world)]  # block held at step t
    elements = 2 * sum(held[:world - 1]) + sum(held)  # k/v twice (fwd, bwd), dk/dv at every step
    return 2 * batch * kv_heads * head_dim * element_size * elements


def _ulysses_kv_heads(heads: int, kv_heads: int, world: int) -> int:
    return kv_heads // world if kv_heads % world == 0 else 1


def ulysses_bytes(*, lengths: Sequence[int], rank: int, batch: int, heads: int, kv_heads: int, head_dim: int,
                  element_size: int) -> int:
    """Bytes rank ``rank`` sends in one ulysses_attention forward + backward."""
    world = len(lengths)
    h, h_kv = heads // world, _ulysses_kv_heads(heads, kv_heads, world)
    mine, others = lengths[rank], sum(lengths) - lengths[rank]
    # forward: q, k, v out (my positions to P-1 ranks), out back (their positions, my heads);
    # backward: dout out, dq, dk, dv back.
    per_position = (world - 1) * mine * (2 * h + 2 * h_kv) + others * (2 * h + 2 * h_kv)
    return batch * head_dim * element_size * per_position


def hybrid_bytes(*, lengths: Sequence[int], rank: int, ulysses: int, ring: int, batch: int, heads: int,
                 kv_heads: int, head_dim: int, element_size: int) -> int:
    """Bytes rank ``rank`` (= j·U + u) sends in one sequence_parallel_attention forward + backward."""
    j, u = divmod(rank, ulysses)
    group = list(lengths[j * ulysses:(j + 1) * ulysses])
    ring_lengths = [sum(lengths[i * ulysses:(i + 1) * ulysses]) for i in range(ring)]
    shape = dict(batch=batch, head_dim=head_dim, element_size=element_size)
    return (ulysses_bytes(lengths=group, rank=u, heads=heads, kv_heads=kv_heads, **shape)
            + ring_bytes(lengths=ring_lengths, rank=j, heads=heads // ulysses,
                         kv_heads=_ulysses_kv_heads(heads, kv_heads, ulysses), **shape))


def linear_bytes(*, world: int, batch: int, heads: int, kv_heads: int, head_dim: int, element_size: int,
                 features: int | None = None) -> int:
    """Bytes each rank sends in one linear_context_parallel forward + backward."""
    f = head_dim if features is None else features
    return 2 * (world - 1) * batch * kv_heads * f * (head_dim + 1) * element_size


def scheme_bytes(scheme: str, *, lengths: Sequence[int], rank: int, batch: int, heads: int, kv_heads: int,
                 head_dim: int, element_size: int, ulysses: int | None = None) -> int:
    """Bytes for ``scheme`` in "ring", "ulysses", "hybrid" (``ulysses`` = U) or "linear"."""
    shape = dict(batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim, element_size=element_size)
    if scheme == "ring":
        return ring_bytes(lengths=lengths, rank=rank, **shape)
    if scheme == "ulysses":
        return ulysses_bytes(lengths=lengths, rank=rank, **shape)
    if scheme == "hybrid":
        if ulysses is None or len(lengths) % ulysses:
            raise ValueError(f"scheme='hybrid' needs ulysses= dividing the {len(lengths)} ranks, got {ulysses!r}")
        return hybrid_bytes(lengths=lengths, rank=rank, ulysses=ulysses, ring=len(lengths) // ulysses, **shape)
    if scheme == "linear":
        return linear_bytes(world=len(lengths), **shape)
    raise ValueError(f"scheme must be one of ring, ulysses, hybrid, linear, got {scheme!r}")
