"""Decoding benchmark: cache memory and tokens/s against context length, per cache kind.

One code path for ``benchmarks/decode.py`` and ``attnmem decode-bench``. A cache is brought to
a context of L tokens by appending L random keys/values per layer (the bytes and the decode cost
depend on L, not on the values; a real prefill of 65536 tokens would take minutes on this CPU),
then the model decodes one token at a time. Timing rounds interleave every (kind, L) pair, so
load from other processes falls on all of them alike; the median round is reported.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..figures import pyplot, save
from ..memory.measure import MiB
from ..nn import Transformer
from ..nn.cache import KVCache, ModelCache
from .cases import DTYPES
from .rows import environment

FILL_CHUNK = 4096  # tokens appended at a time while filling, to bound the transient float copy


@dataclass(frozen=True)
class DecodeConfig:
    """The model decoded (the issue's configuration by default) and how it is timed."""

    d_model: int = 512
    heads: int = 8
    layers: int = 4
    vocab: int = 256
    batch: int = 1
    dtype: str = "float32"
    window: int = 1024
    budget: int = 2048  # tokens kept by the eviction kinds (sink_window, heavy_hitter, snapkv)
    steps: int = 8  # tokens decoded per timed round
    rounds: int = 5
    # Batch-1 decoding is a chain of small ops; on a shared CPU, several threads per op wait on
    # each other (measured here: 0.94 s per token with 2 threads under load, 0.03 s with 1).
    threads: int = 1


# name -> (cache kind, kv_heads of the model or None for all heads, cache options)
def cache_specs(cfg: DecodeConfig) -> dict[str, tuple[str, int | None, dict[str, Any]]]:
    return {
        "full": ("full", None, {}),
        "gqa2": ("full", 2, {}),
        "int8": ("int8", None, {}),
        f"window{cfg.window}": ("sliding_window", None, {"window": cfg.window}),
        "linear": ("linear_state", None, {}),
        "int4": ("int4", None, {}),
        "int2": ("int2", None, {}),
        f"sink_window{cfg.budget}": ("sink_window", None, {"budget": cfg.budget}),
        f"heavy_hitter{cfg.budget}": ("heavy_hitter", None, {"budget": cfg.budget}),
        f"snapkv{cfg.budget}": ("snapkv", None, {"budget": cfg.budget}),
    }


def bench_model(cfg: DecodeConfig, kv_heads: int | None) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg.vocab, cfg.d_model, cfg.heads, cfg.layers, kv_heads=kv_heads, method="chunked")
    return model.to(DTYPES[cfg.dtype]).eval()


def filled_cache(model: Transformer, kind: str, context: int, cfg: DecodeConfig, *, headroom: int = 0,
                 seed: int = 0, **options: Any) -> ModelCache:
    """A cache of ``kind`` holding ``context`` random tokens per layer (and room for ``headroom`` more).

    ``snapkv`` compresses the random prompt as its prefill would, choosing by the attention of
    random observation-window queries (``SnapKVCache.snapshot``); the other kinds append chunk by
    chunk (the eviction kinds evict as they go, with no attention observed).
    """
    fixed = kind in ("full", "int8", "int4", "int2")
    cache = model.new_cache(kind, max_len=context + headroom if fixed else None, **options)
    attn = model.blocks[0].attn
    g = torch.Generator().manual_seed(seed)
    dtype = DTYPES[cfg.dtype]
    if kind == "snapkv":
        for layer in cache.layers:
            shape = (cfg.batch, attn.kv_heads, context, attn.head_dim)  # (B, Hkv, L, D)
            k, v = torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)
            w = min(layer.window, context, layer.budget)
            layer.snapshot(torch.randn(cfg.batch, cfg.heads, w, attn.head_dim, generator=g, dtype=dtype), k, v)
        cache.length = context
        return cache
    for layer in cache.layers:
        for a in range(0, context, FILL_CHUNK):
            n = min(FILL_CHUNK, context - a)
            k = torch.randn(cfg.batch, attn.kv_heads, n, attn.head_dim, generator=g, dtype=dtype)  # (B, Hkv, n, D)
            v = torch.randn(cfg.batch, attn.kv_heads, n, attn.head_dim, generator=g, dtype=dtype)
            layer.append(k, v)
    cache.length = context
    return cache


def run_decode_bench(contexts: list[int], cfg: DecodeConfig = DecodeConfig(), kinds: list[str] | None = None,
                     on_row: Callable[[dict], None] = lambda row: None,
                     log: Callable[[str], None] = lambda msg: None, timing: bool = True) -> list[dict]:
    """Memory rows (one cache per kind and context, exactly L tokens) then, with ``timing``, speed rows."""
    specs = cache_specs(cfg)
    kinds = kinds or list(specs)
    unknown = [k for k in kinds if k not in specs]
    if unknown:
        raise ValueError(f"unknown cache kind(s) {', '.join(unknown)}; expected some of {', '.join(specs)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(contexts, cfg, kinds, specs, on_row, log, timing)
    finally:
        torch.set_num_threads(threads)


def _run(contexts, cfg, kinds, specs, on_row, log, timing: bool = True) -> list[dict]:
    models = {hkv: bench_model(cfg, hkv) for hkv in {specs[k][1] for k in kinds}}
    base = {"config": asdict(cfg), "env": environment()}
    rows: list[dict] = []

    def emit(row: dict) -> None:
        row = {**row, **base}
        rows.append(row)
        on_row(row)

    with torch.no_grad():
        full_bytes: dict[int, int] = {}
        for L in contexts:
            for name in sorted(kinds, key=lambda k: k != "full"):  # the full cache first: the ratios' base
                kind, hkv, opts = specs[name]
                log(f"memory: {name} L={L}")
                cache = filled_cache(models[hkv], kind, L, cfg, **opts)
                nbytes = cache.nbytes()
                del cache
                if name == "full":
                    full_bytes[L] = nbytes
                ratio = {"ratio_to_full": nbytes / full_bytes[L]} if L in full_bytes else {}
                emit({"type": "memory", "kind": name, "cache_kind": kind, "context": L, "nbytes": nbytes,
                      "mib": nbytes / MiB, "kv_heads": hkv or cfg.heads, "options": opts, **ratio})

        if not timing:
            return rows
        headroom = (cfg.rounds + 1) * cfg.steps + 1
        live: dict[tuple[str, int], ModelCache] = {}
        for L in contexts:
            for name in kinds:
                kind, hkv, opts = specs[name]
                log(f"fill for timing: {name} L={L}")
                live[name, L] = filled_cache(models[hkv], kind, L, cfg, headroom=headroom, **opts)
        g = torch.Generator().manual_seed(1)

        def decode(name: str, L: int, steps: int) -> float:
            model, cache = models[specs[name][1]], live[name, L]
            tokens = torch.randint(0, cfg.vocab, (cfg.batch, steps), generator=g)
            t0 = time.perf_counter()
            for i in range(steps):
                model(tokens[:, i:i + 1], cache=cache)
            return steps * cfg.batch / (time.perf_counter() - t0)

        samples: dict[tuple[str, int], list[float]] = {key: [] for key in live}
        for key in live:
            decode(*key, cfg.steps)  # warm-up
        for r in range(cfg.rounds):
            log(f"timing round {r + 1}/{cfg.rounds}")
            for key in live:
                samples[key].append(decode(*key, cfg.steps))
        for (name, L), tps in samples.items():
            emit({"type": "speed", "kind": name, "cache_kind": specs[name][0], "context": L,
                  "tokens_per_s": statistics.median(tps), "samples": tps, "kv_heads": specs[name][1] or cfg.heads})
    return rows


def paged_memory(lengths: list[int], cfg: DecodeConfig = DecodeConfig(), *, block_size: int = 16,
                 seed: int = 0) -> dict:
    """Bytes of a paged cache holding prompts of ``lengths`` tokens (random keys/values), against
    the tokens it holds and against a padded batch preallocated to the longest prompt."""
    model = bench_model(cfg, None)
    cache = model.new_cache("paged", block_size=block_size)
    attn = model.blocks[0].attn
    g = torch.Generator().manual_seed(seed)
    dtype = DTYPES[cfg.dtype]
    for s, n in enumerate(lengths):
        with cache.sequences([s]):
            for layer in cache.layers:
                k = torch.randn(1, attn.kv_heads, n, attn.head_dim, generator=g, dtype=dtype)  # (1, Hkv, n, D)
                layer.append(k, torch.randn(k.shape, generator=g, dtype=dtype))
            cache.advance(n)
    per_token = cfg.layers * 2 * attn.kv_heads * attn.head_dim * torch.empty((), dtype=dtype).element_size()
    held = cache.tokens_held()
    padded = len(lengths) * max(lengths) * per_token
    return {"type": "paged_memory", "lengths": lengths, "block_size": block_size, "tokens_held": held,
            "nbytes": cache.nbytes(), "held_bytes": held * per_token,
            "ratio_to_held": cache.nbytes() / (held * per_token),
            "padded_bytes": padded, "ratio_to_padded": cache.nbytes() / padded,
            "config": asdict(cfg), "env": environment()}


def int8_error(cfg: DecodeConfig = DecodeConfig(), *, prompt: int = 1024, steps: int = 32) -> dict:
    """Error of the int8 cache against the float cache on the same decode steps.

    A random-weight model of ``cfg`` prefills ``prompt`` random tokens with each cache, then both
    decode the same ``steps`` tokens (teacher-forced). Reports the relative L2 error of the step
    logits and how often their argmax agrees.
    """
    model = bench_model(cfg, None)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, cfg.vocab, (cfg.batch, prompt + steps), generator=g)
    logits = {}
    with torch.no_grad():
        for kind in ("full", "int8"):
            cache = model.new_cache(kind, max_len=prompt + steps)
            model(tokens[:, :prompt], cache=cache)
            logits[kind] = torch.cat([model(tokens[:, prompt + i:prompt + i + 1], cache=cache)
                                      for i in range(steps)], dim=1)  # (B, steps, V)
    full, quant = logits["full"].double(), logits["int8"].double()
    agree = (full.argmax(-1) == quant.argmax(-1)).double().mean().item()
    return {"type": "int8_error", "prompt": prompt, "steps": steps,
            "logits_rel_err": ((quant - full).norm() / full.norm()).item(), "argmax_agreement": agree,
            "config": asdict(cfg), "env": environment()}


def int8_attention_error(context: int = 4096, heads: int = 8, head_dim: int = 64, seed: int = 0) -> dict:
    """One layer's attention output from the int8 cache against the float cache: one new query over
    ``context`` cached tokens, q, k, v ~ N(0, 1) float32."""
    from ..nn import Int8KVCache, MultiHeadAttention

    g = torch.Generator().manual_seed(seed)
    mha = MultiHeadAttention(heads * head_dim, heads, method="chunked", causal=True)
    q = torch.randn(1, heads, 1, head_dim, generator=g)
    k = torch.randn(1, heads, context + 1, head_dim, generator=g)
    v = torch.randn(1, heads, context + 1, head_dim, generator=g)
    outs = []
    for cls in (KVCache, Int8KVCache):
        cache = cls(kv_heads=heads, head_dim=head_dim)
        cache.append(k[:, :, :context], v[:, :, :context])
        outs.append(cache.attend(mha, q, k[:, :, context:], v[:, :, context:]))
    full, quant = outs
    return {"type": "int8_attention_error", "context": context, "heads": heads, "head_dim": head_dim,
            "rel_err": ((quant - full).norm() / full.norm()).item(), "env": environment()}


def markdown_tables(rows: list[dict]) -> str:
    mem = [r for r in rows if r.get("type") == "memory"]
    speed = {(r["kind"], r["context"]): r for r in rows if r.get("type") == "speed"}
    contexts = sorted({r["context"] for r in mem} | {c for _, c in speed})
    kinds = list(dict.fromkeys([r["kind"] for r in mem] + [k for k, _ in speed]))
    memo = {(r["kind"], r["context"]): r for r in mem}
    lines = ["Cache memory (MiB; ratio to the full cache at the same context)", "",
             "| kind | " + " | ".join(f"L={c}" for c in contexts) + " |",
             "|---|" + "---|" * len(contexts)]
    for k in kinds:
        cells = []
        for c in contexts:
            r = memo.get((k, c))
            ratio = f" ({r['ratio_to_full']:.4f}×)" if r and "ratio_to_full" in r else ""
            cells.append(f"{r['mib']:.2f}{ratio}" if r else "-")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", "Decoding speed (tokens/s, median of rounds; last column: first context over last)", "",
              "| kind | " + " | ".join(f"L={c}" for c in contexts) + " | ratio |",
              "|---|" + "---|" * (len(contexts) + 1)]
    for k in kinds:
        vals = [speed.get((k, c)) for c in contexts]
        cells = [f"{r['tokens_per_s']:.1f}" if r else "-" for r in vals]
        ratio = (f"{vals[0]['tokens_per_s'] / vals[-1]['tokens_per_s']:.2f}"
                 if vals and vals[0] and vals[-1] else "-")
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path:
    """Two panels: cache MiB and tokens/s against context length, one line per kind."""
    plt = pyplot()

    fig, (ax_mem, ax_speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, typ, key, label in ((ax_mem, "memory", "mib", "cache MiB"),
                                (ax_speed, "speed", "tokens_per_s", "tokens/s")):
        sel = [r for r in rows if r.get("type") == typ]
        for kind in dict.fromkeys(r["kind"] for r in sel):
            pts = sorted((r["context"], r[key]) for r in sel if r["kind"] == kind)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=kind)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_mem.set_title("KV cache memory (all layers)")
    ax_speed.set_title("decoding speed, batch 1")
    (ax_speed if ax_speed.lines else ax_mem).legend()  # a memory-only run (--no-timing) has no speed lines
    cfg = next((r["config"] for r in rows if "config" in r), {})
    fig.suptitle(f"d_model={cfg.get('d_model')}, heads={cfg.get('heads')}, layers={cfg.get('layers')}, "
                 f"{cfg.get('dtype')}, CPU")
    path.parent.mkdir(parents=True, exist_ok=True)
    return save(fig, path)
