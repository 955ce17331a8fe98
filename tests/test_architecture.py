"""Imports point one way: flows → tasks → engines → schemas, and inside tasks/ and engines/ from folder to folder.

A cycle between concerns is how a layout stops meaning anything, so the layering in ARCHITECTURE.md is checked
here on every import in the product code, including the lazy ones inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "engines", "tasks", "flows")

LAYERS: list[set[str]] = [
    {"schemas"},
    {"engines.base"},
    {"engines.scoring"},
    {"engines.remote"},
    {"engines.local"},
    {"engines.extract"},
    {"engines"},  # engines/__init__.py: the builders that pick a back end
    {"tasks.store"},
    {"tasks.ingest"},
    {"tasks.route"},
    {"tasks.account", "tasks.learn"},  # side by side: neither imports the other
    {"tasks.model"},
    {"tasks.answer"},
    {"tasks.shard", "tasks"},  # the shard task; tasks/__init__.py imports nothing
    {"flows"},
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def _unit(dotted: str) -> str:
    """The layer unit of a module: a sub-folder of tasks/ or engines/, a top-level module there, or a package."""
    parts = dotted.split(".")
    if parts[0] in ("tasks", "engines") and len(parts) > 1:
        folder = ROOT / parts[0] / parts[1]
        if folder.is_dir():
            return f"{parts[0]}.{parts[1]}"
        return parts[0] if parts[1] == "__init__" else f"{parts[0]}.{parts[1]}"
    return parts[0]


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("docroute."):
            module = node.module.removeprefix("docroute.")
            if module in ("tasks", "engines"):  # `from docroute.engines import build_small_engine, base`
                found.update(f"{module}.{alias.name}" for alias in node.names)
            else:
                found.add(module)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("docroute.") for a in node.names if a.name.startswith("docroute."))
    return found


def test_every_product_module_sits_in_a_known_layer() -> None:
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            unit = _unit(".".join(path.relative_to(ROOT).with_suffix("").parts))
            assert unit in RANK, f"{path.relative_to(ROOT)} is in no layer of ARCHITECTURE.md ({unit})"


def test_imports_point_down_only() -> None:
    upward = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            source = _unit(".".join(path.relative_to(ROOT).with_suffix("").parts))
            for module in _imports(path):
                target = _unit(module)
                if target == source or target not in RANK:
                    continue
                if RANK[target] >= RANK[source]:
                    upward.append(f"{path.relative_to(ROOT)} ({source}) imports {module} ({target})")
    assert not upward, "imports that point up or sideways:\n" + "\n".join(sorted(upward))
