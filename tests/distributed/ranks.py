"""Start gloo ranks for a multi-process test and collect what each one reports.

A *scenario* is a module-level function ``scenario(rank, world, out_dir)`` of a test module; it
runs on every rank inside an initialised process group and writes what the parent checks
under ``out_dir``. A rank that raises leaves ``error_{rank}.txt`` (type, message, traceback),
one that returns leaves ``ok_{rank}``.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

Scenario = Callable[[int, int, Path], None]
VOCAB = 11  # of the small transformers the model-level cases train


def transformer_inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (2, n) and a float64 gradient of the logits (2, n, VOCAB), the same on every rank."""
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, VOCAB, (2, n), generator=g), torch.randn(2, n, VOCAB, generator=g, dtype=torch.float64)


def _rank_main(rank: int, world: int, store: str, out_dir: str, scenario: Scenario, pg_timeout_s: float) -> None:
    out = Path(out_dir)
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=pg_timeout_s))
        scenario(rank, world, out)
        (out / f"ok_{rank}").write_text("")
    except BaseException as e:  # noqa: BLE001  (reported to the parent, which asserts)
        (out / f"error_{rank}.txt").write_text(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _context(scenario: Scenario):
    # A fork server imports torch once for every rank of every test (importing it in each
    # spawned rank took ~25 s on the loaded 2-core machine); it is a fresh process that has
    # started no threads, so forking from it is safe, unlike forking the test process.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "attnmem", __name__, scenario.__module__])
    return ctx


def spawn_ranks(tmp_path: Path, world: int, scenario: Scenario, *, pg_timeout_s: float, join_timeout_s: float,
                wait_for: list[int] | None = None) -> dict[int, str | None]:
    """Run ``scenario`` on ``world`` ranks; return each waited rank's error text (None = ok).

    Ranks not in ``wait_for`` are killed once the waited ones end. Fails if a waited rank is
    still running after ``join_timeout_s``: the hang these tests guard against. A rank waits
    ``pg_timeout_s`` on a silent peer before its collective raises.
    """
    ctx = _context(scenario)
    store = tmp_path / "store"
    procs = [ctx.Process(target=_rank_main, args=(r, world, str(store), str(tmp_path), scenario, pg_timeout_s),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    wait_for = list(range(world)) if wait_for is None else wait_for
    deadline = time.monotonic() + join_timeout_s
    for r in wait_for:
        procs[r].join(max(0.0, deadline - time.monotonic()))
    hung = [r for r in wait_for if procs[r].is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} still running after {join_timeout_s} s"
    result = {}
    for r in wait_for:
        err = tmp_path / f"error_{r}.txt"
        result[r] = err.read_text() if err.exists() else None
        if result[r] is None:
            assert (tmp_path / f"ok_{r}").exists(), f"rank {r} ended without a result (exit {procs[r].exitcode})"
    return result


def peer_exit_error(tmp_path: Path, scenario: Scenario, *, pg_timeout_s: float, join_timeout_s: float) -> str:
    """Rank 0's error text when ``scenario`` on 2 ranks has rank 1 die mid-step; fails if rank 0
    raised nothing, or only after ``join_timeout_s`` (a hang the timeout merely ended)."""
    t0 = time.monotonic()
    errors = spawn_ranks(tmp_path, 2, scenario, pg_timeout_s=pg_timeout_s, join_timeout_s=join_timeout_s,
                         wait_for=[0])
    assert errors[0] is not None, "rank 0 ended without an error although its peer exited"
    assert time.monotonic() - t0 < join_timeout_s
    return errors[0]
