"""``attnmem train --max-batch-under``'s prediction against a measured training step.

    python benchmarks/train_estimate.py

For a few ``attnmem.tasks`` configurations and batch sizes: the peak of one training step
predicted by ``attnmem.training.estimated_peak_fn`` (``attnmem.memory.plan.model_peak``:
closed forms plus ``attnmem.estimate`` for the attention; nothing allocated) and the peak
measured by ``attnmem.training.step_peak`` (``attnmem.measure`` on a real steady-state step:
weights, gradients, AdamW moments, activations). Rows go to
benchmarks/results/train_estimate.jsonl as they finish.
"""

from __future__ import annotations

import torch

from _common import RESULTS, append_row, log
from attnmem.bench import environment
from attnmem.memory.measure import MiB
from attnmem.training import TrainConfig, build, estimated_peak_fn, step_peak

CASES = [
    ("mqar V=8192", dict(task_options={"vocab_size": 8192})),
    ("mqar V=64", dict(task_options={"vocab_size": 64, "random_non_queries": False})),
    ("mqar V=64 checkpointing", dict(task_options={"vocab_size": 64}, checkpointing=True)),
    ("mqar V=64 window 32", dict(task_options={"vocab_size": 64}, method="chunked",
                                 method_options={"mask_window": 32})),
    ("mqar V=64 linear", dict(task_options={"vocab_size": 64}, method="linear")),
    ("mqar V=64 performer", dict(task_options={"vocab_size": 64}, method="performer")),
    ("mqar V=64 topk", dict(task_options={"vocab_size": 64}, method="topk")),
    ("listops N=256", dict(task="listops")),
]


def main() -> None:
    torch.set_num_threads(1)
    env = environment()
    out = RESULTS / "train_estimate.jsonl"
    print("| case | batch | predicted MiB | measured MiB | predicted / measured |")
    print("|---|---:|---:|---:|---:|")
    for name, kw in CASES:
        for batch in (4, 16):
            cfg = TrainConfig(seq_len=256, batch_size=batch, **kw)
            predicted = estimated_peak_fn(cfg)(batch)
            task, model, opt, _ = build(cfg)
            measured = step_peak(model, opt, *task.sample(batch, torch.Generator().manual_seed(0)))[0]
            row = dict(case=name, batch=batch, seq_len=256, method=cfg.method, predicted_mib=predicted / MiB,
                       measured_mib=measured / MiB, ratio=predicted / measured, env=env)
            append_row(out, row)
            log(f"{name} b={batch}: {predicted / MiB:.2f} vs {measured / MiB:.2f} MiB")
            print(f"| {name} | {batch} | {predicted / MiB:.2f} | {measured / MiB:.2f} | {predicted / measured:.3f} |")


if __name__ == "__main__":
    main()
