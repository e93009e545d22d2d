"""One module per method family; importing this package registers them all.

Named `mechanisms` so that `attnmem.methods()` stays the registry listing of DESIGN.md."""

from . import exact  # noqa: F401
from . import selective  # noqa: F401
from . import adaptive_span  # noqa: F401
from . import hierarchical  # noqa: F401
