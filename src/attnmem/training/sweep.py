"""Several methods trained with the same steps: a table (markdown, JSON) and accuracy against
peak memory as a PNG."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..figures import pyplot, save
from ..method_spec import parse_method_spec
from .loop import CHECKPOINT, TrainConfig, fit

SWEEP_COLUMNS = ("method", "eval_accuracy", "eval_loss", "peak_mib", "tokens_per_s", "train_time_s", "steps")


def sweep(config: TrainConfig, methods: list[str], *, resume: bool = False, progress: bool = False,
          stop_at: int | None = None) -> list[dict]:
    """Train each method spec (``name[:key=value,...]``) with ``config``'s budget of steps (or up to
    ``stop_at``, the learning-rate schedule still spanning ``config.steps``); write
    ``sweep.json``, ``sweep.md`` and ``sweep.png`` (accuracy against peak memory) to ``out_dir``.
    Each method's run lives in ``out_dir/<spec>/``, so an interrupted sweep resumes with ``resume``.

    Raises:
        ValueError: no ``out_dir``, no methods, or a bad method spec (before anything trains).
    """
    if not config.out_dir:
        raise ValueError("sweep needs out_dir")
    if not methods:
        raise ValueError("sweep needs at least one method")
    out = Path(config.out_dir)
    configs = []
    for spec in methods:
        name, opts = parse_method_spec(spec)
        configs.append(dataclasses.replace(config, method=name, method_options=opts,
                                           out_dir=str(out / _safe_dirname(spec))))
    started = [cfg for cfg in configs if (Path(cfg.out_dir) / CHECKPOINT).exists()]
    if resume and not started:
        raise ValueError(f"resume: no checkpoint of any method under {out}; run without resume (--resume) to start")
    rows = []
    for cfg in configs:
        # A resumed sweep continues the runs that started and starts the others.
        rows.append(fit(cfg, resume=resume and cfg in started, progress=progress, stop_at=stop_at).metrics)
        write_sweep(rows, out)
    return rows


def _safe_dirname(spec: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in spec)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| method | eval accuracy | eval loss | peak MiB | tokens/s | train s | steps |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r.get('eval_accuracy', float('nan')):.4f} | "
                     f"{r.get('eval_loss', float('nan')):.4f} | {r['peak_mib']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{r['train_time_s']:.1f} | {r['steps']} |")
    return "\n".join(lines) + "\n"


def write_sweep(rows: list[dict], out: Path) -> None:
    """The table as JSON and markdown, and accuracy against peak memory as a PNG."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(rows, indent=2))
    (out / "sweep.md").write_text(markdown_table(rows))
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["peak_mib"], r.get("eval_accuracy", float("nan")), s=40)
        ax.annotate(r["method"], (r["peak_mib"], r.get("eval_accuracy", float("nan"))), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    first = rows[0]
    ax.set_xlabel("peak training-step memory (MiB, attnmem.measure)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"{first['task']} N={first['seq_len']}, {first['steps']} steps, batch {first['batch_size']}")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    save(fig, out / "sweep.png", dpi=120)
