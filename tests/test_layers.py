"""The house matches its plan: docs/architecture.md's module table gives every module a layer, and every
module imports only modules of lower layers (no stage imports another stage; pure math reaches no I/O)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "diffdistill"


def documented_layers() -> dict[str, int]:
    rows = re.findall(r"^\| (\d+) \| `([\w/]+)\.py` \|", (ROOT / "docs" / "architecture.md").read_text(), re.M)
    return {name.replace("/", "."): int(layer) for layer, name in rows}


def imports(path: Path) -> set[str]:
    """The package modules `path` imports (at any depth of the file: lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diffdistill"):
            names = [f"diffdistill.{a.name}" for a in node.names] if node.module == "diffdistill" else [node.module]
            found |= {n.removeprefix("diffdistill.") for n in names}
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("diffdistill.") for a in node.names if a.name.startswith("diffdistill.")}
    return found


def modules() -> dict[str, Path]:
    return {str(p.relative_to(PACKAGE).with_suffix("")).replace("/", "."): p for p in PACKAGE.rglob("*.py")
            if p.name != "__init__.py"}


def test_every_module_has_a_documented_layer():
    layers, found = documented_layers(), modules()
    assert set(found) == set(layers), (sorted(set(found) - set(layers)), sorted(set(layers) - set(found)))


def test_every_import_points_down():
    layers = documented_layers()
    upward = [(name, dep) for name, path in modules().items() for dep in sorted(imports(path))
              if dep in layers and layers[dep] >= layers[name]]
    assert not upward, f"imports at the same or a higher layer: {upward}"


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from diffdistill.stages.train import train_stage\n")
    assert imports(bad) == {"stages.train"}
