"""The log-sum-exp merge of partial attention results (the online-softmax rule).

Two partial results over disjoint key sets, each an output ``out`` (..., N, D) normalised over
its own keys and the log-sum-exp ``lse`` (..., N) of its scores, combine exactly::

    lse = logaddexp(lse_a, lse_b)
    out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

The tiled kernel merges its segments with it, ring attention its ranks' blocks, and the sparse
methods their separately computed rows.
"""

from __future__ import annotations

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
        ``inplace``). Rows with nothing allowed on either side stay 0 / -inf.
    """
    lse = torch.logaddexp(lse_acc, lse_s)
    # Rows with nothing allowed so far have lse -inf on both sides: give them weight 0.
    finite = torch.isfinite(lse)
    w_acc = torch.where(finite, torch.exp(lse_acc - lse), torch.zeros_like(lse)).unsqueeze(-1)
    w_s = torch.where(finite, torch.exp(lse_s - lse), torch.zeros_like(lse)).unsqueeze(-1)
    if not inplace:
        return out_acc * w_acc + out_s.to(out_acc.dtype) * w_s, lse
    out_acc.mul_(w_acc).add_(out_s.to(out_acc.dtype).mul_(w_s))
    lse_acc.copy_(lse)
    return out_acc, lse_acc
