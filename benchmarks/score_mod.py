"""Score modifications (softcap, ALiBi, T5 relative bias, sinks, dropout): memory and time.

Standard configuration: CPU, float32, B=1, H=8, D=64, forward + backward.

    python benchmarks/score_mod.py memory [--target] [--n N] [--check-n 1024] [--how real|trace]
        [--cases softcap,dropout]
    python benchmarks/score_mod.py time [--target] [--n N] [--repeats 5]
    python benchmarks/score_mod.py window [--target] [--ns 1024,2048,4096]
    python benchmarks/score_mod.py all [--target]

Without ``--target`` the sizes are small (a quick look, well under 3 minutes in all); with it they
are the issue's: memory at N = 16384, time at N = 8192, the window at 2048, 4096, 8192.

``memory`` counts the peak of every live tensor with ``attnmem.measure``'s tracker
(``LiveTensorTracker``); at the large N it runs the call on fake tensors (as
``attnmem.estimate`` does), and it first checks at ``--check-n`` that the fake trace and a real
``attnmem.measure`` run give the same bytes. Peers: SDPA with the equivalent dense float bias
(ALiBi, relative bias: the only CPU alternative), eager attention (softcap and sinks, which no
SDPA argument expresses) and SDPA's own dropout. ``time`` interleaves the cases (A, B, C, …
repeated) and prints medians and the load average: ALiBi and softcap against plain
``chunked`` (causal, no score_mod) and against SDPA with the equivalent dense float bias.
``--how trace`` traces attnmem at the large N too (the generic dropout path runs for minutes
there on a loaded machine); the check at ``--check-n`` shows trace and measurement agree.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import attnmem  # noqa: E402
from attnmem import scores as S  # noqa: E402
from attnmem.memory.estimate import _SmallRealMode, trace_peak  # noqa: E402
from attnmem.reference import reference_attention  # noqa: E402

B, H, D = 1, 8, 64
MiB = 2 ** 20


def floor_bytes(n: int) -> int:
    return 7 * B * H * n * D * 4


def dense_bias(mod, n: int, device="cpu") -> torch.Tensor:
    """The (1, H, N, N) float bias equal to an additive score_mod (score_mod(0, ...))."""
    idx = (torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.arange(H).view(1, H, 1, 1),
           torch.arange(n).view(1, 1, n, 1), torch.arange(n).view(1, 1, 1, n))
    return mod(torch.zeros(1, H, n, n, device=device), *idx)


def cases(n: int):
    """name -> (attnmem call, peer name, peer call); each takes (q, k, v)."""
    table = torch.randn(32, H) * 0.1
    rel = S.relative_bias(table, 32, 128, bidirectional=False)
    alibi = S.alibi(H)
    sinks = torch.zeros(H, requires_grad=True)

    def am(**kw):
        return lambda q, k, v: attnmem.attention(q, k, v, method="chunked", causal=True, **kw)

    def sdpa_bias(mod):
        def call(q, k, v):
            causal = torch.ones(n, n, dtype=torch.bool).tril()
            bias = dense_bias(mod, n).masked_fill(~causal, -math.inf)  # (1, H, N, N)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return call

    causal_mask = attnmem.masks.causal()
    return {
        "softcap": (am(score_mod=S.softcap(50.0)), "eager",
                    lambda q, k, v: reference_attention(q, k, v, mask=causal_mask, score_mod=S.softcap(50.0))),
        "alibi": (am(score_mod=alibi), "sdpa+dense bias", sdpa_bias(alibi)),
        "relative_bias": (am(score_mod=rel), "sdpa+dense bias", sdpa_bias(rel)),
        "sinks": (am(sinks=sinks), "eager",
                  lambda q, k, v: reference_attention(q, k, v, mask=causal_mask, sinks=sinks)),
        "dropout": (am(dropout_p=0.1, dropout_seed=0), "sdpa dropout",
                    lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.1)),
    }


def traced_peak(call, n: int) -> int:
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        q, k, v = (torch.empty(B, H, n, D).requires_grad_() for _ in range(3))  # (B, H, N, D)
    # The tile loops of the generic path run ~10**6 operators at N = 16384: no trace bound here.
    with _SmallRealMode(fake_mode, op_limit=10**9, seconds_limit=1e6):
        peak, _, _ = trace_peak(call, q, k, v, True)
    return peak


def real_peak(call, n: int) -> int:
    q, k, v = (torch.randn(B, H, n, D).requires_grad_() for _ in range(3))  # (B, H, N, D)
    def step(q, k, v):
        call(q, k, v).sum().backward()

    return attnmem.measure(step, q, k, v, repeats=0, warmup=0).peak_bytes


def memory(args) -> None:
    print(f"# memory, fwd+bwd, CPU float32 B={B} H={H} D={D}, torch {torch.__version__}")
    chosen = args.cases.split(",") if args.cases else list(cases(1))
    for name, (call, _, _) in cases(args.check_n).items():
        if name not in chosen:
            continue
        real, fake = real_peak(call, args.check_n), traced_peak(call, args.check_n)
        print(f"check N={args.check_n} {name}: measured {real / MiB:.2f} MiB, traced {fake / MiB:.2f} MiB")
    n = args.n
    how = "measured for real (attnmem.measure)" if args.how == "real" else "traced on fake tensors"
    print(f"N={n}: attnmem {how}; peers traced on fake tensors (their N x N tensors would not fit this "
          "shared machine)")
    print(f"| feature | attnmem peak (MiB) | / floor {floor_bytes(n) / MiB:.0f} MiB | peer | peer peak (MiB) | ratio |")
    print("|---|---|---|---|---|---|")
    for name, (call, peer_name, peer) in cases(n).items():
        if name not in chosen:
            continue
        mine = real_peak(call, n) if args.how == "real" else traced_peak(call, n)
        theirs = traced_peak(peer, n)
        print(f"| {name} | {mine / MiB:.1f} | {mine / floor_bytes(n):.3f} | {peer_name} | {theirs / MiB:.0f} | "
              f"{mine / theirs:.4f} |", flush=True)


def timed(call, q, k, v) -> float:
    t0 = time.perf_counter()
    call(q, k, v).sum().backward()
    return time.perf_counter() - t0


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def time_cases(args) -> None:
    """Interleaved fwd+bwd: chunked, ALiBi (q and k as drawn, and 4 x larger), softcap, SDPA + the
    dense ALiBi bias (A, B, C, D, E, ...)."""
    torch.set_num_threads(args.threads)
    n = args.n
    q, k, v = (torch.randn(B, H, n, D).requires_grad_() for _ in range(3))  # (B, H, N, D)
    c = cases(n)
    runs = {
        "chunked": lambda q, k, v: attnmem.attention(q, k, v, method="chunked", causal=True),
        "alibi": c["alibi"][0],
        # ALiBi skips the key tiles its slopes make negligible, bounded from the q and k norms
        # (README): q and k 4 x larger (scores 16 x) shrink what a head can skip.
        "alibi, q k x4": lambda q, k, v: c["alibi"][0](q * 4, k * 4, v),
        "softcap": c["softcap"][0], "sdpa+dense alibi bias": c["alibi"][2],
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    load0 = load()
    for call in runs.values():  # warm-up
        timed(call, q, k, v)
    for r in range(args.repeats):
        for name, call in runs.items():
            times[name].append(timed(call, q, k, v))
        # Written as it goes: each repeat's times and the ratios so far.
        so_far = {name: statistics.median(ts) for name, ts in times.items()}
        print(f"repeat {r + 1}/{args.repeats} (load {load()}): " + ", ".join(
            f"{name} {times[name][-1]:.2f} s ({so_far[name] / so_far['chunked']:.2f} x chunked)" for name in runs),
            flush=True)
    base = statistics.median(times["chunked"])
    sdpa = statistics.median(times["sdpa+dense alibi bias"])
    print(f"# time, fwd+bwd, causal, N={n}, CPU float32 B={B} H={H} D={D}, threads {args.threads}, "
          f"torch {torch.__version__}, load {load0} -> {load()} (measured under load), {args.repeats} interleaved "
          "repeats, medians")
    print("| case | median (s) | / chunked | / sdpa+dense bias |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.2f} | {med / base:.2f} | {med / sdpa:.2f} |")


def window(args) -> None:
    torch.set_num_threads(args.threads)
    ns = [int(x) for x in args.ns.split(",")]
    load0 = load()
    results: dict[int, list[float]] = {n: [] for n in ns}
    inputs = {n: [torch.randn(B, H, n, D).requires_grad_() for _ in range(3)] for n in ns}

    def call(q, k, v):
        return attnmem.attention(q, k, v, method="sliding_window", window=(256, 0), score_mod=S.alibi(H))

    for n in ns:
        timed(call, *inputs[n])
    for _ in range(args.repeats):
        for n in ns:
            results[n].append(timed(call, *inputs[n]))
    print(f"# sliding_window((256, 0)) + ALiBi, fwd+bwd, threads {args.threads}, "
          f"load {load0} -> {load()} (measured under load); time per query constant = tiles outside skipped")
    for n in ns:
        med = statistics.median(results[n])
        print(f"N={n}: median {med:.2f} s, {med / n * 1e6:.1f} µs per query")


# Quick sizes, and the targets (--target).
SIZES = {False: {"memory": 4096, "time": 2048, "window": "1024,2048,4096"},
         True: {"memory": 16384, "time": 8192, "window": "2048,4096,8192"}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    parsers = {name: sub.add_parser(name) for name in ("memory", "time", "window", "all")}
    for sp in parsers.values():
        sp.add_argument("--target", action="store_true", help="the issue's sizes (N = 16384 / 8192)")
        sp.add_argument("--threads", type=int, default=2)
        sp.add_argument("--repeats", type=int, default=5)
        sp.add_argument("--check-n", type=int, default=1024)
        sp.add_argument("--how", choices=("real", "trace"), default="real")
        sp.add_argument("--n", type=int, default=None)
        sp.add_argument("--ns", default=None)
        sp.add_argument("--cases", default=None, help="memory: comma-separated features (default all)")
    args = p.parse_args()
    sizes = SIZES[args.target]
    cmds = ["memory", "time", "window"] if args.cmd == "all" else [args.cmd]
    for cmd in cmds:
        sub_args = argparse.Namespace(**vars(args))
        if sub_args.n is None:
            sub_args.n = sizes[cmd] if cmd != "window" else None
        sub_args.ns = sub_args.ns or sizes["window"]
        {"memory": memory, "time": time_cases, "window": window}[cmd](sub_args)


if __name__ == "__main__":
    main()
