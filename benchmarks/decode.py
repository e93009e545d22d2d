"""Decoding with a KV cache: cache memory and tokens/s against context length, per cache kind.

    nice -n 5 python benchmarks/decode.py [--quick] [--out benchmarks/results/decode.jsonl]

The issue's configuration: d_model 512, 8 heads, 4 layers, float32, batch 1, CPU, one thread
(``attnmem.bench.decode.DecodeConfig`` says why). Kinds: full cache, full cache of a GQA model
with 2 KV heads, int8 cache, sliding-window ring (w = 1024), linear-attention state. Rows are
appended to the results file as they finish; the plot goes beside it (decode.png) and the
markdown tables for BENCHMARKS.md are printed at the end.
"""

from __future__ import annotations

from _common import RESULTS, append_row, load_rows, log, results_args
from attnmem.bench.decode import DecodeConfig, int8_attention_error, int8_error, markdown_tables, plot, run_decode_bench


def main() -> None:
    args = results_args(__doc__, RESULTS / "decode.jsonl", "contexts 1024 and 4096 only, fewer rounds")
    if not args.table_only:
        if args.out.exists():
            args.out.unlink()
        contexts = [1024, 4096] if args.quick else [1024, 4096, 16384, 65536]
        cfg = DecodeConfig(rounds=3 if args.quick else 7)
        run_decode_bench(contexts, cfg, on_row=lambda row: append_row(args.out, row), log=log)
        log("int8 error against the float cache")
        append_row(args.out, int8_attention_error(4096))
        append_row(args.out, int8_error(cfg))
    rows = load_rows(args.out)
    print(markdown_tables(rows))
    for r in rows:
        if r.get("type") == "int8_attention_error":
            print(f"\nint8 cache, one layer's attention output vs float cache (L={r['context']}, q/k/v ~ N(0,1)): "
                  f"rel. error {r['rel_err']:.2e}")
        if r.get("type") == "int8_error":
            print(f"int8 cache, logits over {r['steps']} decode steps after a {r['prompt']}-token prompt "
                  f"(random-weight model): rel. error {r['logits_rel_err']:.2e}, "
                  f"argmax agreement {r['argmax_agreement']:.3f}")
    print(f"\nplot: {plot(rows, args.out.with_suffix('.png'))}")


if __name__ == "__main__":
    main()
