"""Memory-augmented attention: segment recurrence (Transformer-XL) and a kNN memory (Memorizing Transformers).

Both read a long input in segments of ``S`` tokens and keep what they remember of the past
outside the attention matrix, so peak memory depends on ``S`` and the memory's size, never on
the length of the stream:

* ``recurrent_memory`` (Dai et al. 2019) caches the keys and values of the last ``M`` tokens,
  detached from the graph, and prepends them to each segment's keys/values. Under
  ``causal=True`` every segment token sees all of the memory plus the earlier tokens of its
  segment — attnmem's bottom-right causal alignment with ``Nq = S < Nk = M + S``::

        memory (M)     segment (S)
      k: m m m m m | s0 s1 s2
    q s0 1 1 1 1 1 |  1  0  0
    q s1 1 1 1 1 1 |  1  1  0
    q s2 1 1 1 1 1 |  1  1  1

* ``knn_memory`` (Wu et al. 2022) keeps a first-in-first-out store of up to ``C`` past (k, v)
  pairs per key/value head. Each query retrieves its top-``k`` keys by inner product (exact
  search over the store in chunks) and attends over them together with the causal keys of its
  own segment, one softmax over both; a learned per-head gate ``g ∈ [0, 1]`` scales the
  retrieved keys' share (their logits get ``+ log g``): ``g = 1`` is exact attention over
  retrieved ∪ segment, ``g = 0`` is local attention alone. Equivalently the output is a mix of
  retrieved and local attention, weighted ``g·Z_ret : Z_loc`` by their softmax masses.

Both are stateful (``attnmem.nn.MultiHeadAttention(..., method=...)`` builds the module): the
memory persists across calls until ``reset()``; it is saved and loaded with ``state_dict``.
Gradients do not flow into the memory (stop-gradient, as in both papers).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..api import attention, validate
from ..memory.model import Footprint, Shape, outside
from ..registry import Capabilities, Inputs, Method, Style, register

# Each memory module reads (B, H, N, D) with N split into segments; masks other than causal do
# not survive that split (a user mask over N×N would have to be re-indexed per segment).
MEMORY_CAPS = Capabilities(mask=False)
SEARCH_BACKENDS = ("torch", "faiss")


def _check_int(name: str, val: Any, minimum: int) -> None:
    if not isinstance(val, int) or isinstance(val, bool) or val < minimum:
        want = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {want}, got {val!r}")


@dataclass(frozen=True)
class RecurrentMemoryOptions:
    """segment: tokens per segment S (> 0). memory: cached past tokens M (>= 0; 0 = none)."""

    segment: int = 512
    memory: int = 2048

    def __post_init__(self):
        _check_int("segment", self.segment, 1)
        _check_int("memory", self.memory, 0)


@dataclass(frozen=True)
class KNNMemoryOptions:
    """segment: tokens per segment S (> 0). capacity: store size C per (batch, kv head) (> 0).
    topk: keys retrieved per query (1 <= topk <= capacity). gate: None to learn a per-head
    gate (starts at 0.5), or a fixed number in [0, 1]. search_chunk: store entries scored at
    once (extra memory of the search is O(queries × search_chunk)). backend: "torch" (exact,
    chunked) or "faiss" (exact inner-product search, only when faiss is installed).
    """

    segment: int = 512
    capacity: int = 65536
    topk: int = 32
    gate: float | None = None
    search_chunk: int = 8192
    backend: str = "torch"

    def __post_init__(self):
        _check_int("segment", self.segment, 1)
        _check_int("capacity", self.capacity, 1)
        _check_int("topk", self.topk, 1)
        _check_int("search_chunk", self.search_chunk, 1)
        if self.topk > self.capacity:
            raise ValueError(f"topk must be <= capacity, got topk={self.topk} > capacity={self.capacity}")
        if self.gate is not None and (isinstance(self.gate, bool) or not isinstance(self.gate, (int, float))
                                      or not 0.0 <= self.gate <= 1.0):
            raise ValueError(f"gate must be None (learned) or a number in [0, 1], got {self.gate!r}")
        if self.backend not in SEARCH_BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(SEARCH_BACKENDS)}, got {self.backend!r}")
        if self.backend == "faiss" and importlib.util.find_spec("faiss") is None:
            raise ValueError("backend='faiss' needs the faiss package, which is not installed; use 'torch'")


class SegmentMemory(nn.Module):
    """Base of the memory modules: splits (B, H, N, D) inputs into segments, runs them in order.

    Subclasses implement ``attend_segment(q, k, v, causal)`` (which also updates the memory)
    and ``reset()``.
    """

    def __init__(self, *, heads: int, kv_heads: int, head_dim: int, segment: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.segment = heads, kv_heads, head_dim, segment
        self.scale = 1.0 / math.sqrt(head_dim)

    def check(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, mask: Any) -> None:
        validate(q, k, v, causal=causal)
        if mask is not None:
            raise ValueError(f"{type(self).__name__} does not take a mask (only causal=True/False), got {mask!r}")
        if q.shape[1] != self.heads or k.shape[1] != self.kv_heads or q.shape[3] != self.head_dim:
            raise ValueError(
                f"expected q with {self.heads} heads and k/v with {self.kv_heads} heads of dim {self.head_dim}, "
                f"got q {tuple(q.shape)}, k {tuple(k.shape)}"
            )
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"q and k must cover the same tokens, got Nq={q.shape[2]}, Nk={k.shape[2]}")

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, mask: Any = None) -> Tensor:
        """q (B, Hq, N, D), k and v (B, Hkv, N, D): the next N tokens of the stream -> (B, Hq, N, D).

        N may exceed the segment length; the tokens are then processed S at a time, in order.
        """
        self.check(q, k, v, causal, mask)
        outs = [self.attend_segment(q[:, :, a:a + self.segment], k[:, :, a:a + self.segment],
                                    v[:, :, a:a + self.segment], causal)
                for a in range(0, q.shape[2], self.segment)]
        return torch.cat(outs, dim=2) if outs else torch.zeros_like(q)

    def stream(self, q: Tensor, k: Tensor, v: Tensor, *, segment: int | None = None,
               causal: bool = True) -> Iterator[Tensor]:
        """Yield the outputs (B, Hq, s, D) of a long input, ``segment`` tokens (default S) at a time."""
        segment = self.segment if segment is None else segment
        _check_int("segment", segment, 1)
        for a in range(0, q.shape[2], segment):
            yield self(q[:, :, a:a + segment], k[:, :, a:a + segment], v[:, :, a:a + segment], causal=causal)

    def attend_segment(self, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError


class RecurrentMemoryAttention(SegmentMemory):
    """Transformer-XL segment recurrence: the last ``memory`` keys/values, prepended to each segment's."""

    def __init__(self, *, heads: int, kv_heads: int, head_dim: int, segment: int, memory: int):
        super().__init__(heads=heads, kv_heads=kv_heads, head_dim=head_dim, segment=segment)
        self.memory = memory
        # Not persistent: saved through get_extra_state, whose shape may differ from a fresh module's.
        self.register_buffer("mem_k", None, persistent=False)  # (B, Hkv, ≤M, D)
        self.register_buffer("mem_v", None, persistent=False)

    def reset(self) -> None:
        """Forget the memory (call between documents)."""
        self.mem_k = self.mem_v = None

    def attend_segment(self, q, k, v, causal):
        if self.mem_k is not None and self.mem_k.shape[0] != k.shape[0]:
            raise ValueError(f"batch size changed from {self.mem_k.shape[0]} to {k.shape[0]} with memory "
                             "held; call reset() between documents")
        if self.mem_k is not None:
            k_all = torch.cat([self.mem_k, k], dim=2)  # (B, Hkv, m + s, D)
            v_all = torch.cat([self.mem_v, v], dim=2)
        else:
            k_all, v_all = k, v
        # One query tile per segment and one key tile over memory + segment: the block map has a
        # single tile, so the segment runs as one kernel call (tiles are bounded by S and M).
        out = attention(q, k_all, v_all, method="chunked", causal=causal, scale=self.scale,
                        q_tile=self.segment, kv_tile=self.memory + self.segment)
        if self.memory > 0:
            # clone: keep M tokens, not a view that pins the (m + s)-token concatenation.
            self.mem_k = k_all[:, :, -self.memory:].detach().clone()  # (B, Hkv, ≤M, D)
            self.mem_v = v_all[:, :, -self.memory:].detach().clone()
        return out

    def get_extra_state(self) -> dict[str, Any]:
        return {"k": self.mem_k, "v": self.mem_v}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.mem_k, self.mem_v = state["k"], state["v"]

    def extra_repr(self) -> str:
        return f"segment={self.segment}, memory={self.memory}"


def topk_search(queries: Tensor, keys: Tensor, k: int, *, chunk: int) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` inner products of each query against ``keys``, scoring ``chunk`` keys at a time.

    Args:
        queries: (..., Q, D); keys: (..., C, D) with the same leading dims; 1 <= k <= C.
        chunk: keys scored per step; extra memory is O(Q · chunk), never O(Q · C).

    Returns:
        (scores, indices), each (..., Q, k), best first; indices into the C keys.

    Equivalent PyTorch code (which builds the full (Q, C) score matrix)::

        (queries @ keys.transpose(-1, -2)).topk(k, dim=-1)
    """
    n = keys.shape[-2]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (the number of keys), got {k}")
    best_val = best_idx = None
    for a in range(0, n, chunk):
        scores = queries @ keys[..., a:a + chunk, :].transpose(-1, -2)  # (..., Q, c)
        val, idx = scores.topk(min(k, scores.shape[-1]), dim=-1)
        del scores
        idx += a
        if best_val is not None:
            val = torch.cat([best_val, val], dim=-1)  # (..., Q, ≤ 2k)
            idx = torch.cat([best_idx, idx], dim=-1)
            val, pos = val.topk(min(k, val.shape[-1]), dim=-1)
            idx = idx.gather(-1, pos)
        best_val, best_idx = val, idx
    return best_val, best_idx


def faiss_search(queries: Tensor, keys: Tensor, k: int) -> Tensor:
    """Indices (..., Q, k) of the top-``k`` inner products through faiss' exact flat index."""
    import faiss  # optional; KNNMemoryOptions checked it is installed

    lead = queries.shape[:-2]
    qf = queries.reshape(-1, *queries.shape[-2:]).float().cpu()
    kf = keys.reshape(-1, *keys.shape[-2:]).float().cpu()
    out = []
    for qi, ki in zip(qf, kf):
        index = faiss.IndexFlatIP(ki.shape[-1])
        index.add(ki.contiguous().numpy())
        _, ids = index.search(qi.contiguous().numpy(), k)
        out.append(torch.from_numpy(ids))
    return torch.stack(out).reshape(*lead, queries.shape[-2], k).to(queries.device)


class KNNMemoryAttention(SegmentMemory):
    """Memorizing-Transformer attention: local causal attention plus top-k retrieval from a FIFO store."""

    def __init__(self, *, heads: int, kv_heads: int, head_dim: int, segment: int, capacity: int, topk: int,
                 gate: float | None, search_chunk: int, backend: str):
        super().__init__(heads=heads, kv_heads=kv_heads, head_dim=head_dim, segment=segment)
        self.capacity, self.topk, self.search_chunk, self.backend = capacity, topk, search_chunk, backend
        self.fixed_gate = gate
        # Learned gate g = sigmoid(gate_logit) per query head, starting at 0.5.
        self.gate_logit = nn.Parameter(torch.zeros(heads)) if gate is None else None
        # The ring buffer (B, Hkv, C, D), allocated at the first write. Slots [0, stored) are
        # valid; the next write goes to slot written % C, overwriting the oldest entry.
        self.register_buffer("store_k", None, persistent=False)
        self.register_buffer("store_v", None, persistent=False)
        self.written = 0

    @property
    def stored(self) -> int:
        """Entries currently in the store (per batch element and key/value head)."""
        return min(self.written, self.capacity)

    def reset(self) -> None:
        """Empty the store (call between documents); its buffer is kept for reuse."""
        self.written = 0

    def contents(self) -> tuple[Tensor, Tensor]:
        """The stored keys and values (B, Hkv, stored, D), oldest first."""
        if self.store_k is None or self.written == 0:
            raise ValueError("the store is empty")
        n = self.stored
        oldest = self.written % self.capacity if self.written >= self.capacity else 0
        order = (torch.arange(n, device=self.store_k.device) + oldest) % self.capacity
        return self.store_k[:, :, order], self.store_v[:, :, order]

    def log_gate(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """log g per query head (Hq,): the bias of retrieved keys' logits."""
        if self.gate_logit is not None:
            return F.logsigmoid(self.gate_logit).to(dtype)
        return torch.full((self.heads,), math.log(self.fixed_gate) if self.fixed_gate > 0 else -math.inf,
                          dtype=dtype, device=device)

    def write(self, k: Tensor, v: Tensor) -> None:
        """Append (B, Hkv, s, D) keys/values to the store, evicting the oldest beyond capacity."""
        B, Hkv, s, D = k.shape
        if self.store_k is None or self.store_k.shape[0] != B:
            self.store_k = k.new_zeros(B, Hkv, self.capacity, D)  # (B, Hkv, C, D)
            self.store_v = v.new_zeros(B, Hkv, self.capacity, D)
        elif self.store_k.dtype != k.dtype or self.store_k.device != k.device:
            self.store_k, self.store_v = self.store_k.to(k), self.store_v.to(v)
        drop = max(s - self.capacity, 0)  # a segment longer than the store keeps its newest C
        k, v = k[:, :, drop:], v[:, :, drop:]
        slots = (torch.arange(k.shape[2], device=k.device) + self.written + drop) % self.capacity
        self.store_k.index_copy_(2, slots, k.detach())
        self.store_v.index_copy_(2, slots, v.detach())
        self.written += s

    def retrieve(self, qg: Tensor) -> Tensor | None:
        """Slot indices (B, Hkv, Q, k) of each grouped query's top-k stored keys; None when empty."""
        n = self.stored
        if n == 0:
            return None
        k = min(self.topk, n)
        keys = self.store_k[:, :, :n]  # (B, Hkv, n, D)
        with torch.no_grad():
            if self.backend == "faiss":
                return faiss_search(qg, keys, k)
            return topk_search(qg, keys, k, chunk=self.search_chunk)[1]

    def attend_segment(self, q, k, v, causal):
        B, Hq, s, D = q.shape
        Hkv = k.shape[1]
        if self.store_k is not None and self.written and self.store_k.shape[0] != B:
            raise ValueError(f"batch size changed from {self.store_k.shape[0]} to {B} with a non-empty store; "
                             "call reset() between documents")
        G = Hq // Hkv
        qg = q.reshape(B, Hkv, G * s, D)  # (B, Hkv, G·s, D): query heads sharing a KV head
        s_loc = (qg @ k.transpose(-1, -2)) * self.scale  # (B, Hkv, G·s, s)
        if causal:
            future = torch.ones(s, s, dtype=torch.bool, device=q.device).triu_(1)
            s_loc = s_loc.view(B, Hkv, G, s, s).masked_fill(future, -math.inf).view(B, Hkv, G * s, s)
        idx = self.retrieve(qg)
        if idx is None:
            p = torch.softmax(s_loc, dim=-1)
            out = p @ v  # (B, Hkv, G·s, D)
        else:
            kk = idx.shape[-1]
            flat = idx.reshape(B, Hkv, G * s * kk, 1).expand(-1, -1, -1, D)
            k_ret = self.store_k.gather(2, flat).view(B, Hkv, G * s, kk, D)  # (B, Hkv, G·s, k, D)
            v_ret = self.store_v.gather(2, flat).view(B, Hkv, G * s, kk, D)
            s_ret = torch.einsum("bhqd,bhqkd->bhqk", qg, k_ret) * self.scale  # (B, Hkv, G·s, k)
            log_g = self.log_gate(q.dtype, q.device).view(1, Hkv, G, 1, 1)
            s_ret = (s_ret.view(B, Hkv, G, s, kk) + log_g).view(B, Hkv, G * s, kk)
            # One softmax over retrieved ∪ local; the local diagonal keeps every row non-empty.
            p = torch.softmax(torch.cat([s_ret, s_loc], dim=-1), dim=-1)  # (B, Hkv, G·s, k + s)
            out = torch.einsum("bhqk,bhqkd->bhqd", p[..., :kk], v_ret) + p[..., kk:] @ v
        self.write(k, v)
        return out.reshape(B, Hq, s, D)

    def get_extra_state(self) -> dict[str, Any]:
        n = self.stored
        has = self.store_k is not None and n > 0
        # Slots [0, n) in place (not oldest-first), so a reloaded store breaks ties identically.
        return {"k": self.store_k[:, :, :n].clone() if has else None,
                "v": self.store_v[:, :, :n].clone() if has else None,
                "written": self.written if has else 0}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.written = 0
        k, v = state["k"], state["v"]
        if k is None:
            return
        n = k.shape[2]
        if n > self.capacity:
            raise ValueError(f"saved store holds {n} entries, more than capacity={self.capacity}")
        self.store_k = k.new_zeros(*k.shape[:2], self.capacity, k.shape[3])
        self.store_v = v.new_zeros(*v.shape[:2], self.capacity, v.shape[3])
        self.store_k[:, :, :n] = k
        self.store_v[:, :, :n] = v
        self.written = state["written"]

    def extra_repr(self) -> str:
        gate = "learned" if self.fixed_gate is None else self.fixed_gate
        return (f"segment={self.segment}, capacity={self.capacity}, topk={self.topk}, gate={gate}, "
                f"backend={self.backend!r}")


class _SegmentMemory(Method):
    """What both memory methods refuse beyond their capabilities: a stream is one sequence, so
    queries and keys cover the same tokens."""

    def extra_reasons(self, inp: Inputs, opts) -> list[str]:
        if inp.nq != inp.nk:
            return [f"needs q and k over the same tokens (got Nq={inp.nq}, Nk={inp.nk})"]
        return []


@register
class RecurrentMemory(_SegmentMemory):
    name = "recurrent_memory"
    check_options = {"segment": 8, "memory": 12}
    style = Style("#7f7f7f", "*")
    family = "memory"
    exact = False
    stateful = True
    memory = "O(B·H·(S + M)·D) per segment, independent of the stream length"
    summary = "Transformer-XL: segments of S tokens attend to the cached keys/values of the last M tokens"
    caps = MEMORY_CAPS
    Options = RecurrentMemoryOptions

    def build_module(self, *, heads, kv_heads, head_dim, opts):
        return RecurrentMemoryAttention(heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                                        segment=opts.segment, memory=opts.memory)

    def memory_domain_reasons(self, s: Shape, opts) -> list[str]:
        return outside(recurrent_footprint(s, opts))

    def memory_model(self, s: Shape, opts) -> Footprint:
        return recurrent_footprint(s, opts)


@register
class KNNMemory(_SegmentMemory):
    name = "knn_memory"
    check_options = {"segment": 8, "capacity": 64, "topk": 4}
    style = Style("#c7c7c7", "X")
    family = "memory"
    exact = False
    stateful = True
    memory = "O(B·Hkv·C·D) store + O(B·H·S·(S + k)) per segment; search O(B·H·S·chunk)"
    summary = "Memorizing Transformers: top-k retrieval from a FIFO store of past keys, gated with local attention"
    caps = MEMORY_CAPS
    Options = KNNMemoryOptions

    def build_module(self, *, heads, kv_heads, head_dim, opts):
        return KNNMemoryAttention(heads=heads, kv_heads=kv_heads, head_dim=head_dim, segment=opts.segment,
                                  capacity=opts.capacity, topk=opts.topk, gate=opts.gate,
                                  search_chunk=opts.search_chunk, backend=opts.backend)

    def memory_domain_reasons(self, s: Shape, opts) -> list[str]:
        return outside(knn_footprint(s, opts))

    def memory_model(self, s: Shape, opts) -> Footprint:
        return knn_footprint(s, opts)


# --- memory model -----------------------------------------------------------------------------
# Each closed form returns the bytes of one call beyond its inputs (forward, +
# ``out.sum().backward()`` when ``s.training``) or, outside its domain, the reason (a str); the
# terms are read off the code above and checked against the fake-tensor trace
# (tests/test_estimate*.py). Notation: B batch, H = Hq query heads, Hkv key/value heads, N
# sequence length, D head dim, s bytes per element; Q = B·H·N·D·s, KV = B·Hkv·N·D·s.


def recurrent_footprint(s: Shape, opts) -> Footprint | str:
    """S = segment, M = memory, nseg = ⌈N/S⌉ segments; segment j has S_j tokens (the last
    one N − (nseg − 1)·S) and attends over its memory of m_j = min(M, j·S) cached tokens plus
    itself, as one chunked call over the concatenation K_j = [memory, segment] (m_j + S_j keys).

    Training: saved = O + every segment's output and log-sum-exp (N·(q + l)) + K_j and V_j of
    every segment with a memory (Σ_j 2·(m_j + S_j)·kv; the first segment, or M = 0, uses k, v
    themselves) + the final memory held by the module (2·min(M, N)·kv). The backward walks
    the segments last to first; each slice ``q[:, :, a:a+S]`` turns its gradient into a
    full-length buffer, which is added out of place to q.grad (likewise k, v). The peak is at
    the first such addition (the second-to-last segment, the last one's gradients having been
    taken as they are): dQ + dK + dV, minus the two segments' freed saved tensors, plus the
    larger of (adding dQ: a full-length buffer and the sum, 2·N·q) and (adding dK: 2·N·kv, with
    that segment's dV_j (m + S keys) and dQ_j (S rows) still alive). Causal or not alike.

    Forward only: the segment outputs and their concatenation (2·N·q) + the memory
    (2·min(M, N)·kv). Linear in N.

    Both hold once N ≥ 5·M + 3·S and nseg ≥ 3 (both last segments' memories are then full):
    beyond, one segment's own working set (its K_j, V_j, the old and new memory, its output and
    the masked tile's buffers under causal: at most about (5·M + 3·S)·q) is smaller than the
    full-length terms above. Shorter calls — a few segments, cheap to trace — are traced
    (None); there the peak falls inside one segment's kernel (off by up to 15 % at
    N = 5·S, M = 3·S, causal)."""
    b, h, hkv, n, d, e = s.batch, s.heads, s.kv_heads, s.seq_len, s.head_dim, s.itemsize
    seg, mem = opts.segment, opts.memory
    qt, kvt = b * h * d * e, b * hkv * d * e
    lt = b * h * (8 if e == 8 else 4)
    nseg = math.ceil(n / seg)
    mem_final = 2 * min(mem, n) * kvt
    if n < 5 * mem + 3 * seg or nseg < 3:
        return "shorter than 5·memory + 3·segment tokens or 3 segments: the peak is inside one segment (traced)"
    if not s.training:
        return Footprint(0, 2 * n * qt + mem_final)

    def seg_len(j: int) -> int:
        return min(seg, n - j * seg)

    def concat(j: int) -> int:  # K_j and V_j of segment j (none without a memory)
        m = min(mem, j * seg)
        return 2 * (m + seg_len(j)) * kvt if m > 0 else 0

    # Segments 1 .. nseg-1 have m_j = min(M, j·S): full ones (m = M) from j ≥ ⌈M/S⌉ on.
    full_from = math.ceil(mem / seg) if mem > 0 else nseg
    concat_all = sum(concat(j) for j in range(1, min(full_from, nseg)))
    if full_from < nseg:
        full = nseg - full_from - 1  # full-memory segments of full length (the last one apart)
        concat_all += full * 2 * (mem + seg) * kvt + concat(nseg - 1)
    saved = n * qt + n * (qt + lt) + concat_all + mem_final
    freed = sum(concat(j) + seg_len(j) * (qt + lt) for j in (nseg - 1, nseg - 2))
    grads = n * qt + 2 * n * kvt
    add_q = 2 * n * qt
    add_k = 2 * n * kvt + (min(mem, (nseg - 2) * seg) + seg) * kvt + seg * qt
    return Footprint(saved, grads - freed + max(add_q, add_k))


def knn_footprint(s: Shape, opts) -> Footprint | str:
    """S = segment, C = capacity, G = H/Hkv, nseg = ⌈N/S⌉ segments of S_j tokens (the last one
    N − (nseg − 1)·S); segment j ≥ 1 retrieves k_j = min(topk, C, j·S) stored keys per query.
    The store (2·B·Hkv·C·D·s) is allocated at the first write and held by the module.

    Training: saved = O (N·q) + the store + Σ_j P_j, where segment j ≥ 1 keeps P_j = its
    retrieved keys and values (2·B·Hkv·G·S_j·k_j·D·s), the softmax output over retrieved ∪
    local (B·Hkv·G·S_j·(k_j + S_j)·s), the causal mask (S_j² bytes, causal only), log g
    (H float32: the gate's log-sigmoid) and, under GQA (G > 1), the (B, Hkv, G·S_j, D) copy of
    its queries; segment 0 (an empty store) keeps only its local softmax (B·Hkv·G·S_0²·s), its
    mask and its query copy. The backward walks the segments last to first and accumulates
    q, k, v's gradients as recurrent_memory does: the peak is at the first out-of-place
    addition, dQ + dK + dV minus the last two segments' P_j, plus the larger of (adding dQ:
    2·N·q) and (adding dK: 2·N·kv with that segment's dV_j and dQ_j still alive, S·(kv + q)).
    Causal or not alike.

    Forward only: the segment outputs and their concatenation (2·N·q) + the store. Linear in N.

    Both hold once nseg ≥ 3 and N·q ≥ 3·(P + search), P one full segment's saved terms and
    search = B·H·S·min(search_chunk, C)·s its search scores: beyond, one segment's own working
    set (its saved terms, the local scores, the gathers and the search) is smaller than the
    full-length terms above. Shorter calls are traced (None), and so are the options not read
    off here (a fixed gate, the faiss backend). Every dtype alike: the segments run in the
    inputs' dtype with no float32 accumulator (the saved log g is the float32 log-sigmoid of the
    gate in every dtype), so bfloat16 and float16 are the same terms at s = 2 (tests check them
    against the trace)."""
    b, h, hkv, n, d, e = s.batch, s.heads, s.kv_heads, s.seq_len, s.head_dim, s.itemsize
    if opts.gate is not None or opts.backend != "torch":
        return "a fixed gate or the faiss backend is not modelled (traced)"
    seg, cap = opts.segment, opts.capacity
    g = h // hkv
    bh = b * hkv
    qt, kvt = b * h * d * e, b * hkv * d * e
    nseg = math.ceil(n / seg)
    store = 2 * bh * cap * d * e

    def seg_len(j: int) -> int:
        return min(seg, n - j * seg)

    def kept(j: int, sj: int | None = None) -> int:  # P_j: what segment j saves for backward
        sj = seg_len(j) if sj is None else sj
        mask = sj * sj if s.causal else 0
        qcopy = bh * g * sj * d * e if g > 1 else 0
        if j == 0:
            return bh * g * sj * sj * e + mask + qcopy
        kj = min(opts.topk, cap, j * seg)
        return 2 * bh * g * sj * kj * d * e + bh * g * sj * (kj + sj) * e + mask + h * 4 + qcopy

    search = bh * g * seg * min(opts.search_chunk, cap) * e
    if nseg < 3 or n * qt < 3 * (kept(nseg, seg) + search):
        return "fewer than 3 segments, or one segment's working set rivals the full-length terms (traced)"
    if not s.training:
        return Footprint(0, 2 * n * qt + store)
    # Segments 1 .. nseg-1: k_j = min(topk, C) from j ≥ ⌈topk/S⌉ on (all but the last of full length).
    full_from = min(math.ceil(opts.topk / seg), nseg - 1)
    kept_all = sum(kept(j) for j in range(full_from)) + kept(nseg - 1)
    kept_all += (nseg - 1 - full_from) * kept(full_from, seg)
    saved = n * qt + store + kept_all
    grads = n * qt + 2 * n * kvt
    freed = kept(nseg - 1) + kept(nseg - 2)
    return Footprint(saved, grads - freed + max(2 * n * qt, 2 * n * kvt + seg * (kvt + qt)))
