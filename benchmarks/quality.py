"""What each attention method costs in task quality: trained with it, or swapped into an exact model.

    # the issue's full measurement (a quiet machine; 15 minutes of training per run):
    python benchmarks/quality.py all --preset full --out benchmarks/results/quality/full.jsonl
    # the reduced one measured on the loaded machine (3 minutes per run, one thread):
    python benchmarks/quality.py all --preset reduced --out benchmarks/results/quality/reduced.jsonl
    # the text target alone (context 1024 vs 128, 3 seeds, fixed steps; BENCHMARKS.md, session 4 quality section):
    python benchmarks/quality.py train --preset target --tasks text --runs runs/quality_target
    python benchmarks/quality.py evaluate --preset target --tasks text --runs runs/quality_target \
        --out benchmarks/results/quality/target.jsonl --no-swap
    python benchmarks/quality.py summary --preset target --tasks text --out benchmarks/results/quality/target.jsonl

``train`` fits every (task, context, method, seed) of the preset with ``attnmem.tasks.fit``
(checkpoints in ``--runs``; an interrupted run resumes). ``evaluate`` then loads each run and
appends rows to ``--out``; ``equal-steps`` trains the text task's shorter contexts again up to
the step the longest context reached in its time budget (``mode=trained_equal_steps``):

* ``mode=trained``: the run's own method, scored on the fixed held-out set (bits per byte on
  the first ``text_bytes`` validation bytes of the stdlib corpus; MQAR accuracy on the
  held-out seed's sequences).
* ``mode=swapped``: every registered method (``attnmem.bench.quality.method_specs``) swapped
  into each exact-attention run, scored the same way, with its error on the q, k, v captured
  from that model (against full exact attention under the model's mask) and, as a secondary
  column, on random inputs (``attnmem.bench.cases.approx_error``).

With a preset's ``scored_offset`` the text rows also carry ``bpb_full_context``: the same
validation bytes for every context, each predicted with at least 7/8 of the model's context
(``TextLM.scored_windows``); the n-gram is scored on those bytes too. ``summary`` then compares
the exact method's longest context with its shortest over seeds (``mode=summary`` rows: mean,
standard deviation and range per context, the margin against 3 × the larger range, and the
n-gram). ``evaluate`` skips rows already in ``--out``, and fixed-steps runs still in progress.

Every row carries the preset, the model, the seed, the corpus hash (text), the torch version,
threads and the load average at the time. ``all`` runs both stages. The n-gram baseline
(order 2, add-0.1) is one row of its own (``mode=baseline``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from _common import append_row, load_rows, log
from attnmem.bench.cases import approx_error
from attnmem.bench.frontier import cost_rows, measure_points, summarize
from attnmem.bench.quality import (
    bpb_by_position,
    capture_attention_inputs,
    captured_error,
    context_margin,
    held_out_inputs,
    load_trained,
    method_specs,
    parse_spec,
    score,
    swap_attention,
)
from attnmem.tasks.text import NGram, scored_stream, validation_stream
from attnmem.training import TrainConfig, fit
from attnmem.training.loop import CHECKPOINT

EXACT_RUN = "sdpa"  # the method of the runs every other method is swapped into (a preset's "exact" overrides it)

# Session 5's text-target recipe, shared by "target" and its longer probe "target-long".
TARGET_RECIPE: dict[str, Any] = {
    "exact": "chunked",
    "model": {"d_model": 64, "n_heads": 2, "n_layers": 2, "tie_embeddings": True, "positions": "rotary"},
    "trained_methods": ["chunked"],
}
TARGET_TEXT: dict[str, Any] = {"seq_lens": [1024, 128], "batch_tokens": 8192, "lr": 1e-2, "warmup_steps": 50,
                               "max_time_s": None, "text_bytes": 65536, "scored_offset": 1024}


def warm_text(steps: int, warmup: int) -> dict[str, Any]:
    """The target's text recipe at ``steps`` steps whose context-1024 runs warm up on windows of
    128, 256, 512 for ``warmup`` steps, then mix windows of 1024 and 128 (``target-warm``)."""
    return {**TARGET_TEXT, "steps": steps,
            "long": {"context_warmup": warmup, "context_start": 128, "train_mix": [{"seq_len": 128}]}}


# Each preset: the model, the optimiser budget, the contexts and what to score on.
PRESETS: dict[str, dict[str, Any]] = {
    "reduced": {
        "note": "reduced for a loaded 2-core CPU: d_model 64, 2 layers, context 512 vs 64, 2048 tokens "
                "per step, <= 200 steps or 170 s per run, 1 torch thread",
        "model": {"d_model": 64, "n_heads": 2, "n_layers": 2, "tie_embeddings": True},
        "text": {"seq_lens": [512, 64], "batch_tokens": 2048, "steps": 200, "lr": 5e-3, "warmup_steps": 20,
                 "max_time_s": 170.0, "text_bytes": 32768},
        "mqar": {"seq_lens": [64], "task_options": {"num_pairs": 4, "vocab_size": 64,
                                                    "random_non_queries": False},
                 "batch_tokens": 1024, "steps": 1500, "lr": 3e-3, "warmup_steps": 50, "max_time_s": 170.0,
                 "examples": 256},
        "trained_methods": ["sdpa", "sliding_window:window={w}", "topk:topk={w}", "linear"],
        "seeds": [0, 1],
    },
    "reduced-long": {  # the text pair only, longer, equal steps: does the long context pull ahead?
        "note": "reduced, longer: d_model 64, 2 layers, context 512 vs 64, 2048 tokens per step, 400 steps "
                "(<= 720 s) per run, 1 torch thread",
        "model": {"d_model": 64, "n_heads": 2, "n_layers": 2, "tie_embeddings": True},
        "text": {"seq_lens": [512, 64], "batch_tokens": 2048, "steps": 400, "lr": 5e-3, "warmup_steps": 20,
                 "max_time_s": 720.0, "text_bytes": 32768},
        "trained_methods": ["sdpa"],
        "seeds": [0, 1],
    },
    "smoke": {  # a few steps, to check the pipeline end to end in a minute
        "note": "smoke test of the pipeline: a few steps, not a measurement",
        "model": {"d_model": 32, "n_heads": 2, "n_layers": 1, "tie_embeddings": True},
        "text": {"seq_lens": [128, 32], "batch_tokens": 512, "steps": 3, "lr": 3e-3, "warmup_steps": 1,
                 "max_time_s": 60.0, "text_bytes": 2048},
        "mqar": {"seq_lens": [64], "task_options": {"num_pairs": 4, "vocab_size": 64,
                                                    "random_non_queries": False},
                 "batch_tokens": 256, "steps": 3, "lr": 3e-3, "warmup_steps": 1, "max_time_s": 60.0,
                 "examples": 16},
        "trained_methods": ["sdpa", "sliding_window:window={w}"],
        "seeds": [0],
    },
    "target": {  # the issue's text target, session 5's recipe (BENCHMARKS.md, session 5, issue 19)
        "note": "the text target: context 1024 vs 128, exact attention (chunked), d_model 64, 2 layers, 2 heads, "
                "rotary positions, tied embeddings, 8192 tokens per step (8 windows of 1024, 64 of 128), 300 "
                "steps (603-831 s of training steps per context-1024 run at load 14-19, two runs side by side), "
                "lr 1e-2 (warm-up 50, cosine), 1 torch thread",
        **TARGET_RECIPE,
        "text": {**TARGET_TEXT, "steps": 300},
        "seeds": [0, 1, 2],
    },
    "target-long": {  # the target's recipe with the steps 15 minutes allow on quieter cores (one seed: a probe)
        "note": "the target's recipe, 900 steps (0.89 s per context-1024 step at load 10, two side by side: "
                "about 13 minutes), seed 0 only",
        **TARGET_RECIPE,
        "text": {**TARGET_TEXT, "steps": 900},
        "seeds": [0],
    },
    "target-warm": {  # the target's recipe, 900 steps, the context-1024 runs with short windows (session 6)
        "note": "the target's recipe at 900 steps; the context-1024 runs train their first 600 steps on shorter "
                "windows of the same 8192 tokens per step (128, 256, 512: 200 steps each, TrainConfig."
                "context_warmup), then 300 steps of which each draws either 8 windows of 1024 or 64 of 128 "
                "(train_mix); the context-128 runs are target-long's",
        **TARGET_RECIPE,
        "text": warm_text(900, 600),
        "seeds": [0, 1, 2],
    },
    "target-warm-long": {  # target-warm with three times the steps
        "note": "target-warm at 2700 steps (1800 warm-up steps on 128/256/512 windows, then 900 mixed); "
                "quiet throughput 0.27 s per context-1024 step on average, two runs side by side: about 12 "
                "minutes; seed 0 (session 6), seeds 1 and 2 (session 7)",
        **TARGET_RECIPE,
        "text": warm_text(2700, 1800),
        "seeds": [0, 1, 2],
    },
    "target-warm-3800": {  # target-warm-long with the steps a quiet 15 minutes allow (BENCHMARKS.md, session 7)
        "note": "target-warm-long's 1800 warm-up steps (128/256/512 windows), then 2000 mixed steps (3800 in "
                "all); session 7's quiet throughput, two runs side by side: 0.17 s a warm-up step, 0.25 s a "
                "mixed step, about 800 s for a context-1024 run",
        **TARGET_RECIPE,
        "text": warm_text(3800, 1800),
        "seeds": [0, 1, 2],
    },
    "target-warm-3800-h4": {  # a probe: target-warm-3800 with 4 heads of 16 instead of 2 of 32 (one seed)
        "note": "target-warm-3800 with n_heads 4 (head dim 16; the same attention FLOPs): more heads to "
                "copy from far back; seed 0 only (a probe, session 7)",
        **TARGET_RECIPE,
        "model": {**TARGET_RECIPE["model"], "n_heads": 4},
        "text": warm_text(3800, 1800),
        "seeds": [0],
    },
    "target-h4-full": {  # target-warm-3800-h4 with three seeds, scored on the whole validation split (session 8)
        "note": "target-warm-3800 with n_heads 4 (head dim 16), seeds 0-2, scored on the whole validation split "
                "(1046528 bytes of its 1048576, 83 files: the full-context scoring starts 1024 bytes in and "
                "needs one more) rather than its first 64 KiB: a 600-step probe at context 128 "
                "(session 8) put most of the seed range in the model's initialisation and found the 64 KiB "
                "set added to it (range 0.080 against 0.053 on the whole split; 4 heads: 0.066 against 0.034). "
                "Chosen before these runs were trained; the 64 KiB figures are reported beside them",
        **TARGET_RECIPE,
        "model": {**TARGET_RECIPE["model"], "n_heads": 4},
        "text": {**warm_text(3800, 1800), "text_bytes": 1046528},
        "seeds": [0, 1, 2],
    },
    "target-d128": {  # target-h4-full on a model twice as wide, in the steps 15 minutes allow (session 9)
        "note": "d_model 128, 8 heads of 16, 2 layers (about 4 x the dense FLOPs and 2 x the attention's of "
                "target-h4-full), lr 5e-3 (half the narrow model's, for twice the width), 2200 steps: 1050 "
                "warm-up steps on windows of 128, 256, 512, then 1150 mixed 1024/128 steps (throughput, session "
                "9's Intel Xeon, two runs side by side: 0.392 s a context-1024 step on average, about 860 s); "
                "seeds 0-2, scored on the whole validation split. Chosen before its runs were trained",
        **TARGET_RECIPE,
        "model": {**TARGET_RECIPE["model"], "d_model": 128, "n_heads": 8},
        "text": {**warm_text(2200, 1050), "lr": 5e-3, "text_bytes": 1046528},
        "seeds": [0, 1, 2],
    },
    "target-d128-alibi": {  # target-d128 with ALiBi on top of rotary, the one change (session 13's probe)
        "note": "target-d128 (d_model 128, 8 heads of 16, 2 layers, lr 5e-3, 2200 steps: 1050 warm-up steps on "
                "windows of 128, 256, 512, then 1150 mixed 1024/128 steps) with alibi=True (fixed slopes "
                "1/2 .. 1/256) in both contexts; session 13's one-seed probe at 800 steps had it 0.024 bpb "
                "ahead at context 1024. Seeds 0-2, whole validation split. Chosen before its runs were trained",
        **TARGET_RECIPE,
        "model": {**TARGET_RECIPE["model"], "d_model": 128, "n_heads": 8, "alibi": True},
        "text": {**warm_text(2200, 1050), "lr": 5e-3, "text_bytes": 1046528},
        "seeds": [0, 1, 2],
    },
    "target-s4": {  # session 4's target recipe (sinusoidal positions; its rows in target.jsonl say "target"); missed
        "note": "the text target: context 1024 vs 128, exact attention (chunked), d_model 64, 2 layers, 2 heads, "
                "tied embeddings, 2048 tokens per step, 1200 steps (875-1013 s of training per context-1024 run "
                "under load average 17, under 15 minutes on quiet cores), lr 1e-2 (warm-up 50, cosine), "
                "attention-window warm-up over the first 400 steps (32 keys doubling to 512), 1 torch thread",
        "exact": "chunked",
        "model": {"d_model": 64, "n_heads": 2, "n_layers": 2, "tie_embeddings": True},
        "text": {"seq_lens": [1024, 128], "batch_tokens": 2048, "steps": 1200, "lr": 1e-2, "warmup_steps": 50,
                 "window_warmup": 400, "max_time_s": None, "text_bytes": 65536, "scored_offset": 1024},
        "trained_methods": ["chunked"],
        "seeds": [0, 1, 2],
    },
    "mqar": {  # MQAR only: a recipe the exact model learns (BENCHMARKS.md, "MQAR (Zoology), N = 256, 16 pairs")
        "note": "MQAR at N = 256, 16 pairs, vocabulary 64, filler 0, Zoology's mixture (N 64 / 4 pairs twice, "
                "N 128 / 8 pairs), d_model 64, 2 layers, 2 heads, tied embeddings, 16 sequences of 256 per step, "
                "2000 steps, lr 3e-3 (warm-up 100, cosine), 1 torch thread",
        "model": {"d_model": 64, "n_heads": 2, "n_layers": 2, "tie_embeddings": True},
        "mqar": {"seq_lens": [256], "task_options": {"num_pairs": 16, "vocab_size": 64,
                                                     "random_non_queries": False},
                 "train_mix": [{"seq_len": 64, "num_pairs": 4}, {"seq_len": 64, "num_pairs": 4},
                               {"seq_len": 128, "num_pairs": 8}],
                 "batch_tokens": 4096, "steps": 2000, "lr": 3e-3, "warmup_steps": 100, "max_time_s": None,
                 "eval_every": 100, "eval_examples": 64, "examples": 256},
        "trained_methods": ["sdpa", "sliding_window:window={w}", "linear", "topk:topk={w}"],
        "seeds": [0, 1, 2],
    },
    "full": {
        "note": "the issue's configuration: context 1024 vs 128, 15 minutes of training per run",
        "model": {"d_model": 128, "n_heads": 4, "n_layers": 4, "tie_embeddings": True},
        "text": {"seq_lens": [1024, 128], "batch_tokens": 8192, "steps": 3000, "lr": 3e-3, "warmup_steps": 100,
                 "max_time_s": 900.0, "text_bytes": 262144},
        "mqar": {"seq_lens": [256], "task_options": {"num_pairs": 16, "vocab_size": 64,
                                                     "random_non_queries": False},
                 "train_mix": [{"seq_len": 64, "num_pairs": 4}, {"seq_len": 64, "num_pairs": 4},
                               {"seq_len": 128, "num_pairs": 8}],
                 "batch_tokens": 4096, "steps": 4000, "lr": 3e-3, "warmup_steps": 100, "max_time_s": 900.0,
                 "examples": 256},
        "trained_methods": ["*"],  # every method of method_specs that trains on a causal model
        "seeds": [0, 1, 2],
    },
}


def machine() -> dict[str, Any]:
    return {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "loadavg": os.getloadavg()[0], "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}


def run_dir(runs: Path, task: str, seq_len: int, spec: str, seed: int) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in spec)
    return runs / task / f"N{seq_len}" / safe / f"seed{seed}"


def has_checkpoint(cfg: TrainConfig) -> bool:
    """Whether ``cfg``'s run was interrupted and can be resumed (fit refuses resume=True without one)."""
    return (Path(cfg.out_dir) / CHECKPOINT).exists()


def exact_run(preset: dict[str, Any]) -> str:
    return preset.get("exact", EXACT_RUN)


def trained_specs(preset: dict[str, Any], seq_len: int) -> list[str]:
    w = max(seq_len // 8, 4)
    names = preset["trained_methods"]
    if names == ["*"]:
        return [s for s in method_specs(seq_len) if not s.startswith(("reference", "linformer", "nystrom"))]
    return [s.format(w=w) for s in names]


def train_configs(preset: dict[str, Any], task: str) -> list[tuple[str, TrainConfig]]:
    """(spec, config) of every run of a task; the long context's runs come first."""
    t = preset[task]
    # Exact attention at every context first (the long-against-short comparison), then the other
    # methods at the longest context.
    exact = exact_run(preset)
    plan = [(n, exact) for n in t["seq_lens"]]
    plan += [(t["seq_lens"][0], s) for s in trained_specs(preset, t["seq_lens"][0]) if s != exact]
    out = []
    for n, spec in plan:
        for seed in preset["seeds"]:
            name, opts = parse_spec(spec)
            # "long": TrainConfig fields of the runs longer than the shortest context only.
            long = t.get("long", {}) if n > min(t["seq_lens"]) else {}
            fields = dict(task=task, task_options=dict(t.get("task_options", {})),
                          train_mix=list(t.get("train_mix", [])), seq_len=n, method=name,
                          method_options=opts, batch_size=max(t["batch_tokens"] // n, 1),
                          steps=t["steps"], lr=t["lr"], warmup_steps=t["warmup_steps"],
                          window_warmup=t.get("window_warmup", 0),
                          eval_every=t.get("eval_every", max(t["steps"] // 4, 1)),
                          eval_examples=t.get("eval_examples", 16),
                          checkpoint_every=max(t["steps"] // 4, 1), max_time_s=t.get("max_time_s"), seed=seed,
                          **preset["model"])
            cfg = TrainConfig(**{**fields, **long})
            out.append((spec, cfg))
    if "methods_only" in preset:  # --methods: some of the preset's runs (e.g. the slow ones last)
        out = [(spec, cfg) for spec, cfg in out if spec in preset["methods_only"]]
    return out


def train(preset_name: str, tasks: list[str], runs: Path, shard: tuple[int, int] = (0, 1)) -> None:
    """Every run of the preset, or with ``shard=(i, n)`` every n-th from the i-th (for n processes)."""
    preset = PRESETS[preset_name]
    plan = [(task, spec, cfg) for task in tasks for spec, cfg in train_configs(preset, task)]
    for task, spec, cfg in plan[shard[0]::shard[1]]:
        cfg = dataclasses.replace(cfg, out_dir=str(run_dir(runs, task, cfg.seq_len, spec, cfg.seed)))
        log(f"train {task} N={cfg.seq_len} {spec} seed {cfg.seed} -> {cfg.out_dir}")
        t0 = time.perf_counter()
        try:
            fit(cfg, resume=has_checkpoint(cfg))
        except (ValueError, TypeError, RuntimeError) as e:
            log(f"  failed: {type(e).__name__}: {e}")
            continue
        log(f"  {time.perf_counter() - t0:.0f} s")


def window_schedule(cfg: TrainConfig) -> dict[int, float]:
    """Expected training steps at each window length of a run: the context warm-up's stages (equal
    steps each), then the task and its ``train_mix`` entries (uniform draws) for the rest."""
    steps: dict[int, float] = {}
    for step in range(min(cfg.context_warmup, cfg.steps)):
        length = cfg.warmup_context(step)
        steps[length] = steps.get(length, 0) + 1
    rest = cfg.steps - min(cfg.context_warmup, cfg.steps)
    lengths = [cfg.seq_len] + [m.get("seq_len", cfg.seq_len) for m in cfg.train_mix]
    for length in lengths:
        steps[length] = steps.get(length, 0) + rest / len(lengths)
    return steps


def throughput(preset_name: str, out: Path, shard: tuple[int, int], probe_steps: int) -> None:
    """Seconds per training step of the text task's exact runs, one per context (seed 0), timed
    over ``probe_steps`` steps after two untimed ones at every window length the run trains on
    (the context warm-up's and ``train_mix``'s too, with the run's tokens per step): what a
    fixed-steps preset's runs cost, in a few minutes (``--jobs 2``: the contexts side by side, as
    the runs are trained)."""
    preset = PRESETS[preset_name]
    exact = exact_run(preset)
    plan = [cfg for spec, cfg in train_configs(preset, "text") if spec == exact and cfg.seed == preset["seeds"][0]]
    for cfg in plan[shard[0]::shard[1]]:
        schedule = window_schedule(cfg)
        per_length = {}
        for length in sorted(schedule):
            plain = dataclasses.replace(cfg, seq_len=length, batch_size=cfg.batch_at(length),
                                        context_warmup=0, train_mix=[], eval_examples=1)
            fit(dataclasses.replace(plain, steps=2, eval_every=2))  # first-call costs, untimed
            timed = fit(dataclasses.replace(plain, eval_every=cfg.steps), stop_at=probe_steps)
            per_length[length] = timed.metrics["train_time_s"] / probe_steps
        projected = sum(schedule[n] * per_length[n] for n in schedule)
        per_step = projected / cfg.steps
        append_row(out, {"preset": preset_name, "task": "text", "mode": "throughput", "method": exact,
                         "seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "probe_steps": probe_steps,
                         "s_per_step": per_step, "steps": cfg.steps, "projected_train_s": projected,
                         "s_per_step_by_window": per_length, "steps_by_window": schedule, **machine()})
        log(f"throughput N={cfg.seq_len}: {per_step:.3f} s per step on average "
            f"({', '.join(f'{n}: {t:.3f}' for n, t in sorted(per_length.items()))}) -> {projected:.0f} s for "
            f"{cfg.steps} steps (load {os.getloadavg()[0]:.1f})")


def in_processes(stage: str, preset_name: str, tasks: str, runs: str, out: str, threads: int, jobs: int,
                 probe_steps: int, seeds: str | None = None, methods: str | None = None) -> None:
    """``stage`` (train, throughput) as ``jobs`` processes, shard i of jobs each; returns when
    all have ended. ``seeds`` and ``methods`` (the command line's filters) go to every process.

    Raises:
        RuntimeError: a process that exited with an error.
    """
    import subprocess
    import sys

    cmd = [sys.executable, __file__, stage, "--preset", preset_name, "--tasks", tasks, "--runs", runs,
           "--out", out, "--threads", str(threads), "--probe-steps", str(probe_steps)]
    if seeds is not None:
        cmd += ["--seeds", seeds]
    if methods is not None:
        cmd += ["--methods", methods]
    procs = [subprocess.Popen([*cmd, "--shard", f"{i}/{jobs}"]) for i in range(jobs)]
    failed = [i for i, p in enumerate(procs) if p.wait() != 0]
    if failed:
        raise RuntimeError(f"{stage} shards {failed} of {jobs} failed; see their output above")


def equal_steps(preset_name: str, runs: Path, out: Path) -> None:
    """The text task's shorter contexts again, stopped at the step the longest context's run
    reached (same schedule, same tokens): under a time budget the short context gets more
    steps, so this separates what the context buys from what the speed buys."""
    preset = PRESETS[preset_name]
    t = preset["text"]
    long_n = t["seq_lens"][0]
    exact = exact_run(preset)
    for spec, cfg in train_configs(preset, "text"):
        if spec != exact or cfg.seq_len == long_n:
            continue
        try:
            _, _, long_metrics = load_trained(str(run_dir(runs, "text", long_n, exact, cfg.seed)))
        except ValueError as e:
            log(f"skip: {e}")
            continue
        steps = long_metrics["steps"]
        path = run_dir(runs, "text", cfg.seq_len, f"{exact}@step{steps}", cfg.seed)
        cfg = dataclasses.replace(cfg, out_dir=str(path), max_time_s=None)
        log(f"train text N={cfg.seq_len} {exact} seed {cfg.seed} to step {steps} -> {path}")
        fit(cfg, resume=has_checkpoint(cfg), stop_at=steps)
        config, model, metrics = load_trained(str(path))
        from attnmem.tasks import make_task

        task_obj = make_task("text", seq_len=config.seq_len)
        inputs, labels = held_out_inputs(config, task_obj, text_bytes=t["text_bytes"], examples=0)
        append_row(out, {"preset": preset_name, "preset_note": preset["note"], "task": "text",
                         "seq_len": config.seq_len, "seed": config.seed, "model": preset["model"],
                         "trained_with": exact, "mode": "trained_equal_steps", "method": exact,
                         "train_steps": metrics["steps"], "train_time_s": metrics["train_time_s"],
                         "long_context_steps": steps, "text_bytes": t["text_bytes"], **task_obj.corpus.describe(),
                         **machine(), **_quality("text", score(model, task_obj, inputs, labels))})


def _quality(task: str, s: dict[str, float]) -> dict[str, float]:
    return {"bpb": s["bpb"]} if task == "text" else {"accuracy": s["accuracy"], "loss": s["loss"]}


def evaluate(preset_name: str, tasks: list[str], runs: Path, out: Path, *, swap: bool = True) -> None:
    preset = PRESETS[preset_name]
    for task in tasks:
        t = preset[task]
        for spec, cfg in train_configs(preset, task):
            path = run_dir(runs, task, cfg.seq_len, spec, cfg.seed)
            try:
                config, model, metrics = load_trained(str(path))
            except ValueError as e:
                log(f"skip {path}: {e}")
                continue
            if t.get("max_time_s") is None and metrics["steps"] < cfg.steps:  # a fixed-steps run still going
                log(f"skip {path}: step {metrics['steps']} of {cfg.steps}, unfinished")
                continue
            from attnmem.tasks import make_task

            task_obj = make_task(task, seq_len=config.seq_len, **config.task_options)
            inputs, labels = held_out_inputs(config, task_obj, text_bytes=t.get("text_bytes", 0),
                                             examples=t.get("examples", 256))
            base = {"preset": preset_name, "preset_note": preset["note"], "task": task, "seq_len": config.seq_len,
                    "seed": config.seed, "model": preset["model"], "trained_with": spec,
                    "train_steps": metrics["steps"], "train_time_s": metrics["train_time_s"],
                    "train_peak_mib": metrics["peak_mib"], "heldout": len(inputs), **machine()}
            if task == "text":
                base.update(task_obj.corpus.describe(), text_bytes=t["text_bytes"])
            else:
                base["task_options"] = config.task_options
            done = {r["mode"] for r in load_rows(out) if r.get("preset") == preset_name and r.get("task") == task
                    and (r.get("seq_len"), r.get("seed"), r.get("trained_with"), r.get("train_steps"))
                    == (config.seq_len, config.seed, spec, metrics["steps"])}  # an evaluation run again resumes
            if "trained" not in done:
                row = {**base, "mode": "trained", "method": spec,
                       **_quality(task, score(model, task_obj, inputs, labels))}
                if task == "text" and "scored_offset" in t:
                    row.update(full_context_bpb(model, task_obj, t))
                if task == "text":  # does the model read its context? (better with position if so)
                    row["bpb_by_position"] = bpb_by_position(model, inputs, labels)
                append_row(out, row)
                log(f"{task} N={config.seq_len} {spec} seed {config.seed}: trained row")
            if not swap or "swapped" in done or spec != exact_run(preset) or config.seq_len != t["seq_lens"][0]:
                continue
            captures = capture_attention_inputs(model, inputs[:4])  # (4, N) windows
            for other in method_specs(config.seq_len):
                name, opts = parse_spec(other)
                row = {**base, "mode": "swapped", "method": other}
                t0 = time.perf_counter()
                try:
                    row.update(_quality(task, score(swap_attention(model, name, opts, seed=config.seed), task_obj,
                                                    inputs, labels)))
                    row["status"] = "ok"
                except (ValueError, TypeError, RuntimeError, NotImplementedError) as e:
                    row.update(status="not applicable", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                err = captured_error(captures, name, opts, seed=config.seed)
                row.update({f"captured_{k}": v for k, v in err.items()})
                try:
                    row["random_error"] = approx_error(name, min(config.seq_len, 512), heads=cfg.n_heads,
                                                       head_dim=cfg.d_model // cfg.n_heads, causal=True, **opts)
                except (ValueError, TypeError, RuntimeError, NotImplementedError) as e:
                    row["random_error_reason"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                row["eval_s"] = time.perf_counter() - t0
                append_row(out, row)
                log(f"  swapped {other}: {row.get('bpb', row.get('accuracy'))} "
                    f"captured error {err.get('error_mean', err.get('reason'))}")
        points = summarize(load_rows(out)).get(task, []) if swap else []
        measure_points(points)  # peak and time of every option set at this N, cached for the report
        for row in cost_rows(points):
            append_row(out, {**row, "preset": preset_name, "loadavg": os.getloadavg()[0]})
        if task == "text":
            long_n = t["seq_lens"][0]
            from attnmem.tasks import make_task

            corpus = make_task("text", seq_len=long_n).corpus
            ngram = NGram(order=2, alpha=0.1).fit(corpus.train)
            row = {"preset": preset_name, "task": "text", "mode": "baseline", "method": "ngram:order=2,alpha=0.1",
                   "bpb": ngram.bits_per_byte(validation_stream(corpus, t["text_bytes"])),
                   "text_bytes": t["text_bytes"], **corpus.describe(), **machine()}
            if "scored_offset" in t:
                row["bpb_full_context"] = ngram.bits_per_byte(scored_stream(corpus, t["text_bytes"],
                                                                            t["scored_offset"], ngram.order))
                row["scored_offset"] = t["scored_offset"]
            append_row(out, row)


def full_context_bpb(model: torch.nn.Module, task_obj: Any, t: dict[str, Any]) -> dict[str, Any]:
    """Bits per byte on the validation bytes after ``scored_offset``, each predicted with at least
    7/8 of the model's context (``TextLM.scored_windows``, stride seq_len / 8): every context
    scores the same bytes, none of them from a nearly empty window."""
    stride = max(task_obj.seq_len // 8, 1)
    inputs, labels = task_obj.held_out().scored_windows(t["text_bytes"], stride=stride, offset=t["scored_offset"])
    return {"bpb_full_context": score(model, task_obj, inputs, labels)["bpb"], "scored_stride": stride,
            "scored_offset": t["scored_offset"]}


def summary(preset_name: str, out: Path) -> None:
    """The text target from the rows in ``out``: the exact method's long context against its
    short one over seeds, and against the n-gram baseline, in both scorings."""
    preset = PRESETS[preset_name]
    long_n, short_n = preset["text"]["seq_lens"][:2]
    rows = [r for r in load_rows(out) if r.get("preset") == preset_name and r.get("task") == "text"]
    trained = [r for r in rows if r.get("mode") == "trained" and r.get("method") == exact_run(preset)]
    baseline = next((r for r in reversed(rows) if r.get("mode") == "baseline"), None)
    if baseline is None or not trained:
        log(f"summary: {out} has no trained rows or no baseline row of preset {preset_name!r}; evaluate first")
        return
    for metric in ("bpb", "bpb_full_context"):
        if metric not in baseline:
            continue

        def by_seed(n: int, metric: str = metric) -> dict[int, float]:
            return {r["seed"]: r[metric] for r in trained if r["seq_len"] == n and metric in r}  # the latest

        long_by, short_by = by_seed(long_n), by_seed(short_n)
        long, short = [long_by[k] for k in sorted(long_by)], [short_by[k] for k in sorted(short_by)]
        if not long or not short:
            continue
        result = context_margin(long, short, baseline[metric])
        # For information, not the target (which compares the two groups, unpaired): the short
        # minus the long model of each seed both were trained with.
        paired = [short_by[k] - long_by[k] for k in sorted(set(long_by) & set(short_by))]
        append_row(out, {"preset": preset_name, "task": "text", "mode": "summary", "metric": metric,
                         "long_seq_len": long_n, "short_seq_len": short_n, "long_values": long,
                         "short_values": short, **result, "paired_differences": paired,
                         "corpus_sha256": baseline["corpus_sha256"], **machine()})
        log(f"{metric}: N={long_n} {result['long']['mean']:.4f} (range {result['long']['range']:.4f}, "
            f"std {result['long']['std']:.4f}), N={short_n} {result['short']['mean']:.4f} (range "
            f"{result['short']['range']:.4f}, std {result['short']['std']:.4f}); margin {result['margin']:.4f} = "
            f"{result['margin_over_spread']:.1f} x spread; n-gram {baseline[metric]:.4f}; "
            f"beats short by 3x spread: {result['beats_short']}, beats n-gram: {result['beats_baseline']}")
        if len(paired) > 1:
            log(f"  {metric}, paired by seed (not the target's criterion): short - long = "
                f"{', '.join(f'{d:.4f}' for d in paired)}; mean {sum(paired) / len(paired):.4f}, "
                f"range {max(paired) - min(paired):.4f}")


def seed_spread(values: dict[int, float]) -> str:
    """``mean (min–max, n seeds)`` of one figure per seed, or ``—`` for none."""
    if not values:
        return "—"
    v = [values[k] for k in sorted(values)]
    return f"{sum(v) / len(v):.3f} ({min(v):.3f}–{max(v):.3f}, {len(v)} seeds)"


def mqar_summary(preset_name: str, out: Path) -> str:
    """The MQAR table from the rows in ``out``: per method, held-out accuracy trained with it
    from scratch and swapped into the exact runs, mean and range over seeds (the latest row of
    each seed), and the mean error on the q, k, v captured from the exact models."""
    preset = PRESETS[preset_name]
    rows = [r for r in load_rows(out) if r.get("preset") == preset_name and r.get("task") == "mqar"
            and r.get("seq_len") == preset["mqar"]["seq_lens"][0]]
    trained: dict[str, dict[int, float]] = {}
    swapped: dict[str, dict[int, float]] = {}
    errors: dict[str, dict[int, float]] = {}
    reasons: dict[str, str] = {}
    for r in rows:
        if r.get("mode") == "trained":
            trained.setdefault(r["method"], {})[r["seed"]] = r["accuracy"]
        elif r.get("mode") == "swapped" and r.get("trained_with") == exact_run(preset):
            if r.get("status") == "ok":
                swapped.setdefault(r["method"], {})[r["seed"]] = r["accuracy"]
            else:
                reasons[r["method"]] = r.get("reason", "")
            if "captured_error_mean" in r:
                errors.setdefault(r["method"], {})[r["seed"]] = r["captured_error_mean"]
    lines = ["| method | accuracy trained with it | accuracy swapped into exact | error on captured q, k, v |",
             "|---|---:|---:|---:|"]
    for method in list(dict.fromkeys([*trained, *swapped, *reasons])):
        err = errors.get(method, {})
        why = reasons.get(method, "").split("inputs: ")[-1]  # the method's own reason, without the preamble
        swap = seed_spread(swapped.get(method, {})) if method in swapped else f"n/a: {why[:80]}"
        lines.append(f"| {method} | {seed_spread(trained.get(method, {}))} | {swap} | "
                     f"{(sum(err.values()) / len(err)) if err else float('nan'):.3g} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=["train", "evaluate", "equal-steps", "summary", "all", "throughput"])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="reduced")
    ap.add_argument("--tasks", default="text,mqar", help="comma-separated: text, mqar")
    ap.add_argument("--runs", default="runs/quality", help="checkpoints of the training runs")
    ap.add_argument("--out", default="benchmarks/results/quality/reduced.jsonl")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-swap", action="store_true", help="evaluate: the trained rows only")
    ap.add_argument("--shard", default="0/1", help="I/N: train every N-th run from the I-th (N processes)")
    ap.add_argument("--jobs", type=int, default=1, help="train: run the shards as this many processes at once "
                                                        "(each with --threads threads)")
    ap.add_argument("--probe-steps", type=int, default=20, help="throughput: timed steps per context")
    ap.add_argument("--seeds", default=None, help="comma-separated: only these of the preset's seeds (e.g. to "
                                                  "evaluate two seeds in two processes)")
    ap.add_argument("--methods", default=None, help="semicolon-separated specs as the run directories name them "
                                                    "(e.g. 'sdpa;linear'): only these of the preset's runs")
    args = ap.parse_args()
    if args.methods is not None:
        PRESETS[args.preset] = {**PRESETS[args.preset], "methods_only": set(args.methods.split(";"))}
    if args.seeds is not None:
        wanted = [int(x) for x in args.seeds.split(",")]
        unknown = sorted(set(wanted) - set(PRESETS[args.preset]["seeds"]))
        if unknown:
            raise ValueError(f"--seeds {unknown} are not seeds of preset {args.preset!r}: "
                             f"{PRESETS[args.preset]['seeds']}")
        PRESETS[args.preset] = {**PRESETS[args.preset], "seeds": wanted}
    torch.set_num_threads(args.threads)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    i, n = (int(x) for x in args.shard.split("/"))
    if args.stage == "throughput" and args.jobs > 1:
        in_processes("throughput", args.preset, args.tasks, args.runs, args.out, args.threads, args.jobs,
                     args.probe_steps, args.seeds, args.methods)
    elif args.stage == "throughput":
        throughput(args.preset, Path(args.out), (i, n), args.probe_steps)
    if args.stage in ("train", "all") and args.jobs > 1:
        in_processes("train", args.preset, args.tasks, args.runs, args.out, args.threads, args.jobs,
                     args.probe_steps, args.seeds, args.methods)
    elif args.stage in ("train", "all"):
        train(args.preset, tasks, Path(args.runs), (i, n))
    if args.stage in ("evaluate", "all"):
        evaluate(args.preset, tasks, Path(args.runs), Path(args.out), swap=not args.no_swap)
    if args.stage in ("equal-steps", "all") and "text" in tasks:
        if PRESETS[args.preset]["text"].get("max_time_s"):
            equal_steps(args.preset, Path(args.runs), Path(args.out))
        else:
            log(f"equal-steps: preset {args.preset!r} trains every context for the same fixed steps already")
    if args.stage in ("summary", "all") and "text" in tasks:
        summary(args.preset, Path(args.out))
    if args.stage in ("summary", "all") and "mqar" in tasks:
        print(mqar_summary(args.preset, Path(args.out)))


if __name__ == "__main__":
    main()
