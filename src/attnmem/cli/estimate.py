"""``attnmem estimate``: the predicted peak memory of one attention call, before anything runs."""

from __future__ import annotations

import json

import click
from rich.table import Table

from ..bench.cases import parse_mask
from ..memory.estimate import DTYPES, HOWS, estimate
from ..memory.measure import MiB
from . import common
from .common import console


@click.command("estimate")
@click.argument("method", callback=common.method, metavar="METHOD[:KEY=VALUE,...]")
@click.option("--seq-len", required=True, type=int, callback=common.seq_len, help="Sequence length N.")
@click.option("--batch", default=1, type=int)
@click.option("--heads", default=8, type=int)
@click.option("--kv-heads", default=None, type=int)
@click.option("--head-dim", default=64, type=int)
@click.option("--dtype", default="float32", type=click.Choice(sorted(DTYPES)))
@click.option("--causal", is_flag=True)
@click.option("--mask", "mask_spec", default="none",
              help="none, causal, window:L[:R], document:LEN, random_blocks:KEEP[:BLOCK].")
@click.option("--forward-only", is_flag=True, help="Inference: forward under no_grad.")
@click.option("--how", default="auto", type=click.Choice(HOWS), help="trace, formula, or auto.")
@click.option("--option", "option_pairs", multiple=True, callback=common.options,
              help="A method option, KEY=VALUE (repeatable; the same as METHOD:KEY=VALUE).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def estimate_cmd(method, seq_len, batch, heads, kv_heads, head_dim, dtype, causal, mask_spec, forward_only,
                 how, option_pairs, as_json) -> None:
    """Predicted peak memory of one attention call (forward + backward), without running it."""
    method, options = method[0], {**method[1], **option_pairs}
    mask_causal, mask = parse_mask(mask_spec, seq_len)
    est = estimate(method, batch=batch, heads=heads, kv_heads=kv_heads, seq_len=seq_len, head_dim=head_dim,
                   dtype=dtype, causal=causal or mask_causal, mask=mask, training=not forward_only, how=how,
                   **options)
    if as_json:
        click.echo(json.dumps(est.as_dict(), indent=2))
        return
    table = Table(title=f"attnmem estimate: {est.method}, B={batch} H={heads} N={seq_len} D={head_dim} {dtype}")
    for col in ("part", "MiB"):
        table.add_column(col, justify="right" if col == "MiB" else "left")
    for part, val in (("inputs (q, k, v)", est.inputs_bytes), ("saved for backward", est.saved_bytes),
                      ("transient", est.transient_bytes), ("peak", est.peak_bytes)):
        table.add_row(part, f"{val / MiB:,.1f}")
    console.print(table)
    console.print(f"source: {est.source}")
