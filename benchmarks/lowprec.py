"""bfloat16 error of every exact method against FlashAttention's rule, on its grid.

    python benchmarks/lowprec.py [--dtype bfloat16] [--d 16]

For each method and (Nq, Nk): max-abs error of out, dq, dk, dv against a float64 reference
computed from the same low-precision inputs, divided by plain PyTorch's (eager attention in
that dtype). The rule is ratio <= 2 (``tests/kernels/test_lowprec.py`` checks the small sizes).
"""

from __future__ import annotations

import argparse

import torch

from attnmem.bench.precision import precision_errors

GRID = [(113, 203), (512, 1), (1023, 1024), (4096, 64)]
METHODS = [("chunked", {"q_tile": 16}), ("chunked", {}), ("sliding_window", {"window": 64}),
           ("dilated", {"window": 16}), ("longformer", {"window": 32}), ("strided", {"stride": 16}),
           ("bigbird", {})]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--d", type=int, default=16)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"# {args.dtype}, Hq=8, Hkv=1, B=1, D={args.d}, torch {torch.__version__}; ratios out dq dk dv")
    for method, options in METHODS:
        for nq, nk in GRID:
            if method == "bigbird" and nq != nk:
                nq = nk = 1024  # BigBird's blocks need a square problem
            ratios = [a / b if b else (0.0 if a == 0 else float("inf")) for _, a, b in
                      precision_errors(method, options, nq, nk, dtype, d=args.d)]
            print(f"{method} {options} ({nq}, {nk}): " + " ".join(f"{r:.2f}" for r in ratios), flush=True)
            if method == "bigbird":
                break


if __name__ == "__main__":
    main()
