"""The layers of docs/architecture.md, checked on the source: every import statement of every module
under valfree/ (module level or inside a function) is parsed with ``ast`` and must point down."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "valfree"

# Lowest first. A module may import its own layer, the base modules and the layers listed before its own.
ORDER = ("probes", "tpv", "selection", "pruning", "io", "integrations", "commands", "cli")
# Leaf modules every layer may use: the error type, the demo's plain nn.Module factories, and the one
# reading of data items and batches (inputs, labels, collating, calling the model).
BASE = {"errors", "models", "batches"}
# io reads and writes only: it sits beside the maths, not on top of it.
IO_MAY_NOT_IMPORT = {"probes", "tpv", "selection", "pruning", "integrations", "commands", "cli"}
# (module, imported module) pairs that break a rule on purpose, each with the reason it stays for now.
EXCEPTIONS: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every valfree module ``path`` imports, relative imports resolved; ``from P import m`` yields
    P.m when m is a submodule of package P, else P."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "valfree"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "valfree":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                is_module = (ROOT.parent / Path(*sub.split("."))).with_suffix(".py").exists() or \
                    (ROOT.parent / Path(*sub.split(".")) / "__init__.py").exists()
                found.add(sub if is_module else base)
    return found


def layer_of(module: str) -> str | None:
    """The layer of a valfree module: a folder of ORDER, 'cli', 'base', or None for the facades (the
    package root, ``valfree.lightning``, ``valfree.huggingface``, ``__main__``) that sit on top."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    if parts[1] in BASE:
        return "base"
    if parts[1] in ORDER:
        return parts[1]
    return None


def all_imports():
    for path in sorted(ROOT.rglob("*.py")):
        module = module_name(path)
        for target in sorted(imported_modules(path)):
            yield module, target


def test_the_parser_sees_the_imports_it_must_judge():
    imports = set(all_imports())
    assert ("valfree.commands.score", "valfree.io.results") in imports
    assert ("valfree.selection.select", "valfree.selection.smoothing") in imports
    assert ("valfree.cli", "valfree.commands.score") in imports


def test_io_reads_and_writes_only():
    wrong = [(m, t) for m, t in all_imports()
             if layer_of(m) == "io" and layer_of(t) in IO_MAY_NOT_IMPORT and (m, t) not in EXCEPTIONS]
    assert not wrong, "io imports a layer it must not: " + ", ".join(f"{m} -> {t}" for m, t in wrong)


def test_no_import_runs_up_the_layers():
    wrong = []
    for module, target in all_imports():
        here, there = layer_of(module), layer_of(target)
        if here in (None, "base") and there not in (None, "base"):
            if here == "base":
                wrong.append((module, target))  # a base module must stay a leaf
            continue
        if here in (None, "base") or there in ("base",) or (module, target) in EXCEPTIONS:
            continue
        if there is None:
            # Only the CLI reaches the package root, for the version string.
            if not (here == "cli" and target == "valfree"):
                wrong.append((module, target))
        elif ORDER.index(there) > ORDER.index(here):
            wrong.append((module, target))
    assert not wrong, "imports running up the layers: " + ", ".join(f"{m} -> {t}" for m, t in wrong)


def test_every_exception_is_still_needed():
    imports = set(all_imports())
    stale = [pair for pair in EXCEPTIONS if pair not in imports]
    assert not stale, f"{stale} no longer import; drop them from EXCEPTIONS"


def test_io_reads_data_through_the_shared_leaf():
    assert ("valfree.io.data", "valfree.batches") in set(all_imports())
