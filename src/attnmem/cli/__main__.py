"""``python -m attnmem.cli``: the same command line as ``attnmem``."""

from . import main

main()
