"""Train a small causal Transformer on a sequence split across ranks.

    torchrun --nproc-per-node 2 -m attnmem.distributed.demo --seq-len 512 --steps 40
    torchrun --nproc-per-node 4 -m attnmem.distributed.demo --scheme hybrid --check

``--scheme`` picks ring attention (default), Ulysses (all-to-all over heads) or the hybrid
(Ulysses × ring grid; at 4 ranks 2 × 2).

The task cannot be solved without attending across ranks: the sequence is random tokens and
every position of its second half must name the sequence's FIRST token, which sits on rank 0's
slice. A model that only saw its own slice stays at the chance loss ``log(vocab)``. Every
rank feeds its shard (``SequenceParallel.partition``) of the same batch to
``attnmem.nn.Transformer(..., sequence_parallel=...)``; the gradients of the replicated
parameters are summed with ``all_reduce``. ``--check`` finally compares the gathered logits
with the same model run in one process on the whole sequence.

Without torchrun it runs as a single rank (a one-process gloo group).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from ..nn import Transformer
from .layout import gather
from .parallel import SCHEMES, SequenceParallel


def _init() -> tuple[int, int, torch.device]:
    cuda = torch.cuda.is_available() and "LOCAL_RANK" in os.environ
    backend = "nccl" if cuda else "gloo"
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=timedelta(minutes=5))
    else:
        store = os.path.join(tempfile.mkdtemp(), "store")
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), device


def recall_batch(batch: int, seq_len: int, vocab: int, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, seq_len) random tokens and targets: the first token on the second half, else -100."""
    tokens = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    targets = tokens[:, :1].expand(batch, seq_len).clone()
    targets[:, : seq_len // 2] = -100
    return tokens, targets


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=16)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--layout", choices=["zigzag", "contiguous"], default="zigzag")
    ap.add_argument("--scheme", choices=SCHEMES, default="ring")
    ap.add_argument("--check", action="store_true", help="compare with one process on the whole sequence")
    args = ap.parse_args(argv)

    rank, world, device = _init()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if args.seq_len % (2 * world):
        raise SystemExit(f"error: --seq-len must be a multiple of 2·world_size = {2 * world}, got {args.seq_len}")
    torch.manual_seed(0)  # the same initial weights on every rank
    sp = SequenceParallel(scheme=args.scheme, layout=args.layout)
    model = Transformer(args.vocab, args.d_model, args.heads, args.layers, causal=True,
                        sequence_parallel=sp).to(device)
    part = sp.partition(args.seq_len, args.heads, args.heads)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    data = torch.Generator().manual_seed(1)  # the same batches on every rank
    n_scored = args.batch * (args.seq_len - args.seq_len // 2)
    if rank == 0:
        print(f"{args.scheme} sequence-parallel demo: {world} rank(s), {args.layout} layout, N={args.seq_len} "
              f"({args.seq_len // world} tokens per rank), chance loss {math.log(args.vocab):.3f}", flush=True)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        tokens, targets = recall_batch(args.batch, args.seq_len, args.vocab, data)
        local_tokens = part.shard(tokens, rank, dim=1).to(device)
        local_targets = part.shard(targets, rank, dim=1).to(device)
        logits = model(local_tokens)  # (B, N_local, vocab)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), local_targets.flatten(),
                                                 ignore_index=-100, reduction="sum") / n_scored
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)  # each rank holds its tokens' share of the gradient
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0 and (step == 1 or step % 10 == 0 or step == args.steps):
            print(f"step {step:4d}  recall loss {total.item():.3f}  {time.perf_counter() - t0:.1f} s", flush=True)
    if args.check:
        model.eval()
        with torch.no_grad():
            tokens, _ = recall_batch(args.batch, args.seq_len, args.vocab, data)
            local = model(part.shard(tokens, rank, dim=1).to(device))
            full_sp = gather(local, layout=part, dim=1)
            # The same weights without sequence parallelism, on the whole sequence.
            single = Transformer(args.vocab, args.d_model, args.heads, args.layers, causal=True).to(device)
            single.load_state_dict(model.state_dict())
            single.eval()
            want = single(tokens.to(device))
            diff = (full_sp - want).abs().max().item()
            scale = want.abs().max().item()
            # The replicated weights must agree bitwise across ranks.
            flat = torch.cat([p.detach().flatten() for p in model.parameters()])
            spread = flat.clone()
            dist.all_reduce(spread, op=dist.ReduceOp.MAX)
            spread = (spread - flat).abs().max()
            dist.all_reduce(spread, op=dist.ReduceOp.MAX)
        if rank == 0:
            print(f"check: max |logits({args.scheme}, {world} ranks) - logits(one process)| = {diff:.2e} "
                  f"(max |logit| {scale:.1f}); weights differ across ranks by {spread.item():.1e}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
