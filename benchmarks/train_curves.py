"""Learning curves of ``attnmem train`` runs: held-out accuracy against step and training time.

    python benchmarks/train_curves.py RUN_DIR [RUN_DIR ...] --out curves.png

Reads each run's ``metrics.jsonl`` (written by ``attnmem train``), prints a markdown table of
the last evaluation and the first step (and training seconds) at which accuracy reached
``--threshold``, and plots both curves.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import load_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", default="curves.png")
    ap.add_argument("--threshold", type=float, default=0.99)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    print(f"| run | last step | eval acc | train s | first step ≥ {args.threshold:.0%} | train s then |")
    print("|---|---:|---:|---:|---:|---:|")
    for run in args.runs:
        rows = load_rows(Path(run) / "metrics.jsonl")
        if not rows:
            continue
        label = Path(run).name
        steps = [r["step"] for r in rows]
        acc = [r["eval_accuracy"] for r in rows]
        secs = [r["train_time_s"] for r in rows]
        by_step.plot(steps, acc, label=label)
        by_time.plot(secs, acc, label=label)
        hit = next((r for r in rows if r["eval_accuracy"] >= args.threshold), None)
        last = rows[-1]
        hit_step, hit_time = (str(hit["step"]), f"{hit['train_time_s']:.0f}") if hit else ("-", "-")
        print(f"| {label} | {last['step']} | {last['eval_accuracy']:.4f} | {last['train_time_s']:.0f} | "
              f"{hit_step} | {hit_time} |")
    by_step.set_xlabel("step")
    by_time.set_xlabel("training seconds (evaluation excluded)")
    by_step.set_ylabel("held-out accuracy")
    for ax in (by_step, by_time):
        ax.axhline(args.threshold, color="gray", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
    by_step.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
