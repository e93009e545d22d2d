"""One training step of Hugging Face Llama- and Mistral-shaped models: eager, HF sdpa, attnmem.

Small widths, long N, so that attention's memory is what is measured: d = 128, 4 query heads of
32, 2 KV heads (GQA), FFN 256, 2 layers, vocabulary 256 (at d = 256 and vocabulary 1024 the
logits, MLP and AdamW state were most of attnmem's peak). Mistral: ``sliding_window = 1024``.
For each (model, N, padding, implementation) the step — forward with the model's own loss,
backward, AdamW step, gradients freed — is predicted by ``estimate_step`` (fake tensors) and,
where that prediction fits ``--measure-max-mib``, measured for its peak (``attnmem.measure``'s
tracker: every live tensor, parameters and optimizer state included). Padded cases left-pad
``N // 64`` tokens (1.6 %).

Times (``--timing``, or only those with ``--timing-only``) are the issue's target ratios, each
pair interleaved in one process (A, B, A, B, ...), medians of the per-pair ratios, with
/proc/loadavg before and after: unpadded attnmem vs HF sdpa, and padded vs unpadded attnmem,
for both models (``--models``).

    PYTHONPATH=src python benchmarks/hf.py                                  # memory table
    PYTHONPATH=src python benchmarks/hf.py --timing-only --seq-lens 8192 --repeats 5
    PYTHONPATH=src python benchmarks/hf.py --mask-build                     # mask construction
    PYTHONPATH=src python benchmarks/hf.py --band --seq-lens 8192,32768     # banded window vs tile loop
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import LlamaConfig, MistralConfig

import attnmem.integrations.hf as amhf
from attnmem.memory.measure import MiB, track_peak

SHAPE = {"vocab_size": 256, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 65536}
IMPLS = ("eager", "sdpa", "attnmem")


def configs(window: int) -> dict:
    return {"llama": LlamaConfig(**SHAPE), "mistral": MistralConfig(**SHAPE, sliding_window=window)}


def loadavg() -> list[str]:
    with open("/proc/loadavg") as f:
        return f.read().split()[:3]


def prepared(cfg, impl: str, n: int, pad: int):
    torch.manual_seed(0)
    return amhf.prepare_step(cfg, impl, n, 1, pad=pad)


def measured_peak(cfg, impl: str, n: int, pad: int) -> int:
    model, opt, inputs = prepared(cfg, impl, n, pad)
    peak, _ = track_peak(lambda state, inp: amhf.train_step(model, opt, inp), amhf.state_tensors(model, opt), inputs)
    return peak


def time_ratio(a: tuple, b: tuple, repeats: int) -> dict:
    """Steps ``a`` and ``b`` — each (config, impl, N, pad) — interleaved after one warm-up each:
    their median times and the median of the per-pair ratios a / b."""
    steps = [prepared(*case) for case in (a, b)]
    for model, opt, inputs in steps:
        amhf.train_step(model, opt, inputs)  # warm-up
    times: list[list[float]] = [[], []]
    for _ in range(repeats):
        for (model, opt, inputs), out in zip(steps, times):
            t0 = time.perf_counter()
            amhf.train_step(model, opt, inputs)
            out.append(time.perf_counter() - t0)
    return {"time_a_s": statistics.median(times[0]), "time_b_s": statistics.median(times[1]),
            "ratio": statistics.median(x / y for x, y in zip(*times)), "pairs": repeats}


def memory_rows(args) -> list[dict]:
    rows = []
    for model_name in args.models:
        cfg = configs(args.window)[model_name]
        for n in args.seq_lens:
            for pad in (0, n // 64) if args.padding == "both" else ((0,) if args.padding == "none" else (n // 64,)):
                for impl in args.impls:
                    est = amhf.estimate_step(cfg, n, attn_implementation=impl, pad=pad)
                    row = {"model": model_name, "impl": impl, "N": n, "pad": pad, "estimate_mib": est.peak_mib,
                           "estimate_s": est.seconds}
                    if est.peak_mib <= args.measure_max_mib:
                        peak = measured_peak(cfg, impl, n, pad)
                        row["peak_mib"] = peak / MiB
                        row["estimate_error"] = est.peak_bytes / peak - 1
                    row["loadavg"] = loadavg()
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def timing_rows(args) -> list[dict]:
    """The issue's time targets: unpadded attnmem / sdpa (Llama's is a target; Mistral's runs the
    banded window, kernels.banded); padded / unpadded attnmem."""
    cfgs = configs(args.window)
    rows = []
    for n in args.seq_lens:
        pairs = [(m, "attnmem / sdpa, unpadded", (cfgs[m], "attnmem", n, 0), (cfgs[m], "sdpa", n, 0))
                 for m in args.models]
        pairs += [(m, "attnmem padded / unpadded", (cfgs[m], "attnmem", n, n // 64), (cfgs[m], "attnmem", n, 0))
                  for m in args.models]
        for model_name, what, a, b in pairs:
            before = loadavg()
            row = {"model": model_name, "N": n, "ratio_of": what, **time_ratio(a, b, args.repeats),
                   "loadavg_before": before, "loadavg_after": loadavg()}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _timed_call(q, k, v, mask) -> float:
    """Seconds of one chunked attention call, forward and backward."""
    from attnmem import attention

    t0 = time.perf_counter()
    torch.autograd.grad(attention(q, k, v, method="chunked", mask=mask).sum(), (q, k, v))
    return time.perf_counter() - t0


def band_rows(args) -> list[dict]:
    """Mistral's attention call alone (forward + backward, its shape: 4 query heads of 32, 2 KV
    heads), the window run banded (``sliding_window(W - 1, 0)``, kernels.banded) against the
    same window through the tile loop, as before kernels.banded (``masks.Band(1 - W, 0)``: the
    same mask function and tile states, a class ``plan_call`` leaves to the tile loop), and banded
    with the step's N // 64 left pads, interleaved."""
    from attnmem import masks as M

    rows = []
    for n in args.seq_lens:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, n, 4, 32, generator=g).transpose(1, 2).requires_grad_()  # (B, H, N, D) as HF lays it
        k, v = (torch.randn(1, n, 2, 32, generator=g).transpose(1, 2).requires_grad_() for _ in range(2))
        valid = torch.ones(1, n, dtype=torch.bool)
        valid[0, :n // 64] = False  # the step benchmark's left padding
        masks = {"banded": M.sliding_window(args.window - 1, 0),
                 "tile loop": M.Band(1 - args.window, 0),
                 "banded padded": M.sliding_window(args.window - 1, 0) & M.key_padding(valid)}

        for mask in masks.values():
            _timed_call(q, k, v, mask)  # warm-up
        before = loadavg()
        times = {name: [] for name in masks}
        for _ in range(args.repeats):
            for name, mask in masks.items():
                times[name].append(_timed_call(q, k, v, mask))
        row = {"N": n, "window": args.window, "banded_s": statistics.median(times["banded"]),
               "tile_loop_s": statistics.median(times["tile loop"]),
               "banded_padded_s": statistics.median(times["banded padded"]),
               "ratio_banded_over_tile_loop": statistics.median(a / b for a, b in zip(times["banded"],
                                                                                      times["tile loop"])),
               "ratio_padded_over_unpadded": statistics.median(a / b for a, b in zip(times["banded padded"],
                                                                                     times["banded"])),
               "pairs": args.repeats, "loadavg_before": before, "loadavg_after": loadavg()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    """The memory rows as the BENCHMARKS table (MiB)."""
    lines = ["| model | N | padding | impl | measured peak MiB | estimate_step MiB | error | trace s | load avg |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        measured = f"{r['peak_mib']:.1f}" if "peak_mib" in r else "not run (predicted only)"
        error = f"{100 * r['estimate_error']:+.2f} %" if "estimate_error" in r else "–"
        pad = f"{r['pad']} left" if r["pad"] else "none"
        lines.append(f"| {r['model']} | {r['N']} | {pad} | {r['impl']} | {measured} | {r['estimate_mib']:.1f} | "
                     f"{error} | {r['estimate_s']:.1f} | {r['loadavg'][0]} |")
    return "\n".join(lines)


def mask_build(n: int = 8192, repeats: int = 20) -> list[dict]:
    """Time and peak of turning one layer call's HF mask description into attnmem masks plus
    their block map (q_tile = kv_tile = 256), for every recognised kind."""
    from transformers import masking_utils as mu

    valid = torch.ones(1, n, dtype=torch.bool)
    valid[0, : n // 64] = False
    pos = torch.cat([torch.arange(m) for m in (n // 4, n // 2, n // 4)])[None, :]  # (1, N): 3 packed sequences
    kinds = {
        "causal": (mu.causal_mask_function, None),
        "causal+padding": (mu.causal_mask_function, valid),
        "sliding(1024)": (mu.sliding_window_causal_mask_function(1024), None),
        "sliding(1024)+padding": (mu.sliding_window_causal_mask_function(1024), valid),
        "bidirectional+padding": (mu.bidirectional_mask_function, valid),
        "bidirectional sliding(64)": (mu.sliding_window_bidirectional_mask_function(64), None),
        "chunked(2048)": (mu.chunked_causal_mask_function(2048, torch.zeros(1, dtype=torch.long)), None),
        "packed(3 sequences)": (mu.and_masks(mu.remap_positions_for_packed_sequence(mu.causal_mask_function, pos),
                                            mu.packed_sequence_mask_function(mu.find_packed_sequence_indices(pos))),
                                None),
    }
    k = torch.zeros(1, 1, n, 1)
    rows = []
    for name, (fn, padding) in kinds.items():
        def build(fn=fn, padding=padding):
            desc = amhf.mask_interface(batch_size=1, q_length=n, kv_length=n, mask_function=fn, attention_mask=padding)
            mask, _, _ = amhf.structured_mask(desc, k, k, batch=1, nq=n, is_causal=True)
            mask.block_map(n, n, 256, 256)

        peak, base = track_peak(build)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            build()
            times.append(time.perf_counter() - t0)
        row = {"mask": name, "N": n, "build_ms": statistics.median(times) * 1e3, "build_peak_kib": (peak - base) / 1024,
               "loadavg": loadavg()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", default="4096,8192,16384,32768")
    p.add_argument("--models", default="llama,mistral")
    p.add_argument("--impls", default=",".join(IMPLS), help="Among eager, sdpa, attnmem.")
    p.add_argument("--padding", choices=("both", "none", "left"), default="both")
    p.add_argument("--window", type=int, default=1024, help="Mistral's sliding_window.")
    p.add_argument("--measure-max-mib", type=float, default=6144,
                   help="Run a case for real only when estimate_step predicts at most this peak.")
    p.add_argument("--timing", action="store_true", help="Also the interleaved time ratios.")
    p.add_argument("--timing-only", action="store_true", help="Only the interleaved time ratios.")
    p.add_argument("--repeats", type=int, default=3, help="Interleaved pairs per time ratio.")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mask-build", action="store_true", help="Only the mask-construction benchmark.")
    p.add_argument("--band", action="store_true", help="Only Mistral's attention call: banded vs the tile loop.")
    args = p.parse_args()
    args.seq_lens = [int(x) for x in args.seq_lens.split(",")]
    args.models, args.impls = args.models.split(","), args.impls.split(",")
    torch.set_num_threads(args.threads)
    amhf.register("chunked", name="attnmem")
    with open("/proc/cpuinfo") as f:
        cpu = f.read().split("model name")[1].split("\n")[0].strip(": \t")
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu,
                      "loadavg": loadavg()}), flush=True)
    if args.mask_build:
        mask_build()
        return
    if args.band:
        band_rows(args)
        return
    if not args.timing_only:
        print(markdown(memory_rows(args)), flush=True)
    if args.timing or args.timing_only:
        timing_rows(args)


if __name__ == "__main__":
    main()
