"""The package's import graph: no cycles, and no module importing from a layer above it.

Every import counts, including those inside functions (a late import hides a cycle, it does not remove it).
"""

import ast
from pathlib import Path

from helpers import REPO

PACKAGE = REPO / "mmcs_monai"

# layers, bottom up: a module may import its own layer and those below, never one above
LAYERS = [
    {
        "io",
        "allocator",
        "distributed",
        "diameters",
        "flows",
        "masks",
        "pipeline",
        "metrics",
        "losses",
        "cells",
        "size_estimate",
        "networks.padding",
        "networks.torchscript",
        "reporting",
        "options",
        "outlines",
        "ome",
        "exports",
    },
    {
        "networks.cpnet",
        "networks.model_files",
        "networks.compiled",
        "networks.quantized",
        "networks",
        "precision",
        "data",
        "transforms",
        "transforms.array",
        "transforms.dictionary",
    },
    {
        "inference",
        "segmentation",
        "engines",
        "engines.utils",
        "engines.schedules",
        "engines.checkpointing",
        "engines.training",
        "engines.reports",
        "engines.semi",
    },
    {"evaluation", "wholeslide", "workflows", "export", "calibration"},
    {"cli"},
]
APPS = ("label", "deploy", "napari")  # applications on top of the library: they may import anything but the CLI


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """mmcs_monai modules imported anywhere in ``path`` (names relative to the package)."""
    tree = ast.parse(path.read_text())
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                names = ["mmcs_monai." + base.strip(".")]
            else:
                names = [node.module or ""]
            names += [f"{names[0]}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("mmcs_monai."):
                found.add(name[len("mmcs_monai.") :])
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        edges[name] = {m for m in imports_of(path) if m in modules and m != name}
    return edges


def layer_of(name: str) -> int | None:
    for level, members in enumerate(LAYERS):
        if name in members:
            return level
    return None


def test_no_import_cycles():
    edges = graph()
    # the package namespaces (__init__) re-export their modules; they are not part of the graph's cycles
    edges = {k: {m for m in v if not _is_namespace(m, edges)} for k, v in edges.items() if not _is_namespace(k, edges)}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import cycles: {cycles}"


def _is_namespace(name: str, edges) -> bool:
    return any(other.startswith(name + ".") for other in edges) and name != ""


def test_no_module_imports_a_layer_above_it():
    problems = []
    for name, targets in graph().items():
        if name.split(".")[0] in APPS:
            problems += [f"{name} -> {t}" for t in targets if t == "cli"]
            continue
        level = layer_of(name)
        assert level is not None or name in ("", "networks", "transforms", "engines"), f"{name}: add it to a layer in LAYERS"
        for target in targets:
            if target.split(".")[0] in APPS:
                problems.append(f"{name} -> {target} (an application)")
            elif level is not None and (layer_of(target) or 0) > level:
                problems.append(f"{name} -> {target}")
    assert not problems, "imports from a layer above: " + "; ".join(sorted(problems))
