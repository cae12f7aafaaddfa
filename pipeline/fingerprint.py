"""A stage's code identity: its module and every project module it imports, transitively.

A step re-runs when code it runs changes, and only then: parse does not re-run over 14M captions
because a docstring in model/bert.py changed, but editing a helper in tagset/ that parse imports
re-runs parse. Modules are hashed as their syntax tree without docstrings, so comments, docstrings
and formatting never re-run anything. Imports are found in the whole module (also inside functions,
where heavy imports are deferred). A package's ``data/`` folder (checked-in word lists, overrides)
counts as code of every module of that package that is imported.
"""
from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "stages", "tagset", "model")  # the project's own code; the rest is versioned deps


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The file of a project module (``tagset.vocab`` -> tagset/vocab.py), or None if it is not ours."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _parse(path: Path, root: Path) -> tuple[str, tuple[str, ...]]:
    st = path.stat()
    return _parse_cached(path, root, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=None)
def _parse_cached(path: Path, root: Path, mtime_ns: int, size: int) -> tuple[str, tuple[str, ...]]:
    """(hash of the module without docstrings, project modules it imports)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(path, root)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    imports: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                body[0] = ast.Pass()  # a docstring is not code
        if isinstance(node, ast.Import):
            imports.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            imports.add(base)
            imports.update(f"{base}.{a.name}" for a in node.names)  # `from model import cnn` is a module
    digest = hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).hexdigest()
    found = []
    for name in sorted(imports):
        # `import a.b.c` also runs a/__init__.py and a/b/__init__.py
        parts = name.split(".")
        found += [".".join(parts[:k]) for k in range(1, len(parts) + 1)]
    own = here.split(".")[:-1] if path.name != "__init__.py" else here.split(".")[:-1]
    found += [".".join(own[:k]) for k in range(1, len(own) + 1)]  # the packages this module lives in
    return digest, tuple(sorted({n for n in found if module_file(n, root) is not None}))


def import_closure(path: Path, root: Path = ROOT) -> list[Path]:
    """Every project module ``path`` runs when imported and used, itself first, then sorted."""
    seen: dict[Path, None] = {}
    todo = [path.resolve()]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen[p] = None
        for name in _parse(p, root)[1]:
            f = module_file(name, root)
            if f is not None and f not in seen:
                todo.append(f)
    first, rest = path.resolve(), sorted(set(seen) - {path.resolve()})
    return [first, *rest]


def code_hash(path: Path, root: Path = ROOT) -> str:
    """Hash of a module's import closure (docstrings and comments excluded) and its packages' data."""
    root = root.resolve()
    h = hashlib.sha256()
    data_dirs: set[Path] = set()
    for f in import_closure(path, root):
        h.update(str(f.relative_to(root)).encode())
        h.update(_parse(f, root)[0].encode())
        d = f.parent / "data"
        if d.is_dir():
            data_dirs.add(d)
    for d in sorted(data_dirs):
        for f in sorted(x for x in d.rglob("*") if x.is_file() and "__pycache__" not in x.parts):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def code_files(path: Path, root: Path = ROOT) -> dict[str, str]:
    """What ``code_hash`` hashes, file by file (relative path -> digest of its syntax tree, or of the bytes of
    a ``data/`` file): a step's manifest keeps it, so ``plan`` can name the file whose edit re-runs the step."""
    root = root.resolve()
    out: dict[str, str] = {}
    data_dirs: set[Path] = set()
    for f in import_closure(path, root):
        out[str(f.relative_to(root))] = _parse(f, root)[0][:16]
        if (f.parent / "data").is_dir():
            data_dirs.add(f.parent / "data")
    for d in sorted(data_dirs):
        for f in sorted(x for x in d.rglob("*") if x.is_file() and "__pycache__" not in x.parts):
            out[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()[:16]
    return out
