"""The package's layers import one way: each module imports only from layers below its own, and the two
middle groups (calibration, decomposition) never from each other. Read statically, every import counts,
including those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Import name → folder: calib/ and export/ are corda_surgery.calib and corda_surgery.export (linked into it).
FOLDERS = {"corda_surgery": "corda_surgery", "corda_surgery.calib": "calib", "corda_surgery.export": "export"}

# (module prefix, layer, group): the longest matching prefix decides. Same layer, other group: forbidden.
LAYERS = [
    ("corda_surgery.errors", 0, "ground"),
    ("corda_surgery.numerics", 0, "ground"),
    ("corda_surgery.outputs", 0, "ground"),
    ("corda_surgery.paths", 0, "ground"),
    ("corda_surgery.sizes", 0, "ground"),
    ("corda_surgery.compute", 0, "ground"),
    ("corda_surgery.distributed", 0, "ground"),
    ("corda_surgery.memory", 0, "ground"),
    ("corda_surgery.models", 0, "ground"),
    ("corda_surgery.checkpoint", 1, "checkpoint"),
    ("corda_surgery.export.peft_adapter", 1, "checkpoint"),  # the adapter's file format, beside the checkpoint's
    ("corda_surgery.calib", 2, "calibration"),
    ("corda_surgery.decomposition", 2, "decomposition"),
    ("corda_surgery.surgery", 3, "surgery"),
    ("corda_surgery.export", 4, "adapters"),
    ("corda_surgery.cli", 5, "cli"),
    ("corda_surgery.cli_options", 5, "cli"),
    ("corda_surgery.cli_errors", 5, "cli"),
    ("corda_surgery.cli_deploy", 5, "cli"),
    ("corda_surgery.launcher", 5, "cli"),
    ("corda_surgery.__main__", 5, "cli"),
    ("corda_surgery", 0, "ground"),  # the package's own __init__ (its version)
]


def _place(module: str) -> tuple[int, str]:
    matches = [(prefix, layer, group) for prefix, layer, group in LAYERS
               if module == prefix or module.startswith(prefix + ".")]  # fmt: skip
    assert matches, f"{module} is in no layer: add it to LAYERS"
    _, layer, group = max(matches, key=lambda match: len(match[0]))
    return layer, group


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            if (REPO / folder / parts[0]).is_symlink():
                continue  # a linked folder: walked under its own name
            name = ".".join((package, *parts[:-1]) if parts[-1] == "__init__" else (package, *parts))
            found[name] = path
    return found


def _imports(path: Path, module: str) -> set[str]:
    """The project modules ``path`` imports (``from x import y`` counts as x.y where that is a module)."""
    known = _modules()
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}: relative import; the layers are read from absolute ones"
            base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known)
    return {name for name in names if name.split(".")[0] == "corda_surgery"}


MODULES = _modules()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module):
    layer, group = _place(module)
    for imported in sorted(_imports(MODULES[module], module)):
        if imported == "corda_surgery" or imported.startswith(module + "."):
            continue
        other_layer, other_group = _place(imported)
        assert other_layer < layer or other_group == group, (
            f"{module} (layer {layer}, {group}) imports {imported} (layer {other_layer}, {other_group})"
        )


def test_every_module_has_a_layer():
    for module in MODULES:
        _place(module)
