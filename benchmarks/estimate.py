"""attnmem.estimate and attnmem.plan against attnmem.measure, and the time of an estimate.

    python benchmarks/estimate.py [--quick] [--table-only]

1. One attention call per registered method (stateless, with a backward) at the standard
   configuration (CPU, float32, B=1, H=8, D=64, forward + backward), unmasked and causal: the
   estimate (``how="auto"``: trace, or the closed form where tracing would be slow) and the
   closed form, each against the measured peak.
2. A real AdamW training step of a small ``attnmem.nn.Transformer`` against ``attnmem.plan``'s
   prediction, with and without checkpointing.
3. Wall time of ``attnmem.estimate`` at N = 1,048,576 for every method (first call in the
   process, which pays for importing torch's fake-tensor machinery, and a warm call).
Rows go to benchmarks/results/estimate.jsonl as they finish.

    python benchmarks/estimate.py --approx [--table-only]

4. The closed forms of the approximate methods (their ``Method.memory_model``): time of
   ``attnmem.estimate`` at N = 1,048,576 and the closed form against the trace and the measured
   peak at N = 16,384 (standard configuration). Rows go to benchmarks/results/estimate_approx.jsonl.
"""

from __future__ import annotations

import argparse
import time

import attnmem
from _common import RESULTS, append_row, load_rows, log
from attnmem import registry
from attnmem.bench import Case, environment, run_case
from attnmem.memory.estimate import estimate
from attnmem.memory.measure import MiB
from attnmem.memory.plan import ModelConfig, measure_step, model_peak

OUT = RESULTS / "estimate.jsonl"


def _closed_form(name: str, **kw):
    """The method's closed-form estimate, or None outside its declared domain."""
    try:
        return estimate(name, how="formula", **kw)
    except ValueError:
        return None
APPROX_OUT = RESULTS / "estimate_approx.jsonl"
APPROX = ("linear", "performer", "nystrom", "hierarchical")


def methods() -> list[str]:
    return [m.name for m in attnmem.methods() if not m.stateful and m.supports.backward]


def timing_rows() -> None:
    n = 1_048_576
    for name in methods():
        for causal in (False, True):
            t0 = time.perf_counter()
            est = estimate(name, batch=1, heads=8, seq_len=n, head_dim=64, causal=causal)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            estimate(name, batch=1, heads=8, seq_len=n, head_dim=64, causal=causal)
            warm = time.perf_counter() - t0
            append_row(OUT, dict(kind="timing", method=name, seq_len=n, causal=causal, first_s=first, warm_s=warm,
                                 source=est.source, peak_bytes=est.peak_bytes, **environment()))
            log(f"timing {name} causal={causal}: first {first:.3f}s warm {warm:.3f}s ({est.source})")


def attention_rows(quick: bool) -> None:
    lengths = [1024, 2048] if quick else [1024, 2048, 4096]
    for n in lengths:
        for name in methods():
            for mask in ("none", "causal"):
                case = Case(name, n, mask=mask)
                row = run_case(case, repeats=0, warmup=0)
                if row["status"] != "ok":
                    log(f"{name} N={n} {mask}: {row.get('reason')}")
                    continue
                kw = dict(batch=1, heads=8, seq_len=n, head_dim=64, causal=mask == "causal")
                t0 = time.perf_counter()
                est = estimate(name, **kw)
                est_s = time.perf_counter() - t0
                closed = _closed_form(name, **kw)
                out = dict(kind="attention", method=name, seq_len=n, mask=mask, measured_bytes=row["peak_bytes"],
                           estimate_bytes=est.peak_bytes, source=est.source, estimate_s=est_s,
                           formula_bytes=closed.peak_bytes if closed else None, **environment())
                append_row(OUT, out)
                log(f"{name} N={n} {mask}: measured {row['peak_mib']:.1f} MiB, estimate {est.peak_mib:.1f} "
                    f"({est.source})")


STEP_CONFIGS = [
    dict(layers=4, d_model=256, heads=4, vocab=1000, seq_len=1024, batch=1),
    dict(layers=2, d_model=128, heads=4, kv_heads=2, vocab=5000, seq_len=2048, batch=1),
]


def step_rows(quick: bool) -> None:
    configs = STEP_CONFIGS[:1] if quick else STEP_CONFIGS
    for base in configs:
        for ckpt in (False, True):
            cfg = ModelConfig(**base, checkpointing=ckpt)
            for name in ("chunked", "sdpa", "reference"):
                if cfg.kv_heads and not registry.get(name).caps.gqa:
                    continue
                predicted = model_peak(cfg, name)["peak"]
                measured = measure_step(cfg, name)
                append_row(OUT, dict(kind="step", method=name, config=base, checkpointing=ckpt,
                                     predicted_bytes=predicted, measured_bytes=measured, **environment()))
                log(f"step {name} ckpt={ckpt}: predicted {predicted / MiB:.1f} MiB, measured {measured / MiB:.1f}")


def approx_rows(names: list[str]) -> None:
    std = dict(batch=1, heads=8, head_dim=64)
    for name in names:
        for causal in (False, True):
            if causal and not registry.get(name).caps.causal:
                log(f"{name} causal=True: not supported by the method, no row")
                continue
            t0 = time.perf_counter()
            est = estimate(name, seq_len=1_048_576, causal=causal, **std)
            secs = time.perf_counter() - t0
            t0 = time.perf_counter()
            estimate(name, seq_len=1_048_576, causal=causal, **std)
            warm = time.perf_counter() - t0
            n = 16384
            closed = estimate(name, seq_len=n, causal=causal, how="formula", **std)
            row = run_case(Case(name, n, mask="causal" if causal else "none"), repeats=0, warmup=0)
            t0 = time.perf_counter()
            traced = estimate(name, seq_len=n, causal=causal, how="trace", **std)
            trace_s = time.perf_counter() - t0
            append_row(APPROX_OUT, dict(kind="approx", method=name, causal=causal, source_1m=est.source,
                                        estimate_1m_s=secs, estimate_1m_warm_s=warm, peak_1m_bytes=est.peak_bytes,
                                        seq_len=n,
                                        formula_bytes=closed.peak_bytes, trace_bytes=traced.peak_bytes,
                                        trace_s=trace_s, measured_bytes=row.get("peak_bytes"), **environment()))
            log(f"{name} causal={causal}: 1M {secs:.3f}s ({est.source}); 16K formula {closed.peak_mib:.1f} MiB, "
                f"trace {traced.peak_mib:.1f}, measured {row.get('peak_mib')}")


def approx_table(rows: list[dict]) -> str:
    lines = ["| method | causal | estimate at N=1,048,576 s, first / warm (source) | 16K closed form MiB | "
             "16K trace MiB | 16K measured MiB | closed vs trace | closed vs measured |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["measured_bytes"]
        warm = f" / {r['estimate_1m_warm_s']:.3f}" if "estimate_1m_warm_s" in r else ""
        lines.append(f"| {r['method']} | {r['causal']} | {r['estimate_1m_s']:.3f}{warm} ({r['source_1m']}) | "
                     f"{r['formula_bytes'] / MiB:.1f} | {r['trace_bytes'] / MiB:.1f} | "
                     + (f"{m / MiB:.1f}" if m else "-") + f" | {pct(r['formula_bytes'], r['trace_bytes'])} | "
                     + (pct(r["formula_bytes"], m) if m else "-") + " |")
    return "\n".join(lines)


def pct(a: float, b: float) -> str:
    return f"{100 * (a - b) / b:+.1f} %"


def tables(rows: list[dict]) -> str:
    env = next((r for r in rows), {})
    lines = [f"Machine: {env.get('processor', '?')}, {env.get('cpu_threads', '?')} threads, "
             f"torch {env.get('torch', '?')}.", "",
             "One attention call, CPU, float32, B=1, H=8, D=64, forward + backward:", "",
             "| method | N | mask | measured MiB | estimate MiB (source) | error | closed form MiB | error |",
             "|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["kind"] == "attention"):
        f = r["formula_bytes"]
        lines.append(
            f"| {r['method']} | {r['seq_len']} | {r['mask']} | {r['measured_bytes'] / MiB:.1f} | "
            f"{r['estimate_bytes'] / MiB:.1f} ({r['source']}) | {pct(r['estimate_bytes'], r['measured_bytes'])} | "
            + (f"{f / MiB:.1f} | {pct(f, r['measured_bytes'])} |" if f else "- | - |"))
    lines += ["", "A training step (AdamW, parameters and moments counted) of attnmem.nn.Transformer:", "",
              "| config | checkpointing | method | measured MiB | plan MiB | error |", "|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["kind"] == "step"):
        c = r["config"]
        desc = f"{c['layers']}L d={c['d_model']} H={c['heads']}/{c.get('kv_heads') or c['heads']} " \
               f"V={c['vocab']} N={c['seq_len']} B={c['batch']}"
        lines.append(f"| {desc} | {'yes' if r['checkpointing'] else 'no'} | {r['method']} | "
                     f"{r['measured_bytes'] / MiB:.1f} | {r['predicted_bytes'] / MiB:.1f} | "
                     f"{pct(r['predicted_bytes'], r['measured_bytes'])} |")
    lines += ["", "`attnmem.estimate` at N = 1,048,576 (B=1, H=8, D=64, float32, training):", "",
              "| method | causal | source | first call in process s | warm call s | predicted peak GiB |",
              "|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["kind"] == "timing"):
        lines.append(f"| {r['method']} | {r['causal']} | {r['source']} | {r['first_s']:.2f} | {r['warm_s']:.3f} | "
                     f"{r['peak_bytes'] / 2**30:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--recompute-formulas", action="store_true",
                    help="Recompute the closed-form column of recorded rows (no measuring).")
    ap.add_argument("--approx", action="store_true", help="Only the approximate methods' closed forms (part 4).")
    ap.add_argument("--methods", default=",".join(APPROX), help="With --approx: methods to (re)measure.")
    args = ap.parse_args()
    if args.approx:
        if not args.table_only:
            approx_rows(args.methods.split(","))
        print(approx_table(load_rows(APPROX_OUT)))
        return
    if args.recompute_formulas:
        rows = load_rows(OUT)
        OUT.unlink()
        for r in rows:
            closed = None
            if r["kind"] == "attention":
                closed = _closed_form(r["method"], batch=1, heads=8, seq_len=r["seq_len"], head_dim=64,
                                      causal=r["mask"] == "causal")
            if closed is not None:
                r["formula_bytes"] = closed.peak_bytes
            append_row(OUT, r)
        args.table_only = True
    if not args.table_only:
        if OUT.exists():
            OUT.unlink()
        timing_rows()  # first, so "first call" really is the first in the process
        attention_rows(args.quick)
        step_rows(args.quick)
    print(tables(load_rows(OUT)))


if __name__ == "__main__":
    main()
