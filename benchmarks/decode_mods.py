"""What a score_mod costs at decode time: tokens/s of the same model with and without ALiBi.

    python benchmarks/decode_mods.py [--quick] [--out benchmarks/results/decode_mods.jsonl]

``benchmarks/decode.py``'s model (d_model 512, 8 heads, 4 layers, float32, batch 1, one
thread), once plain and once with ``attnmem.scores.alibi(8)`` on every layer (same weights),
each decoding through the ``full``, ``int8``, ``int4`` and ``sliding_window`` caches at each
context. The rounds interleave every (kind, context, model) and the medians are reported, with
the ALiBi model's tokens/s as a ratio to the plain one's in the same run. A first part checks
the decode against the ALiBi model's own full forward on real tokens (max |Δ logits|). Rows are
appended as they finish; the markdown table for BENCHMARKS.md is printed at the end.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict

import torch

from _common import RESULTS, append_row, load_rows, log, results_args
from attnmem.bench.decode import DecodeConfig, bench_model, filled_cache
from attnmem.bench.rows import environment
from attnmem.scores import alibi

KINDS = {"full": {}, "int8": {}, "int4": {}, "sliding_window": {"window": 1024}}


def with_alibi(model):
    out = copy.deepcopy(model)
    for block in out.blocks:
        block.attn.score_mod = alibi(block.attn.n_heads)
    return out


def agreement(models, cfg: DecodeConfig, prompt: int = 192, steps: int = 64) -> list[dict]:
    """Max |Δ logits| of each model decoding ``steps`` tokens after a ``prompt`` through each
    kind, against its own full forward over the same tokens (teacher-forced)."""
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, cfg.vocab, (1, prompt + steps), generator=g)
    rows = []
    for name, model in models.items():
        want = model(tokens)[:, prompt:]
        for kind, opts in KINDS.items():
            cache = model.new_cache(kind, **opts)
            model(tokens[:, :prompt], cache=cache)
            got = torch.cat([model(tokens[:, i:i + 1], cache=cache) for i in range(prompt, prompt + steps)], dim=1)
            rows.append({"type": "agreement", "model": name, "kind": kind, "prompt": prompt, "steps": steps,
                         "max_abs_logit_diff": float((got - want).abs().max()),
                         "logit_scale": float(want.abs().max())})
    return rows


def main() -> None:
    args = results_args(__doc__, RESULTS / "decode_mods.jsonl", "context 1024 only, 3 rounds")
    if not args.table_only:
        run(args)
    print(table(load_rows(args.out)))


def run(args) -> None:
    if args.out.exists():
        args.out.unlink()
    cfg = DecodeConfig(rounds=3 if args.quick else 7)
    contexts = [1024] if args.quick else [1024, 4096]
    torch.set_num_threads(cfg.threads)
    base = {"config": asdict(cfg), "env": environment()}
    plain = bench_model(cfg, None)
    models = {"plain": plain, "alibi": with_alibi(plain)}
    with torch.no_grad():
        log("agreement with the full forward")
        for row in agreement(models, cfg):
            append_row(args.out, {**row, **base})
        headroom = (cfg.rounds + 1) * cfg.steps + 1
        live = {(kind, L, name): filled_cache(models[name], kind, L, cfg, headroom=headroom, **opts)
                for kind, opts in KINDS.items() for L in contexts for name in models}
        g = torch.Generator().manual_seed(1)

        def decode(kind: str, L: int, name: str) -> float:
            tokens = torch.randint(0, cfg.vocab, (cfg.batch, cfg.steps), generator=g)
            t0 = time.perf_counter()
            for i in range(cfg.steps):
                models[name](tokens[:, i:i + 1], cache=live[kind, L, name])
            return cfg.steps * cfg.batch / (time.perf_counter() - t0)

        samples: dict[tuple, list[float]] = {key: [] for key in live}
        for key in live:
            decode(*key)  # warm-up
        for r in range(cfg.rounds):
            log(f"timing round {r + 1}/{cfg.rounds}")
            for key in live:
                samples[key].append(decode(*key))
        for kind in KINDS:
            for L in contexts:
                p, a = (statistics.median(samples[kind, L, n]) for n in ("plain", "alibi"))
                append_row(args.out, {"type": "speed", "kind": kind, "context": L, "plain_tokens_per_s": p,
                                      "alibi_tokens_per_s": a, "alibi_over_plain": a / p,
                                      "plain_samples": samples[kind, L, "plain"],
                                      "alibi_samples": samples[kind, L, "alibi"], **base})


def table(rows: list[dict]) -> str:
    out = ["| cache | context | plain tokens/s | ALiBi tokens/s | ALiBi / plain |", "|---|---:|---:|---:|---:|"]
    for r in (r for r in rows if r.get("type") == "speed"):
        out.append(f"| {r['kind']} | {r['context']} | {r['plain_tokens_per_s']:.1f} | "
                   f"{r['alibi_tokens_per_s']:.1f} | {r['alibi_over_plain']:.2f} |")
    out += ["", "| model | cache | max abs Δ logits vs its full forward | largest logit |", "|---|---|---:|---:|"]
    for r in (r for r in rows if r.get("type") == "agreement"):
        out.append(f"| {r['model']} | {r['kind']} | {r['max_abs_logit_diff']:.2e} | {r['logit_scale']:.2f} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
