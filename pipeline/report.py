"""Run statistics: the one-screen summary printed after every run."""
from __future__ import annotations

from pathlib import Path


def workers_used(extra: dict) -> str:
    """``4 on 2 nodes``: the workers that ran a step's shards and the nodes they ran on (its manifest's
    ``workers``); ``Ray Train xN`` for a step that trained as a Ray Train job of N workers (its
    ``ray_train_workers``); ``driver`` for a step with no shard tasks (a whole-data reduce such as local
    training)."""
    w = extra.get("workers")
    if not w or not w.get("nodes"):
        return f"Ray Train x{extra['ray_train_workers']}" if extra.get("ray_train_workers") else "driver"
    n = len(w["nodes"])
    return f"{w['used']} on {n} node{'s' if n != 1 else ''}"


def print_summary(cfg, out: Path, reports) -> None:
    print()
    chain = f"workflow {cfg.workflow}" if cfg.workflow else f"steps of {cfg.file}"
    print(f"run '{cfg.name}' ({chain}, seed {cfg.seed}) -> {out}")
    head = (f"{'step':<10} {'stage':<24} {'status':<8} {'rows in':>9} {'out':>9} {'rejected':>9} {'sec':>8}  "
            f"{'workers':<14}")
    print(head)
    print("-" * len(head))
    for r in reports:
        print(f"{r.step:<10} {r.use:<24} {r.status:<8} {r.rows_in:>9} {r.rows_out:>9} {r.rows_rejected:>9} "
              f"{r.seconds:>8.2f}  {workers_used(r.extra):<14}")
        for k in ("summary",):
            if k in r.extra:
                print(f"{'':<10} {r.extra[k]}")
    print()
