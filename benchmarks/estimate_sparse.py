"""Closed forms of the sparse, selective methods: time at N = 1,048,576 and error against measured.

    PYTHONPATH=src nice -n 5 python benchmarks/estimate_sparse.py [--table-only]

1. Wall time of ``attnmem.estimate`` (``how="auto"``, which picks the closed form at this size)
   at N = 1,048,576, B=1, H=8, D=64, float32, training, causal and not.
2. The closed form (``how="formula"``) against ``attnmem.measure`` of one forward + backward at
   the standard configuration (CPU, float32, B=1, H=8, D=64), causal: N = 16384 for the O(N·w)
   patterns; N = 4096 for the methods whose time is O(N²) (strided and fixed list every key
   tile, topk and hard score every key) so a measured run stays within minutes on 2 cores.
Rows go to benchmarks/results/estimate_sparse.jsonl as they finish (a separate file from
benchmarks/estimate.py's, which covers the exact methods).
"""

from __future__ import annotations

import argparse
import time

from _common import RESULTS, append_row, load_rows, log
from attnmem.bench import Case, environment, run_case
from attnmem.memory.estimate import estimate
from attnmem.memory.measure import MiB

OUT = RESULTS / "estimate_sparse.jsonl"
METHODS = [  # (label, method, options, N measured)
    ("sliding_window", "sliding_window", {}, 16384),
    ("dilated", "dilated", {}, 16384),
    ("longformer", "longformer", {}, 16384),
    ("bigbird", "bigbird", {}, 16384),
    ("strided", "strided", {}, 4096),
    ("strided (fixed)", "strided", {"pattern": "fixed"}, 4096),
    ("topk", "topk", {}, 4096),
    ("hard", "hard", {}, 4096),
]


def timing_rows() -> None:
    n = 1_048_576
    for label, name, opts, _ in METHODS:
        for causal in (False, True):
            t0 = time.perf_counter()
            est = estimate(name, batch=1, heads=8, seq_len=n, head_dim=64, causal=causal, **opts)
            wall = time.perf_counter() - t0
            append_row(OUT, dict(kind="timing", label=label, method=name, options=opts, seq_len=n, causal=causal,
                                 wall_s=wall, source=est.source, peak_bytes=est.peak_bytes, **environment()))
            log(f"timing {label} causal={causal}: {wall:.3f}s ({est.source}) {est.peak_bytes / 2**30:.2f} GiB")


def measured_rows() -> None:
    for label, name, opts, n in METHODS:
        case = Case(name, n, causal=True, options=dict(opts))
        row = run_case(case, repeats=0, warmup=0)
        if row["status"] != "ok":
            log(f"{label} N={n}: {row.get('reason')}")
            continue
        f = estimate(name, batch=1, heads=8, seq_len=n, head_dim=64, causal=True, how="formula", **opts)
        append_row(OUT, dict(kind="measured", label=label, method=name, options=opts, seq_len=n, causal=True,
                             measured_bytes=row["peak_bytes"], formula_bytes=f.peak_bytes, **environment()))
        log(f"{label} N={n}: measured {row['peak_bytes'] / MiB:.1f} MiB, formula {f.peak_bytes / MiB:.1f} MiB")


def tables(rows: list[dict]) -> str:
    env = next(iter(rows), {})
    lines = [f"Machine: {env.get('processor', '?')}, {env.get('cpu_threads', '?')} threads, "
             f"torch {env.get('torch', '?')}.",
             "", "`attnmem.estimate` at N = 1,048,576 (B=1, H=8, D=64, float32, training):", "",
             "| method | causal | source | wall s | predicted peak GiB |", "|---|---|---|---|---|"]
    for r in (r for r in rows if r["kind"] == "timing"):
        lines.append(f"| {r['label']} | {r['causal']} | {r['source']} | {r['wall_s']:.2f} | "
                     f"{r['peak_bytes'] / 2**30:.2f} |")
    lines += ["", "Closed form vs measured, one causal call, CPU, float32, B=1, H=8, D=64, forward + backward:", "",
              "| method | N | measured MiB | closed form MiB | error |", "|---|---|---|---|---|"]
    for r in (r for r in rows if r["kind"] == "measured"):
        err = 100 * (r["formula_bytes"] - r["measured_bytes"]) / r["measured_bytes"]
        lines.append(f"| {r['label']} | {r['seq_len']} | {r['measured_bytes'] / MiB:.1f} | "
                     f"{r['formula_bytes'] / MiB:.1f} | {err:+.1f} % |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--recompute-formulas", action="store_true",
                    help="Recompute the closed-form column of recorded rows (no measuring).")
    args = ap.parse_args()
    if args.recompute_formulas:
        rows = load_rows(OUT)
        OUT.unlink()
        for r in rows:
            if r["kind"] == "measured":
                r["formula_bytes"] = estimate(r["method"], batch=1, heads=8, seq_len=r["seq_len"], head_dim=64,
                                              causal=True, how="formula", **r["options"]).peak_bytes
            append_row(OUT, r)
        args.table_only = True
    if not args.table_only:
        if OUT.exists():
            OUT.unlink()
        timing_rows()
        measured_rows()
    print(tables(load_rows(OUT)))


if __name__ == "__main__":
    main()
