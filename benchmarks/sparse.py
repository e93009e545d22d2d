"""Sparse attention at the standard configuration: sliding window, BigBird, Longformer against
the peer package local-attention and against SDPA given the same pattern as a dense bool mask.

    python benchmarks/sparse.py [--quick] [--threads 1] [--out benchmarks/results/sparse.jsonl]

Standard configuration (DESIGN.md): CPU, float32, B=1, H=8, D=64, forward + backward
(``out.sum().backward()``). Peak memory is one tracked ``attnmem.measure`` run with q, k, v
passed as arguments (so they count); times are medians of untracked runs interleaved with the
peer's (ours, peer, ours, peer, ...), because the machine is shared. Rows are appended to the
results file as they finish; the markdown tables are printed at the end.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import attnmem
from _common import RESULTS, append_row, load_rows, log
from attnmem import masks as M
from attnmem.bench import Case, environment, floor_bytes
from attnmem.bench.cases import make_inputs
from attnmem.memory.measure import MiB, measure

WINDOW = 256
BIGBIRD = dict(block=64, window_blocks=3, global_blocks=2, random_blocks=3, seed=0)
LONGFORMER = dict(window=WINDOW, global_tokens=tuple(range(16)))  # 16 global tokens, CLS-style at the start
METHODS = {
    "sliding_window": dict(window=WINDOW),
    "bigbird": BIGBIRD,
    "longformer": LONGFORMER,
}


def ours(method: str):
    opts = METHODS[method]

    def run(q, k, v):
        attnmem.attention(q, k, v, method=method, **opts).sum().backward()

    return run


def local_attention_peer():
    from local_attention import LocalAttention

    peer = LocalAttention(window_size=WINDOW, look_backward=1, look_forward=1, autopad=True, dim=64)

    def run(q, k, v):
        peer(q, k, v).sum().backward()

    return run


def dense_pattern(method: str, n: int, rows: int = 1024) -> torch.Tensor:
    """The method's pattern as an (N, N) bool tensor, built a block of rows at a time."""
    m = attnmem.registry.get(method)
    mask = m.pattern(m.make_options(METHODS[method]))
    fn = mask.mask_fn(n, n)
    zero = torch.zeros(1, 1, 1, 1, dtype=torch.int64)
    out = torch.empty(n, n, dtype=torch.bool)
    keys = torch.arange(n)[None, :]
    for a in range(0, n, rows):
        q = torch.arange(a, min(a + rows, n))[:, None]
        out[a:a + rows] = M.eval_mask(fn, zero, zero, q, keys)[0, 0]
    return out


def sdpa_dense(dense: torch.Tensor):
    def run(q, k, v):
        attnmem.attention(q, k, v, method="sdpa", mask=dense).sum().backward()

    return run


def _zero_grads(q, k, v):
    for t in (q, k, v):
        t.grad = None


def row(label: str, n: int, part: str, **extra) -> dict:
    case = Case("sliding_window", n)  # floor_bytes depends on the configuration only
    return {"label": label, "seq_len": n, "part": part, "floor_bytes": floor_bytes(case), **environment(), **extra}


def memory_row(out: Path, label: str, n: int, fn, part: str) -> dict:
    q, k, v = make_inputs(Case("sliding_window", n))
    log(f"  memory {label} N={n} ...")
    m = measure(fn, q, k, v, repeats=0, warmup=0)
    r = row(label, n, part, kind="memory", peak_bytes=m.peak_bytes, peak_mib=m.peak_bytes / MiB,
            tracked_time_s=m.time_s)
    r["peak_over_floor"] = m.peak_bytes / r["floor_bytes"]
    append_row(out, r)
    log(f"    {r['peak_mib']:.0f} MiB = {r['peak_over_floor']:.2f} x floor, tracked run {m.time_s:.2f} s")
    return r


def timing_rows(out: Path, n: int, fns: dict, rounds: int, part: str, warmup: bool = True) -> dict:
    """Interleaved untracked runs; one row per label with the median."""
    q, k, v = make_inputs(Case("sliding_window", n))
    times: dict[str, list[float]] = {label: [] for label in fns}
    for fn in fns.values() if warmup else ():
        _zero_grads(q, k, v)
        fn(q, k, v)
    for _ in range(rounds):
        for label, fn in fns.items():
            _zero_grads(q, k, v)
            t0 = time.perf_counter()
            fn(q, k, v)
            times[label].append(time.perf_counter() - t0)
    rows = {}
    for label, ts in times.items():
        r = row(label, n, part, kind="time", time_s=statistics.median(ts), times_s=ts)
        append_row(out, r)
        rows[label] = r
        log(f"  time {label} N={n}: median {r['time_s']:.2f} s of {[round(t, 2) for t in ts]}")
    return rows


def run(out: Path, quick: bool, rounds: int, sdpa_patterns: list[str], sdpa_only: bool) -> None:
    log(f"environment: {environment()}")
    n = 4096 if quick else 16384
    if sdpa_only:
        return sdpa_part(out, n, sdpa_patterns, warmup=False)
    # 1. Sliding window 256 at N = 8192 against local-attention: memory and interleaved time.
    n = 8192
    peer = local_attention_peer()
    memory_row(out, "sliding_window", n, ours("sliding_window"), "vs_local_attention")
    memory_row(out, "local-attention", n, peer, "vs_local_attention")
    timing_rows(out, n, {"sliding_window": ours("sliding_window"), "local-attention": peer}, rounds,
                "vs_local_attention")
    # 2. Peak memory of every method at N = 16384.
    n = 4096 if quick else 16384
    for method in ("bigbird", "longformer", "sliding_window"):
        memory_row(out, method, n, ours(method), "n16384")
    # 3. Linear scaling: N = 8192 and N = 65536 (one timed run each at 65536).
    big = 16384 if quick else 65536
    fns = {"sliding_window": ours("sliding_window"), "bigbird": ours("bigbird")}
    timing_rows(out, 8192, fns, rounds, "scaling")
    timing_rows(out, big, fns, 1, "scaling")
    sdpa_part(out, n, sdpa_patterns)


def sdpa_part(out: Path, n: int, patterns: list[str], warmup: bool = True) -> None:
    """SDPA given the same pattern as a dense bool mask (computes all N² scores), one
    interleaved run each: the gap is far wider than the machine's noise."""
    for method in patterns:
        dense = dense_pattern(method, n)
        timing_rows(out, n, {method: ours(method), f"sdpa+dense {method}": sdpa_dense(dense)}, 1,
                    "vs_sdpa_dense", warmup=warmup)
        del dense


def _find(rows, label, n, kind, part=None):
    hits = [r for r in rows if r["label"] == label and r["seq_len"] == n and r["kind"] == kind
            and (part is None or r["part"] == part)]
    return hits[-1] if hits else None


def tables(rows: list[dict]) -> str:
    out = []
    n = 8192
    ours_m, peer_m = _find(rows, "sliding_window", n, "memory"), _find(rows, "local-attention", n, "memory")
    ours_t = _find(rows, "sliding_window", n, "time", "vs_local_attention")
    peer_t = _find(rows, "local-attention", n, "time", "vs_local_attention")
    if ours_m and peer_m and ours_t and peer_t:
        out += ["**Sliding window 256 each side, N = 8192, vs local-attention** (window_size=256, "
                "look_backward=1, look_forward=1, autopad=True, dim=64)", "",
                "| method | peak MiB | peak / floor | time s (median) | time / peer |", "|---|---|---|---|---|"]
        for m, t in ((ours_m, ours_t), (peer_m, peer_t)):
            out.append(f"| {m['label']} | {m['peak_mib']:.0f} | {m['peak_over_floor']:.2f} | {t['time_s']:.2f} "
                       f"| {t['time_s'] / peer_t['time_s']:.2f} |")
        out.append("")
    big = max((r["seq_len"] for r in rows if r["part"] == "scaling"), default=None)
    if big:
        out += [f"**Linear scaling: time at N = {big} over time at N = 8192**", "",
                "| method | time s N=8192 (median of 3) | time s N=" + str(big) + " (one run) | ratio |",
                "|---|---|---|---|"]
        for method in ("sliding_window", "bigbird"):
            a, b = _find(rows, method, 8192, "time", "scaling"), _find(rows, method, big, "time", "scaling")
            if a and b:
                out.append(f"| {method} | {a['time_s']:.2f} | {b['time_s']:.2f} | {b['time_s'] / a['time_s']:.1f} |")
        out.append("")
    sizes = sorted({r["seq_len"] for r in rows if r["part"] in ("n16384", "vs_sdpa_dense")})
    for n in sizes:
        out += [f"**N = {n}: peak memory (one tracked run), and time against SDPA given the same pattern as a "
                "dense bool mask** (one interleaved untracked run each)", "",
                "| method | peak MiB | peak / floor | time s | SDPA+dense time s | SDPA+dense / ours |",
                "|---|---|---|---|---|---|"]
        for method in METHODS:
            m = _find(rows, method, n, "memory", "n16384")
            t = _find(rows, method, n, "time", "vs_sdpa_dense")
            s = _find(rows, f"sdpa+dense {method}", n, "time", "vs_sdpa_dense")
            if not (m or t):
                continue
            mem = f"| {m['peak_mib']:.0f} | {m['peak_over_floor']:.2f} " if m else "| | "
            tt = f"{t['time_s']:.2f}" if t else ""
            st = f"{s['time_s']:.2f}" if s else ""
            ratio = f"{s['time_s'] / t['time_s']:.1f}" if s and t else ""
            out.append(f"| {method} {mem}| {tt} | {st} | {ratio} |")
        out.append("")
    env = next((r for r in rows), None)
    if env:
        out.append(f"torch {env['torch']}, {env['machine']}, {env['cpu_threads']} thread(s), float32, "
                   "B=1, H=8, D=64, forward + backward.")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller N for a smoke run")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 by default: on a shared machine it gives steadier ratios)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--out", type=Path, default=RESULTS / "sparse.jsonl")
    ap.add_argument("--sdpa-patterns", default="sliding_window",
                    help="comma-separated methods whose pattern SDPA runs as a dense mask (each costs minutes)")
    ap.add_argument("--sdpa-only", action="store_true", help="only the SDPA + dense mask part, without warm-up")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.table_only:
        run(args.out, args.quick, args.rounds, [m for m in args.sdpa_patterns.split(",") if m],
            args.sdpa_only)
    print(tables(load_rows(args.out)))


if __name__ == "__main__":
    main()
