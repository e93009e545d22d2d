"""A generated matrix of bad inputs through the Python API and the command line.

Each case runs isolated (API: a forked child; CLI: a subprocess), under a timeout, and is
classified:

- ``ok``: returned a correct result (a zero-size call's empty or zero output, correct shape);
- ``refused``: ``ValueError``/``TypeError`` (API) or exit status 2 with one ``error:`` line
  (CLI) — and ``unnamed`` when that refusal does not name the argument;
- ``raw``: any other exception, or a traceback / several lines on the CLI;
- ``crash``: killed by a signal; ``hang``: past the timeout;
- ``silent``: accepted an input it should refuse, or returned a wrong shape or non-finite values.

Target: 0 crashes, 0 hangs, 0 raw, 0 silent, 0 unnamed. Run:
``PYTHONPATH=src python benchmarks/bad_inputs.py [--quick] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

import attnmem
from attnmem import registry

API_TIMEOUT_S = 60
CLI_TIMEOUT_S = 300  # a start of the CLI took 23 s at load 15; a refusal is immediate after it


@dataclass
class Case:
    name: str
    run: Callable[[], object] | list[str]  # an API call, or CLI arguments after ``attnmem``
    names: tuple[str, ...] = ()  # words a refusal must contain (any one of them)
    must_refuse: bool = True


def qkv(shape_q=(1, 2, 16, 8), shape_kv=None, dtype=torch.float32):
    shape_kv = shape_kv or shape_q
    return (torch.randn(shape_q).to(dtype), torch.randn(shape_kv).to(dtype), torch.randn(shape_kv).to(dtype))


def zero_call(method, shape_q, shape_kv):
    def call():
        q, k, v = qkv(shape_q, shape_kv)
        for t in (q, k, v):
            t.requires_grad_(True)
        out = attnmem.attention(q, k, v, method=method)
        assert out.shape == q.shape and not out.any(), "wrong zero-size output"
        out.sum().backward()
        return out
    return call


def api_cases(quick: bool) -> list[Case]:
    names = ["auto"] + [m.name for m in registry.methods() if not m.stateful]
    if quick:
        names = ["auto", "chunked", "sliding_window", "nystrom", "linear", "strided"]
    cases: list[Case] = []
    for m in names:
        zero = {"B=0": ((0, 2, 16, 8), (0, 2, 16, 8)), "D=0": ((1, 2, 16, 0), (1, 2, 16, 0)),
                "Nq=0": ((1, 2, 0, 8), (1, 2, 16, 8)), "Nk=0": ((1, 2, 16, 8), (1, 2, 0, 8))}
        for label, (sq, skv) in zero.items():
            cases.append(Case(f"api {m} {label}", zero_call(m, sq, skv), (m, "cannot run"), must_refuse=False))
        bad = {
            "Hq=0": (lambda m=m: attnmem.attention(*qkv((1, 0, 16, 8), (1, 2, 16, 8)), method=m), ("Hq",)),
            "q a list": (lambda m=m: attnmem.attention([[1.0]], *qkv()[1:], method=m), ("q",)),
            "int q": (lambda m=m: attnmem.attention(torch.ones(1, 2, 16, 8, dtype=torch.int64), *qkv()[1:],
                                                    method=m), ("q", "floating")),
            "3-D q": (lambda m=m: attnmem.attention(torch.randn(2, 16, 8), *qkv()[1:], method=m), ("q",)),
            "mixed dtypes": (lambda m=m: attnmem.attention(qkv()[0].double(), *qkv()[1:], method=m), ("dtype",)),
            "batch differs": (lambda m=m: attnmem.attention(*qkv((2, 2, 16, 8), (1, 2, 16, 8)), method=m), ("batch",)),
            "D differs": (lambda m=m: attnmem.attention(*qkv((1, 2, 16, 8), (1, 2, 16, 4)), method=m), ("head dim",)),
            "Hq % Hkv": (lambda m=m: attnmem.attention(*qkv((1, 3, 16, 8), (1, 2, 16, 8)), method=m), ("heads",)),
            "causal='yes'": (lambda m=m: attnmem.attention(*qkv(), method=m, causal="yes"), ("causal",)),
            "scale=nan": (lambda m=m: attnmem.attention(*qkv(), method=m, scale=float("nan")), ("scale",)),
            "scale='1'": (lambda m=m: attnmem.attention(*qkv(), method=m, scale="1"), ("scale",)),
            "check_finite='no'": (lambda m=m: attnmem.attention(*qkv(), method=m, check_finite="no"),
                                  ("check_finite",)),
            "mask shape": (lambda m=m: attnmem.attention(*qkv(), method=m, mask=torch.ones(3, 5, dtype=torch.bool)),
                           ("mask",)),
            "mask ints": (lambda m=m: attnmem.attention(*qkv(), method=m, mask=torch.ones(16, 16, dtype=torch.int64)),
                          ("mask",)),
            "unknown option": (lambda m=m: attnmem.attention(*qkv(), method=m, bogus=1), ("bogus",)),
        }
        cases += [Case(f"api {m} {label}", fn, words) for label, (fn, words) in bad.items()]
    est = lambda **kw: lambda: attnmem.estimate("chunked", **{**dict(batch=1, heads=2, seq_len=64, head_dim=8), **kw})  # noqa: E731
    for label, kw, words in [("seq_len=0", dict(seq_len=0), ("seq_len",)),
                             ("seq_len=-1", dict(seq_len=-1), ("seq_len",)),
                             ("heads=0", dict(heads=0), ("heads",)), ("dtype=int8", dict(dtype="int8"), ("dtype",)),
                             ("seq_len=2.5", dict(seq_len=2.5), ("seq_len",))]:
        cases.append(Case(f"api estimate {label}", est(**kw), words))
    for budget in ("lots", "-1GB", 0, True, float("inf"), "1e30", "24GiBs"):
        cases.append(Case(f"api plan budget={budget!r}", lambda b=budget: attnmem.plan("tiny", b), ("budget",)))
    M = attnmem.masks
    for label, fn, words in [("random_blocks block=0", lambda: M.random_blocks(64, 64, 0, 0.5), ("block",)),
                             ("random_blocks keep=2", lambda: M.random_blocks(64, 64, 16, 2.0), ("keep",)),
                             ("sliding_window(-1)", lambda: M.sliding_window(-1), ("window", "left")),
                             ("dilated d=0", lambda: M.dilated(4, 0), ("dilat",)),
                             ("strided 0", lambda: M.strided(0), ("stride",))]:
        cases.append(Case(f"api masks {label}", fn, words))
    return cases


def cli_cases(quick: bool, tmp: str) -> list[Case]:
    blocker = os.path.join(tmp, "a_file")
    open(blocker, "w").close()
    bad_results = os.path.join(tmp, "bad_results")
    os.makedirs(bad_results, exist_ok=True)
    with open(os.path.join(bad_results, "results.jsonl"), "wb") as f:
        f.write(b'{"key": "x", "status": "ok"}\n\xff\xfe\n')
    ckpt_dir = os.path.join(tmp, "ckpt")
    os.makedirs(ckpt_dir, exist_ok=True)
    open(os.path.join(ckpt_dir, "checkpoint.pt"), "wb").close()
    tiny = ["--seq-lens", "32", "--heads", "2", "--head-dim", "8", "--repeats", "0"]
    train = ["train", "--seq-len", "64", "--steps", "1", "--d-model", "16", "--layers", "1", "--no-progress"]
    cases = [
        ("compare --methods nope", ["compare", "--methods", "nope", *tiny], ("nope",)),
        ("compare --methods chunked,chunked", ["compare", "--methods", "chunked,chunked", *tiny], ("chunked",)),
        ("compare --seq-lens x", ["compare", "--seq-lens", "1,x"], ("--seq-lens",)),
        ("compare --seq-lens huge", ["compare", "--seq-lens", str(2**70)], ("--seq-lens",)),
        ("compare --budget lots", ["compare", "--budget", "lots", *tiny], ("--budget",)),
        ("compare --budget 0", ["compare", "--budget", "0", *tiny], ("--budget",)),
        ("compare --mask document:0", ["compare", "--mask", "document:0", *tiny], ("document:0",)),
        ("compare --mask random_blocks:0.5:0", ["compare", "--mask", "random_blocks:0.5:0", *tiny], ("random_blocks",)),
        ("compare --mask zigzag", ["compare", "--mask", "zigzag:3", *tiny], ("zigzag",)),
        ("compare --out ''", ["compare", "--methods", "chunked", *tiny, "--out", ""], ("--out",)),
        ("compare --out unwritable", ["compare", "--methods", "chunked", *tiny, "--out", blocker + "/x"], ("--out",)),
        ("compare non-UTF-8 results", ["compare", "--methods", "chunked", *tiny, "--out", bad_results, "--resume"],
         ("results.jsonl",)),
        ("compare --heads 0", ["compare", "--heads", "0"], ("--heads",)),
        ("compare --dtype int8", ["compare", "--dtype", "int8"], ("--dtype",)),
        ("compare chunked:nope=1", ["compare", "--methods", "chunked:nope=1", *tiny], ("nope",)),
        ("estimate --seq-len -5", ["estimate", "chunked", "--seq-len", "-5"], ("seq_len", "--seq-len")),
        ("estimate --seq-len huge", ["estimate", "chunked", "--seq-len", str(2**80)], ("seq_len", "--seq-len")),
        ("estimate unknown method", ["estimate", "nope", "--seq-len", "64"], ("nope",)),
        ("estimate --option q_tile", ["estimate", "chunked", "--seq-len", "64", "--option", "q_tile"], ("q_tile",)),
        ("estimate --mask document:0", ["estimate", "chunked", "--seq-len", "64", "--mask", "document:0"],
         ("document:0",)),
        ("plan --budget lots", ["plan", "--config", "tiny", "--budget", "lots"], ("budget",)),
        ("plan --config nope", ["plan", "--config", "gpt-17", "--budget", "1GB"], ("gpt-17",)),
        ("plan --plot unwritable", ["plan", "--config", "tiny", "--budget", "1GB", "--methods", "chunked", "--plot",
                                    blocker + "/x.png"], ("--plot",)),
        ("plan --seq-len huge", ["plan", "--config", "tiny", "--budget", "1GB", "--seq-len", str(2**70)],
         ("seq_len", "--seq-len")),
        ("train --resume no checkpoint", [*train, "--out", os.path.join(tmp, "none"), "--resume"], ("checkpoint",)),
        ("train --resume empty checkpoint", [*train, "--out", ckpt_dir, "--resume"], ("checkpoint",)),
        ("train --out unwritable", [*train, "--out", blocker + "/x"], ("--out",)),
        ("train --max-batch-under lots", [*train, "--max-batch-under", "lots"], ("--max-batch-under",)),
        ("train --method chunked:q_tile=-1", [*train, "--method", "chunked:q_tile=-1"], ("q_tile",)),
        ("train --seq-len huge", [*train[:1], "--seq-len", str(2**70)], ("seq_len", "--seq-len")),
        ("decode-bench --out unwritable", ["decode-bench", "--contexts", "8", "--out", blocker + "/x"], ("--out",)),
        ("decode-bench --kinds nope", ["decode-bench", "--kinds", "nope"], ("nope",)),
    ]
    if quick:
        cases = cases[::4]
    return [Case(f"cli {label}", args, words) for label, args, words in cases]


def run_api(case: Case) -> tuple[str, str]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run, report one line, exit without cleanup
        os.close(r)
        signal.alarm(API_TIMEOUT_S)
        try:
            case.run()
            msg = "ok\t"
        except (ValueError, TypeError) as e:
            msg = f"refused\t{' | '.join(str(e).splitlines()) or type(e).__name__}"
        except AssertionError as e:
            msg = f"silent\t{e}"
        except BaseException as e:  # noqa: BLE001 - classifying every failure is the point
            msg = f"raw\t{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        os.write(w, msg.encode()[:2000])
        os._exit(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    text = os.read(r, 4096).decode(errors="replace")
    os.close(r)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return ("hang" if sig == signal.SIGALRM else "crash"), f"signal {sig}"
    kind, _, detail = text.partition("\t")
    return kind or "crash", detail


def run_cli(case: Case) -> tuple[str, str]:
    try:
        p = subprocess.run([sys.executable, "-m", "attnmem", *case.run], capture_output=True, text=True,
                           timeout=CLI_TIMEOUT_S, errors="replace")
    except subprocess.TimeoutExpired:
        return "hang", f"> {CLI_TIMEOUT_S} s"
    if p.returncode < 0:
        return "crash", f"signal {-p.returncode}"
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    if "Traceback" in p.stderr + p.stdout:
        return "raw", lines[-1] if lines else "traceback"
    if p.returncode == 0:
        return "ok", ""
    if p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "):
        return "refused", lines[0]
    return "raw", f"exit {p.returncode}: {' | '.join(lines[:3])}"


def classify(case: Case, kind: str, detail: str) -> str:
    if kind == "ok" and case.must_refuse:
        return "silent"
    if kind == "refused" and case.names and not any(w.lower() in detail.lower() for w in case.names):
        return "unnamed"
    return kind


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small subset (the tests run it)")
    parser.add_argument("--json", default=None, help="write every case's outcome here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    outcomes = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in api_cases(args.quick) + cli_cases(args.quick, tmp):
            kind, detail = run_cli(case) if isinstance(case.run, list) else run_api(case)
            verdict = classify(case, kind, detail)
            outcomes.append(dict(case=case.name, verdict=verdict, detail=detail))
            if verdict not in ("ok", "refused"):
                print(f"{verdict:8s} {case.name}: {detail}", flush=True)
    counts = Counter(o["verdict"] for o in outcomes)
    summary = {k: counts.get(k, 0) for k in ("ok", "refused", "crash", "hang", "raw", "silent", "unnamed")}
    counted = ", ".join(f"{k} {v}" for k, v in summary.items())
    print(f"{len(outcomes)} cases in {time.time() - started:.0f} s: {counted}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "cases": outcomes}, f, indent=2)
    return 0 if all(summary[k] == 0 for k in ("crash", "hang", "raw", "silent", "unnamed")) else 1


if __name__ == "__main__":
    sys.exit(main())
