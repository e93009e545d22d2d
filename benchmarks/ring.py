"""Ring attention on 1, 2 and 4 gloo ranks against single-process ``chunked`` at the same N.

    python benchmarks/ring.py [--n 16384] [--ranks 1 2 4] [--masks none causal] [--rounds 1]

Standard configuration (DESIGN.md): CPU, float32, B=1, H=8, D=64, forward + backward
(``out.sum().backward()``). Every rank measures itself with ``attnmem.measure`` (peak of all
live tensors of that rank: its q, k, v shard, their gradients, the ring's buffers) and the row
keeps the largest peak and the slowest rank's time. The machine's cores are split between
the ranks (``torch.set_num_threads(max(1, cores // P))``), so on this 2-core machine 2 ranks
have one core each, like the single process's two threads, and 4 ranks oversubscribe.
Causal runs use the zigzag layout. Runs are interleaved (chunked, ring P=1, 2, 4, chunked,
...) and ``--rounds`` repeats the whole sequence; rows are appended to
benchmarks/results/ring.jsonl as they finish.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch.distributed as dist

from _common import RESULTS, append_row, load_rows, log
from _ranks import CORES, run_ranks, threads_per_rank
from attnmem.bench import Case, environment, floor_bytes, run_case
from attnmem.bench.cases import make_inputs
from attnmem.distributed import ring_attention, shard
from attnmem.memory.measure import measure


def _rank(rank, world, n, causal, repeats, heads_per_pass) -> dict:
    layout = "zigzag" if causal else "contiguous"
    q, k, v = (shard(t.detach(), world, rank, layout=layout).clone().requires_grad_(True)
               for t in make_inputs(Case("chunked", n)))

    def step(q, k, v):
        for t in (q, k, v):
            t.grad = None
        ring_attention(q, k, v, causal=causal, layout=layout, heads_per_pass=heads_per_pass).sum().backward()

    dist.barrier()
    m = measure(step, q, k, v, repeats=repeats, warmup=0)
    return {"peak": m.peak_bytes, "time": m.time_s, "times": m.times_s}


def run_ring(n: int, world: int, causal: bool, repeats: int, heads_per_pass: int) -> dict:
    return run_ranks(world, _rank, n, causal, repeats, heads_per_pass)[0]


def table(rows: list[dict]) -> str:
    lines = ["| N | mask (layout) | run | ranks | threads/rank | heads/pass | per-rank peak MiB "
             "| peak / chunked peak | time s | time / chunked |", "|---|---|---|---|---|---|---|---|---|---|"]
    ok = [r for r in rows if r.get("status") == "ok"]
    for r in ok:
        if r["method"] != "ring":
            continue
        peer = r.get("peer")
        ratio_m = f"{r['peak_bytes'] / peer['peak_bytes']:.3f}" if peer else ""
        ratio_t = f"{r['time_s'] / peer['time_s']:.2f}" if peer else ""
        mask = "causal (zigzag)" if r["causal"] else "none (contiguous)"
        if peer:
            lines.append(f"| {r['seq_len']} | {mask} | chunked (round {r['round']}) | 1 | {CORES} | — "
                         f"| {peer['peak_mib']:.0f} | 1 | {peer['time_s']:.2f} | 1 |")
        lines.append(f"| {r['seq_len']} | {mask} | ring (round {r['round']}) | {r['ranks']} "
                     f"| {threads_per_rank(r['ranks'])} | {r.get('heads_per_pass') or 'auto'} | {r['peak_mib']:.0f} "
                     f"| {ratio_m} | {r['time_s']:.2f} | {ratio_t} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--masks", nargs="+", default=["none", "causal"], choices=["none", "causal"])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs after the tracked one")
    ap.add_argument("--heads-per-pass", type=int, default=None, help="default: ring_attention's own choice")
    ap.add_argument("--out", type=Path, default=RESULTS / "ring.jsonl")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    if not args.table_only:
        env = environment()
        for rnd in range(args.rounds):
            for mask in args.masks:
                causal = mask == "causal"
                for world in args.ranks:
                    # The peer is measured right before each ring run, so load changes hit both.
                    log(f"round {rnd} N={args.n} mask={mask}: chunked")
                    peer = run_case(Case("chunked", args.n, mask=mask), repeats=args.repeats, warmup=0)
                    log(f"  chunked: {peer.get('peak_mib', 0):.0f} MiB {peer.get('time_s', 0):.2f} s; ring P={world}")
                    row = {"method": "ring", "seq_len": args.n, "batch": 1, "heads": 8, "head_dim": 64,
                           "dtype": "float32", "device": "cpu", "causal": causal,
                           "layout": "zigzag" if causal else "contiguous", "ranks": world, "round": rnd,
                           "threads_per_rank": threads_per_rank(world), "backend": "gloo", **env,
                           "floor_bytes": floor_bytes(Case("chunked", args.n)),
                           "heads_per_pass": args.heads_per_pass,
                           **run_ring(args.n, world, causal, args.repeats, args.heads_per_pass),
                           "peer": {k: peer.get(k) for k in ("method", "status", "peak_bytes", "peak_mib", "time_s")}}
                    log(f"  ring P={world}: {row.get('peak_mib', 0):.0f} MiB {row.get('time_s', 0):.2f} s")
                    append_row(args.out, row)
    print(table(load_rows(args.out)))


if __name__ == "__main__":
    main()
