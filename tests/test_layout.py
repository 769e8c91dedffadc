"""The package layout keeps its direction (DESIGN.md "Layout"): imports point down.

Each module has a rank; a module may import modules of its own rank or lower, never higher.
A new upward import (config -> delivery, the codec -> the log, intake -> a door) fails here
with the two module names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mailhost"

# Longest matching prefix wins.
RANKS = {
    "mailhost.config": 0,
    "mailhost.message": 0,
    "mailhost.smtp.wire": 1,
    "mailhost.smtp.transport": 1,
    "mailhost.ops": 1,
    "mailhost.smtp.sasl": 2,
    "mailhost.smtp.client": 2,
    "mailhost.queue": 2,
    "mailhost.local": 2,
    "mailhost.authn": 2,
    "mailhost.feedback": 3,
    "mailhost.multiproc.shard": 3,  # a value the intake and the scheduler are handed
    "mailhost.multiproc.commands": 3,  # the AMP command set: a protocol, like the codec
    "mailhost.intake": 4,
    "mailhost.delivery": 5,
    "mailhost.doors": 6,
    "mailhost.smtp.server": 6,  # a door
    "mailhost.multiproc": 7,
    "mailhost.service": 7,
    "mailhost.cli": 8,
}


def rank(module: str) -> int:
    matches = [prefix for prefix in RANKS if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} has no place in tests/test_layout.py RANKS"
    return RANKS[max(matches, key=len)]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mailhost"):
            for alias in node.names:  # `from mailhost.smtp import sasl` imports mailhost.smtp.sasl
                submodule = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / (submodule.replace(".", "/") + ".py")).exists()
                found.add(submodule if is_module else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("mailhost."))
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if module_name(p) != "mailhost")


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_imports_point_down(path: Path) -> None:
    here = module_name(path)
    upward = sorted(m for m in imports(path) if rank(m) > rank(here))
    assert upward == [], f"{here} (rank {rank(here)}) imports {upward} above it"
