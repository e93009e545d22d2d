"""One module per method family; importing this package registers them all.

Named `mechanisms` so that `attnmem.methods()` stays the registry listing of DESIGN.md."""

from . import (  # noqa: F401
    adaptive_span,
    exact,
    hierarchical,
    linear,
    lowrank,
    memory,
    selective,
    sparse,
)
