"""Plans and runs a workflow: contract check, fingerprints, skip / resume / force, manifests."""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import __version__
from pipeline.config import RunConfig, Step
from pipeline.errors import ContractError
from pipeline.executor import run_shards, start_ray
from pipeline.stage import RowSource, StageContext
from pipeline.store import StepDir, rejects_table, write_bytes_atomic, write_json_atomic, write_parquet_atomic

BASE_COLUMNS = ("image_id",)


# Code a stage's output depends on besides its own module: the text and vision libraries and data.
SHARED_CODE = ("tagset", "model", "stages/world", "stages/columns.py", "stages/vision.py")


@functools.lru_cache(maxsize=None)
def _shared_code_hash() -> str:
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for rel in SHARED_CODE:
        p = root / rel
        files = sorted(f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts) if p.is_dir() else [p]
        for f in files:
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:8]


def code_version(cls: type) -> str:
    """Package version + a hash of the stage's module and the shared libraries it builds on.

    Editing a stage (or tagset/, model/, the scene world) re-runs what it affects.
    """
    try:
        src = Path(inspect.getsourcefile(cls) or "").read_bytes()
    except (OSError, TypeError):
        src = b""
    return f"{__version__}+{hashlib.sha256(src).hexdigest()[:8]}.{_shared_code_hash()}"


def check_contract(cfg: RunConfig) -> None:
    """Fail before running if a step reads a column or artifact that no earlier step writes."""
    columns: set[str] | None = None
    artifacts: set[str] = set()
    for i, step in enumerate(cfg.steps):
        cls = step.stage_cls
        where = f"workflow '{cfg.workflow}' ({cfg.file}): step '{step.name}' ({step.use})"
        if i == 0 and cls.kind != "source":
            raise ContractError(f"{where} is the first step, so it must be a source stage, not {cls.kind}")
        if i > 0 and cls.kind == "source":
            raise ContractError(f"{where} is a source stage; only the first step may be one")
        if columns is not None:
            missing = [c for c in cls.inputs if c not in columns]
            if missing:
                raise ContractError(f"{where} reads column(s) {missing} that no earlier step writes; "
                                    f"available: {sorted(columns)}")
        lacking = [a for a in cls.needs if a not in artifacts]
        if lacking:
            raise ContractError(f"{where} needs artifact(s) {lacking} that no earlier step provides; "
                                f"available: {sorted(artifacts)}")
        artifacts.update(cls.provides)
        if cls.kind == "source":
            columns = set(cls.outputs) | set(BASE_COLUMNS)
        elif cls.kind == "map":
            assert columns is not None
            columns = (set(BASE_COLUMNS) | set(cls.outputs)) if cls.replaces_columns else columns | set(cls.outputs)


@dataclass
class StepReport:
    step: str
    use: str
    status: str  # ran | resumed | skipped
    rows_in: int = 0
    rows_out: int = 0
    rows_rejected: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


class Runner:
    def __init__(self, cfg: RunConfig, out_dir: Path, force: bool = False, only: list[str] | None = None):
        self.cfg, self.out_dir, self.force = cfg, out_dir, force
        names = [s.name for s in cfg.steps]
        for o in only or []:
            if o not in names:
                raise ContractError(f"--only {o}: no such step in workflow '{cfg.workflow}'; steps: {names}")
        self.only = set(only or names)
        self.fingerprints: dict[str, str] = {}
        self.reports: list[StepReport] = []

    # -- planning ----------------------------------------------------------------------------
    def _fingerprint(self, step: Step, upstream: list[str], extra: str = "") -> str:
        payload = {"code": code_version(step.stage_cls), "use": step.use, "config": step.config_hash(), "seed": self.cfg.seed,
                   "upstream": [self.fingerprints[u] for u in upstream], "input": extra}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]

    def _artifact_map(self, upto: int) -> dict[str, str]:
        out: dict[str, str] = {}
        for s in self.cfg.steps[:upto]:
            for a in s.stage_cls.provides:
                out[a] = str(self.out_dir / s.name)
        return out

    def run(self) -> list[StepReport]:
        check_contract(self.cfg)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        ray_started = False
        try:
            rows_step: str | None = None
            for i, step in enumerate(self.cfg.steps):
                ctx = StageContext(str(self.out_dir), step.name, self.cfg.seed, self._artifact_map(i))
                stage = step.stage_cls(step.config, ctx)
                upstream = ([rows_step] if rows_step else []) + [
                    s.name for s in self.cfg.steps[:i] if set(s.stage_cls.provides) & set(step.stage_cls.needs)]
                extra = stage.input_fingerprint() if hasattr(stage, "input_fingerprint") else ""
                fp = self._fingerprint(step, sorted(set(upstream)), extra)
                self.fingerprints[step.name] = fp
                sdir = StepDir(self.out_dir / step.name)
                if step.name not in self.only:
                    if not sdir.is_done(fp):
                        raise ContractError(f"--only leaves out step '{step.name}', but its output is missing or "
                                            f"stale; run it too")
                    self.reports.append(self._skipped(step, sdir))
                elif sdir.is_done(fp) and not self.force:
                    self.reports.append(self._skipped(step, sdir))
                else:
                    if step.stage_cls.kind != "reduce" and not ray_started and self.cfg.ray.enabled:
                        ray_started = start_ray(self.cfg.ray, self.out_dir)
                    self.reports.append(self._run_step(step, stage, ctx, sdir, fp, rows_step))
                if step.stage_cls.kind != "reduce":
                    rows_step = step.name
        finally:
            if ray_started:
                import ray

                ray.shutdown()
        return self.reports

    def _skipped(self, step: Step, sdir: StepDir) -> StepReport:
        m = sdir.manifest() or {}
        return StepReport(step.name, step.use, "skipped", m.get("rows_in", 0), m.get("rows_out", 0),
                          m.get("rows_rejected", 0), 0.0)

    # -- running -----------------------------------------------------------------------------
    def _run_step(self, step: Step, stage, ctx: StageContext, sdir: StepDir, fp: str,
                  rows_step: str | None) -> StepReport:
        t0 = time.perf_counter()
        if self.force or sdir.manifest() is not None or sdir.has_foreign_shards(fp):
            sdir.reset()  # stale or forced: never mix shards of two fingerprints
        sdir.path.mkdir(parents=True, exist_ok=True)
        in_files = StepDir(self.out_dir / rows_step).data_files() if rows_step else []
        if step.stage_cls.kind == "reduce":
            stats = self._run_reduce(step, stage, sdir, in_files)
            status = "ran"
        else:
            specs = stage.plan() if step.stage_cls.kind == "source" else [{"path": str(f)} for f in in_files]
            done = sdir.done_shards(fp)
            todo = [(i, spec) for i, spec in enumerate(specs) if i not in done]
            new = run_shards(step, ctx, todo, sdir, fp, self.cfg.ray)
            shard_stats = sorted([*done.values(), *new], key=lambda s: s["shard"])
            stats = _sum_stats(shard_stats)
            stats["shards"] = len(shard_stats)
            stats["shards_resumed"] = len(done)
            stats.update(stage.finalize(sdir.path))
            status = "resumed" if done else "ran"
        seconds = round(time.perf_counter() - t0, 3)
        manifest = {
            "step": step.name, "use": step.use, "fingerprint": fp, "code_version": code_version(step.stage_cls),
            "config_hash": step.config_hash(), "config": step.config.model_dump(mode="json"),
            "resources": step.resources.model_dump(mode="json"), "seed": self.cfg.seed,
            "input": {"rows_from": rows_step, "upstream": {k: self.fingerprints[k] for k in self.fingerprints
                                                           if k != step.name}},
            "seconds": seconds, **stats,
        }
        if manifest["rows_in"] != manifest["rows_out"] + manifest["rows_rejected"]:
            raise RuntimeError(f"step {step.name}: rows_in != rows_out + rows_rejected: {stats}")
        write_json_atomic(manifest, sdir.manifest_path)
        extra = {k: v for k, v in stats.items() if k not in ("rows_in", "rows_out", "rows_rejected")}
        return StepReport(step.name, step.use, status, stats["rows_in"], stats["rows_out"],
                          stats["rows_rejected"], seconds, extra)

    def _run_reduce(self, step: Step, stage, sdir: StepDir, in_files: list[Path]) -> dict:
        stage.setup()
        res = stage.run(RowSource(in_files))
        for name, table in res.tables.items():
            write_parquet_atomic(table, sdir.path / f"{name}.parquet")
        for name, data in res.files.items():
            write_bytes_atomic(data, sdir.path / name)
        write_parquet_atomic(rejects_table(res.rejects, step.use), sdir.path / "rejects" / "part-00000.parquet")
        rows = RowSource(in_files).num_rows()
        codes: dict[str, int] = {}
        for r in res.rejects:
            codes[r.code] = codes.get(r.code, 0) + 1
        # A reduce step consumes every row it is given; what it rejects is reported, not subtracted.
        return {"rows_in": rows, "rows_out": rows, "rows_rejected": 0, "rejects_by_code": codes, **res.stats}


def _sum_stats(shards: list[dict]) -> dict:
    codes: dict[str, int] = {}
    for s in shards:
        for k, v in s["rejects_by_code"].items():
            codes[k] = codes.get(k, 0) + v
    return {
        "rows_in": sum(s["rows_in"] for s in shards),
        "rows_out": sum(s["rows_out"] for s in shards),
        "rows_rejected": sum(s["rows_rejected"] for s in shards),
        "rejects_by_code": dict(sorted(codes.items())),
        "shard_seconds": round(sum(s["seconds"] for s in shards), 3),
    }
