"""Token-by-token generation with a decoding cache: greedy, or sampled under a seed."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


@torch.no_grad()
def generate(model: Any, prompt: Tensor, steps: int, *, greedy: bool = True, temperature: float = 1.0,
             top_k: int | None = None, seed: int | None = None, cache: Any = None) -> Tensor:
    """Continue ``prompt`` (B, N) by ``steps`` tokens; returns (B, N + steps). A list of (N_s,)
    prompts of different lengths goes to ``generate_ragged`` (a paged cache) and returns a list.

    The prompt is prefilled in one call (the method's full-sequence path), then each step
    feeds one token. ``greedy`` takes the argmax; otherwise tokens are sampled from
    softmax(logits / temperature), restricted to the ``top_k`` most likely when given, with a
    generator seeded by ``seed`` (same seed, same tokens). ``cache`` defaults to
    ``new_cache(max_len=N + steps)``; a given cache may already hold earlier tokens.

    Raises:
        ValueError: bad steps, temperature or top_k, or a cache that does not fit.
    """
    if isinstance(prompt, (list, tuple)):
        return generate_ragged(model, prompt, steps, greedy=greedy, temperature=temperature, top_k=top_k,
                               seed=seed, cache=cache)
    _check_sampling(steps, temperature, top_k)
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must have shape (B, N) with N >= 1, got {tuple(prompt.shape)}")
    if cache is None:
        cache = model.new_cache(max_len=prompt.shape[1] + steps)
    gen = _generator(greedy, seed, prompt.device)
    out, nxt = [prompt], prompt
    for _ in range(steps):
        nxt = _next_token(model.forward(nxt, cache=cache)[:, -1], greedy, temperature, top_k, gen)
        out.append(nxt.to(prompt.dtype))
    return torch.cat(out, dim=1)


@torch.no_grad()
def generate_ragged(model: Any, prompts: list[Tensor] | tuple[Tensor, ...], steps: int, *, greedy: bool = True,
                    temperature: float = 1.0, top_k: int | None = None, seed: int | None = None,
                    cache: Any = None) -> list[Tensor]:
    """Continue prompts of different lengths, each (N_s,), by ``steps`` tokens in one batch.

    Each prompt is prefilled alone into a paged cache (``model.new_cache("paged")`` by default),
    then every step decodes all of them at once, each at its own position. Returns one
    (N_s + steps,) tensor per prompt: the tokens ``generate`` gives for that prompt alone
    (sampling draws from one generator for the whole batch, so only greedy decoding is
    token-for-token the same as one prompt at a time).
    """
    _check_sampling(steps, temperature, top_k)
    if not prompts or any(p.dim() != 1 or p.shape[0] == 0 for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of non-empty (N,) tensors, got shapes "
                         f"{[tuple(p.shape) for p in prompts]}")
    cache = model.new_cache("paged") if cache is None else cache
    if not hasattr(cache, "sequences"):
        raise ValueError(f"prompts of different lengths need a paged cache, got kind {cache.kind!r}")
    gen = _generator(greedy, seed, prompts[0].device)
    last = []
    for s, p in enumerate(prompts):
        with cache.sequences([s]):
            last.append(model.forward(p[None], cache=cache)[:, -1])  # (1, V)
    out = [[p] for p in prompts]
    logits = torch.cat(last, dim=0)  # (S, V)
    with cache.sequences(range(len(prompts))):
        for i in range(steps):
            nxt = _next_token(logits, greedy, temperature, top_k, gen)  # (S, 1)
            for s, t in enumerate(nxt):
                out[s].append(t.to(prompts[s].dtype))
            if i + 1 < steps:
                logits = model.forward(nxt, cache=cache)[:, -1]
    return [torch.cat(o) for o in out]


def _check_sampling(steps: int, temperature: float, top_k: int | None) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k <= 0):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")


def _generator(greedy: bool, seed: int | None, device: torch.device) -> torch.Generator | None:
    if greedy:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(torch.initial_seed() if seed is None else seed)
    return gen


def _next_token(logits: Tensor, greedy: bool, temperature: float, top_k: int | None,
                gen: torch.Generator | None) -> Tensor:
    """(B, V) logits of the last position -> (B, 1) next tokens."""
    logits = logits.float()
    if greedy:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen)
