"""The layering holds: arrows point down. ``common`` (what every layer shares: rejects, image opening, row
files) imports no other package of the project; ``tagset`` and ``model`` import nothing of the engine or
the stages; the engine (``pipeline``) imports nothing of tags, models, images or the stages (it finds their
stages and commands through ``pipeline/registry.py``). Every import counts, lazy ones inside functions too."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("common", "tagset", "model", "pipeline", "stages")
FORBIDDEN = {
    "common": ("tagset", "model", "pipeline", "stages"),
    "tagset": ("model", "pipeline", "stages"),
    "model": ("pipeline", "stages"),
    "pipeline": ("tagset", "model", "stages", "common.images"),
    "stages": (),
}


def imports_of(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)  # `from common import images`
    return out


def test_no_module_imports_a_layer_above_its_own():
    broken = []
    for pkg in PACKAGES:
        files = sorted((REPO / pkg).rglob("*.py"))
        assert files, f"package {pkg} has no modules"
        for f in files:
            for name in sorted(imports_of(f)):
                for bad in FORBIDDEN[pkg]:
                    if name == bad or name.startswith(bad + "."):
                        broken.append(f"{f.relative_to(REPO)} imports {name}")
    assert not broken, "imports that point up:\n" + "\n".join(broken)


def test_the_check_sees_lazy_and_from_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from stages.vision import crop\n    import model.ram\nfrom common import images\n")
    assert {"stages.vision", "model.ram", "common.images"} <= imports_of(f)
