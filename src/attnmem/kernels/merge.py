"""The log-sum-exp merge of partial attention results (the online-softmax rule).

Two partial results over disjoint key sets, each an output ``out`` (..., N, D) normalised over
its own keys and the log-sum-exp ``lse`` (..., N) of its scores, combine exactly::

    lse = logaddexp(lse_a, lse_b)
    out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

The tiled kernel merges its segments with it, ring attention its ranks' blocks, and the sparse
methods their separately computed rows; ``merge`` (``attnmem.merge``) is its public form over a
list of ``(out, lse)`` pairs, e.g. from ``attnmem.attention(..., return_lse=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def merge_partials(out_acc: Tensor, lse_acc: Tensor, out_s: Tensor, lse_s: Tensor, *,
                   inplace: bool = False) -> tuple[Tensor, Tensor]:
    """Merge the partial result ``(out_s, lse_s)`` into ``(out_acc, lse_acc)``.

    Args:
        out_acc, out_s: (..., N, D) partial outputs; ``out_s`` is cast to ``out_acc``'s dtype.
        lse_acc, lse_s: (..., N) their log-sum-exps; -inf for a row with no allowed key.
        inplace: write the result into ``out_acc`` and ``lse_acc`` (views of a larger buffer,
            as in ring attention) instead of allocating new tensors; ``out_s`` is then
            scaled in place too when it already has ``out_acc``'s dtype.

    Returns:
        ``(out, lse)``: the merged output and log-sum-exp (``out_acc``, ``lse_acc`` when
        ``inplace``). Rows with nothing allowed on either side stay 0 / -inf. Out of place it
        is differentiable, and such rows get zero (never NaN) gradients.
    """
    finite = torch.isfinite(torch.maximum(lse_acc, lse_s))
    # Both sides -inf: merge zeros instead, so neither value nor gradient sees -inf - -inf.
    sa = torch.where(finite, lse_acc, torch.zeros_like(lse_acc))
    sb = torch.where(finite, lse_s, torch.zeros_like(lse_s))
    lse = torch.logaddexp(sa, sb)
    w_acc = torch.where(finite, torch.exp(sa - lse), torch.zeros_like(lse)).unsqueeze(-1)
    w_s = torch.where(finite, torch.exp(sb - lse), torch.zeros_like(lse)).unsqueeze(-1)
    lse = torch.where(finite, lse, torch.full_like(lse, -math.inf))
    if not inplace:
        return out_acc * w_acc.to(out_acc.dtype) + out_s.to(out_acc.dtype) * w_s.to(out_acc.dtype), lse
    out_acc.mul_(w_acc).add_(out_s.to(out_acc.dtype).mul_(w_s))
    lse_acc.copy_(lse)
    return out_acc, lse_acc


def merge(partials: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Merge partial attentions over disjoint key sets into the attention over their union.

    Args:
        partials: ``[(out_i, lse_i), ...]`` with out_i (B, H, N, D) and lse_i (B, H, N), each
            the softmax attention of the same queries over one key set (``return_lse=True``).

    Returns:
        ``(out, lse)``: out (B, H, N, D) in the first partial's dtype, merged in the lse dtype,
        and lse (B, H, N). Differentiable in every out_i and lse_i (plain torch ops: memory is
        that of the inputs plus a few (B, H, N, D) temporaries).

    Equivalent PyTorch code::

        lse = torch.logsumexp(torch.stack(lses), 0)
        out = sum(o * torch.exp(l - lse)[..., None] for o, l in partials)

    Raises:
        ValueError: no partials, or shapes that do not match.
    """
    if not isinstance(partials, (list, tuple)) or not partials:
        raise ValueError(f"partials must be a non-empty list of (out, lse) pairs, got {partials!r:.80}")
    for i, pair in enumerate(partials):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(t, Tensor) for t in pair):
            raise TypeError(f"partials[{i}] must be an (out, lse) pair of tensors, got {type(pair).__name__}")
        o, lse = pair
        if o.dim() < 2 or lse.shape != o.shape[:-1]:
            raise ValueError(f"partials[{i}]: lse must have out's shape without D, got out {tuple(o.shape)} "
                             f"and lse {tuple(lse.shape)}")
        if o.shape != partials[0][0].shape:
            raise ValueError(f"partials[{i}]: out has shape {tuple(o.shape)}, "
                             f"partials[0] has {tuple(partials[0][0].shape)}")
    out_dtype = partials[0][0].dtype
    out, lse = partials[0][0].to(partials[0][1].dtype), partials[0][1]
    for o, l_ in partials[1:]:
        out, lse = merge_partials(out, lse, o, l_.to(lse.dtype))
    return out.to(out_dtype), lse
