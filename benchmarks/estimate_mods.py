"""``attnmem.estimate`` of the modified calls (issue 17): closed form against trace and measurement.

Standard configuration: CPU, float32, B=1, H=8, D=64, causal, forward + backward, ``chunked``.

    python benchmarks/estimate_mods.py [--n 16384] [--features softcap,alibi,...] [--how formula,trace,measure]
    python benchmarks/estimate_mods.py --n 1048576 --how formula

For each feature (softcap(50), ALiBi's standard slopes, a fixed T5 relative bias, learned
sinks, dropout 0.1): the closed form (``how="formula"``), the fake-tensor trace
(``how="trace"``, its operator and time bounds lifted: at N = 16384 a tiled trace runs past
them) and a real run counted by ``attnmem.measure``, each with the wall time it took. Memory is
deterministic; the times were measured under load (the load average is printed).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import attnmem
from attnmem import scores as S
from attnmem.memory import estimate as est_mod
from attnmem.memory.estimate import estimate

FEATURES = ("softcap", "alibi", "relative_bias", "sinks", "dropout")


def feature_kwargs(name: str, heads: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {"softcap": {"score_mod": S.softcap(50.0)}, "alibi": {"score_mod": S.alibi(heads)},
            "relative_bias": {"score_mod": S.relative_bias(torch.randn(32, heads, generator=gen) * 0.1)},
            "sinks": {"sinks": torch.zeros(heads, requires_grad=True)},
            "dropout": {"dropout_p": 0.1}}[name]


def measured(n: int, heads: int, head_dim: int, mods: dict) -> int:
    q, k, v = (torch.randn(1, heads, n, head_dim, requires_grad=True) for _ in range(3))
    seed = {"dropout_seed": 0} if "dropout_p" in mods else {}

    def step(q, k, v):
        attnmem.attention(q, k, v, method="chunked", causal=True, **mods, **seed).sum().backward()

    return attnmem.measure(step, q, k, v, repeats=0, warmup=0).peak_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--features", default=",".join(FEATURES))
    p.add_argument("--how", default="formula,trace", help="any of formula, trace, measure")
    args = p.parse_args()
    hows = args.how.split(",")
    est_mod.TRACE_OP_LIMIT, est_mod.TRACE_SECONDS_LIMIT = 10**12, float("inf")
    print(f"N={args.n} B=1 H={args.heads} D={args.head_dim} float32 causal fwd+bwd, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, load {os.getloadavg()}")
    print(f"{'feature':14s} {'how':8s} {'peak MiB':>10s} {'bytes':>12s} {'x formula':>9s} {'seconds':>8s}")
    for name in args.features.split(","):
        mods = feature_kwargs(name, args.heads)
        base = None
        for how in hows:
            t0 = time.perf_counter()
            if how == "measure":
                peak = measured(args.n, args.heads, args.head_dim, mods)
            else:
                peak = estimate("chunked", batch=1, heads=args.heads, seq_len=args.n, head_dim=args.head_dim,
                                causal=True, how=how, **mods).peak_bytes
            dt = time.perf_counter() - t0
            base = peak if base is None else base
            print(f"{name:14s} {how:8s} {peak / 2**20:10.2f} {peak:12d} {peak / base:9.4f} {dt:8.2f}", flush=True)


if __name__ == "__main__":
    main()
