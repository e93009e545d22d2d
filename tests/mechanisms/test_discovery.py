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


def test_every_registered_method_comes_from_a_family_module():
    modules = {type(registry.get(n)).__module__ for n in registry.names()}
    assert modules == {f"attnmem.mechanisms.{name}" for name in mechanisms.FAMILY_MODULES}
    assert [m.name for m in attnmem.methods()][:3] == ["adaptive_span", "adaptive_span_fixed", "reference"]
