"""MQAR accuracy by recall distance, of methods swapped into the exact models of the ``mqar`` preset.

    python benchmarks/mqar_distance.py --runs runs/quality_mqar --out benchmarks/results/quality/mqar_distance.jsonl
    python benchmarks/mqar_distance.py --runs runs/quality_mqar --table   # the rows as a markdown table

A query at position p recalls the value written right after its key in the opening pairs: the
recall distance is p − (position of that value). A method that keeps only the last W keys of a
query cannot read a value further back than W (here W = 32, the preset's window), so its
accuracy should hold below the window and fall to chance above it; this is what the overall
accuracy of ``quality.py`` averages away. The runs trained with a method of their own
(``mode=trained_by_distance``) are scored on the same queries. One row per (seed, mode, method,
distance bucket), written as it is made; rows already in ``--out`` are skipped.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import Tensor

from _common import append_row, load_rows, log
from attnmem.bench.quality import held_out_inputs, load_trained, parse_spec, swap_attention
from attnmem.tasks import IGNORE, make_task
from quality import PRESETS, exact_run, machine, run_dir, trained_specs

BUCKETS = ((1, 32), (33, 64), (65, 128), (129, 255))  # recall distances, inclusive
METHODS = ["sdpa", "sliding_window:window=32", "longformer:window=32", "strided:stride=32", "bigbird:block=16",
           "adaptive_span_fixed:spans=32", "recurrent_memory:segment=64,memory=64", "hard", "topk:topk=32",
           "hierarchical:block=16", "performer:features=64", "linear"]


def recall_distance(inputs: Tensor, labels: Tensor, num_pairs: int) -> Tensor:
    """(B, N) distance from each query to its value in the opening pairs; 0 where no label."""
    keys = inputs[:, 0:2 * num_pairs:2]  # (B, P): the keys, at positions 0, 2, 4, ...
    pos = torch.arange(inputs.shape[1]).expand_as(inputs)  # (B, N)
    match = inputs.unsqueeze(-1) == keys.unsqueeze(1)  # (B, N, P): which opening key a token is
    value_pos = 2 * match.int().argmax(-1) + 1  # (B, N): where that key's value sits
    return torch.where(labels != IGNORE, pos - value_pos, torch.zeros_like(pos))


@torch.no_grad()
def correct_by_query(model: torch.nn.Module, inputs: Tensor, labels: Tensor, batch_size: int = 8) -> Tensor:
    """(M,) whether each labelled prediction is right, in ``labels != IGNORE`` order; each batch
    a fresh document for memory methods, as ``attnmem.bench.quality.score`` scores them."""
    model.eval()
    out = []
    for a in range(0, inputs.shape[0], batch_size):
        if callable(getattr(model.net, "reset_memory", None)):
            model.net.reset_memory()
        logits, target = model.scored(inputs[a:a + batch_size], labels[a:a + batch_size])  # (m, C), (m,)
        out.append(logits.argmax(-1) == target)
    return torch.cat(out)


def bucket_rows(right: Tensor, dist: Tensor, base: dict) -> list[dict]:
    """One row per distance bucket: the queries in it and the accuracy on them."""
    rows = []
    for lo, hi in BUCKETS:
        sel = (dist >= lo) & (dist <= hi)
        rows.append({**base, "distance": [lo, hi], "queries": int(sel.sum()),
                     "accuracy": float(right[sel].float().mean())})
    return rows


def record(out: Path, rows: list[dict], t0: float) -> None:
    for row in rows:
        append_row(out, {**row, "eval_s": time.perf_counter() - t0, **machine()})
    log(f"seed {rows[0]['seed']} {rows[0]['mode']} {rows[0]['method']}: "
        + ", ".join(f"{r['distance'][0]}-{r['distance'][1]}: {r['accuracy']:.3f}" for r in rows))


def table(out: Path) -> str:
    """The rows of ``out`` as a markdown table: per (mode, method), the accuracy in each distance
    bucket, mean and range over seeds."""
    acc: dict[tuple[str, str], dict[tuple[int, int], dict[int, float]]] = {}
    queries: dict[tuple[int, int], dict[int, int]] = {}
    for r in load_rows(out):
        b = tuple(r["distance"])
        acc.setdefault((r["mode"], r["method"]), {}).setdefault(b, {})[r["seed"]] = r["accuracy"]
        queries.setdefault(b, {})[r["seed"]] = r["queries"]
    head = " | ".join(f"{lo}–{hi} ({sum(queries[(lo, hi)].values()) / len(queries[(lo, hi)]):.0f} queries)"
                      for lo, hi in BUCKETS)
    lines = [f"| scored | method | {head} |", "|---|---|" + "---:|" * len(BUCKETS)]
    for (mode, method), by_bucket in acc.items():
        cells = []
        for b in BUCKETS:
            v = list(by_bucket.get(b, {}).values())
            cells.append(f"{sum(v) / len(v):.3f} ({min(v):.3f}–{max(v):.3f}, {len(v)})" if v else "—")
        lines.append(f"| {mode.removesuffix('_by_distance')} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True, help="the mqar preset's checkpoints (quality.py train --runs)")
    ap.add_argument("--out", default="benchmarks/results/quality/mqar_distance.jsonl")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table", action="store_true", help="print the rows of --out as a table and stop")
    args = ap.parse_args()
    if args.table:
        print(table(Path(args.out)))
        return
    torch.set_num_threads(args.threads)
    preset, out = PRESETS["mqar"], Path(args.out)
    t = preset["mqar"]
    n, exact = t["seq_lens"][0], exact_run(preset)
    done = {(r["seed"], r["mode"], r["method"]) for r in load_rows(out)}
    for seed in preset["seeds"]:
        try:
            config, model, _ = load_trained(str(run_dir(Path(args.runs), "mqar", n, exact, seed)))
        except ValueError as e:
            log(f"skip seed {seed}: {e}")
            continue
        task = make_task("mqar", seq_len=n, **config.task_options)
        inputs, labels = held_out_inputs(config, task, text_bytes=0, examples=t["examples"])
        dist = recall_distance(inputs, labels, config.task_options["num_pairs"])[labels != IGNORE]  # (M,)
        base = {"preset": "mqar", "task": "mqar", "seq_len": n, "seed": seed}
        for spec in METHODS:
            if (seed, "swapped_by_distance", spec) in done:
                continue
            t0 = time.perf_counter()
            name, opts = parse_spec(spec)
            right = correct_by_query(swap_attention(model, name, opts, seed=seed), inputs, labels)
            record(out, bucket_rows(right, dist, {**base, "mode": "swapped_by_distance", "trained_with": exact,
                                                  "method": spec}), t0)
        for spec in trained_specs(preset, n):  # the runs trained with their own method, on the same queries
            if spec == exact or (seed, "trained_by_distance", spec) in done:
                continue
            try:
                _, trained, metrics = load_trained(str(run_dir(Path(args.runs), "mqar", n, spec, seed)))
            except ValueError as e:
                log(f"skip {spec} seed {seed}: {e}")
                continue
            if metrics["steps"] < t["steps"]:
                log(f"skip {spec} seed {seed}: step {metrics['steps']} of {t['steps']}, unfinished")
                continue
            t0 = time.perf_counter()
            record(out, bucket_rows(correct_by_query(trained, inputs, labels), dist,
                                    {**base, "mode": "trained_by_distance", "trained_with": spec, "method": spec,
                                     "train_steps": metrics["steps"]}), t0)


if __name__ == "__main__":
    main()
