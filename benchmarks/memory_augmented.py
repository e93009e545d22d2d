"""Memory-augmented attention: streaming peak memory and kNN retrieval memory.

    python benchmarks/memory_augmented.py stream --tokens 1048576
    python benchmarks/memory_augmented.py knn
    python benchmarks/memory_augmented.py table

stream: a 2-layer Transformer (d_model 256, 4 heads, vocab 256) with ``recurrent_memory``
(S = 512, M = 2048) or ``knn_memory`` reads a token stream segment by segment in inference
(``Transformer.stream``, ``torch.inference_mode``). The tokens come from a generator, one
segment at a time, so the input itself is not held. One run is tracked as ``attnmem.measure``
tracks (the model's parameters count from the start) and reports the peak so far at 16,384
tokens and every power of two up to the end. Target: peak at 1,048,576 tokens <= 1.1 x peak at 16,384.

knn: a 1,000,000-entry store (B = 1, one head, D = 64, float32), 512 queries, k = 32. The
retrieval (chunked exact top-k search + gathering the retrieved keys/values) is measured with the
store passed as an input, so ``peak - baseline`` is its extra memory (target <= 64 MiB); its
indices and scores are compared with a brute-force ``torch.topk`` over the full score rows.

Rows are appended to benchmarks/results/memory_augmented.jsonl as they finish.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import attnmem
from _common import RESULTS, append_row, load_rows, log
from attnmem.bench import environment
from attnmem.mechanisms.memory import KNNMemoryAttention, topk_search
from attnmem.memory.measure import LiveTensorTracker, MiB

OUT = RESULTS / "memory_augmented.jsonl"
MODEL = dict(vocab_size=256, d_model=256, n_heads=4, n_layers=2)
SEGMENT = 512
METHOD_OPTIONS = {
    "recurrent_memory": dict(segment=SEGMENT, memory=2048),
    "knn_memory": dict(segment=SEGMENT, capacity=8192, topk=32),
}


def token_source(n_tokens: int, segment: int, seed: int = 1):
    """(1, segment) int64 token pieces, made as they are read."""
    g = torch.Generator().manual_seed(seed)
    for a in range(0, n_tokens, segment):
        yield torch.randint(0, MODEL["vocab_size"], (1, min(segment, n_tokens - a)), generator=g)


def stream_rows(method: str, n_tokens: int, out: Path) -> list[dict]:
    """Stream ``n_tokens`` once, tracked like ``attnmem.measure`` (parameters count from the
    start); at 16384 tokens and every power of two after it, append a row with the peak so far,
    so one long run also gives the peak at every shorter length (the same operations, in order)."""
    torch.manual_seed(0)
    opts = METHOD_OPTIONS[method]
    model = attnmem.nn.Transformer(**MODEL, method=method, **opts).eval()
    checkpoints = {n for n in (2 ** p for p in range(14, 40)) if n < n_tokens} | {n_tokens}
    tracker = LiveTensorTracker()
    tracker.track_tree(list(model.parameters()))
    baseline = tracker.live
    rows, done, t0, cpu0 = [], 0, time.perf_counter(), time.process_time()
    with torch.inference_mode(), tracker:
        for logits in model.stream(token_source(n_tokens, SEGMENT)):
            done += logits.shape[1]
            del logits
            if done in checkpoints:
                row = {"kind": "stream", "method": method, "tokens": done, "run_tokens": n_tokens,
                       "segment": SEGMENT, **MODEL, **opts, "dtype": "float32", "device": "cpu",
                       "inference": True, "peak_bytes": tracker.peak, "peak_mib": tracker.peak / MiB,
                       "baseline_mib": baseline / MiB, "time_s": time.perf_counter() - t0,
                       "cpu_s": time.process_time() - cpu0, "status": "ok", **environment()}
                append_row(out, row)
                rows.append(row)
                log(f"  {method}: {done} tokens, peak so far {row['peak_mib']:.2f} MiB, {row['time_s']:.0f} s "
                    f"(cpu {row['cpu_s']:.0f} s)")
    return rows


def knn_rows(store_size: int, n_queries: int, k: int, chunks: list[int]) -> list[dict]:
    D = 64
    g = torch.Generator().manual_seed(0)
    mod = KNNMemoryAttention(heads=1, kv_heads=1, head_dim=D, segment=n_queries, capacity=store_size, topk=k,
                             gate=1.0, search_chunk=chunks[0], backend="torch")
    # Fill the store through the module's own FIFO write, in pieces.
    for a in range(0, store_size, 65536):
        s = min(65536, store_size - a)
        mod.write(torch.randn(1, 1, s, D, generator=g), torch.randn(1, 1, s, D, generator=g))
    q = torch.randn(1, 1, n_queries, D, generator=g)
    store_mib = (mod.store_k.nbytes + mod.store_v.nbytes) / MiB

    # Brute force on the same data: full score rows, a block of queries at a time.
    with torch.no_grad():
        want_val, want_idx = [], []
        for a in range(0, n_queries, 64):
            scores = q[:, :, a:a + 64] @ mod.store_k.transpose(-1, -2)  # (1, 1, 64, C)
            val, idx = scores.topk(k, dim=-1)
            want_val.append(val)
            want_idx.append(idx)
            del scores
        want_val, want_idx = torch.cat(want_val, 2), torch.cat(want_idx, 2)

    rows = []
    for chunk in chunks:
        mod.search_chunk = chunk

        def retrieve(store_k, store_v, queries):
            with torch.no_grad():
                idx = mod.retrieve(queries)  # (1, 1, Q, k)
                flat = idx.reshape(1, 1, -1, 1).expand(-1, -1, -1, D)
                return store_k.gather(2, flat), store_v.gather(2, flat)

        m = attnmem.measure(retrieve, mod.store_k, mod.store_v, q, repeats=1, warmup=0)
        with torch.no_grad():
            val, idx = topk_search(q, mod.store_k, k, chunk=chunk)
        same_idx = int((idx == want_idx).all(-1).sum())
        rows.append({"kind": "knn", "store": store_size, "head_dim": D, "queries": n_queries, "k": k,
                     "search_chunk": chunk, "dtype": "float32", "device": "cpu",
                     "store_mib": store_mib, "peak_mib": m.peak_bytes / MiB, "baseline_mib": m.baseline_bytes / MiB,
                     "extra_mib": (m.peak_bytes - m.baseline_bytes) / MiB, "time_s": m.time_s,
                     "rows_identical": same_idx, "indices_equal": bool(torch.equal(idx, want_idx)),
                     "max_score_diff": float((val - want_val).abs().max()), "status": "ok", **environment()})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| method | run length | threads | tokens read | segments | peak MiB | peak / peak at 16384 tokens "
             "| wall s | CPU s |", "|---|---|---|---|---|---|---|---|---|"]
    # Rows of one run (run_tokens) are the peak so far after each checkpoint of that run.
    # A row without run_tokens is a whole attnmem.measure run of that length.
    streams = [{"run_tokens": r["tokens"], "cpu_s": None, **r} for r in rows if r.get("kind") == "stream"]
    def run(r):
        return r["method"], r["run_tokens"], r["cpu_threads"]

    for r in sorted(streams, key=lambda r: (*run(r), r["tokens"])):
        base = [b for b in streams if run(b) == run(r) and b["tokens"] == 16384]
        ratio = f"{r['peak_bytes'] / base[-1]['peak_bytes']:.4f}" if base else ""
        lines.append(f"| {r['method']} | {r['run_tokens']} | {r['cpu_threads']} | {r['tokens']} "
                     f"| {-(-r['tokens'] // r['segment'])} | {r['peak_mib']:.2f} "
                     f"| {ratio} | {r['time_s']:.0f} | {'' if r['cpu_s'] is None else round(r['cpu_s'])} |")
    knn = [r for r in rows if r.get("kind") == "knn"]
    if knn:
        lines += ["", "| store | queries | k | search_chunk | store MiB | extra MiB | time s | indices equal "
                      "brute force | max score diff |", "|---|---|---|---|---|---|---|---|---|"]
        for r in knn:
            lines.append(f"| {r['store']} | {r['queries']} | {r['k']} | {r['search_chunk']} | {r['store_mib']:.0f} "
                         f"| {r['extra_mib']:.1f} | {r['time_s']:.2f} | {r['indices_equal']} "
                         f"({r['rows_identical']}/{r['queries']} rows) | {r['max_score_diff']:.2g} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["stream", "knn", "table"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1048576])
    ap.add_argument("--methods", nargs="+", default=["recurrent_memory"], choices=sorted(METHOD_OPTIONS))
    ap.add_argument("--chunks", type=int, nargs="+", default=[8192, 65536])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine, 2 threads cost 5x the CPU time per segment)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.part != "table":
        log(f"environment: {environment()}")
    if args.part == "stream":
        for method in args.methods:
            for n in args.tokens:
                log(f"stream {method} {n} tokens ...")
                stream_rows(method, n, args.out)
    elif args.part == "knn":
        for row in knn_rows(1_000_000, 512, 32, args.chunks):
            append_row(args.out, row)
            log(f"  chunk {row['search_chunk']}: extra {row['extra_mib']:.1f} MiB, equal {row['indices_equal']}")
    print(table(load_rows(args.out)))


if __name__ == "__main__":
    main()
