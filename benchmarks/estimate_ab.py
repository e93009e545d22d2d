"""Interleaved A/B of one ``attnmem.estimate`` at N = 2**20: another checkout's src against this
one's, a fresh interpreter per run, alternating (timings on a shared machine: compare ratios).

python benchmarks/estimate_ab.py METHOD DTYPE [--ref-src /work/main/src] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CODE = """
import time, attnmem
from attnmem import registry
m = registry.get({name!r})
t = time.perf_counter()
e = attnmem.estimate({name!r}, batch=1, heads=8, seq_len=2**20, head_dim=64, dtype={dtype!r},
                     causal=m.caps.causal, training=m.caps.backward)
print(time.perf_counter() - t, e.source)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("method")
    ap.add_argument("dtype")
    ap.add_argument("--ref-src", default="/work/main/src")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    here = str(Path(__file__).resolve().parents[1] / "src")
    res: dict[str, list[float]] = {"ref": [], "this": []}
    for _ in range(args.repeats):
        for label, src in (("ref", args.ref_src), ("this", here)):
            out = subprocess.run([sys.executable, "-c", CODE.format(name=args.method, dtype=args.dtype)],
                                 env={**os.environ, "PYTHONPATH": src}, capture_output=True, text=True, check=True)
            res[label].append(float(out.stdout.split()[-2]))
    med = {k: statistics.median(v) for k, v in res.items()}
    print(json.dumps(dict(method=args.method, dtype=args.dtype, seconds=res, median=med,
                          ratio=med["this"] / med["ref"], loadavg=open("/proc/loadavg").read().split()[:3])))


if __name__ == "__main__":
    main()
