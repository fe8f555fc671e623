"""The package's layout: one folder per stage, and no import circle between them.

Every ``.py`` under ``asdm_export/`` is parsed with ``ast`` (nothing is imported), every import of ours is
resolved (relative or absolute, at module level or inside a function), and the graph between the package's
parts must be acyclic: a part is a sub-package (``export/``, ``check/`` ...) or a top-level module
(``artifacts.py``, ``errors.py`` ...), and a part may only use the ones below it.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import asdm_export

PACKAGE = Path(asdm_export.__file__).resolve().parent
NAME = "asdm_export"


def _module_name(path: Path) -> tuple[str, bool]:
    """The dotted name of a file of the package, and whether it is a package's ``__init__``."""
    parts = (NAME, *path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """The dotted names of ours this module imports (``from X import y`` yields X, and X.y where y may be a
    module: both fall in the same part unless X is the package itself)."""
    names = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{a.name}" for a in node.names if a.name != "*")
    return {n for n in names if n == NAME or n.startswith(NAME + ".")}


def _part(name: str) -> str | None:
    """The part a dotted name belongs to: its first component below the package (None for the package)."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def part_graph() -> dict[str, set[str]]:
    """``{part: parts it imports}`` over every file of the package."""
    parts = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    parts |= {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module, is_package = _module_name(path)
        here = _part(module)
        if here is None:  # asdm_export/__init__.py
            continue
        edges = graph.setdefault(here, set())
        for name in _imported(ast.parse(path.read_text(), str(path)), module, is_package):
            there = _part(name)
            if there in parts and there != here:  # (a name imported from the package itself is no part)
                edges.add(there)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_circle_between_the_parts_of_the_package():
    graph = part_graph()
    assert {"cli", "models", "assembly", "graphs", "export", "build", "runtime", "check", "int8"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import circle between the parts of asdm_export: " + " -> ".join(cycle)


def test_the_import_paths_readme_names_still_work():
    """README's Python API (and the console script's ``asdm_export.cli:main``) survive the move."""
    for path, names in {
        "asdm_export.pipeline": ("AsdmPipeline", "save_png"),
        "asdm_export.export": ("export_bundle",),
        "asdm_export.check": ("check_bundle",),
        "asdm_export.cli": ("main",),
        "asdm_export.backends": ("OrtBackend", "TorchBackend"),
        "asdm_export.denoise": ("denoise",),
        "asdm_export.schedule": ("Schedule",),
        "asdm_export.artifacts": ("read_manifest",),
    }.items():
        module = importlib.import_module(path)
        for name in names:
            assert callable(getattr(module, name)), f"{path}.{name}"


def test_the_data_files_the_code_reads_are_package_data():
    """engine specs, TensorRT's operator table and the calibration prompts live at the top of the repository;
    the code found them at ``parents[2]``, which in a wheel is site-packages: `build --spec ort-cpu`, `lint`'s
    default table and `calibrate`'s default prompts failed outside a checkout. They are reached through links in
    asdm_export/data/, and pyproject's package-data puts what the links hold into the wheel."""
    import pytest

    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")
    from asdm_export.data import CALIBRATION_PROMPTS, ENGINES_DIR

    root = PACKAGE.parent
    assert ENGINES_DIR.resolve() == (root / "engines").resolve()
    assert CALIBRATION_PROMPTS.resolve() == (root / "calibration" / "prompts.txt").resolve()
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {p for pattern in globs["asdm_export.data"] for p in (PACKAGE / "data").glob(pattern)}
    needed = {*ENGINES_DIR.glob("*.yaml"), CALIBRATION_PROMPTS}
    assert len(needed) >= 6 and needed <= shipped, sorted(map(str, needed - shipped))
