"""attnmem.estimate for every registered method at N = 1,048,576 (issue 7's ≤ 2 s target).

python benchmarks/estimate_million.py [--seq-len N]

B=1, H=8, D=64, float32, training; causal where the method is causal by definition. One fresh
process, methods in registry order, so the first call also pays whatever it imports. Rows go
to benchmarks/results/estimate_million.jsonl as they finish.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

t_import = time.perf_counter()
import attnmem  # noqa: E402
from attnmem import registry  # noqa: E402
from attnmem.bench import environment  # noqa: E402

IMPORT_S = time.perf_counter() - t_import
RESULTS = Path(__file__).resolve().parent / "results" / "estimate_million.jsonl"
CAUSAL_ONLY = ("adaptive_span", "adaptive_span_fixed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seq-len", type=int, default=2**20)
    args = ap.parse_args()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    print(f"import attnmem: {IMPORT_S:.2f} s")
    print("| method | seconds | source | predicted peak GiB |\n|---|---|---|---|")
    for name in registry.names():
        t0 = time.perf_counter()
        try:
            est = attnmem.estimate(name, batch=1, heads=8, seq_len=args.seq_len, head_dim=64,
                                   causal=name in CAUSAL_ONLY)
            row = {"method": name, "seconds": time.perf_counter() - t0, "source": est.source,
                   "peak_gib": est.peak_bytes / 2**30}
        except (ValueError, TypeError, RuntimeError) as e:
            row = {"method": name, "seconds": time.perf_counter() - t0, "source": "error", "reason": str(e)}
        row.update(seq_len=args.seq_len, import_s=IMPORT_S, **environment())
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"| {name} | {row['seconds']:.3f} | {row['source']} | {row.get('peak_gib', float('nan')):.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
