"""Token-by-token generation with a decoding cache: greedy, or sampled under a seed."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


@torch.no_grad()
def generate(model: Any, prompt: Tensor, steps: int, *, greedy: bool = True, temperature: float = 1.0,
             top_k: int | None = None, seed: int | None = None, cache: Any = None) -> Tensor:
    """Continue ``prompt`` (B, N) by ``steps`` tokens; returns (B, N + steps).

    The prompt is prefilled in one call (the method's full-sequence path), then each step
    feeds one token. ``greedy`` takes the argmax; otherwise tokens are sampled from
    softmax(logits / temperature), restricted to the ``top_k`` most likely when given, with a
    generator seeded by ``seed`` (same seed, same tokens). ``cache`` defaults to
    ``new_cache(max_len=N + steps)``; a given cache may already hold earlier tokens.

    Raises:
        ValueError: bad steps, temperature or top_k, or a cache that does not fit.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k <= 0):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must have shape (B, N) with N >= 1, got {tuple(prompt.shape)}")
    if cache is None:
        cache = model.new_cache(max_len=prompt.shape[1] + steps)
    gen = None
    if not greedy:
        gen = torch.Generator(device=prompt.device)
        gen.manual_seed(torch.initial_seed() if seed is None else seed)
    out, nxt = [prompt], prompt
    for _ in range(steps):
        logits = model.forward(nxt, cache=cache)[:, -1].float()  # (B, V)
        if greedy:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.shape[-1]:
                kth = logits.topk(top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, -float("inf"))
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=gen)
        out.append(nxt.to(prompt.dtype))
    return torch.cat(out, dim=1)
