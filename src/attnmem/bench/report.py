"""The report of a sweep: ``report.md`` with tables, and PNG plots of the memory wall."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import registry
from ..figures import pyplot, save
from ..memory.units import format_bytes
from ..registry import Style
from .rows import Row

MiB = 2**20

# Rows of a method no longer registered (an old results file) are drawn in grey.
_UNKNOWN = Style("#000000", ".")


def _style(method: str) -> Style:
    """The method's own plot style (``Method.style``: a colour and marker distinct per method)."""
    try:
        return registry.get(method).style
    except ValueError:
        return _UNKNOWN


def _ok(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status") == "ok"]


def _by_method(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["method"], []).append(r)
    for v in out.values():
        v.sort(key=lambda r: r["seq_len"])
    return out


def _config_line(rows: list[dict[str, Any]]) -> str:
    r = rows[0]
    pass_ = "forward only" if r.get("forward_only") else "forward + backward"
    mask = "causal" if r.get("causal") else r.get("mask", "none")
    hkv = r.get("kv_heads") or r["heads"]
    return (f"device {r['device']}, {r['dtype']}, B={r['batch']}, H={r['heads']}, Hkv={hkv}, "
            f"D={r['head_dim']}, mask {mask}, score_mod {r.get('score_mod', 'none')}, {pass_}; "
            f"torch {r.get('torch')}, {r.get('cpu_threads')} CPU threads, "
            f"{r.get('processor')}")


BEST_EXACT = ("chunked", "sdpa")  # memory saved is counted against the better of these at each N


def best_exact_peaks(rows: list[dict[str, Any]]) -> dict[int, int]:
    """N -> the lowest measured peak of the exact methods users would otherwise run
    (``BEST_EXACT``; not ``reference``, which stores the N×N matrix)."""
    best: dict[int, int] = {}
    for r in _ok(rows):
        if r["method"] in BEST_EXACT:
            best[r["seq_len"]] = min(best.get(r["seq_len"], r["peak_bytes"]), r["peak_bytes"])
    return best


def memory_saved(row: dict[str, Any], best: dict[int, int]) -> float | None:
    """1 − peak / best exact peak at the row's N (negative: it costs more), or None."""
    ref = best.get(row["seq_len"])
    return None if ref is None or row.get("status") != "ok" else 1 - row["peak_bytes"] / ref


def results_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | family | N | status | peak MiB | peak / floor | saved vs best exact | time s "
             "| error (random) | error (peaked) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    best = best_exact_peaks(rows)
    for r in sorted(rows, key=lambda r: (r["seq_len"], r["method"])):
        if r.get("status") == "ok":
            err = r.get("approx_error")
            errp = r.get("approx_error_peaked")
            saved = memory_saved(r, best)
            lines.append(
                f"| {r['method']} | {r.get('family', '')} | {r['seq_len']} | ok | {r['peak_mib']:.1f} "
                f"| {r['peak_over_floor']:.2f} | {'' if saved is None else f'{100 * saved:.0f} %'} "
                f"| {r['time_s']:.3f} | {'' if err is None else f'{err:.3g}'} "
                f"| {'' if errp is None else f'{errp:.3g}'} |")
        else:
            lines.append(f"| {r['method']} | {r.get('family', '')} | {r['seq_len']} | {r.get('status')}: "
                         f"{r.get('reason', '')} | | | | | | |")
    return "\n".join(lines)


# Tay et al., "Long Range Arena: A Benchmark for Efficient Transformers", ICLR 2021, Table 2
# (Table 3 in the arXiv v1 of 2020): byte-level text classification, whole models, batch 32,
# 4x4 TPU v3. Speed-ups are the bracketed ratios printed there (steps per second against the
# vanilla Transformer); memory ratios are our division of their peak GB per device by the
# Transformer's (0.85, 2.65, 5.51, 9.48 GB at 1K-4K). Keyed by the attnmem method that
# implements the same mechanism; "reference" stands for their vanilla Transformer.
LRA_PUBLISHED: dict[str, tuple[str, tuple[float, ...], tuple[float, ...]]] = {
    "reference": ("Transformer", (1.0, 1.0, 1.0, 1.0), (0.85, 2.65, 5.51, 9.48)),
    "sliding_window": ("Local Attention", (1.1, 1.7, 3.2, 5.3), (0.42, 0.76, 1.06, 1.37)),
    "linformer": ("Linformer", (1.2, 1.9, 3.7, 5.5), (0.37, 0.55, 0.99, 0.99)),
    "bigbird": ("BigBird", (0.9, 0.8, 1.2, 1.1), (0.77, 1.49, 2.18, 2.88)),
    "linear": ("Linear Trans.", (1.1, 1.9, 3.7, 5.6), (0.37, 0.57, 0.80, 1.03)),
    "performer": ("Performer", (1.2, 1.9, 3.8, 5.7), (0.37, 0.59, 0.82, 1.06)),
}
_LRA_LENGTHS = (1024, 2048, 3072, 4096)


def lra_table(rows: list[dict[str, Any]], lengths=_LRA_LENGTHS) -> str:
    """Speed and memory relative to ``reference`` at each length, in the style of Tay et al.
    (Long Range Arena, Table 2 of the ICLR 2021 paper): speed-up = reference time / time,
    memory = peak / reference. Below each method with a counterpart in their table, a row gives
    their published ratios at the same lengths (``LRA_PUBLISHED``)."""
    ok = {(r["method"], r["seq_len"]): r for r in _ok(rows)}
    present = [n for n in lengths if ("reference", n) in ok]
    if not present:
        return "_No `reference` rows at N = 1K…4K in this sweep, so no relative table._"
    methods = sorted({m for m, n in ok if n in present})
    head = "| method | " + " | ".join(f"speed-up {n // 1024}K" for n in present) + " | " + \
           " | ".join(f"memory {n // 1024}K" for n in present) + " |"
    lines = [head, "|---|" + "---|" * (2 * len(present))]
    for m in methods:
        speed, mem = [], []
        for n in present:
            r, ref = ok.get((m, n)), ok[("reference", n)]
            speed.append(f"{ref['time_s'] / r['time_s']:.2f}×" if r else "—")
            mem.append(f"{r['peak_bytes'] / ref['peak_bytes']:.2f}×" if r else "—")
        lines.append(f"| {m} | " + " | ".join(speed) + " | " + " | ".join(mem) + " |")
        if m in LRA_PUBLISHED:
            model, ups, gbs = LRA_PUBLISHED[m]
            at = [_LRA_LENGTHS.index(n) if n in _LRA_LENGTHS else None for n in present]
            pub_speed = [f"{ups[i]:.1f}×" if i is not None else "—" for i in at]
            pub_mem = [f"{gbs[i] / LRA_PUBLISHED['reference'][2][i]:.2f}×" if i is not None else "—" for i in at]
            lines.append(f"| ↳ Tay et al.: {model} | " + " | ".join(pub_speed) + " | " + " | ".join(pub_mem) + " |")
    return "\n".join(lines)


def _plot_vs_n(rows, key, ylabel, title, path: Path, budget: int | None = None, floor: bool = False) -> None:
    import matplotlib.ticker

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for method, rs in sorted(_by_method(rows).items()):
        ok = [r for r in rs if r.get("status") == "ok"]
        style = _style(method)
        colour = style.colour
        if ok:
            ax.plot([r["seq_len"] for r in ok], [key(r) for r in ok], marker=style.marker,
                    color=colour, label=f"{method} ({rs[0].get('family', '')})")
        over = [r for r in rs if r.get("status") == "over budget" and r.get("predicted_bytes")]
        if over and budget is not None:
            ax.scatter([r["seq_len"] for r in over], [r["predicted_bytes"] / MiB for r in over], marker="x",
                       color=colour, s=60, label=f"{method}: predicted, over budget")
    if budget:
        ax.axhline(budget / MiB, color="black", linestyle="--", linewidth=1, label=f"budget {format_bytes(budget)}")
    if floor:
        lengths = sorted({r["seq_len"] for r in rows})
        floors = {r["seq_len"]: r["floor_bytes"] / MiB for r in rows if r.get("floor_bytes")}
        ax.plot(lengths, [floors[n] for n in lengths], color="grey", linestyle=":", label="floor (q, k, v, out, grads)")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{int(x)}"))
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save(fig, path, dpi=120)


def _plot_error_vs_memory(rows, path: Path) -> bool:
    plt = pyplot()

    best = best_exact_peaks(rows)
    pts = [(r, memory_saved(r, best)) for r in _ok(rows)]
    pts = [(r, saved) for r, saved in pts if saved is not None and r.get("approx_error") is not None]
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(8, 5.5))
    seen = set()
    floor = 1e-9  # the exact family's 0 is drawn here, on the log axis
    for r, saved in pts:
        label = r["method"] if r["method"] not in seen else None
        seen.add(r["method"])
        style = _style(r["method"])
        ax.scatter(100 * saved, max(r["approx_error"], floor), color=style.colour, marker=style.marker,
                   label=label)
    ax.set_yscale("log")
    ax.set_xlabel(f"peak memory saved against the best exact method ({' / '.join(BEST_EXACT)}) at the same N (%)")
    ax.set_ylabel("error against full attention under the case's mask (random inputs; 0 drawn at 1e-9)")
    ax.set_title("What the memory saving costs: error against memory saved")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save(fig, path, dpi=120)
    return True


def write_report(rows: list[Row] | list[dict[str, Any]], out_dir: Path, budget: int | None = None,
                 quality: Path | None = None, plots: bool = True) -> Path:
    """Write ``report.md`` and the PNG plots into ``out_dir``; return the report's path. Rows
    are ``Row``s or their JSON objects (as ``results.jsonl`` holds them). ``quality``: a file of
    cached training results (``benchmarks/quality.py``) for the "which method" section.
    ``plots=False``: the tables only (no PNG is drawn, and the report says so)."""
    rows = [r.as_dict() if isinstance(r, Row) else r for r in rows]
    out_dir.mkdir(parents=True, exist_ok=True)
    if not rows:
        raise ValueError("no results to report")
    if plots:
        _plot_vs_n(rows, lambda r: r["peak_mib"], "peak memory (MiB)",
                   "The memory wall: peak memory against sequence length", out_dir / "peak_memory.png", budget,
                   floor=True)
        _plot_vs_n(rows, lambda r: r["time_s"], "time per forward + backward (s)",
                   "Time against sequence length", out_dir / "time.png")
    has_err = plots and _plot_error_vs_memory(rows, out_dir / "error_vs_memory.png")
    over = [r for r in rows if r.get("status") == "over budget"]
    failed = [r for r in rows if r.get("status") == "error"]
    parts = [
        "# attnmem compare report", "",
        f"Configuration: {_config_line(rows)}.", "",
        "Peak memory counts every live tensor (inputs and gradients included); the floor is q, k, v, out "
        "(+ dq, dk, dv when training). Times are medians of the timed repeats, which run after the "
        "tracked (peak-memory) run that warms them up; a case gets up to `--repeats` of them within "
        "`--repeat-budget` seconds (a slow case, one).", "",
        *(["![peak memory](peak_memory.png)", "", "![time](time.png)", ""] if plots
          else ["_Plots not drawn (--no-plots)._", ""]),
    ]
    if has_err:
        parts += ["![error against memory saved](error_vs_memory.png)", ""]
    if quality is not None:
        from .frontier import quality_section

        parts += quality_section(quality, out_dir, plot=plots)
    parts += ["## All cases", "", "Memory saved is against the best exact method at the same N "
              f"({' / '.join(BEST_EXACT)}); errors are against full attention under the case's mask, on random "
              "inputs (a sparse method's dropped keys count).", "", results_table(rows), ""]
    parts += ["## Relative to `reference` (Long Range Arena style)", "",
              "Speed-up and memory of each method relative to the quadratic `reference` on this machine, the "
              "layout of Tay et al. (Long Range Arena, ICLR 2021, Table 2). The rows marked ↳ are their "
              "published ratios for the same mechanism: whole models on byte-level text classification, "
              "batch 32, 4x4 TPU v3 (memory: their peak GB per device over the Transformer's). Ours time "
              "one attention call's forward + backward on this CPU, so read the trends, not the digits.", "",
              lra_table(rows), ""]
    if over:
        parts += [f"{len(over)} case(s) were predicted over the budget and not run: that is the memory wall.", ""]
    unsupported = [r for r in rows if r.get("status") == "not supported"]
    if unsupported:
        parts += ["## Not supported (not run)", ""] + sorted({f"- {r['method']}: {r.get('reason')}"
                                                              for r in unsupported}) + [""]
    if failed:
        parts += ["## Failures", ""] + [f"- {r['method']} N={r['seq_len']}: {r.get('reason')}" for r in failed] + [""]
    path = out_dir / "report.md"
    path.write_text("\n".join(parts))
    return path
