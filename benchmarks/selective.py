"""Selective, adaptive and hierarchical attention: memory, time and approximation error.

    python benchmarks/selective.py [--quick] [--out benchmarks/results/selective.jsonl] [--table-only]

Standard configuration (DESIGN.md): CPU, float32, B=1, H=8, D=64, forward + backward. Targets:
  * topk k=32 at N=16384: peak <= 2 x floor.
  * adaptive_span (fixed spans spread over S/16..S, geometric, one per head) at N=16384: peak
    and time within 1.3 x of causal sliding-window attention at the largest span S=1024
    (``chunked`` with mask window:1024:0, causal), falling as S shrinks.
  * hierarchical at N=65536: peak <= 2 x floor; time(65536) / time(8192) <= 10.
Approximation error is the relative Frobenius error of the output against exact attention
(``attnmem.bench.approx_error``) at N=1024 on standard-normal ("random") and peaked inputs,
plus smooth inputs (low-frequency sinusoids) for hierarchical. The same cases run through
``attnmem compare --methods topk,hard,adaptive_span_fixed,hierarchical --causal``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from _common import RESULTS, append_row, load_rows, log
from attnmem.api import attention
from attnmem.bench import Case, approx_error, environment, run_case


def spans_for(largest: int, heads: int = 8) -> tuple[float, ...]:
    """One span per head, geometric from largest/16 to largest."""
    lo = largest / 16
    return tuple(round(lo * (largest / lo) ** (i / (heads - 1)), 1) for i in range(heads))


def plan(quick: bool) -> list[tuple[str, Case, int]]:
    """(label, case, repeats); rounds of ours/peer interleave so load hits both alike."""
    big = 4096 if quick else 16384
    out: list[tuple[str, Case, int]] = []
    peer = Case("chunked", big, causal=True, mask="window:1024:0")
    for rnd in range(2):
        for s in (1024, 512, 256, 128):
            out.append((f"adaptive r{rnd}", Case("adaptive_span_fixed", big, causal=True,
                                                 options={"spans": spans_for(s), "ramp": 32}), 1 if rnd else 0))
            if s == 1024:
                out.append((f"peer r{rnd}", peer, 1 if rnd else 0))
    for n in ((2048, 8192) if quick else (8192, 65536)):
        out.append(("hierarchical", Case("hierarchical", n, options={"block": 32}), 0))
    # topk last: its selection reads every score, so it is the slowest case on CPU.
    out.append(("topk", Case("topk", big // 2, options={"topk": 32}), 0))
    out.append(("topk", Case("topk", big, options={"topk": 32}), 0))
    return out


def smooth_inputs(n: int, heads: int = 8, dim: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n, dtype=torch.float32)[:, None] / n
    out = []
    for _ in range(3):
        f = torch.randint(1, 4, (1, heads, 1, dim), generator=g).float()
        ph = torch.rand(1, heads, 1, dim, generator=g) * 2 * math.pi
        out.append(2 * torch.sin(2 * math.pi * f * t + ph))
    return out


def errors(n: int = 1024) -> list[dict]:
    rows = []
    configs = [("topk", False, {"topk": 32}), ("topk", False, {"topk": 128}), ("hard", False, {}),
               ("adaptive_span_fixed", True, {"spans": spans_for(1024), "ramp": 32}),
               ("adaptive_span_fixed", True, {"spans": spans_for(128), "ramp": 32}),
               ("hierarchical", False, {"block": 32}), ("hierarchical", True, {"block": 32})]
    for method, causal, opts in configs:
        row = {"kind": "error", "method": method, "seq_len": n, "causal": causal, "options": opts}
        for peaked in (False, True):
            row["peaked" if peaked else "random"] = approx_error(method, n, causal=causal, peaked=peaked, **opts)
        q, k, v = smooth_inputs(n)
        with torch.no_grad():
            exact = attention(q, k, v, method="chunked", causal=causal)
            approx = attention(q, k, v, method=method, causal=causal, **opts)
        row["smooth"] = ((approx - exact).norm() / exact.norm()).item()
        rows.append(row)
    return rows


def _opts(r):
    o = dict(r.get("options") or {})
    if r.get("mask", "none") != "none":
        o["mask"] = r["mask"]
    if "spans" in o:
        sp = o["spans"]
        o["spans"] = f"{min(sp):g}..{max(sp):g}"
    return ", ".join(f"{k}={v}" for k, v in o.items())


def table(rows: list[dict]) -> str:
    runs = [r for r in rows if r.get("kind") != "error"]
    lines = ["| case | N | options | peak MiB | peak / floor | time s |", "|---|---|---|---|---|---|"]
    for r in runs:
        if r.get("status") != "ok":
            lines.append(f"| {r['label']} | {r['seq_len']} | {_opts(r)} | — | — | {r.get('reason', '')} |")
            continue
        lines.append(f"| {r['label']} | {r['seq_len']} | {_opts(r)}{' causal' if r['causal'] else ''} "
                     f"| {r['peak_mib']:.0f} | {r['peak_over_floor']:.2f} | {r['time_s']:.2f} |")
    lines += ["", "| method | causal | options | error random | error peaked | error smooth |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("kind") == "error":
            lines.append(f"| {r['method']} | {r['causal']} | {_opts(r)} | {r['random']:.3f} | {r['peaked']:.3f} "
                         f"| {r['smooth']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="N = 4096 / 8192 instead of 16384 / 65536")
    ap.add_argument("--out", type=Path, default=RESULTS / "selective.jsonl")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    if not args.table_only:
        env = environment()
        log(f"environment: {env}")
        if not any(r.get("kind") == "error" for r in load_rows(args.out)):
            for row in errors():
                append_row(args.out, {**row, **env})
                log(f"error {row['method']} {_opts(row)}: {row['random']:.3f} / {row['peaked']:.3f} "
                    f"/ {row['smooth']:.3f}")
        done = {(r.get("label"), r["key"]) for r in load_rows(args.out) if "key" in r}
        for label, case, reps in plan(args.quick):
            if (label, case.key()) in done:
                continue
            log(f"running {label}: {case.method} N={case.seq_len} {case.options} ...")
            row = run_case(case, repeats=reps, warmup=0)
            row["label"] = label
            append_row(args.out, row)
            if row["status"] == "ok":
                log(f"  peak {row['peak_mib']:.0f} MiB ({row['peak_over_floor']:.2f} x floor), {row['time_s']:.2f} s")
            else:
                log(f"  {row['status']}: {row['reason']}")
    print(table(load_rows(args.out)))


if __name__ == "__main__":
    main()
