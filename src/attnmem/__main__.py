"""``python -m attnmem`` runs the command line, every subcommand registered."""

from .cli import main

main()
