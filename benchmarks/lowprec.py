"""bfloat16 error of every exact method against FlashAttention's rule, on its grid.

    python benchmarks/lowprec.py [--dtype bfloat16] [--d 16]

For each method and (Nq, Nk): max-abs error of out, dq, dk, dv against a float64 reference
computed from the same low-precision inputs, divided by plain PyTorch's (eager attention in
that dtype). The rule is ratio <= 2 (``tests/kernels/test_lowprec.py`` checks the small sizes).
"""

from __future__ import annotations

import argparse

import torch

import attnmem
from attnmem.reference import reference_attention
from attnmem.registry import get as get_method

GRID = [(113, 203), (512, 1), (1023, 1024), (4096, 64)]
METHODS = [("chunked", {"q_tile": 16}), ("chunked", {}), ("sliding_window", {"window": 64}),
           ("dilated", {"window": 16}), ("longformer", {"window": 32}), ("strided", {"stride": 16}),
           ("bigbird", {})]


def errors(method, options, nq, nk, dtype, hq=8, hkv=1, d=16):
    g = torch.Generator().manual_seed(nq * 7 + nk)
    q, k, v = (torch.randn(1, h, n, d, generator=g).to(dtype) for h, n in ((hq, nq), (hkv, nk), (hkv, nk)))
    dout = torch.randn(1, hq, nq, d, generator=g).to(dtype)
    m = get_method(method)
    mask = m.pattern(m.make_options(options)) if hasattr(m, "pattern") else None

    def run(fn, dt):
        x = [t.to(dt).requires_grad_() for t in (q, k, v)]
        out = fn(*x)
        return [out, *torch.autograd.grad(out, x, dout.to(dt))]

    ref = run(lambda a, b, c: reference_attention(a, b, c, mask=mask), torch.float64)
    plain = run(lambda a, b, c: reference_attention(a, b, c, mask=mask), dtype)
    got = run(lambda a, b, c: attnmem.attention(a, b, c, method=method, **options), dtype)
    return [((x.double() - r).abs().max().item(), (y.double() - r).abs().max().item())
            for x, y, r in zip(got, plain, ref)]


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
            ratios = [a / b if b else (0.0 if a == 0 else float("inf")) for a, b in
                      errors(method, options, nq, nk, dtype, d=args.d)]
            print(f"{method} {options} ({nq}, {nk}): " + " ".join(f"{r:.2f}" for r in ratios), flush=True)
            if method == "bigbird":
                break


if __name__ == "__main__":
    main()
