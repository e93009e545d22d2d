"""Check every CUDA path of attnmem on one NVIDIA GPU in under five minutes.

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.jsonl] [--n 2048]

Four checks, each against a float64 reference computed on the same device:

1. ``sdpa``: ``method="sdpa"`` reaches PyTorch's flash kernel (it runs under
   ``sdpa_kernel(FLASH_ATTENTION)`` alone), ``method="auto"`` chooses it on CUDA, and its
   error is at most 2 × plain PyTorch's at the same dtype (FlashAttention's rule).
2. ``flex``: the sparse methods run on FlexAttention with block masks built from attnmem's
   block maps (``BlockMask.from_kv_blocks``). Forward and backward error are held to 2 ×
   that of a dense masked softmax in float32.
3. ``tile``: the torch tile kernel (``chunked``, ``kernel="torch"``), forward and backward, in
   float32 and bfloat16, with causal, window and GQA, under the same 2 × rule.
4. ``measure``: ``attnmem.measure``'s tracked peak against the CUDA caching allocator's peak
   (``torch.cuda.max_memory_allocated`` above the baseline), and ``attnmem.estimate`` against
   both.

Without a CUDA device it says "no CUDA device" and runs the parts a CPU can check: the
BlockMap → BlockMask conversion, the tile kernel, measure against estimate. It exits 0 when
every check that ran passed and 1 otherwise. Every row is printed in a table and appended to
the JSONL file, together with a machine line.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

import attnmem
from attnmem import masks as M
from attnmem import registry
from attnmem.kernels import flex_available, flex_block_mask, flex_safe
from attnmem.reference import reference_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, append_row, log  # noqa: E402

# FlashAttention's rule: the kernel's error against float64 is at most twice PyTorch's own at
# that dtype. The absolute floor keeps a case where both errors are at rounding level (1e-7
# in float32) from failing on noise.
ERROR_RATIO = 2.0
ERROR_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# attnmem.measure tracks tensors; the allocator also holds its own rounding (512-byte blocks)
# and cuBLAS/cuDNN workspaces, hence a relative bound plus a fixed allowance.
MEASURE_REL, MEASURE_SLACK = 0.10, 64 * 2**20
ESTIMATE_REL = 0.05

Row = dict[str, Any]


def _qkv(B: int, Hq: int, Hkv: int, N: int, D: int, dtype: torch.dtype, device: str,
         seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    shapes = [(B, Hq, N, D), (B, Hkv, N, D), (B, Hkv, N, D)]  # q; k, v
    return tuple(torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes)


def _max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref).abs().max().item() if a.numel() else 0.0


def _with_grads(fn: Callable[..., torch.Tensor], q, k, v, g) -> list[torch.Tensor]:
    """``fn``'s output and the gradients of ``(out * g).sum()`` w.r.t. q, k, v."""
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), g.to(out.dtype))
    return [out.detach(), *grads]


def _rule_rows(check: str, case: str, device: str, dtype: torch.dtype, ours: list, plain: list,
               ref: list, note: str = "") -> Iterator[Row]:
    """One row per tensor (out, dq, dk, dv): our error, plain PyTorch's, and the 2× bound."""
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), ours, plain, ref):
        err, base = _max_err(a, r), _max_err(b, r)
        limit = ERROR_RATIO * base + ERROR_FLOOR[dtype]
        yield dict(check=check, case=f"{case} {name}", device=device, dtype=str(dtype).replace("torch.", ""),
                   metric="max abs err", value=err, limit=limit, peer=base, ok=err <= limit, note=note)


# --- 1. SDPA dispatch ------------------------------------------------------------------------------


def check_sdpa(device: str, n: int) -> Iterator[Row]:
    if device != "cuda":
        yield dict(check="sdpa", case="flash dispatch", device=device, ok=None,
                   note="skipped: needs a CUDA GPU; none on this machine")
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for dtype in (torch.float16, torch.bfloat16):
        for hq, hkv, causal in ((8, 8, False), (8, 8, True), (8, 2, True)):
            case = f"B=2 Hq={hq} Hkv={hkv} N={n} D=64 causal={causal}"
            q64, k64, v64 = _qkv(2, hq, hkv, n, 64, torch.float64, device)
            q, k, v = (t.to(dtype) for t in (q64, k64, v64))
            inp = attnmem.validate(q, k, v, causal=causal)
            chosen = registry.choose(inp, {}).method.name
            yield dict(check="sdpa", case=f"{case} auto", device=device, dtype=str(dtype), metric="auto chooses",
                       value=chosen, ok=chosen == "sdpa")
            try:
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    attnmem.attention(q, k, v, method="sdpa", causal=causal)
                flash, note = True, ""
            except (RuntimeError, ValueError) as e:
                flash, note = False, str(e).splitlines()[0][:120]
            # Flash with GQA depends on the torch build: recorded, required only without GQA.
            yield dict(check="sdpa", case=f"{case} flash", device=device, dtype=str(dtype),
                       metric="flash kernel reached", value=flash, ok=flash if hkv == hq else None, note=note)
            g = torch.randn_like(q64)
            ref = _with_grads(lambda a, b, c, m=inp.mask: reference_attention(a, b, c, mask=m), q64, k64, v64, g)
            ours = _with_grads(lambda a, b, c, cz=causal: attnmem.attention(a, b, c, method="sdpa", causal=cz),
                               q, k, v, g)

            def plain(a, b, c, cz=causal):
                rep = a.shape[1] // b.shape[1]
                return torch.nn.functional.scaled_dot_product_attention(
                    a, b.repeat_interleave(rep, 1), c.repeat_interleave(rep, 1), is_causal=cz)

            yield from _rule_rows("sdpa", case, device, dtype, ours, _with_grads(plain, q, k, v, g), ref)


# --- 2. FlexAttention with attnmem's block maps ----------------------------------------------------

FLEX_CASES = [  # (method, causal, options)
    ("sliding_window", True, dict(window=(255, 0))),
    ("longformer", False, dict(window=128, global_tokens=(0, 101))),
    ("bigbird", False, dict(block=128, window_blocks=3, global_blocks=2, random_blocks=2)),
    ("dilated", True, dict(window=64, dilation=(1, 2, 4, 8))),
    ("strided", True, dict(pattern="fixed", stride=128, summary=8)),
]


def check_flex(device: str, n: int) -> Iterator[Row]:
    if not flex_available():
        yield dict(check="flex", case="import", device=device, ok=None,
                   note="skipped: torch.nn.attention.flex_attention does not import")
        return
    for method, causal, opts in FLEX_CASES:
        m = registry.get(method)
        # The conversion itself: FlexAttention's dense view of the block mask must list exactly
        # the tiles of attnmem's block map (CPU-checkable; at least 8 × 8 tiles so that the
        # patterns leave tiles out).
        nc = max(n, 8 * 128)
        inp = attnmem.validate(*_qkv(1, 4, 4, nc, 64, torch.float32, "cpu"), causal=causal)
        pattern = m.effective_mask(inp, m.make_options(opts))
        bm = pattern.block_map(nc, nc, 128, 128, heads=4)
        block_mask = flex_block_mask(bm, pattern.mask_fn(nc, nc), device)
        same = torch.equal(block_mask.to_dense()[0, 0].bool().cpu(), bm.dense_states() != M.EMPTY)
        yield dict(check="flex", case=f"{method} block mask = block map", device=device, metric="tiles equal",
                   value=same, ok=same, note=f"density {bm.density():.3f}")
        if device != "cuda":
            continue
        q, k, v = _qkv(1, 4, 4, n, 64, torch.float32, device)
        mask = m.effective_mask(attnmem.validate(q, k, v, causal=causal), m.make_options(opts))
        if not flex_safe(mask):
            yield dict(check="flex", case=method, device=device, ok=False, note="mask not FlexAttention-safe")
            continue
        q64, k64, v64 = _qkv(1, 4, 4, n, 64, torch.float64, device)
        g = torch.randn_like(q64)
        ref = _with_grads(lambda a, b, c, m=mask: reference_attention(a, b, c, mask=m), q64, k64, v64, g)
        start = time.perf_counter()
        def run(a, b, c, name=method, cz=causal, kw=opts):
            return attnmem.attention(a, b, c, method=name, causal=cz, **kw)

        ours = _with_grads(run, q, k, v, g)
        torch.cuda.synchronize()
        first = time.perf_counter() - start  # includes torch.compile of the FlexAttention kernel
        plain = _with_grads(lambda a, b, c, m=mask: reference_attention(a, b, c, mask=m), q, k, v, g)
        yield from _rule_rows("flex", f"{method} N={n}", device, torch.float32, ours, plain, ref,
                              note=f"first call {first:.1f} s (compile)")


# --- 3. the torch tile kernel ----------------------------------------------------------------------


def check_tile(device: str, n: int) -> Iterator[Row]:
    nq = n // 2 + 3  # odd, and not a multiple of the tiles
    cases = [(False, None, 4, 4), (True, None, 8, 2), (True, M.sliding_window(200, 17), 8, 1)]
    for dtype in (torch.float32, torch.bfloat16):
        for causal, mask, hq, hkv in cases:
            case = f"Hq={hq} Hkv={hkv} N={nq} D=80 causal={causal} mask={mask!r}"
            q64, k64, v64 = _qkv(1, hq, hkv, nq, 80, torch.float64, device, seed=1)
            q, k, v = (t.to(dtype) for t in (q64, k64, v64))
            inp = attnmem.validate(q64, k64, v64, causal=causal, mask=mask)
            g = torch.randn_like(q64)
            ref = _with_grads(lambda a, b, c, m=inp.mask: reference_attention(a, b, c, mask=m), q64, k64, v64, g)
            def tiled(a, b, c, cz=causal, m=mask):
                return attnmem.attention(a, b, c, method="chunked", causal=cz, mask=m, kernel="torch",
                                         q_tile=64, kv_tile=128)

            ours = _with_grads(tiled, q, k, v, g)
            plain = _with_grads(lambda a, b, c, m=inp.mask: reference_attention(a, b, c, mask=m), q, k, v, g)
            yield from _rule_rows("tile", case, device, dtype, ours, plain, ref)


# --- 4. memory measurement -------------------------------------------------------------------------


def check_measure(device: str, n: int) -> Iterator[Row]:
    B, H, D = 1, 8, 64
    for method, opts in (("chunked", dict(kernel="torch", q_tile=128, kv_tile=128)), ("reference", {})):
        q, k, v = (t.float().requires_grad_(True) for t in _qkv(B, H, H, n, D, torch.float32, device))

        def step(q, k, v, name=method, kw=opts):
            attnmem.attention(q, k, v, method=name, causal=True, **kw).sum().backward()

        if device == "cuda":
            step(q, k, v)  # warm up kernels and cuBLAS workspaces outside the window
            q.grad = k.grad = v.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        tracked = attnmem.measure(step, q, k, v, repeats=0, warmup=0).peak_bytes
        est = attnmem.estimate(method, batch=B, heads=H, seq_len=n, head_dim=D, causal=True, **opts).peak_bytes
        case = f"{method} B={B} H={H} N={n} D={D} causal fwd+bwd"
        # The estimate is held to 5 % of the tracked peak (tests/memory/test_estimate.py).
        yield dict(check="measure", case=f"{case} estimate vs tracked", device=device, metric="bytes",
                   value=est, peer=tracked, limit=ESTIMATE_REL * tracked,
                   ok=abs(est - tracked) <= ESTIMATE_REL * tracked)
        limit = MEASURE_REL * tracked + MEASURE_SLACK
        if device == "cuda":
            torch.cuda.synchronize()
            allocator = torch.cuda.max_memory_allocated() - base
            # q, k, v (and their grads, kept by the tracked run) were allocated before the window.
            inputs = 3 * q.numel() * q.element_size()
            yield dict(check="measure", case=f"{case} allocator vs tracked", device=device, metric="bytes",
                       value=allocator + inputs, peer=tracked, limit=limit,
                       ok=abs(allocator + inputs - tracked) <= limit,
                       note="allocator peak above baseline, plus the inputs allocated before it")


CHECKS: dict[str, Callable[[str, int], Iterator[Row]]] = {
    "sdpa": check_sdpa, "flex": check_flex, "tile": check_tile, "measure": check_measure,
}


def machine(device: str) -> Row:
    row: Row = dict(check="machine", python=platform.python_version(), torch=torch.__version__,
                    threads=torch.get_num_threads(), device=device, platform=platform.platform())
    if device == "cuda":
        row.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                   gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    else:
        row.update(gpu=None, note="no CUDA device")
    try:
        row["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        pass
    return row


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if not math.isinf(x) else str(x)
    return "" if x is None else str(x)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS / "gpu_check.jsonl")
    ap.add_argument("--n", type=int, default=None, help="sequence length (default 2048 on CUDA, 256 on CPU)")
    ap.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = args.n or (2048 if device == "cuda" else 256)
    names = [c for c in args.checks.split(",") if c]
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        ap.error(f"unknown checks {unknown}; choose from {','.join(CHECKS)}")
    if device == "cpu":
        log("no CUDA device: running the parts a CPU can check (block-mask conversion, tile kernel, "
            "measure vs estimate); the CUDA paths are reported as skipped")
    head = machine(device)
    append_row(args.out, head)
    rows: list[Row] = []
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # FlexAttention's "called without torch.compile" on CPU
        for name in names:
            t0 = time.perf_counter()
            for row in CHECKS[name](device, n):
                row["seconds"] = round(time.perf_counter() - t0, 2)
                rows.append(row)
                append_row(args.out, row)
    total = time.perf_counter() - start
    cols = ("check", "case", "dtype", "metric", "value", "peer", "limit", "ok", "note")
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    widths = [min(w, 70) for w in widths]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c))[:w].ljust(w) for c, w in zip(cols, widths)))
    failed = [r for r in rows if r.get("ok") is False]
    skipped = [r for r in rows if r.get("ok") is None]
    print(f"\n{head.get('gpu') or 'no CUDA device'} | torch {torch.__version__} | {len(rows)} rows, "
          f"{len(failed)} failed, {len(skipped)} not checked here | {total:.0f} s | rows appended to {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
