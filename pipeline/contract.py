"""The contract between steps: which columns and artifacts each step may read, checked before anything
runs, and the rows each step reads."""
from __future__ import annotations

from pathlib import Path

from pipeline.config import RunConfig
from pipeline.errors import ContractError
from pipeline.view import View

BASE_COLUMNS = ("image_id",)


def plan_views(steps, root: Path) -> list[View]:
    """The rows each step reads (before it runs), from the declared columns of the steps before it.

    Each later round starts from the rows as they were before round 1 (the parse labels), so round k+1
    re-judges the original labels with new evidence instead of stacking its decisions on round k's."""
    views, view, before_rounds = [], View(str(root)), None
    for prev, step in zip((None, *steps), steps):
        if step.round == 1 and (prev is None or prev.round != 1):
            before_rounds = view
        elif step.round > 1 and prev is not None and prev.round != step.round:
            view = before_rounds
        views.append(view)
        cls = step.stage_cls
        view = view.after(step.name, cls.kind, cls.outputs, cls.replaces_columns)
    return views


def check_contract(cfg: RunConfig) -> None:
    """Fail before running if a step reads a column or artifact that no earlier step writes."""
    columns: set[str] | None = None
    artifacts: set[str] = set()
    before_rounds: set[str] | None = None
    for i, step in enumerate(cfg.steps):
        prev = cfg.steps[i - 1] if i else None
        if step.round == 1 and (prev is None or prev.round != 1):
            before_rounds = set(columns or ())
        elif step.round > 1 and prev is not None and prev.round != step.round:
            columns = set(before_rounds or ())  # as plan_views: a later round reads the rows before round 1
        cls = step.stage_cls
        where = (f"workflow '{cfg.workflow}' ({cfg.file}): step '{step.name}' ({step.use})" if cfg.workflow
                 else f"{cfg.file}: step '{step.name}' (steps.{step.name}: {step.use})")
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
