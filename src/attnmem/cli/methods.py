"""``attnmem methods``: the registry, one short block per method (readable at 80 columns)."""

from __future__ import annotations

import json
import shutil
import textwrap

import click

from .. import registry

YES = {True: "✓", False: "·"}
NAME_W, FAMILY_W = 20, 14  # the longest registered name and family fit, with a space


def method_block(m: registry.MethodInfo, width: int) -> list[str]:
    """One method as lines of at most ``width`` columns: capabilities, then memory and options
    wrapped under their labels."""
    s = m.supports
    caps = (f"exact {YES[m.exact]}  causal {YES[s.causal]}  mask {YES[s.mask]}  "
            f"backward {YES[s.backward]}  gqa {YES[s.gqa]}")
    lines = [f"{m.name:<{NAME_W}}{m.family:<{FAMILY_W}}{caps}".rstrip()]
    if len(lines[0]) > width:
        lines = [m.name, f"  {m.family}", f"  {caps}"]
    lines.append(f"  {'modifies':<9}score_mod {YES[s.score_mod]}  sinks {YES[s.sinks]}  dropout {YES[s.dropout]}  "
                 f"return_lse {YES[s.return_lse]}")
    for label, text in (("memory", m.memory), ("options", ", ".join(m.options) or "none"),
                        ("state", "learned parameters or state: attnmem.nn only" if m.stateful else "")):
        if text:
            lines += textwrap.wrap(text, width=max(width, 40), initial_indent=f"  {label:<9}",
                                   subsequent_indent=" " * 11, break_on_hyphens=False)
    return lines


@click.command("methods")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def methods_cmd(as_json: bool) -> None:
    """List every registered attention method with its family and memory cost."""
    infos = registry.methods()
    if as_json:
        click.echo(json.dumps([{
            "name": m.name, "family": m.family, "exact": m.exact, "memory": m.memory,
            "summary": m.summary, "options": list(m.options), "stateful": m.stateful,
            "supports": {"causal": m.supports.causal, "mask": m.supports.mask,
                         "backward": m.supports.backward, "gqa": m.supports.gqa,
                         "devices": list(m.supports.devices), "score_mod": m.supports.score_mod,
                         "sinks": m.supports.sinks, "dropout": m.supports.dropout,
                         "return_lse": m.supports.return_lse},
        } for m in infos], indent=2))
        return
    width = min(shutil.get_terminal_size((80, 24)).columns, 100)
    click.echo(f"attnmem methods: {len(infos)} registered (✓ yes, · no)")
    for m in infos:
        click.echo("")
        click.echo("\n".join(method_block(m, width)))
