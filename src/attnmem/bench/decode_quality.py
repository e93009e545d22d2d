"""What a smaller cache costs in recall: MQAR accuracy against cache bytes, per cache kind.

One code path for ``benchmarks/decode_quality.py`` and ``attnmem decode-bench --quality``.
A model trained by ``attnmem train`` on MQAR (``export_model`` keeps its weights and config)
reads held-out sequences through a decoding cache: the first ``prompt`` tokens in one prefill,
then every later token one at a time (teacher-forced: the next input is the data's, not the
model's guess), as generation would. Accuracy is Zoology's, over the query positions after the
prompt: those are the predictions that must recall a key-value pair through the cache. The
bytes are ``ModelCache.nbytes()`` at the end of the sequence (the most any kind here holds;
``full``, ``int8``, ``int4``, ``int2`` preallocated with ``max_len`` = the sequence).
Everything is deterministic under ``seed``: the examples, the model, the caches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..figures import pyplot, save
from ..memory.measure import MiB
from ..tasks import IGNORE
from ..training import CHECKPOINT, TaskModel, TrainConfig, build, load_checkpoint
from .rows import environment

# Accuracy within this many points of the full cache counts as keeping it.
WITHIN_POINTS = 1.0
PREALLOCATED = ("full", "int8", "int4", "int2")


@dataclass(frozen=True)
class QualityConfig:
    """Which caches to try, on how many held-out MQAR sequences, and how much is prefilled."""

    examples: int = 512
    prompt: int | None = None  # tokens prefilled; None: half the sequence
    seed: int = 7  # held-out examples, drawn apart from training (seed 0) and its evaluation split
    budgets: tuple[int, ...] = (16, 32, 64, 96, 128, 160, 192, 224)  # eviction kinds, tokens
    residuals: tuple[int, ...] = (0, 32, 64, 128)  # int4/int2 full-precision window, tokens
    group: int = 32  # int4/int2 key group (tokens) and value group (channels, at most head_dim)
    sinks: int = 4  # sink_window's sink tokens (StreamingLLM's 4)
    snap_window: int = 16  # snapkv's observation window
    snap_kernel: int = 5
    threads: int = 1  # one torch thread: decoding is a chain of small ops
    names: tuple[str, ...] | None = None  # only these caches (``quality_specs`` names; "full" always runs)


def export_model(run_dir: str | Path, path: str | Path) -> Path:
    """Keep only the weights and the config of a run of ``attnmem train`` (its checkpoint also
    holds optimizer states and RNG states): a small file ``load_model`` reads."""
    state = load_checkpoint(Path(run_dir) / CHECKPOINT)  # verified against its checksum
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = {k: v for k, v in state["config"].items() if k in fields}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": config, "model": state["model"], "step": state["step"],
                "history": state["history"][-1:]}, path)
    return path


def load_model(path: str | Path) -> tuple[TrainConfig, TaskModel, dict]:
    """(config, model in eval mode, saved extras) from ``export_model``'s file."""
    state = torch.load(path, weights_only=False)
    config = TrainConfig(**state["config"])
    if config.task != "mqar":
        raise ValueError(f"the quality benchmark reads MQAR models; {path} was trained on {config.task!r}")
    _, model, _, _ = build(config)
    model.load_state_dict(state["model"])
    return config, model.eval(), {k: v for k, v in state.items() if k not in ("config", "model")}


def quality_specs(q: QualityConfig, seq_len: int, head_dim: int) -> list[tuple[str, str, int | None, dict]]:
    """(name, cache kind, budget in tokens or None, options) of every cache tried."""
    specs: list[tuple[str, str, int | None, dict]] = [("full", "full", None, {}), ("int8", "int8", None, {})]
    for b in q.budgets:
        specs += [(f"sink_window{b}", "sink_window", b, {"budget": b, "sinks": min(q.sinks, b)}),
                  (f"heavy_hitter{b}", "heavy_hitter", b, {"budget": b}),
                  (f"snapkv{b}", "snapkv", b, {"budget": b, "window": min(q.snap_window, b),
                                               "kernel": q.snap_kernel})]
    for r in q.residuals:
        for kind in ("int4", "int2"):
            specs.append((f"{kind}_r{r}", kind, r, {"residual": r, "group": q.group,
                                                    "value_group": min(q.group, head_dim)}))
    return specs


@torch.no_grad()
def decode_predictions(model: TaskModel, inputs: torch.Tensor, prompt: int, kind: str,
                       **options: Any) -> tuple[torch.Tensor, int]:
    """Predictions (B, N - prompt) for the positions after the prompt, and the cache's bytes at the end."""
    net = model.net
    # Kinds that grow by doubling are preallocated to the sequence, as a server sizing its cache
    # would: their bytes are then those of the tokens held, not of the growth slack.
    fixed = {"max_len": inputs.shape[1]} if kind in PREALLOCATED else {}
    cache = net.new_cache(kind, **fixed, **options)
    net.hidden(inputs[:, :prompt], cache=cache)
    preds = []
    for t in range(prompt, inputs.shape[1]):
        hidden = net.hidden(inputs[:, t:t + 1], cache=cache)  # (B, 1, d_model)
        preds.append(model.readout(hidden[:, 0]).argmax(-1))
    return torch.stack(preds, dim=1), cache.nbytes()


def run_quality(model_path: str | Path, q: QualityConfig = QualityConfig(),
                on_row: Callable[[dict], None] = lambda row: None,
                log: Callable[[str], None] = lambda msg: None) -> list[dict]:
    """One row per cache: accuracy over the queries after the prompt, bytes, ratio to the full cache."""
    threads = torch.get_num_threads()
    torch.set_num_threads(q.threads)
    try:
        return _run_quality(model_path, q, on_row, log)
    finally:
        torch.set_num_threads(threads)


def _run_quality(model_path, q, on_row, log) -> list[dict]:
    config, model, extras = load_model(model_path)
    task = build(config)[0]
    N = task.seq_len
    prompt = N // 2 if q.prompt is None else q.prompt
    if not 0 < prompt < N:
        raise ValueError(f"prompt must be in 1 .. seq_len - 1 = {N - 1}, got {prompt}")
    inputs, labels = task.sample(q.examples, torch.Generator().manual_seed(q.seed))
    target = labels[:, prompt:]  # (B, N - prompt)
    asked = target != IGNORE
    counted = int(asked.sum())
    with torch.no_grad():  # the full forward's own predictions, to check the full cache against
        forward_preds = model(inputs)[:, prompt:].argmax(-1)
    base = {"model": str(model_path), "trained_steps": extras.get("step"), "seq_len": N, "prompt": prompt,
            "examples": q.examples, "queries_counted": counted, "config": asdict(q), "env": environment()}
    rows: list[dict] = []
    full_bytes = None
    for name, kind, budget, opts in quality_specs(q, N, model.net.blocks[0].attn.head_dim):
        if q.names is not None and name not in q.names and kind != "full":
            continue
        log(f"quality: {name}")
        preds, nbytes = decode_predictions(model, inputs, prompt, kind, **opts)
        correct = int((preds[asked] == target[asked]).sum())
        row = {"type": "quality", "name": name, "kind": kind, "budget": budget, "options": opts,
               "accuracy": correct / max(counted, 1), "correct": correct, "nbytes": nbytes, "mib": nbytes / MiB}
        if kind == "full":
            full_bytes = nbytes
            # Decoding with the full cache is the forward pass token by token: the predictions
            # agree but for float rounding at near-ties of the argmax.
            row["forward_disagreements"] = int((preds[asked] != forward_preds[asked]).sum())
        row["ratio_to_full"] = nbytes / full_bytes
        row = {**row, **base}
        rows.append(row)
        on_row(row)
    return rows


def summarize(rows: list[dict]) -> dict:
    """Per kind, the smallest budget within ``WITHIN_POINTS`` of the full cache; SnapKV against
    sink_window at each common budget."""
    rows = [r for r in rows if r.get("type") == "quality"]
    full = next(r for r in rows if r["kind"] == "full")
    smallest: dict[str, dict | None] = {}
    for kind in dict.fromkeys(r["kind"] for r in rows if r["budget"] is not None):
        ok = [r for r in rows if r["kind"] == kind and 100 * (full["accuracy"] - r["accuracy"]) <= WITHIN_POINTS]
        best = min(ok, key=lambda r: r["budget"], default=None)
        smallest[kind] = best and {"budget": best["budget"], "accuracy": best["accuracy"],
                                   "ratio_to_full": best["ratio_to_full"]}
    by = {(r["kind"], r["budget"]): r for r in rows}
    versus = [{"budget": b, "snapkv": by["snapkv", b]["accuracy"], "sink_window": by["sink_window", b]["accuracy"],
               "heavy_hitter": by.get(("heavy_hitter", b), {}).get("accuracy")}
              for (kind, b) in by if kind == "snapkv" and ("sink_window", b) in by]
    return {"full_accuracy": full["accuracy"], "full_nbytes": full["nbytes"], "smallest_within": smallest,
            "snapkv_vs_sink_window": versus}


def markdown_table(rows: list[dict]) -> str:
    rows = [r for r in rows if r.get("type") == "quality"]
    lines = ["| cache | budget (tokens) | accuracy | cache KiB | ratio to full |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        budget = "-" if r["budget"] is None else str(r["budget"])
        lines.append(f"| {r['name']} | {budget} | {100 * r['accuracy']:.2f} % | {r['nbytes'] / 1024:.1f} | "
                     f"{r['ratio_to_full']:.4f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path:
    """Accuracy against cache bytes (ratio to the full cache), one line per kind."""
    plt = pyplot()

    rows = [r for r in rows if r.get("type") == "quality"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind in dict.fromkeys(r["kind"] for r in rows):
        pts = sorted((r["ratio_to_full"], 100 * r["accuracy"]) for r in rows if r["kind"] == kind)
        style = {"marker": "*", "markersize": 12, "linestyle": "none"} if len(pts) == 1 else {"marker": "o"}
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=kind, **style)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("cache bytes at the end of the sequence / full cache's")
    ax.set_ylabel("MQAR accuracy after the prompt (%)")
    first = rows[0]
    ax.set_title(f"MQAR N={first['seq_len']}, prompt {first['prompt']}, {first['examples']} sequences "
                 f"({first['queries_counted']} queries)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save(fig, path)
