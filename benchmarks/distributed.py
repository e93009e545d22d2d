"""Ring, Ulysses and hybrid sequence parallelism on 2 and 4 gloo ranks; layout work imbalance.

    python benchmarks/distributed.py [--n 4096] [--ranks 2 4] [--schemes ring ulysses hybrid]
                                     [--masks causal none] [--imbalance-only] [--heads 8]
                                     [--ulysses-heads-per-pass C]

Standard configuration (DESIGN.md): CPU, float32, B=1, H=8, D=64, forward + backward
(``out.sum().backward()``). Every rank measures itself with ``attnmem.measure`` (the tracked
run, which is also the timed one: its q, k, v shard, their gradients and every buffer of the
scheme) and counts the bytes it sends with ``attnmem.distributed.count_traffic``; the row keeps
the largest per-rank peak, the slowest rank's time and every rank's bytes, beside the
predictions of ``attnmem.distributed.estimate.per_rank``. Cores are split between the ranks
(``torch.set_num_threads(max(1, cores // P))``). Causal runs use the zigzag layout (the ring
level of the hybrid); the hybrid runs at 4 ranks as 2 × 2. ``--ulysses-heads-per-pass C`` runs
Ulysses and the hybrid's Ulysses level C query heads per rank at a time, recomputed in the
backward (``heads_per_pass``); ``--heads`` changes H (a non-standard configuration: say so).
The single-process ``chunked`` peer is measured right before each scheme (interleaved), at the
same N. Rows are appended to benchmarks/results/distributed.jsonl.

The imbalance part needs no ranks: packed documents with lengths uniform in [L, 10·L]
(``layout.random_documents``), and for each layout the work (attention pairs, causal within
each document) of every rank: max / mean.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

import attnmem
from _common import RESULTS, append_row, load_rows, log
from _ranks import CORES, run_ranks, threads_per_rank
from attnmem.bench import Case, environment, run_case
from attnmem.bench.cases import make_inputs
from attnmem.distributed import (
    attention_pairs,
    count_traffic,
    hybrid_partition,
    imbalance,
    partition,
    process_grid,
    ring_attention,
    sequence_parallel_attention,
    ulysses_attention,
)
from attnmem.distributed.estimate import per_rank
from attnmem.distributed.layout import random_documents
from attnmem.memory.measure import MiB, measure

SCHEMES = ("ring", "ulysses", "hybrid")
B, H, D = 1, 8, 64


def _grid(scheme: str, world: int) -> tuple[int, int]:
    return {"ring": (1, world), "ulysses": (world, 1), "hybrid": (2, world // 2)}[scheme]


def _rank(rank, world, n, causal, scheme, repeats, heads, passes, blocks, kv_blocks) -> dict:
    u, r = _grid(scheme, world)
    layout = "zigzag" if causal else "contiguous"
    part = hybrid_partition(layout, n, ulysses=u, ring=r)
    inputs = make_inputs(Case("chunked", n, heads=heads))
    q, k, v = (part.shard(t.detach(), rank).clone().requires_grad_(True) for t in inputs)
    if scheme == "hybrid":
        process_grid(ulysses=u, ring=r)  # new_group is collective: outside the measured step

    def attend(q, k, v):
        if scheme == "ring":
            return ring_attention(q, k, v, causal=causal, layout=layout, kv_blocks=kv_blocks or 1)
        if scheme == "ulysses":
            return ulysses_attention(q, k, v, causal=causal, layout=layout, method="chunked", heads_per_pass=passes,
                                     query_blocks=blocks)
        return sequence_parallel_attention(q, k, v, ulysses=u, ring=r, layout=layout, causal=causal,
                                           ulysses_heads_per_pass=passes, kv_blocks=kv_blocks)

    def step(q, k, v):
        for t in (q, k, v):
            t.grad = None
        attend(q, k, v).sum().backward()

    dist.barrier()
    with count_traffic() as traffic:
        m = measure(step, q, k, v, repeats=0, warmup=0)  # the tracked run: its peak and its bytes
    seconds = m.time_s
    if repeats:
        # The tracker hooks every operator (the ring's many small ones most): time untracked runs
        # (measure's repeats after a second tracked run, whose bytes are not counted).
        dist.barrier()
        seconds = measure(step, q, k, v, repeats=repeats, warmup=0).time_s
    return {"peak": m.peak_bytes, "time": seconds, "sent": traffic.sent_bytes,
            "payload": traffic.payload_bytes, "by_kind": dict(traffic.by_kind), "threads": torch.get_num_threads()}


def run_scheme(scheme: str, n: int, world: int, causal: bool, repeats: int, heads: int = H,
               passes: int | None = None, blocks: int | None = None, kv_blocks: int | None = None) -> dict:
    row, ranks = run_ranks(world, _rank, n, causal, scheme, repeats, heads, passes, blocks, kv_blocks)
    if row["status"] != "ok":
        return row
    u, _ = _grid(scheme, world)
    pred = per_rank(scheme, local_estimate=attnmem.estimate, world_size=world, ulysses=u, batch=B, heads=heads,
                    seq_len=n, head_dim=D, causal=causal, layout="zigzag" if causal else "contiguous",
                    ulysses_heads_per_pass=passes if scheme != "ring" else None,
                    query_blocks=blocks, kv_blocks=kv_blocks)
    return {**row, "sent_bytes": [r["sent"] for r in ranks], "payload_bytes": [r["payload"] for r in ranks],
            "by_kind": [r["by_kind"] for r in ranks],
            "predicted_peak_bytes": pred["peak_bytes"], "predicted_sent_bytes": pred["sent_bytes"]}


def table(rows: list[dict]) -> str:
    lines = ["| N | mask (layout) | scheme | ranks (U×R) | per-rank peak MiB (pred.) | peak / chunked "
             "| time s | time / chunked | MiB sent per rank, measured (pred.) | sent / pred. |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") != "ok" or r.get("kind") != "scheme":
            continue
        peer = r["peer"]
        mask = "causal (zigzag)" if r["causal"] else "none (contiguous)"
        sent = max(r["sent_bytes"])
        pred = max(r["predicted_sent_bytes"])
        worst = max(abs(s / p - 1) for s, p in zip(r["sent_bytes"], r["predicted_sent_bytes"])) if pred else 0.0
        lines.append(f"| {r['seq_len']} | {mask} | chunked (1 process, {CORES} threads) | 1 "
                     f"| {peer['peak_mib']:.1f} | 1 | {peer['time_s']:.2f} | 1 | — | — |")
        grid = f"{r['ulysses']}×{r['ranks'] // r['ulysses']}"
        lines.append(f"| {r['seq_len']} | {mask} | {r['scheme']} | {r['ranks']} ({grid}) "
                     f"| {r['peak_mib']:.1f} ({r['predicted_peak_bytes'] / MiB:.1f}) "
                     f"| **{r['peak_bytes'] / peer['peak_bytes']:.3f}** | {r['time_s']:.2f} "
                     f"| {r['time_s'] / peer['time_s']:.2f} | {sent / MiB:.2f} ({pred / MiB:.2f}) "
                     f"| max dev {100 * worst:.2f} % |")
    return "\n".join(lines)


def imbalance_rows(n: int, worlds: list[int], lows: list[int], seeds: int) -> list[dict]:
    rows = []
    for low in lows:
        for world in worlds:
            for seed in range(seeds):
                ids = random_documents(n, low, 10 * low, seed=seed)
                row = {"kind": "imbalance", "seq_len": n, "ranks": world, "doc_len": [low, 10 * low], "seed": seed,
                       "num_documents": int(ids.max()) + 1}
                for layout in ("contiguous", "zigzag", "documents"):
                    if layout == "zigzag" and n % (2 * world):
                        continue
                    part = partition(layout, n, world, documents=ids)
                    row[layout] = imbalance(attention_pairs(part, ids))
                    row[f"{layout}_tokens"] = part.lengths
                rows.append(row)
    return rows


def imbalance_table(rows: list[dict]) -> str:
    lines = ["| N | ranks | document lengths | seed | documents | contiguous | zigzag | balanced documents |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seq_len']} | {r['ranks']} | {r['doc_len'][0]}–{r['doc_len'][1]} | {r['seed']} "
                     f"| {r['num_documents']} | {r['contiguous']:.3f} | {r['zigzag']:.3f} | **{r['documents']:.3f}** |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    ap.add_argument("--masks", nargs="+", default=["causal"], choices=["none", "causal"])
    ap.add_argument("--imbalance-only", action="store_true")
    ap.add_argument("--repeats", type=int, default=1, help="timed untracked runs after the tracked one (0: time it)")
    ap.add_argument("--imbalance-n", type=int, default=16384)
    ap.add_argument("--out", type=Path, default=RESULTS / "distributed.jsonl")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--heads", type=int, default=H, help="H = Hkv (standard: 8)")
    ap.add_argument("--ulysses-heads-per-pass", type=int, default=None,
                    help="heads_per_pass of Ulysses and of the hybrid's Ulysses level (default: all at once)")
    ap.add_argument("--query-blocks", type=int, default=None,
                    help="query_blocks of Ulysses (default: its own, P blocks with passes)")
    ap.add_argument("--kv-blocks", type=int, default=None,
                    help="kv_blocks of the ring and of the hybrid's ring (default: theirs; the hybrid's is 2 "
                         "with passes)")
    args = ap.parse_args()
    if not args.table_only:
        rows = imbalance_rows(args.imbalance_n, [2, 4, 8], [200, 400], seeds=3)
        for row in rows:
            append_row(args.out, {**row, **environment()})
        print(imbalance_table(rows))
        if args.imbalance_only:
            return
        env = environment()
        for mask in args.masks:
            causal = mask == "causal"
            for world in args.ranks:
                for scheme in args.schemes:
                    if scheme == "hybrid" and world < 4:
                        continue  # 2 ranks: a 2 × 1 or 1 × 2 grid is Ulysses or ring alone
                    log(f"N={args.n} mask={mask}: chunked")
                    peer = run_case(Case("chunked", args.n, heads=args.heads, mask=mask), repeats=args.repeats,
                                    warmup=0)
                    log(f"  chunked: {peer.get('peak_mib', 0):.1f} MiB {peer.get('time_s', 0):.2f} s; "
                        f"{scheme} P={world}")
                    u, _ = _grid(scheme, world)
                    passes = args.ulysses_heads_per_pass if scheme != "ring" else None
                    blocks = args.query_blocks if scheme == "ulysses" else None
                    kv_blocks = args.kv_blocks if scheme != "ulysses" else None
                    row = {"kind": "scheme", "scheme": scheme, "seq_len": args.n, "batch": B, "heads": args.heads,
                           "head_dim": D, "ulysses_heads_per_pass": passes,
                           "query_blocks": blocks, "kv_blocks": kv_blocks,
                           "dtype": "float32", "device": "cpu", "causal": causal, "ranks": world, "ulysses": u,
                           "threads_per_rank": threads_per_rank(world), "backend": "gloo", **env,
                           "loadavg": Path("/proc/loadavg").read_text().split()[:3],
                           **run_scheme(scheme, args.n, world, causal, args.repeats, args.heads, passes, blocks,
                                        kv_blocks),
                           "repeats": args.repeats,
                           "peer": {k: peer.get(k) for k in ("method", "status", "peak_bytes", "peak_mib", "time_s")}}
                    log(f"  {scheme} P={world}: {row.get('peak_mib', 0):.1f} MiB {row.get('time_s', 0):.2f} s "
                        f"sent {row.get('sent_bytes')} predicted {row.get('predicted_sent_bytes')}")
                    append_row(args.out, row)
    print(table(load_rows(args.out)))


if __name__ == "__main__":
    main()
