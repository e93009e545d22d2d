"""Context parallel for causal linear attention: pass the state between ranks, not the keys.

Causal linear attention (``method="linear"``, Katharopoulos et al. 2020) reads everything
before a query through one F×(D+1) state ``S = Σ_j φ(k_j)ᵀ[v_j, 1]``. Split the sequence into
contiguous slices, one per rank: rank r's queries see the ranks before it only through the sum
of their states, an exclusive prefix sum (a scan)::

    rank r:   S_r = φ(K_r)ᵀ[V_r, 1]                      its own slice's state
              prefix_r = Σ_{s<r} S_s                    all_gather of the P states, local sum
              out = chunkwise causal linear attention of its slice, started from prefix_r

The backward is the scan reversed: the gradient of prefix_r reaches every earlier rank, so
rank s receives Σ_{r>s} dprefix_r (an all_gather of the P gradients and a local suffix sum).
Each rank sends (P-1)·B·Hkv·F·(D+1) elements forward and as many backward, whatever N is
(an all_gather; a log-depth scan would send less at large P). The local part keeps the
chunkwise form's memory, O(N/P·(D + C)) per head; autograd (not a written-out backward)
differentiates it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..api import validate
from .comm import all_gather, check_initialised, gather_ints

SCHEME = "linear_context_parallel"
FEATURE_MAPS = ("elu", "relu")


def _features(x: Tensor, feature_map: str) -> Tensor:
    return F.elu(x) + 1.0 if feature_map == "elu" else F.relu(x)


def _ones_column(v: Tensor) -> Tensor:
    return torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], -1)  # (…, L, D+1): [v, 1]


class _ExclusiveScan(torch.autograd.Function):
    """prefix_r = Σ_{s<r} S_s across the group; backward dS_s = Σ_{r>s} dprefix_r."""

    @staticmethod
    def forward(ctx, state: Tensor, group: Any):
        ctx.group = group
        every = all_gather(state, group, "combining the states of the earlier ranks (forward)", kind="linear state",
                           scheme=SCHEME)
        rank = dist.get_rank(group)
        return sum(every[:rank], torch.zeros_like(state))

    @staticmethod
    def backward(ctx, dprefix: Tensor):
        every = all_gather(dprefix.contiguous(), ctx.group, "returning the state gradients (backward)",
                           kind="linear state", scheme=SCHEME)
        rank = dist.get_rank(ctx.group)
        return sum(every[rank + 1:], torch.zeros_like(dprefix)), None


def _local(fq: Tensor, fk: Tensor, v1: Tensor, prefix: Tensor, chunk: int) -> Tensor:
    """[num, den] (B, Hkv, G, n, D+1) of this slice's queries: the prefix state, the state of
    the chunks before, and each chunk's own keys through an exact causal C×C product."""
    nums = []
    state = prefix  # (B, Hkv, 1, F, D+1)
    n = fq.shape[3]
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        scores = (fq[:, :, :, a:b] @ fk[:, :, :, a:b].transpose(-1, -2)).tril()  # (B, Hkv, G, C, C)
        nums.append(fq[:, :, :, a:b] @ state + scores @ v1[:, :, :, a:b])
        state = state + fk[:, :, :, a:b].transpose(-1, -2) @ v1[:, :, :, a:b]
    return torch.cat(nums, 3)


def linear_context_parallel(q: Tensor, k: Tensor, v: Tensor, *, group: Any = None, feature_map: str = "elu",
                            chunk: int = 256) -> Tensor:
    """Causal linear attention over a sequence split in contiguous slices across ``group``.

    The result equals ``attnmem.attention(q, k, v, method="linear", causal=True,
    feature_map=feature_map)`` on the whole sequence (module docstring).

    Args:
        q: this rank's queries (B, Hq, N_local, D) — the r-th contiguous slice.
        k, v: its keys and values (B, Hkv, N_local, D); Hq % Hkv == 0.
        group: the process group (default: the world).
        feature_map: "elu" (elu(x) + 1) or "relu", as for ``linear``.
        chunk: queries per chunk of the local causal product.

    Returns:
        (B, Hq, N_local, D); differentiable. A row whose denominator is 0 (relu features that
        see nothing) is zeros.

    Raises:
        ValueError: bad options or shapes, or ranks that disagree.
        SequenceParallelError: a peer failed, exited or timed out.
    """
    check_initialised(SCHEME)
    validate(q, k, v, causal=True)
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {', '.join(FEATURE_MAPS)}, got {feature_map!r}")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk <= 0:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    if q.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{SCHEME} sums states over the whole sequence: float32 or float64 only, got {q.dtype}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"{SCHEME} is self-attention over one split sequence: q has N_local={q.shape[2]}, "
                         f"k has {k.shape[2]}")
    B, Hq, n, D = q.shape
    Hkv = k.shape[1]
    table = gather_ints([B, Hq, Hkv, D, FEATURE_MAPS.index(feature_map)], group, q,
                        "exchanging shapes with the other ranks", scheme=SCHEME)
    for i, name in enumerate(["B", "Hq", "Hkv", "D", "feature_map"]):
        if len({row[i] for row in table}) > 1:
            raise ValueError(f"{SCHEME}: every rank must pass the same {name}, got {[row[i] for row in table]}")
    G = Hq // Hkv
    fq = _features(q.reshape(B, Hkv, G, n, D), feature_map)  # (B, Hkv, G, n, F)
    fk = _features(k.unsqueeze(2), feature_map)  # (B, Hkv, 1, n, F)
    v1 = _ones_column(v.unsqueeze(2))  # (B, Hkv, 1, n, D+1)
    own = fk.transpose(-1, -2) @ v1  # (B, Hkv, 1, F, D+1): this slice's state
    prefix = _ExclusiveScan.apply(own.contiguous(), group)
    num = _local(fq, fk, v1, prefix, chunk)  # (B, Hkv, G, n, D+1)
    den = num[..., D:]
    out = num[..., :D] / torch.where(den == 0, torch.ones_like(den), den)
    return out.reshape(B, Hq, n, D)


__all__ = ["linear_context_parallel"]
