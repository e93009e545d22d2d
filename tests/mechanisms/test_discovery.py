"""A method family is one file: every module under ``attnmem/mechanisms/`` is imported, and
its methods registered, by ``import attnmem`` with no list to edit."""

import sys
from pathlib import Path

import attnmem
from attnmem import mechanisms, registry


def test_every_module_file_is_imported():
    folder = Path(mechanisms.__file__).parent
    files = sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__")
    assert list(mechanisms.FAMILY_MODULES) == files
    for name in files:
        assert f"attnmem.mechanisms.{name}" in sys.modules


# Modules beside the families that register no method: a family's memory model kept apart.
HELPER_MODULES = {"sparse_memory"}


def test_every_registered_method_comes_from_a_family_module():
    modules = {type(registry.get(n)).__module__ for n in registry.names()}
    families = set(mechanisms.FAMILY_MODULES) - HELPER_MODULES
    assert HELPER_MODULES <= set(mechanisms.FAMILY_MODULES)
    assert modules == {f"attnmem.mechanisms.{name}" for name in families}
    assert [m.name for m in attnmem.methods()][:3] == ["adaptive_span", "adaptive_span_fixed", "reference"]
