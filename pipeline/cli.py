"""Command line: ``python -m pipeline run CONFIG``, ``plan CONFIG``, ``train CONFIG``, ``status RUN_DIR``,
``stages``, and the commands stages register (``scene-world``, ``explain``: ``pipeline/registry.py``).

``main(argv)`` takes a list so tests can run the CLI in-process. Exit codes: 0 ok, 2 bad config or
workflow contract (nothing written) or no such run directory, 1 anything else.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.errors import ConfigError, ContractError


def _cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import load_run_config
    from pipeline.report import print_summary
    from pipeline.contract import check_contract
    from pipeline.workflow import Runner

    from pipeline.store import run_dir_path

    cfg = load_run_config(args.config, args.set)
    check_contract(cfg)
    out = run_dir_path(args.out or cfg.out or Path("runs") / cfg.name, args.config)
    runner = Runner(cfg, out, force=args.force, only=args.only)
    reports = runner.run()
    print_summary(cfg, out, reports)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from pipeline.config import load_run_config
    from pipeline.plan import format_plan, plan_run
    from pipeline.store import run_dir_path
    from pipeline.contract import check_contract

    cfg = load_run_config(args.config, args.set)
    check_contract(cfg)
    out = run_dir_path(args.out or cfg.out or Path("runs") / cfg.name, args.config)
    plan = plan_run(cfg, out)
    if args.sample is not None:
        from pipeline.forecast import format_forecast, sample_forecast

        plan["forecast"] = sample_forecast(cfg, args.sample, plan, sample_epochs=args.sample_epochs)
    text = json.dumps(plan, indent=2) if args.json else format_plan(plan)
    if args.sample is not None and not args.json:
        text += "\n\n" + format_forecast(plan["forecast"])
    print(text)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    """The config's train step(s) alone (a ``ray job submit`` entrypoint): the steps before must be done."""
    from pipeline.config import load_run_config

    cfg = load_run_config(args.config, args.set)
    steps = [s.name for s in cfg.steps if s.use.startswith("train.")]
    if not steps:
        raise ConfigError(args.config, "workflow" if cfg.workflow else "steps", f"{cfg.chain} has no train step")
    args.only = steps
    return _cmd_run(args)


def _cmd_status(args: argparse.Namespace) -> int:
    from pipeline.status import RunDirError, format_status, run_status

    try:
        st = run_status(args.run_dir)
    except RunDirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(st, indent=2) if args.json else format_status(st))
    return 0


def _cmd_stages(args: argparse.Namespace) -> int:
    from pipeline import registry
    from pipeline.stage import Resources

    for name in registry.names():
        cls = registry.get(name)
        print(f"{name}  [{cls.kind}]  reads {list(cls.inputs) or '-'}  writes {list(cls.outputs) or '-'}"
              + (f"  reads if present {list(cls.optional_inputs)}" if cls.optional_inputs else "")
              + (f"  needs {list(cls.needs)}" if cls.needs else "")
              + (f"  provides {list(cls.provides)}" if cls.provides else ""))
        doc = (cls.__doc__ or "").strip().splitlines()
        if doc:
            print(f"    {doc[0]}")
        own = {k: f for k, f in cls.Resources.model_fields.items() if k not in Resources.model_fields}
        for fname, f in [*cls.Config.model_fields.items(), *((f"resources.{k}", f) for k, f in own.items())]:
            default = "required" if f.is_required() else repr(f.default)
            desc = f" — {f.description}" if f.description else ""
            print(f"    {fname}: {default}{desc}")
    return 0


def _run_args(p: argparse.ArgumentParser, force_help: str, set_help: str) -> None:
    """What every command that runs steps of a config takes."""
    p.add_argument("config")
    p.add_argument("--out", help="run directory (default: runs/<config name>)")
    p.add_argument("--force", action="store_true", help=force_help)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pipeline", description="RAM data engine")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a workflow config")
    _run_args(r, "redo steps even when their output is current",
              "override a config value by dotted path, e.g. --set input.images=500")
    r.add_argument("--only", nargs="+", metavar="STEP",
                   help="run only these steps: the steps they read must be done; later ones are left as they were")
    r.set_defaults(fn=_cmd_run)
    p = sub.add_parser("plan", help="what a run of a config would do: each step's run or skip and why, its "
                       "workers, and with --sample N a forecast of time, memory and output")
    p.add_argument("config")
    p.add_argument("--out", help="run directory to plan against (default: runs/<config name>); never written")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value as run does, e.g. --set decide.add_threshold=0.8")
    p.add_argument("--sample", type=int, metavar="N",
                   help="run the chain on the first planned shards holding about N rows, in a scratch directory, "
                   "and forecast each step for the whole input")
    p.add_argument("--sample-epochs", type=int, default=1, metavar="K",
                   help="epochs each training step runs in the sample (default 1; never more than the run's): "
                   "its forecast scales the time of an epoch to the run's epochs; more make the sample's tagger, "
                   "whose candidates later steps work on, closer to the run's")
    p.add_argument("--json", action="store_true", help="print it as JSON (for scripts)")
    p.set_defaults(fn=_cmd_plan)
    t = sub.add_parser("train", help="run only a config's train step (the steps before it must be done)")
    _run_args(t, "retrain even when the step's output is current",
              "override a config value, e.g. --set train.backend=ray_train --set train.workers=8")
    t.set_defaults(fn=_cmd_train)
    st = sub.add_parser("status", help="each step of a run: done / partial / pending, shards, rows, rejects, "
                        "and the last error")
    st.add_argument("run_dir")
    st.add_argument("--json", action="store_true", help="print it as JSON (for scripts)")
    st.set_defaults(fn=_cmd_status)
    s = sub.add_parser("stages", help="list registered stages with their config fields")
    s.set_defaults(fn=_cmd_stages)
    from pipeline.registry import commands

    for name, (help_text, configure) in commands().items():  # stage-specific: scene-world, explain
        configure(sub.add_parser(name, help=help_text))
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, ContractError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
