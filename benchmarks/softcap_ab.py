"""A/B of softcap's kernels: the torch-ops tile backward at git REF (default d1aa93b, before
session 9's change) and the working tree's, and the native C++ kernel (``attnmem.kernels.native``,
what a causal softcap call runs where it is built), interleaved with plain chunked; causal
fwd+bwd, B 1, H 8, D 64, float32, medians.

    python benchmarks/softcap_ab.py [N] [repeats] [REF]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
import types

import torch

import attnmem
import attnmem.kernels.tile as T
from attnmem import scores as S
from attnmem.kernels import native


def inputs(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of the standard shape (B 1, H 8, D 64, float32), seed 0, requiring grad."""
    torch.manual_seed(0)
    return tuple(torch.randn(1, 8, n, 64).requires_grad_() for _ in range(3))


def fwd_bwd(q, k, v, **kw) -> float:
    """Seconds of one causal ``chunked`` forward and backward."""
    t0 = time.perf_counter()
    attnmem.attention(q, k, v, method="chunked", causal=True, **kw).sum().backward()
    return time.perf_counter() - t0


def old_backward(ref: str):
    src = subprocess.run(["git", "show", f"{ref}:src/attnmem/kernels/tile.py"], capture_output=True, text=True,
                         check=True).stdout
    old = types.ModuleType("attnmem.kernels.oldtile")
    exec(compile(src, "oldtile", "exec"), old.__dict__)
    old.CAUSAL_TILE = T.CAUSAL_TILE  # the tiled loop hands the working tree's marker
    return old.softcap_backward


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    ref = sys.argv[3] if len(sys.argv) > 3 else "d1aa93b"
    new_pair = T.TILE_KERNELS["softcap"]
    old_pair = (T.softcap_forward, old_backward(ref))
    q, k, v = inputs(n)

    def timed(**kw) -> float:
        return fwd_bwd(q, k, v, **kw)

    built = native.available()
    assert built, f"the native kernel did not build: {native.why_unavailable()}"

    def softcap(pair) -> float:
        T.TILE_KERNELS["softcap"] = pair
        native.available = lambda: pair is None  # None: the native kernel; else these torch-ops tiles
        try:
            return timed(score_mod=S.softcap(50.0))
        finally:
            native.available = lambda: built

    runs = {"plain": timed, "old": lambda: softcap(old_pair), "new": lambda: softcap(new_pair),
            "native": lambda: softcap(None)}
    for f in runs.values():
        f()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, f in runs.items():
            times[name].append(f())
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"N={n}, {repeats} repeats, threads {torch.get_num_threads()}, torch {torch.__version__}: "
          + ", ".join(f"{name} {m:.3f} s ({m / med['plain']:.2f} x plain)" for name, m in med.items()))


if __name__ == "__main__":
    main()
