"""One module per method family; importing this package registers them all.

Named `mechanisms` so that `attnmem.methods()` stays the registry listing of DESIGN.md."""

from . import (
    adaptive_span,  # noqa: F401
    exact,  # noqa: F401
    hierarchical,  # noqa: F401
    selective,  # noqa: F401
)
