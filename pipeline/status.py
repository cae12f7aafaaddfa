"""``python -m pipeline status RUN_DIR``: where a run stands, read from its files alone.

Nothing here imports a stage or starts Ray, so it answers in a moment on a run that is going on, was
killed, or failed. Each step is

* ``done``: its ``_manifest.json`` is written (the rows and rejects come from it);
* ``partial``: started (its ``_plan.json`` or a shard's stats exist) but not done; the rows and rejects
  are the sums over its committed shards;
* ``pending``: never started.

Shards are ``done of planned``: the stats files carrying the step's fingerprint against the count the
runner wrote in ``_plan.json`` when the step started. The order of the steps is the one in
``_run.json``; a run directory from before that file existed is ordered by how many steps came before
each finished one (its manifest's upstream fingerprints), unfinished ones last.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.progress import LOG_FILE
from pipeline.store import StepDir
from pipeline.workflow import ERROR_FILE, RUN_FILE


class RunDirError(Exception):
    """The path given is no run directory."""


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def _looks_like_step(path: Path) -> bool:
    return path.is_dir() and any((path / n).exists() for n in ("_manifest.json", "_plan.json", "_stats"))


def _sum_shards(stats: list[dict]) -> dict:
    """A partial step's rows and rejects so far: the sums over its committed shards."""
    codes: dict[str, int] = {}
    for st in stats:
        for code, n in st.get("rejects_by_code", {}).items():
            codes[code] = codes.get(code, 0) + n
    out = {k: sum(st[k] for st in stats) for k in ("rows_in", "rows_out", "rows_rejected")}
    return {**out, "rejects_by_code": dict(sorted(codes.items()))}


def step_status(path: Path, use: str | None = None) -> dict:
    sdir = StepDir(path)
    manifest, plan = sdir.manifest(), sdir.plan()
    fingerprint = (manifest or plan or {}).get("fingerprint")
    if fingerprint:  # shards of an older fingerprint will be redone: they do not count
        stats = [st for _, st in sorted(sdir.done_shards(fingerprint).items())]
    else:  # a step directory from before plans were written
        stats = [json.loads(f.read_text()) for f in sorted((path / "_stats").glob("part-*.json"))]
    total = plan["shards"] if plan else (manifest or {}).get("shards")
    out = {"step": path.name, "use": (manifest or {}).get("use", use),
           "shards_done": len(stats) if total is not None or stats else None, "shards_total": total}
    if manifest is not None:
        counts = {k: manifest.get(k) for k in ("rows_in", "rows_out", "rows_rejected")}
        return {**out, "status": "done", **counts, "rejects_by_code": manifest.get("rejects_by_code") or {}}
    if plan is not None or stats:
        return {**out, "status": "partial", **_sum_shards(stats)}
    return {**out, "status": "pending", "shards_done": None, "rows_in": None, "rows_out": None,
            "rows_rejected": None, "rejects_by_code": {}}


def _order_unrecorded(root: Path, names: list[str]) -> list[str]:
    def key(name: str) -> tuple[int, str]:
        m = StepDir(root / name).manifest()
        return (len(m.get("input", {}).get("upstream", {})) if m else 1 << 30, name)

    return sorted(names, key=key)


def run_status(run_dir: str | Path) -> dict:
    root = Path(run_dir).expanduser().resolve()
    if not root.is_dir():
        raise RunDirError(f"{root}: no such run directory")
    record = _read_json(root / RUN_FILE)
    recorded = [(s["name"], s["use"]) for s in (record or {}).get("steps", [])]
    names = {n for n, _ in recorded}
    others = [p.name for p in root.iterdir() if p.name not in names and _looks_like_step(p)]
    steps = [step_status(root / n, use) for n, use in recorded]
    for name in _order_unrecorded(root, others):
        steps.append({**step_status(root / name), "in_run": False} if record else step_status(root / name))
    if not steps:
        raise RunDirError(f"{root}: not a run directory (no {RUN_FILE} and no step directories)")
    log = root / LOG_FILE
    return {"run_dir": str(root), "run": record, "steps": steps, "error": _read_json(root / ERROR_FILE),
            "log": str(log) if log.is_file() else None}


def _cell(v: object) -> str:
    return "-" if v is None else str(v)


def format_status(st: dict) -> str:
    run, lines = st["run"], [f"run {st['run_dir']}"]
    if run:
        chain = f"workflow {run['workflow']}" if run.get("workflow") else "its own steps"
        only = f", only {', '.join(run['only'])}" if run.get("only") else ""
        lines.append(f"config {run['config']} ({chain}{only}), started {run['started_at']}")
    else:
        lines.append(f"no {RUN_FILE} (a run from before it was written): steps ordered from their manifests")
    if st.get("log"):
        lines.append(f"log {st['log']} (each run's steps, progress and errors)")
    head = ["step", "stage", "status", "shards", "rows in", "rows out", "rejected", "rejects by code"]
    rows = []
    for s in st["steps"]:
        shards = "-" if s["shards_total"] is None and s["shards_done"] is None else \
            f"{_cell(s['shards_done'])}/{_cell(s['shards_total'])}"
        codes = ", ".join(f"{k}={v}" for k, v in s["rejects_by_code"].items()) or "-"
        name = s["step"] + (" (not in this run's steps)" if s.get("in_run") is False else "")
        rows.append([name, _cell(s["use"]), s["status"], shards, _cell(s["rows_in"]), _cell(s["rows_out"]),
                     _cell(s["rows_rejected"]), codes])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    right = {3, 4, 5, 6}  # counts line up on the right
    for r in [head, *rows]:
        lines.append("  ".join(c.rjust(w) if i in right else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    err = st["error"]
    if err:
        where = f"step '{err['step']}' ({err['use']})" if err.get("step") else "before any step"
        lines.append(f"last error, {where} at {err['at']}: {err['error'].splitlines()[0] if err['error'] else ''}")
        lines.append(f"  traceback: {Path(st['run_dir']) / ERROR_FILE}")
        if err.get("ray_logs"):
            lines.append(f"  Ray worker logs: {err['ray_logs']}")
    return "\n".join(lines)
