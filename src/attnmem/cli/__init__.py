"""The ``attnmem`` command line: one module per subcommand, gathered on the ``main`` group.

Each subcommand module defines a plain click command and imports only ``cli.common``; this
module adds them to the group, so no subcommand imports the group (no import circle).
"""

from __future__ import annotations

import click

from .common import CLIGroup
from .compare import compare_cmd
from .decode_bench import decode_bench_cmd
from .estimate import estimate_cmd
from .methods import methods_cmd
from .plan import plan_cmd
from .train import train_cmd


@click.group(cls=CLIGroup)
@click.version_option(package_name="attnmem")
def main() -> None:
    """See, remove and compare the memory bottleneck of softmax attention."""


for command in (methods_cmd, compare_cmd, estimate_cmd, plan_cmd, train_cmd, decode_bench_cmd):
    main.add_command(command)

__all__ = ["main"]
