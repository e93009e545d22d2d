"""Run one benchmark step on P gloo ranks and gather what each rank measured.

The machine's cores are split between the ranks (``torch.set_num_threads(max(1, cores // P))``);
a rank function ``rank_fn(rank, world, *args) -> dict`` runs inside the initialised process
group and returns its measurements, at least ``peak`` (bytes) and ``time`` (seconds).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attnmem.memory.measure import MiB

CORES = os.cpu_count() or 1
RankFn = Callable[..., dict[str, Any]]


def threads_per_rank(world: int) -> int:
    return max(1, CORES // world)


def _rank_main(rank: int, world: int, result_dir: str, rank_fn: RankFn, args: tuple) -> None:
    torch.set_num_threads(threads_per_rank(world))
    # Long enough for the slowest rank of a large N on an oversubscribed machine.
    dist.init_process_group("gloo", init_method=f"file://{result_dir}/store", rank=rank, world_size=world,
                            timeout=timedelta(minutes=20))
    torch.save(rank_fn(rank, world, *args), Path(result_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def run_ranks(world: int, rank_fn: RankFn, *args: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``rank_fn`` on ``world`` spawned ranks: the row fields every such benchmark records (the
    largest peak, the slowest rank's time, each rank's, the wall time with start-up) and each
    rank's own result; on a failed rank, an error row and no results."""
    with tempfile.TemporaryDirectory() as d:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_rank_main, args=(r, world, d, rank_fn, args)) for r in range(world)]
        t0 = time.perf_counter()
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        wall = time.perf_counter() - t0
        if any(p.exitcode for p in procs):
            return {"status": "error", "reason": f"exit codes {[p.exitcode for p in procs]}"}, []
        ranks = [torch.load(Path(d) / f"rank{r}.pt") for r in range(world)]
    peaks = [r["peak"] for r in ranks]
    return {"status": "ok", "peak_bytes": max(peaks), "peak_mib": max(peaks) / MiB,
            "rank_peaks_mib": [p / MiB for p in peaks], "time_s": max(r["time"] for r in ranks),
            "rank_times_s": [r["time"] for r in ranks], "wall_s_with_startup": wall}, ranks
