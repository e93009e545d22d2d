"""attnmem.estimate for every registered method × dtype at N = 1,048,576 (issue 16's ≤ 2 s
target), each in a fresh process, and attnmem.plan("llama3-8b", "80GB") (≤ 30 s).

python benchmarks/estimate_million.py [--seq-len N] [--dtypes float32,bfloat16,float16]
                                      [--methods a,b,...] [--timeout S] [--skip-plan]

B=1, H=8, D=64, training where the method has a backward; causal where the method supports it.
Each row runs ``python -c`` in a new interpreter, timing the estimate call alone (import apart),
killed after ``--timeout`` seconds. Rows go to benchmarks/results/estimate_million.jsonl.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "estimate_million.jsonl"

ONE = """
import json, time
t0 = time.perf_counter()
import attnmem
from attnmem import registry
t1 = time.perf_counter()
m = registry.get({name!r})
row = dict(method={name!r}, dtype={dtype!r}, import_s=t1 - t0)
try:
    est = attnmem.estimate({name!r}, batch=1, heads=8, seq_len={n}, head_dim=64, dtype={dtype!r},
                           causal=m.caps.causal, training=m.caps.backward)
    row.update(seconds=time.perf_counter() - t1, source=est.source, peak_gib=est.peak_bytes / 2**30)
except ValueError as e:
    row.update(seconds=time.perf_counter() - t1, source="refused", reason=str(e).splitlines()[0][:160])
print(json.dumps(row))
"""

PLAN = """
import json, time
t0 = time.perf_counter()
import attnmem
t1 = time.perf_counter()
lines = []
rows = attnmem.plan("llama3-8b", "80GB",
                    on_method=lambda name, i, total: lines.append((name, time.perf_counter() - t1)))
print(json.dumps(dict(kind="plan", import_s=t1 - t0, seconds=time.perf_counter() - t1, per_method=lines,
                      statuses={r["method"]: r["status"] for r in rows})))
"""


def run(code: str, timeout: float) -> dict:
    t = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(source="timeout", seconds=time.perf_counter() - t)
    if out.returncode:
        return dict(source="crash", reason=out.stderr.strip().splitlines()[-1][:160] if out.stderr else "")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seq-len", type=int, default=2**20)
    ap.add_argument("--dtypes", default="float32,bfloat16,float16")
    ap.add_argument("--methods", default=None, help="comma-separated methods (default: every registered one)")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--skip-plan", action="store_true")
    args = ap.parse_args()
    from attnmem import registry
    from attnmem.bench import environment

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    env = environment()
    print("| method | dtype | seconds | source | predicted peak GiB |\n|---|---|---|---|---|", flush=True)
    names = registry.names() if args.methods is None else args.methods.split(",")
    unknown = sorted(set(names) - set(registry.names()))
    if unknown:
        ap.error(f"--methods: unknown {', '.join(unknown)}; registered: {', '.join(registry.names())}")
    for name in names:
        for dtype in args.dtypes.split(","):
            # A finished row names its method and dtype itself; a timeout or crash does not.
            row = {"method": name, "dtype": dtype} | run(ONE.format(name=name, dtype=dtype, n=args.seq_len),
                                                         args.timeout)
            row.update(seq_len=args.seq_len, **env)
            with RESULTS.open("a") as f:
                f.write(json.dumps(row) + "\n")
            peak = row.get("peak_gib")
            print(f"| {name} | {dtype} | {row.get('seconds', float('nan')):.2f} | {row['source']} | "
                  f"{'' if peak is None else f'{peak:.2f}'} |", flush=True)
    if not args.skip_plan:
        row = {"kind": "plan"} | run(PLAN, 10 * args.timeout)  # the plan's own output names its kind too
        row.update(**env)
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"plan('llama3-8b', '80GB'): {row.get('seconds', float('nan')):.1f} s ({row.get('source', 'ok')})",
              flush=True)
        for name, at in row.get("per_method", []):
            print(f"  started {name} at {at:.1f} s", flush=True)


if __name__ == "__main__":
    main()
