"""Where softcap's time goes: the whole causal fwd+bwd call against plain chunked, the share
inside the softcap torch-ops tile kernels, and torch.profiler's op table (B 1, H 8, D 64,
float32). The native kernel, which a causal softcap call runs where it is built, is turned off
here: this profiles the torch-ops path (``softcap_ab.py`` times both).

    python benchmarks/softcap_profile.py [N] [repeats]
"""

from __future__ import annotations

import collections
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import attnmem.kernels.tile as T
from attnmem import scores as S
from attnmem.kernels import native
from softcap_ab import fwd_bwd, inputs


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    native.available = lambda: False  # the torch-ops tile kernels
    inside: dict[str, float] = collections.defaultdict(float)

    def timed_kernel(name, f):
        def g(*args, **kwargs):
            t0 = time.perf_counter()
            result = f(*args, **kwargs)
            inside[name] += time.perf_counter() - t0
            return result
        return g

    fwd, bwd = T.TILE_KERNELS["softcap"]
    T.TILE_KERNELS["softcap"] = (timed_kernel("forward", fwd), timed_kernel("backward", bwd))
    q, k, v = inputs(n)

    def run(**kw) -> float:
        return fwd_bwd(q, k, v, **kw)

    softcap = S.softcap(50.0)
    run(), run(score_mod=softcap)
    print(f"N={n}, threads {torch.get_num_threads()}, torch {torch.__version__}")
    for _ in range(repeats):
        inside.clear()
        plain, capped = run(), run(score_mod=softcap)
        print(f"plain {plain:.3f} s, softcap {capped:.3f} s ({capped / plain:.2f} x); inside the tile kernels: "
              f"forward {inside['forward']:.3f} s, backward {inside['backward']:.3f} s")
    for kw in ({"score_mod": softcap}, {}):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(**kw)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
