"""The one training loop. A Ray Train job runs it on every worker (``model/distributed.py``); a local run
is the same loop as a one-worker job (:class:`LocalSession`). Nothing about the order of rows, the
schedule or the checkpoints depends on which of the two runs it.

Rows: ``DistributedSampler`` semantics. Each epoch has one permutation of all training rows, seeded by
(seed, epoch) and the same on every worker; it is padded by wrapping to a multiple of the world size and
rank r takes positions r, r + world, ... So each epoch the workers' rows are disjoint (up to the padding)
and together cover every training row, and one worker sees every row once. Every worker holds the
same row index (ids, labels, where each image is) and decodes only the rows of its own batches.

Each batch's random draws (flips, caption picks) come from a generator seeded by (seed, rank, epoch,
batch), so a job restarted from a checkpoint draws what an uninterrupted one draws: the checkpoint (every
``checkpoint_every`` optimizer steps and at each epoch's end) holds the model, optimizer, schedule and
position, and nothing else random. The gradient all-reduce (DDP) makes N workers one optimizer.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from model.checkpoint import load_state
from model.data import batches, make_loader
from model.metrics import evaluate
from model.objective import BatchLoss, Objective
from model.train import TrainConfig, accumulation_steps, lr_lambda, model_device, optimizer_step


def seed_of(*parts) -> int:
    return int.from_bytes(hashlib.sha1(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def epoch_rows(n: int, world: int, rank: int, seed: int, epoch: int) -> list[int]:
    """Rank ``rank``'s rows of one epoch: positions rank, rank + world, ... of the epoch's permutation
    of ``n`` rows, padded by wrapping to a multiple of ``world`` (every rank gets ``ceil(n / world)``)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed_of(seed, "epoch", epoch))).tolist()
    total = math.ceil(n / world) * world
    order = [perm[i % n] for i in range(total)]
    return order[rank:total:world]


def epoch_batches(n: int, world: int, rank: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """This rank's batches of one epoch (the last one may be smaller; it is the same size on every rank)."""
    rows = epoch_rows(n, world, rank, seed, epoch)
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


def batches_per_epoch(n: int, world: int, batch_size: int) -> int:
    return math.ceil(math.ceil(n / world) / batch_size)


@dataclass
class Position:
    """Where a job is: what a checkpoint needs besides the weights and the optimizer."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    history: list = field(default_factory=list)
    loss_sum: float = 0.0  # the epoch's loss so far, over all workers (rank 0 carries it)
    loss_n: int = 0


class LocalSession:
    """One worker in this process: no process group, checkpoints in ``out_dir/last.pth``."""

    rank, world = 0, 1

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def wrap(self, objective: torch.nn.Module) -> torch.nn.Module:
        return objective

    def all_reduce(self, values: list[float], device: torch.device, op: str = "sum") -> list[float]:
        return [float(v) for v in values]

    def restore(self) -> dict | None:
        last = self.out_dir / "last.pth"
        return load_state(last) if last.exists() else None

    def save(self, state: dict, metrics: dict, final_model: dict | None) -> None:
        from common.files import temp_path

        tmp = temp_path(self.out_dir / "last.pth")
        torch.save(state, tmp)
        tmp.replace(self.out_dir / "last.pth")


@dataclass
class Hooks:
    """What a caller adds to the loop: where rejects go, a log, and the test hooks."""

    on_reject: Callable | None = None
    log: Callable[[str], None] = lambda m: None
    checkpoint_every: int = 0  # optimizer steps between checkpoints besides each epoch's end (0: none)
    fault: dict = field(default_factory=dict)  # tests: {"kill_at_step": k, "marker": path} SIGKILLs rank 0 once
    seen: dict | None = None  # when a dict: epoch -> the image_ids this worker trained on in it


def _state(model, opt, sched, pos: Position) -> dict:
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
            "position": dict(pos.__dict__)}


def _checkpoint(session, model, opt, sched, pos: Position, metrics: dict, final: bool) -> None:
    session.save(_state(model, opt, sched, pos), metrics, {"model": model.state_dict()} if final else None)


def run(model, ds, cfg: TrainConfig, session, batch_loss, val_loader=None, hooks: Hooks | None = None) -> dict:
    """Train ``model`` on dataset ``ds`` (every training row, on every worker) for ``cfg.epochs``; rank 0
    evaluates on ``val_loader`` after each epoch. Returns ``{"history", "steps", "resumed_at"}`` (the step
    this attempt started from, None from scratch)."""
    hooks = hooks or Hooks()
    rank, world = session.rank, session.world
    device = model_device(model)
    if len(ds) == 0:
        raise ValueError("no training rows")
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    wrapped = session.wrap(Objective(model, cfg))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    accum = accumulation_steps(cfg, world)
    nb = batches_per_epoch(len(ds), world, cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, cfg.epochs * math.ceil(nb / accum)))
    pos, st = Position(), session.restore()
    if st is not None:
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["lr_scheduler"])
        pos = Position(**st["position"])
        hooks.log(f"resumed at step {pos.step} (epoch {pos.epoch}, batch {pos.batch})")
    resumed_at = pos.step or None
    if rank == 0 and not pos.history and val_loader is not None:
        pos.history.append({"epoch": -1, "loss": None, **evaluate(model, val_loader, cfg)})
    for epoch in range(pos.epoch, cfg.epochs):
        first = pos.batch if epoch == pos.epoch else 0
        carried = [pos.loss_sum, pos.loss_n] if rank == 0 and epoch == pos.epoch else [0.0, 0]
        order = epoch_batches(len(ds), world, rank, cfg.batch_size, cfg.seed, epoch)
        loader = make_loader(ds, 1, device, cfg.num_workers, cfg.prefetch_factor, batch_sampler=order[first:])
        wrapped.train()
        loss_sum, n, t0 = torch.zeros((), dtype=torch.float64, device=device), 0, time.perf_counter()
        for b, (x, y, idx) in enumerate(batches(loader, hooks.on_reject), start=first):
            if b % accum == 0:
                opt.zero_grad(set_to_none=True)
                group = min(accum, nb - b)  # batches in this optimizer step (fewer at an epoch's end)
            last = (b + 1) % accum == 0 or b + 1 == nb
            g = torch.Generator().manual_seed(seed_of(cfg.seed, "batch", rank, epoch, b))
            sync = contextlib.nullcontext() if last or not hasattr(wrapped, "no_sync") else wrapped.no_sync()
            with sync:
                loss = batch_loss(wrapped, x, y, lambda: [ds.row(int(i)) for i in idx], g, device)
                (loss / group if group > 1 else loss).backward()
            loss_sum += loss.detach().double() * x.shape[0]  # float64, as a Python float would sum it
            n += x.shape[0]
            if hooks.seen is not None:
                hooks.seen.setdefault(epoch, set()).update(ds.image_id(int(i)) for i in idx)
            if not last:
                continue
            optimizer_step(opt, sched, params, cfg)
            pos.step += 1
            kill = hooks.fault.get("kill_at_step")
            if kill == pos.step and rank == 0 and not Path(hooks.fault["marker"]).exists():
                Path(hooks.fault["marker"]).write_text(str(pos.step))
                os.kill(os.getpid(), signal.SIGKILL)
            if hooks.checkpoint_every and pos.step % hooks.checkpoint_every == 0 and b + 1 < nb:
                total, count = session.all_reduce([float(loss_sum) + carried[0], n + carried[1]], device)
                loss_sum, n = torch.zeros_like(loss_sum), 0
                carried = [total, int(count)] if rank == 0 else [0.0, 0]
                pos.epoch, pos.batch, pos.loss_sum, pos.loss_n = epoch, b + 1, carried[0], carried[1]
                _checkpoint(session, model, opt, sched, pos, {"step": pos.step, "epoch": epoch}, final=False)
        total, count = session.all_reduce([float(loss_sum) + carried[0], n + carried[1]], device)
        # wall time of this attempt's batches (bench/train.py's samples/s), and the images they held
        metrics = {"epoch": epoch, "loss": total / max(1, count), "seconds": time.perf_counter() - t0,
                   "images": int(count)}
        if rank == 0 and val_loader is not None:
            metrics.update(evaluate(model, val_loader, cfg))
        if rank == 0:
            pos.history.append(metrics)
        pos.epoch, pos.batch, pos.loss_sum, pos.loss_n = epoch + 1, 0, 0.0, 0
        _checkpoint(session, model, opt, sched, pos, {"step": pos.step, **metrics}, final=epoch == cfg.epochs - 1)
        if rank == 0:
            hooks.log(json.dumps(metrics))
    return {"history": pos.history, "steps": pos.step, "resumed_at": resumed_at}


def train(model: torch.nn.Module, train_set, val_set, cfg: TrainConfig, out_dir: Path, teacher=None, caption_encoder=None,
          log=print, tag_names: list[str] | None = None, caption_tokenizer=None) -> dict:
    """Train in this process: the one loop (``model/loop.py``) as a one-worker job, checkpointing each
    epoch into ``out_dir/last.pth`` and resuming from it.

    ``teacher``: callable images -> pooled embedding (distillation); ``caption_encoder``: a text
    encoder whose width is the model's label_dim (RAM++ alignment); ``tag_names`` and
    ``caption_tokenizer`` (default: :class:`model.caption.CaptionTokenizer`) for RAM's caption branch.
    A row whose image does not decode is left out of its batch and ends in ``train_set.rejects`` (or
    ``val_set.rejects``): every training row is in every epoch, so each is trained on or rejected.
    """
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    device = model_device(model)
    val_loader = make_loader(val_set, cfg.batch_size * 2, device, cfg.num_workers, cfg.prefetch_factor)
    batch_loss = BatchLoss(model, cfg, teacher, caption_encoder, tag_names, caption_tokenizer)
    res = run(model, train_set, cfg, LocalSession(out_dir), batch_loss, val_loader, Hooks(log=log))
    torch.save({"model": model.state_dict()}, Path(out_dir) / "model.pth")  # the official layout alone
    return res
