"""Linear and low-rank attention: memory, time and approximation error against the peers.

    python benchmarks/linear.py [--quick] [--repeats 3] [--out benchmarks/results/linear.jsonl]

Standard configuration (DESIGN.md): CPU, float32, B=1, H=8, D=64, forward + backward, peak of
every live tensor through ``attnmem.measure`` with the inputs passed as arguments. Parts:

* performer (m = 256) against ``performer_pytorch.FastAttention(dim_heads=64, nb_features=256)``
  at N = 8192, runs interleaved (ours, peer, ours, peer...), medians.
* nystrom module against module on x of shape (1, 8192, 512):
  ``attnmem.nn.MultiHeadAttention(512, 8, method="nystrom", landmarks=256)`` (and with the same
  33-wide conv residual as the peer's default) against
  ``nystrom_attention.NystromAttention(dim=512, dim_head=64, heads=8, num_landmarks=256)``.
* causal linear at N = 8192 and 65536: peak / floor and the time ratio.
* every method's relative error against exact attention (random and peaked inputs, N = 1024).

Rows are appended to the results file as they finish; the tables are printed at the end.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

import attnmem
from _common import RESULTS, append_row, load_rows, log
from attnmem.bench import Case, approx_error, environment, floor_bytes, run_case
from attnmem.memory.measure import MiB, measure


def _inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).requires_grad_(True) for _ in range(3)]


def _train_step(fn):
    def run(*args):
        for t in args:
            t.grad = None
        fn(*args).sum().backward()
    return run


def interleaved(contenders: dict, args_for: dict, repeats: int) -> dict:
    """Peak (one tracked run each) and median time of ``repeats`` interleaved timed runs."""
    result = {}
    for name, fn in contenders.items():
        m = measure(fn, *args_for[name], repeats=0, warmup=1)
        result[name] = {"peak_bytes": m.peak_bytes, "times_s": []}
    for _ in range(repeats):
        for name, fn in contenders.items():
            m = measure(fn, *args_for[name], repeats=1, warmup=0)
            result[name]["times_s"].append(m.times_s[0])
    for r in result.values():
        r["time_s"] = statistics.median(r["times_s"])
    return result


def performer_part(out: Path, repeats: int, n: int) -> None:
    from performer_pytorch import FastAttention

    peer = FastAttention(dim_heads=64, nb_features=256)
    contenders = {
        "performer m=256": _train_step(lambda q, k, v: attnmem.attention(q, k, v, method="performer",
                                                                        features=256)),
        "performer-pytorch FastAttention": _train_step(lambda q, k, v: peer(q, k, v)),
    }
    shape = (1, 8, n, 64)
    args = {name: _inputs(shape) for name in contenders}
    res = interleaved(contenders, args, repeats)
    floor = floor_bytes(Case("performer", n))
    for name, r in res.items():
        append_row(out, {"part": "performer", "name": name, "seq_len": n, "floor_bytes": floor, **r,
                         **environment()})


def nystrom_part(out: Path, repeats: int, n: int) -> None:
    from nystrom_attention import NystromAttention

    torch.manual_seed(0)
    ours = attnmem.nn.MultiHeadAttention(512, 8, method="nystrom", landmarks=256)
    ours_conv = attnmem.nn.MultiHeadAttention(512, 8, method="nystrom", landmarks=256, conv_kernel=33)
    peer = NystromAttention(dim=512, dim_head=64, heads=8, num_landmarks=256)
    contenders = {
        "MultiHeadAttention nystrom m=256": _train_step(lambda x: ours(x)),
        "MultiHeadAttention nystrom m=256 conv_kernel=33": _train_step(lambda x: ours_conv(x)),
        "nystrom_attention.NystromAttention (conv 33)": _train_step(lambda x: peer(x)),
    }
    args = {name: _inputs((1, n, 512))[:1] for name in contenders}
    res = interleaved(contenders, args, repeats)
    for name, r in res.items():
        append_row(out, {"part": "nystrom", "name": name, "seq_len": n, **r, **environment()})


def causal_linear_part(out: Path, lengths: list[int]) -> None:
    for n in lengths:
        # The longest case is timed on its single tracked run (tracking only adds time).
        reps = 2 if n <= 8192 else 0
        row = run_case(Case("linear", n, causal=True), repeats=reps, warmup=1 if n <= 8192 else 0)
        append_row(out, {"part": "causal_linear", **row})
        log(f"  causal linear N={n}: {row.get('peak_mib', 0):.0f} MiB, {row.get('time_s', 0):.2f} s")


ERROR_CASES = [
    ("linear", {}, False), ("linear", {}, True),
    ("performer", {"features": 256}, False), ("performer", {"features": 256}, True),
    ("linformer", {"k": 256}, False),
    ("nystrom", {"landmarks": 64}, False), ("nystrom", {"landmarks": 256}, False),
]


def error_part(out: Path, n: int, mem_n: int) -> None:
    for method, opts, causal in ERROR_CASES:
        errs = {p: approx_error(method, n, causal=causal, peaked=p, **opts) for p in (False, True)}
        mem = run_case(Case(method, mem_n, causal=causal, options=opts), repeats=1)
        append_row(out, {"part": "error", "method": method, "options": opts, "causal": causal,
                         "error_n": n, "error_random": errs[False], "error_peaked": errs[True],
                         "mem_n": mem_n, "peak_mib": mem.get("peak_mib"),
                         "peak_over_floor": mem.get("peak_over_floor"), "time_s": mem.get("time_s"),
                         **environment()})
        log(f"  {method} {opts} causal={causal}: err {errs[False]:.3f} / peaked {errs[True]:.3f}")


def tables(rows: list[dict]) -> str:
    lines = []
    perf = [r for r in rows if r.get("part") == "performer"]
    if perf:
        peer = next(r for r in perf if r["name"].startswith("performer-pytorch"))
        lines += [f"performer, N = {perf[0]['seq_len']} (floor {perf[0]['floor_bytes'] / MiB:.0f} MiB)", "",
                  "| contender | peak MiB | peak / floor | peak / peer | time s (median) | time / peer |",
                  "|---|---|---|---|---|---|"]
        for r in perf:
            lines.append(f"| {r['name']} | {r['peak_bytes'] / MiB:.0f} | {r['peak_bytes'] / r['floor_bytes']:.2f} "
                         f"| {r['peak_bytes'] / peer['peak_bytes']:.2f} | {r['time_s']:.2f} "
                         f"| {r['time_s'] / peer['time_s']:.2f} |")
        lines.append("")
    nys = [r for r in rows if r.get("part") == "nystrom"]
    if nys:
        peer = next(r for r in nys if r["name"].startswith("nystrom_attention"))
        lines += [f"nystrom modules, x = (1, {nys[0]['seq_len']}, 512), 8 heads", "",
                  "| contender | peak MiB | peak / peer | time s (median) | time / peer |", "|---|---|---|---|---|"]
        for r in nys:
            lines.append(f"| {r['name']} | {r['peak_bytes'] / MiB:.0f} | {r['peak_bytes'] / peer['peak_bytes']:.2f} "
                         f"| {r['time_s']:.2f} | {r['time_s'] / peer['time_s']:.2f} |")
        lines.append("")
    cl = [r for r in rows if r.get("part") == "causal_linear" and r.get("status") == "ok"]
    if cl:
        base = min(cl, key=lambda r: r["seq_len"])
        lines += ["causal linear (elu+1, chunk 256)", "",
                  f"| N | peak MiB | peak / floor | time s | time / time(N={base['seq_len']}) |",
                  "|---|---|---|---|---|"]
        for r in sorted(cl, key=lambda r: r["seq_len"]):
            lines.append(f"| {r['seq_len']} | {r['peak_mib']:.0f} | {r['peak_over_floor']:.2f} | {r['time_s']:.2f} "
                         f"| {r['time_s'] / base['time_s']:.2f} |")
        lines.append("")
    err = [r for r in rows if r.get("part") == "error"]
    if err:
        lines += [f"approximation error (relative Frobenius, against exact attention, N = {err[0]['error_n']}) "
                  f"beside memory (N = {err[0]['mem_n']}, fwd + bwd)", "",
                  "| method | options | causal | error, random | error, peaked | peak MiB | peak / floor |",
                  "|---|---|---|---|---|---|---|"]
        for r in err:
            opts = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "default"
            peak = f"{r['peak_mib']:.0f} | {r['peak_over_floor']:.2f}" if r["peak_mib"] else "— | —"
            lines.append(f"| {r['method']} | {opts} | {r['causal']} | {r['error_random']:.3f} "
                         f"| {r['error_peaked']:.3f} | {peak} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller N everywhere")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parts", default="performer,nystrom,causal_linear,error")
    ap.add_argument("--out", type=Path, default=RESULTS / "linear.jsonl")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    if not args.table_only:
        log(f"environment: {environment()}")
        parts = args.parts.split(",")
        n = 2048 if args.quick else 8192
        if "performer" in parts:
            log("performer against performer-pytorch ...")
            performer_part(args.out, args.repeats, n)
        if "nystrom" in parts:
            log("nystrom against nystrom-attention ...")
            nystrom_part(args.out, args.repeats, n)
        if "causal_linear" in parts:
            log("causal linear ...")
            causal_linear_part(args.out, [2048, 8192] if args.quick else [8192, 65536])
        if "error" in parts:
            log("approximation errors ...")
            error_part(args.out, 1024, 2048 if args.quick else 4096)
    print(tables(load_rows(args.out)))


if __name__ == "__main__":
    main()
