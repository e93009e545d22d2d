"""What a smaller KV cache costs in recall: MQAR accuracy against cache bytes, per cache kind.

    nice -n 5 python benchmarks/decode_quality.py [--run RUN_DIR] [--examples 512]

The model is BENCHMARKS.md's MQAR recipe (N = 256, 16 pairs, vocabulary 64, d_model 64, 2 heads,
2 layers, ``sdpa``), trained by ``attnmem train`` with seed 0 to 99 % held-out accuracy; its
weights (``export_model``: no optimizer state, 0.4 MB) are kept in
``benchmarks/results/decode_quality/mqar_sdpa.pt``. ``--run DIR`` re-exports them from a run of
``attnmem train ... --out DIR`` (the command is in BENCHMARKS.md, KV-cache section). Rows go to
``benchmarks/results/decode_quality/decode_quality.jsonl`` as they finish, then a summary row;
the plot beside them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import RESULTS, append_row, log
from attnmem.bench.decode_quality import QualityConfig, export_model, markdown_table, plot, run_quality, summarize

OUT = RESULTS / "decode_quality"
MODEL = OUT / "mqar_sdpa.pt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=None, help="export the model from this attnmem train run first")
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=None, help="tokens prefilled (default: half the sequence)")
    ap.add_argument("--out", type=Path, default=OUT / "decode_quality.jsonl")
    args = ap.parse_args()
    if args.run is not None:
        export_model(args.run, MODEL)
    if args.out.exists():
        args.out.unlink()
    rows = run_quality(MODEL, QualityConfig(examples=args.examples, prompt=args.prompt),
                       on_row=lambda row: append_row(args.out, row), log=log)
    summary = {"type": "summary", **summarize(rows)}
    append_row(args.out, summary)
    print(markdown_table(rows))
    print(summary)
    print(f"plot: {plot(rows, args.out.with_suffix('.png'))}")


if __name__ == "__main__":
    main()
