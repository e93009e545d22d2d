"""One module per method family; importing this package registers them all.

Every module in this folder is imported here (in name order, which is the registry's listing
order), so a new method family is one new file: nothing else lists it.

Named `mechanisms` so that `attnmem.methods()` stays the registry listing of DESIGN.md."""

import importlib
import pkgutil

FAMILY_MODULES: tuple[str, ...] = tuple(
    info.name for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name)
)

for _name in FAMILY_MODULES:
    importlib.import_module(f"{__name__}.{_name}")
