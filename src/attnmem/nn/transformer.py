"""A small pre-norm transformer with pluggable attention and gradient checkpointing."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..checks import check_positive_int
from ..scores import alibi as alibi_mod
from .attention import ROTARY_BASE, MultiHeadAttention
from .cache import ModelCache, default_kind, make_model_cache
from .sampling import generate


def sinusoidal_positions(positions: Tensor, d_model: int) -> Tensor:
    """(..., N) int positions -> (..., N, d_model) fixed sinusoidal embeddings (Vaswani et al.)."""
    half = d_model // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device) / max(half, 1))
    angle = positions.float()[..., None] * freq  # (..., N, half)
    emb = torch.cat([angle.sin(), angle.cos()], dim=-1)
    return nn.functional.pad(emb, (0, d_model - 2 * half))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, ffn_mult: int, attn_kwargs: dict[str, Any]):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, n_heads, **attn_kwargs)
        self.ln2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn_mult * d_model), nn.GELU(),
                                 nn.Linear(ffn_mult * d_model, d_model))

    def forward(self, x: Tensor, mask: Any = None, cache: Any = None, positions: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.ln1(x), mask=mask, cache=cache, positions=positions)
        return x + self.ffn(self.ln2(x))


POSITIONS = ("sinusoidal", "rotary")


class Transformer(nn.Module):
    """Token embedding, ``n_layers`` pre-norm blocks, final norm and a linear head.

    Args:
        vocab_size: input vocabulary.
        d_model, n_heads, n_layers: model shape.
        kv_heads: GQA/MQA key/value heads.
        ffn_mult: hidden width of the feed-forward block, in multiples of d_model.
        num_outputs: output classes per position (default: vocab_size).
        method, causal, **options: passed to every ``MultiHeadAttention``.
        positions: how the model knows where a token is. "sinusoidal" (the default, kept for
            the models and caches built before the option existed): fixed sinusoidal
            embeddings added to the input. "rotary": nothing added to the input; every
            attention layer rotates its q and k by the tokens' positions
            (``attnmem.nn.attention.rotary``), so attention scores depend on relative
            positions. On the byte-level text task at context 1024 it learns to read the
            context where sinusoidal stayed at bigram quality (BENCHMARKS.md, session 5, issue 19).
        rotary_base: the base of the rotary angles (``MultiHeadAttention``'s ``rotary_base``).
        length_scale: Scalable-Softmax in every attention layer (``MultiHeadAttention``'s
            ``length_scale``): queries multiplied by a learned ``s_h · log(keys seen)``.
        alibi: add ALiBi's fixed linear distance penalty (``attnmem.scores.alibi(n_heads)``:
            slopes 1/2 … 1/256 for 8 heads) to every attention layer's scores, alone or on top
            of ``positions``. It is a ``score_mod``, so it needs an exact method that takes one
            (not sequence parallelism, which refuses it); every decoding cache but the
            eviction kinds applies it.
        checkpointing: recompute each block in the backward instead of storing its
            activations (``torch.utils.checkpoint``), trading time for memory.
        sequence_parallel: run under ``torchrun`` with the sequence split across ranks: True or
            "ring" (ring attention, zigzag layout, world group), "ulysses" (all-to-all over
            heads, any ``method``), "hybrid" (Ulysses × ring grid), or an
            ``attnmem.distributed.SequenceParallel``. Each rank passes its own tokens
            (``model.sequence_parallel.partition(N, n_heads, kv_heads).shard(tokens, rank,
            dim=1)``); positions are global. Gradients of the (replicated) parameters are each
            rank's share: all-reduce them before the optimizer step.

    Shapes: ``forward(tokens)`` takes (B, N) int64 and returns logits (B, N, num_outputs).
    """

    def __init__(self, vocab_size: int, d_model: int, n_heads: int, n_layers: int, *,
                 kv_heads: int | None = None, ffn_mult: int = 4, num_outputs: int | None = None,
                 method: str = "auto", causal: bool = True, checkpointing: bool = False,
                 sequence_parallel: Any = False, positions: str = "sinusoidal", rotary_base: float = ROTARY_BASE,
                 length_scale: bool = False, alibi: bool = False,
                 **options: Any):
        super().__init__()
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
        if not isinstance(alibi, bool):
            raise TypeError(f"alibi must be a bool, got {type(alibi).__name__}")
        if alibi and options.get("score_mod") is not None:
            raise ValueError("alibi=True and a score_mod both set the scores' modification; compose them in "
                             "one score_mod instead")
        for name, val in (("vocab_size", vocab_size), ("n_layers", n_layers), ("ffn_mult", ffn_mult)):
            check_positive_int(name, val)
        if checkpointing and method != "auto":
            from .. import registry

            if registry.get(method).family == "memory":
                # The backward would run each block's forward a second time, and with it the
                # memory update: the memory would advance twice and the recomputed block would
                # read the already-advanced memory (wrong gradients). Refuse instead.
                raise ValueError(f"checkpointing=True cannot be used with method={method!r}: its memory "
                                 "advances on every forward, and checkpointing reruns the forward in the "
                                 "backward; train it with checkpointing=False (its memory per segment is "
                                 "already bounded)")
        self.d_model = d_model
        self.checkpointing = checkpointing
        self.positions = positions
        self.embed = nn.Embedding(vocab_size, d_model)
        attn_kwargs = dict(kv_heads=kv_heads, method=method, causal=causal, rotary=positions == "rotary",
                           rotary_base=rotary_base, length_scale=length_scale, **options)
        self.sequence_parallel = None
        if sequence_parallel:
            from ..distributed import SequenceParallel

            if sequence_parallel is True:
                sequence_parallel = SequenceParallel()
            elif isinstance(sequence_parallel, str):
                sequence_parallel = SequenceParallel(scheme=sequence_parallel)
            elif not isinstance(sequence_parallel, SequenceParallel):
                raise TypeError("sequence_parallel must be False, True, 'ring', 'ulysses', 'hybrid' or an "
                                f"attnmem.distributed.SequenceParallel, got {type(sequence_parallel).__name__}")
            self.sequence_parallel = sequence_parallel
            attn_kwargs["sequence_parallel"] = self.sequence_parallel
        if alibi:  # every layer the same fixed slopes (Press et al.); a score_mod, so exact methods only
            attn_kwargs["score_mod"] = alibi_mod(n_heads)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, ffn_mult, attn_kwargs) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_outputs or vocab_size)

    def hidden(self, tokens: Tensor, *, mask: Any = None, position_offset: int = 0,
               cache: ModelCache | None = None) -> Tensor:
        """With ``cache``, ``tokens`` are the next tokens after the cached ones (positions follow
        on from ``cache.length``); they attend to the cache and are added to it."""
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an int tensor of shape (B, N), got {tuple(tokens.shape)} {tokens.dtype}")
        if cache is not None:
            cache.check_model(self, tokens.shape[1])
        if cache is not None and self.sequence_parallel is None:
            pos = cache.positions(*tokens.shape, tokens.device)  # (N,), or (B, N) per sequence (paged)
        elif self.sequence_parallel is not None:
            position_offset = cache.length if cache is not None else position_offset
            attn = self.blocks[0].attn
            pos = self.sequence_parallel.positions(tokens.shape[1], tokens.device, heads=attn.n_heads,
                                                   kv_heads=attn.kv_heads) + position_offset
        else:
            pos = torch.arange(position_offset, position_offset + tokens.shape[1], device=tokens.device)
        x = self.embed(tokens)  # (B, N, d_model)
        if self.positions == "sinusoidal":
            x = x + sinusoidal_positions(pos, self.d_model).to(x.dtype)
        for i, block in enumerate(self.blocks):
            if cache is not None:
                x = block(x, mask, cache.layers[i], pos)
            elif self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, None, pos, use_reentrant=False)
            else:
                x = block(x, mask, None, pos)
        if cache is not None:
            cache.advance(tokens.shape[1])
        return self.ln_f(x)

    def forward(self, tokens: Tensor, *, mask: Any = None, cache: ModelCache | None = None) -> Tensor:
        return self.head(self.hidden(tokens, mask=mask, cache=cache))

    def new_cache(self, kind: str | None = None, *, max_len: int | None = None, **options: Any) -> ModelCache:
        """An empty decoding cache for this model: ``full``, ``int8``, ``sliding_window``
        (``window=``), ``linear_state`` (``feature_map=``), ``sink_window``, ``heavy_hitter``,
        ``snapkv`` (``budget=``), ``int4``, ``int2`` (``residual=``) or ``paged``
        (``block_size=``); default from the method (its ``Method.decode_cache``,
        ``attnmem.nn.cache.default_kind``)."""
        attn = self.blocks[0].attn
        if kind is None:
            kind = default_kind(attn.method)
            if kind is None:
                raise ValueError(f"no decoding cache for method {attn.method!r}; pass kind= explicitly")
        return make_model_cache(kind, layers=len(self.blocks), kv_heads=attn.kv_heads, head_dim=attn.head_dim,
                                max_len=max_len, **options)

    def generate(self, prompt: Tensor, steps: int, *, greedy: bool = True, temperature: float = 1.0,
                 top_k: int | None = None, seed: int | None = None, cache: ModelCache | None = None) -> Tensor:
        """Continue ``prompt`` (B, N) by ``steps`` tokens -> (B, N + steps); see ``attnmem.nn.sampling.generate``."""
        return generate(self, prompt, steps, greedy=greedy, temperature=temperature, top_k=top_k, seed=seed,
                        cache=cache)

    def reset_memory(self) -> None:
        """Clear the state of memory attention (``recurrent_memory``, ``knn_memory``): a new document."""
        for block in self.blocks:
            inner = block.attn.inner
            if inner is not None and callable(getattr(inner, "reset", None)):
                inner.reset()

    def stream(self, tokens: Tensor | Iterable[Tensor], *, segment: int | None = None,
               reset: bool = True) -> Iterator[Tensor]:
        """Read a long input segment by segment; yield each segment's logits (B, s, num_outputs).

        With ``method="recurrent_memory"`` or ``"knn_memory"`` every layer remembers earlier
        segments, so the model reads a stream far longer than its attention window while peak
        memory stays that of one segment. Positions continue across segments.

        Args:
            tokens: (B, N) int tensor, cut into pieces of ``segment`` tokens; or an iterable of
                (B, n) int tensors, read as they come (the whole stream never needs to exist).
            segment: tokens per step for a tensor input; use the method's segment length S so
                that segment boundaries match a single ``forward`` over the whole input.
            reset: clear the memory first (a new document).

        Raises:
            ValueError: ``segment`` missing or not positive for a tensor input.
        """
        if isinstance(tokens, Tensor):
            if not isinstance(segment, int) or isinstance(segment, bool) or segment <= 0:
                raise ValueError(f"segment must be a positive int for a tensor input, got {segment!r}")
            if tokens.dim() != 2:
                raise ValueError(f"tokens must have shape (B, N), got {tuple(tokens.shape)}")
            pieces: Iterable[Tensor] = tokens.split(segment, dim=1)
        else:
            pieces = tokens
        if reset:
            self.reset_memory()
        offset = 0
        for piece in pieces:
            yield self.head(self.hidden(piece, position_offset=offset))
            offset += piece.shape[1]
