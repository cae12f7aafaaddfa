"""The layering holds: arrows point down. ``common`` (what every layer shares: rejects, image opening, row
files) imports no other package of the project; ``tagset`` and ``model`` import nothing of the engine or
the stages; the engine (``pipeline``) imports nothing of tags, models, images or the stages (it finds their
stages and commands through ``pipeline/registry.py``). Every import counts, lazy ones inside functions too.
Models register into one registry, with no import circle among the model modules."""
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


def test_no_import_circle_among_the_model_modules():
    """``model/registry.py`` is the one registry: model modules register into it and none imports another
    to make its entrypoints known (``cnn`` and ``ram`` used to import each other), lazily or not."""
    mods = {f"model.{f.stem}": f for f in (REPO / "model").glob("*.py") if f.stem != "__init__"}
    graph = {m: {i for i in imports_of(f) if i in mods and i != m} for m, f in mods.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, "import circle: " + " -> ".join([*path, m, n])
            if n not in state:
                visit(n, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert "model.entrypoints" in graph["model.cnn"] and "model.cnn" in graph["model.registry"]


def test_the_check_sees_lazy_and_from_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from stages.vision import crop\n    import model.ram\nfrom common import images\n")
    assert {"stages.vision", "model.ram", "common.images"} <= imports_of(f)


def test_one_registered_stage_per_module():
    """A stage module registers one stage (its versions may share it); readers may share a module."""
    from pipeline import registry

    by_module: dict[str, set[str]] = {}
    for name in registry.names():
        cls = registry.get(name)
        family = name.rsplit(".", 1)[0]  # vocab.wordnet.v1 and .v2: one stage, two versions
        by_module.setdefault(cls.__module__, set()).add(family)
    crowded = {m: sorted(f) for m, f in by_module.items() if len(f) > 1 and not m.startswith("stages.readers.")}
    assert not crowded, f"modules that register several stages: {crowded}"
    assert all(m.startswith("stages.") for m in by_module)


def test_stage_modules_are_grouped_by_part():
    """The tree shows the engine's parts: no stage module sits loose in stages/."""
    loose = sorted(p.name for p in (REPO / "stages").glob("*.py") if p.name not in ("__init__.py", "columns.py"))
    assert not loose, f"stage modules outside a part's package: {loose}"
