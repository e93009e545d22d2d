"""Interleaved A/B of topk and hard (forward + backward): this checkout's ``selective.py``
against another version of it, in one process on the same inputs (timings on a shared
machine: compare the ratio, not the seconds).

    python benchmarks/topk_time.py [--ref FILE] [--seq-lens 4096,8192,16384] [--rounds 3]
        [--methods topk,hard] [--threads 2]

``--ref`` is a copy of ``src/attnmem/mechanisms/selective.py`` to compare against (default:
the main checkout's, ``/work/main/src/attnmem/mechanisms/selective.py``; an older commit's with
``git show REV:src/attnmem/mechanisms/selective.py > FILE``). It is loaded beside this one and
runs on this checkout's kernels, so only the selective module differs. Standard configuration:
CPU, float32, B = 1, H = 8, D = 64, no mask, topk's default k = 32 (hard: k = 1), default tiles.
Each round runs ref then this (alternating which goes first), one call each; the medians and
their ratio are printed as JSON lines with the load average. With the defaults (3 rounds) it
takes about 4 minutes on 2 quiet cores, most of it the reference's topk at N = 16384.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import attnmem.registry
from attnmem.mechanisms import selective

MAIN_COPY = Path("/work/main/src/attnmem/mechanisms/selective.py")
B, H, D = 1, 8, 64
TOPK = 32  # TopKOptions' default


def load_reference(path: Path):
    """``path`` as a module of this package (its relative imports resolve here), without
    registering its methods a second time."""
    spec = importlib.util.spec_from_file_location("attnmem.mechanisms._selective_ref", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    register = attnmem.registry.register
    attnmem.registry.register = lambda cls: cls  # the module's @register runs at import
    try:
        spec.loader.exec_module(mod)
    finally:
        attnmem.registry.register = register
    return mod


def fwd_bwd(module, method: str, q, k, v) -> tuple[float, torch.Tensor]:
    """Seconds of one forward + backward, and the output."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    t = time.perf_counter()
    out, _ = module.topk_attention(q, k, v, topk=TOPK if method == "topk" else 1, scale=D ** -0.5)
    out.backward(torch.ones_like(out))
    return time.perf_counter() - t, out.detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", type=Path, default=MAIN_COPY)
    ap.add_argument("--seq-lens", default="4096,8192,16384")
    ap.add_argument("--methods", default="topk,hard")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sides = {"ref": load_reference(args.ref), "this": selective}
    g = torch.Generator().manual_seed(0)
    warm = [torch.randn(B, H, 1024, D, generator=g) for _ in range(3)]
    for mod in sides.values():
        fwd_bwd(mod, "topk", *warm)
    for n in (int(x) for x in args.seq_lens.split(",")):
        q, k, v = (torch.randn(B, H, n, D, generator=g) for _ in range(3))
        for method in args.methods.split(","):
            secs: dict[str, list[float]] = {"ref": [], "this": []}
            outs = {}
            for r in range(args.rounds):
                for label in (("ref", "this") if r % 2 == 0 else ("this", "ref")):
                    s, outs[label] = fwd_bwd(sides[label], method, q, k, v)
                    secs[label].append(s)
            med = {key: statistics.median(val) for key, val in secs.items()}
            print(json.dumps(dict(method=method, seq_len=n, threads=args.threads, seconds=secs, median=med,
                                  ratio=med["this"] / med["ref"],
                                  max_abs_out_diff=float((outs["this"] - outs["ref"]).abs().max()),
                                  loadavg=open("/proc/loadavg").read().split()[:3])), flush=True)


if __name__ == "__main__":
    main()
