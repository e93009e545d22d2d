"""One training step of Hugging Face Llama- and Mistral-shaped models: eager, HF sdpa, attnmem.

Small widths (d = 256, 8 query heads of 32, 2 KV heads, 2 layers, vocabulary 1024) so that
attention dominates at long N. For each (model, N, padding) the step — forward with the model's
own loss, backward, AdamW step — is measured for its peak (``attnmem.measure``'s tracker, every
live tensor counted, parameters and optimizer state included) and predicted by
``estimate_step`` (fake tensors) beside it. Times are ratios against HF ``sdpa`` measured in the
same run, interleaved (attnmem, sdpa, attnmem, ...), medians; the load average is recorded.
Padded cases left-pad ``N // 64`` tokens (1.6 %). ``eager`` runs only where its N² scores fit
``--eager-max``; above that its peak is ``estimate_step``'s alone.

    PYTHONPATH=src python benchmarks/hf.py --seq-lens 4096,8192 --repeats 3
    PYTHONPATH=src python benchmarks/hf.py --mask-build     # mask construction at N = 8192
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

SHAPE = {"vocab_size": 1024, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
         "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 65536}


def configs(window: int) -> dict:
    return {"llama": LlamaConfig(**SHAPE), "mistral": MistralConfig(**SHAPE, sliding_window=window)}


def prepared(cfg, impl: str, n: int, pad: int):
    torch.manual_seed(0)
    return amhf.prepare_step(cfg, impl, n, 1, pad=pad)


def measured_peak(cfg, impl: str, n: int, pad: int) -> int:
    model, opt, inputs = prepared(cfg, impl, n, pad)
    peak, _ = track_peak(lambda state, inp: amhf.train_step(model, opt, inp), amhf.state_tensors(model, opt), inputs)
    return peak


def time_ratio(cfg, impl: str, peer: str, n: int, pad: int, repeats: int) -> tuple[float, float, float]:
    """(median time of impl, of peer, median of the per-pair ratios), interleaved."""
    a, b = prepared(cfg, impl, n, pad), prepared(cfg, peer, n, pad)
    for model, opt, inputs in (a, b):
        amhf.train_step(model, opt, inputs)  # warm-up
    ta, tb = [], []
    for _ in range(repeats):
        for (model, opt, inputs), out in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            amhf.train_step(model, opt, inputs)
            out.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb), statistics.median(x / y for x, y in zip(ta, tb))


def run_steps(args) -> list[dict]:
    amhf.register("chunked", name="attnmem")
    rows = []
    for model_name, cfg in configs(args.window).items():
        for n in args.seq_lens:
            for pad in (0, n // 64):
                for impl in ("eager", "sdpa", "attnmem"):
                    t0 = time.perf_counter()
                    est = amhf.estimate_step(cfg, n, attn_implementation=impl, pad=pad)
                    est_s = time.perf_counter() - t0
                    row = {"model": model_name, "impl": impl, "N": n, "pad": pad, "estimate_mib": est.peak_bytes / MiB,
                           "estimate_s": est_s}
                    if impl != "eager" or n <= args.eager_max:
                        peak = measured_peak(cfg, impl, n, pad)
                        row["peak_mib"] = peak / MiB
                        row["estimate_error"] = est.peak_bytes / peak - 1
                    if impl == "attnmem" and args.repeats:
                        t_a, t_s, ratio = time_ratio(cfg, "attnmem", "sdpa", n, pad, args.repeats)
                        row.update(time_s=t_a, sdpa_time_s=t_s, time_vs_sdpa=ratio)
                    row["loadavg"] = open("/proc/loadavg").read().split()[:3]
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


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
               "loadavg": open("/proc/loadavg").read().split()[:3]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", default="4096,8192")
    p.add_argument("--window", type=int, default=1024, help="Mistral's sliding_window.")
    p.add_argument("--repeats", type=int, default=3, help="Interleaved timed steps per implementation (0: none).")
    p.add_argument("--eager-max", type=int, default=4096, help="Largest N at which eager runs for real.")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mask-build", action="store_true", help="Only the mask-construction benchmark.")
    args = p.parse_args()
    args.seq_lens = [int(x) for x in args.seq_lens.split(",")]
    torch.set_num_threads(args.threads)
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                      "cpu": open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": ")}))
    if args.mask_build:
        mask_build()
    else:
        run_steps(args)


if __name__ == "__main__":
    main()
