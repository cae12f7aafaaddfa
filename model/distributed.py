"""Training as a Ray Train job: the loop every worker runs (``pipeline/trainer.py`` launches it).

One loop for CPU and GPU. ``ray.train.torch.prepare_model`` wraps the :class:`model.train.Objective` in
DDP (gloo on CPU, NCCL on GPU), so the gradient of every trained parameter is all-reduced; the step is
model/train.py's (:class:`BatchLoss`, accumulation to ``global_batch_size`` over all workers, clipping,
bf16 on CUDA). Each worker reads only its own rows: a hash of image_id picks the worker, so the shards
are disjoint and together are the training split, whatever the input's row order or sharding.

Resumable in the middle of an epoch, exactly: each worker's epoch order is a permutation seeded by
(seed, epoch, rank), each batch's flips and caption draws come from a generator seeded by (seed, rank,
epoch, batch), and a checkpoint (every ``checkpoint_every`` optimizer steps, and at each epoch's end)
holds the model, optimizer, schedule, position and the epoch's loss so far. A job restarted from it
replays and skips nothing, so a worker killed mid-run ends at the same step with the same weights as
an uninterrupted run (two gloo workers' gradient sum is order-free).

DDP needs the same number of steps on every worker: a worker with fewer rows wraps around its own
shard up to the largest shard, rounded up to whole batches; every row is seen each epoch, a few twice.
Rank 0 evaluates on the bounded held-out sample; the published model is ``{'model': state_dict}``.

Images decode in the worker, per item (``model/train.ExportDataset``): one that does not is left out of
its batch (a smaller batch; a batch rejected whole still joins the all-reduce at weight 0, so the step
count stays the same on every worker) and its reject goes, as found, to the worker's
``rank-N.jsonl`` in ``rejects_dir``, once per image_id across epochs and restarts; the driver merges
those files into the step's rejects (:func:`read_rejects`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from model.train import (BatchLoss, ExportDataset, Objective, TrainConfig, accumulation_steps, batches, evaluate,
                         lr_lambda, make_loader, optimizer_step)
from pipeline.errors import Reject


def seed_of(*parts) -> int:
    return int.from_bytes(hashlib.sha1(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def shard_of(image_id: str, workers: int) -> int:
    """The worker that trains on a row (disjoint, covering, independent of sharding and order)."""
    return int(hashlib.sha1(f"worker:{image_id}".encode()).hexdigest()[:8], 16) % workers


def epoch_batches(n_local: int, n_max: int, batch_size: int, seed: int, epoch: int, rank: int) -> list[list[int]]:
    """This worker's batches of one epoch: its rows in a seeded order, wrapped to ``ceil(n_max / bs)`` batches."""
    perm = torch.randperm(n_local, generator=torch.Generator().manual_seed(seed_of(seed, "epoch", epoch, rank)))
    total = math.ceil(n_max / batch_size) * batch_size
    order = [int(perm[i % n_local]) for i in range(total)]
    return [order[i:i + batch_size] for i in range(0, total, batch_size)]


class LocalSchedule:
    """A one-worker job's schedule: exactly model/train.train's, so one Ray Train worker trains the weights
    the local backend trains (tests/test_train_ray.py checks it against the real loop, bit for bit).

    The local loop's DataLoader shuffles with one generator seeded by the seed, drops the last partial
    batch, and the same generator then draws each batch's flips. Draw for draw, per epoch: a 64-bit draw
    (the DataLoader iterator's base seed), the epoch's permutation (RandomSampler), each batch's flips,
    and one more permutation that RandomSampler draws when the batch after the last is asked for (before
    the only batch when the rows are fewer than a batch). This mirrors PyTorch's DataLoader, which the
    test pins. The generator's state at the epoch's start and now go into each checkpoint, so a resumed
    job draws what an uninterrupted one draws."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.bs = n, batch_size
        self.g = torch.Generator().manual_seed(seed)
        self.drop_last = n > batch_size
        self.batches_per_epoch = n // batch_size if self.drop_last else 1
        self.epoch_start = self.g.get_state()

    def epoch(self, restore: tuple | None = None) -> list[list[int]]:
        """The epoch's batches; ``restore``: (state at the epoch's start, state now or None at its start)
        from a checkpoint."""
        if restore is not None:
            self.g.set_state(restore[0])
        self.epoch_start = self.g.get_state()
        torch.empty((), dtype=torch.int64).random_(generator=self.g)
        perm = torch.randperm(self.n, generator=self.g).tolist()
        if self.n < self.bs:
            torch.randperm(self.n, generator=self.g)
        if restore is not None and restore[1] is not None:  # mid-epoch: the flips drawn so far
            self.g.set_state(restore[1])
        if not self.drop_last:
            return [perm]
        return [perm[i * self.bs:(i + 1) * self.bs] for i in range(self.batches_per_epoch)]

    def end_epoch(self) -> None:
        if self.n >= self.bs:
            torch.randperm(self.n, generator=self.g)

    def state(self) -> tuple:
        return self.epoch_start, self.g.get_state()


@dataclass
class JobSpec:
    """Everything a worker needs, picklable: the model to rebuild, its starting weights, the rows."""

    entrypoint: str
    model_args: dict
    init_state: str  # the driver's starting model ({'model': state_dict}, label rows set): the same on every worker
    label_embed_trainable: bool
    source: Any  # model.train.row_tables input: Parquet files or the engine's RowSource
    num_classes: int
    train: dict  # TrainConfig fields
    is_held_out: Callable[[str], bool]  # the held-out split (by hash of image_id): never trained on
    exclude: frozenset[str]  # rows to leave out (the train step passes none: bad images are found as they decode)
    eval_ids: list[str]  # the bounded held-out sample rank 0 evaluates on
    tag_names: list[str]
    checkpoint_every: int = 0  # optimizer steps between checkpoints besides each epoch's end (0: none)
    cache_images: bool = False
    teacher: dict | None = None  # model.teacher.make_teacher arguments (kind, weights, model_name, model_args)
    caption_encoder: dict | None = None  # RAM++ alignment: {"kind", "weights", "projection"}
    record_ids: str | None = None  # a folder: each worker writes its shard's ids, what it trained on, its weights' sha1
    rejects_dir: str | None = None  # a folder (on the job's storage): each worker's rejects, rank-N.jsonl
    fault: dict = field(default_factory=dict)  # tests: {"kill_at_step": k, "marker": path} SIGKILLs rank 0 once


class RejectLog:
    """A worker's rejects, appended as they are found (flushed, so a SIGKILL loses none), each image_id
    once: what an earlier attempt of the same rank wrote is read back first."""

    def __init__(self, folder: str | None, rank: int):
        self.path = Path(folder) / f"rank-{rank}.jsonl" if folder else None
        self.known: set[str] = set()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                self.known = {r.image_id for r in _read_log(self.path)}

    def add(self, rejects) -> None:
        new = [r for r in rejects if r.image_id not in self.known]
        if not new or self.path is None:
            return
        with self.path.open("a", encoding="utf-8") as f:
            for r in new:
                f.write(json.dumps(dataclasses.asdict(r)) + "\n")
                self.known.add(r.image_id)
            f.flush()
            os.fsync(f.fileno())


def _read_log(path: Path) -> list[Reject]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(Reject(**json.loads(line)))
        except json.JSONDecodeError:  # a line cut by a kill mid-write: its reject is found again next epoch
            continue
    return out


def read_rejects(folder: str | Path) -> list[Reject]:
    """Every worker's rejects, once per image_id, in image_id order (the driver's merge)."""
    merged: dict[str, Reject] = {}
    for p in sorted(Path(folder).glob("rank-*.jsonl")):
        for r in _read_log(p):
            merged.setdefault(r.image_id, r)
    return [merged[k] for k in sorted(merged)]


def _build(spec: JobSpec, device: torch.device):
    from model.ram import create_model

    model = create_model(spec.entrypoint, **spec.model_args)  # the arguments give the tagset's shapes
    model.load_state_dict(torch.load(spec.init_state, map_location="cpu", weights_only=True)["model"])
    if hasattr(model, "label_embed"):
        model.label_embed.requires_grad_(spec.label_embed_trainable)
    return model.to(device)


def _extras(spec: JobSpec, model, device: torch.device):
    teacher = captions = None
    if spec.teacher:
        from model.teacher import make_teacher

        teacher = make_teacher(student_cfg=model.cfg, device=str(device), **spec.teacher)
    if spec.caption_encoder:
        from model.finetune import ProjectedEncoder
        from model.text import make_encoder

        c = spec.caption_encoder
        captions = make_encoder(c["kind"], c.get("weights"), str(device))
        if c.get("projection") is not None:
            captions = ProjectedEncoder(captions, c["projection"])
    return teacher, captions


def _all_reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


@dataclass
class Position:
    step: int = 0
    epoch: int = 0
    batch: int = 0
    history: list = field(default_factory=list)
    loss_sum: float = 0.0  # the epoch's loss so far, over all workers (rank 0 carries it)
    loss_n: int = 0
    rng: tuple | None = None  # one worker: LocalSchedule.state() (the generator at the epoch's start, now)


def _restore(model, opt, sched) -> Position:
    import ray.train

    ck = ray.train.get_checkpoint()
    if ck is None:
        return Position()
    with ck.as_directory() as d:
        st = torch.load(Path(d) / "state.pth", map_location="cpu", weights_only=False)
    model.load_state_dict(st["model"])
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["lr_scheduler"])
    return Position(**st["position"])


def _report(rank: int, metrics: dict, model, opt, sched, pos: Position, final: bool) -> None:
    """Every worker reports (it is a barrier); rank 0 attaches the checkpoint."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
                    "position": pos.__dict__}, Path(d) / "state.pth")
        if final:
            torch.save({"model": model.state_dict()}, Path(d) / "model.pth")  # the official layout alone
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def train_loop_per_worker(config: dict) -> dict | None:
    """Ray Train's per-worker function; rank 0 returns ``{"history", "steps"}`` as model/train.train does,
    and ``resumed_at``: the step this attempt started from (None: from scratch)."""
    import ray.train
    import ray.train.torch

    spec: JobSpec = config["spec"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = TrainConfig(**spec.train)
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)  # as model/train.train
    model = _build(spec, device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    ds = ExportDataset(spec.source, spec.num_classes, model.cfg, cache=spec.cache_images,
                       keep=lambda i: shard_of(i, world) == rank and i not in spec.exclude and not spec.is_held_out(i))
    n_max = int(_all_reduce([len(ds)], device, "max")[0])
    if len(ds) == 0:
        raise ValueError(f"Ray Train worker {rank} of {world} got no training rows ({n_max} at most on any "
                         f"worker): use fewer workers")
    objective = Objective(model, cfg)
    unused = getattr(model.cfg, "caption_branch", False) and cfg.caption_weight == 0  # its decoder gets no grad
    wrapped = ray.train.torch.prepare_model(objective, move_to_device=False,
                                            parallel_strategy_kwargs={"find_unused_parameters": unused})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    accum = accumulation_steps(cfg, world)
    local = LocalSchedule(len(ds), cfg.batch_size, cfg.seed) if world == 1 else None
    nb = local.batches_per_epoch if local else math.ceil(n_max / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, cfg.epochs * math.ceil(nb / accum)))
    teacher, captions = _extras(spec, model, device)
    batch_loss = BatchLoss(model, cfg, teacher, captions, spec.tag_names)
    pos = _restore(model, opt, sched)
    resumed_at = pos.step or None  # every checkpoint comes after a step
    val_loader = None
    log = RejectLog(spec.rejects_dir, rank)
    if rank == 0:
        val_set = ExportDataset(spec.source, spec.num_classes, model.cfg, set(spec.eval_ids), cache=spec.cache_images)
        val_loader = make_loader(val_set, cfg.batch_size * 2, device, cfg.num_workers, cfg.prefetch_factor)
        if not pos.history:
            pos.history.append({"epoch": -1, "loss": None, **evaluate(model, val_loader, cfg)})
            log.add(val_set.rejects.values())
    seen: set[str] = set()
    for epoch in range(pos.epoch, cfg.epochs):
        first = pos.batch if epoch == pos.epoch else 0
        carried = [pos.loss_sum, pos.loss_n] if rank == 0 and epoch == pos.epoch else [0.0, 0]
        if local is not None:
            order = local.epoch(pos.rng if epoch == pos.epoch and pos.rng is not None else None)
        else:
            order = epoch_batches(len(ds), n_max, cfg.batch_size, cfg.seed, epoch, rank)
        loader = make_loader(ds, 1, device, cfg.num_workers, cfg.prefetch_factor, batch_sampler=order[first:])
        wrapped.train()
        loss_sum, n, t0 = torch.zeros((), dtype=torch.float64, device=device), 0, time.perf_counter()
        for b, (x, y, idx) in enumerate(batches(loader, log.add), start=first):
            if b % accum == 0:
                opt.zero_grad(set_to_none=True)
                group = min(accum, nb - b)
            last = (b + 1) % accum == 0 or b + 1 == nb
            g = local.g if local is not None else torch.Generator().manual_seed(seed_of(cfg.seed, "batch", rank, epoch, b))
            with contextlib.nullcontext() if last or not hasattr(wrapped, "no_sync") else wrapped.no_sync():
                loss = batch_loss(wrapped, x, y, lambda: [ds.row(int(i)) for i in idx], g, device)
                (loss / group if group > 1 else loss).backward()
            loss_sum += loss.detach().double() * x.shape[0]
            n += x.shape[0]
            if spec.record_ids:
                seen.update(ds.image_id(int(i)) for i in idx)
            if not last:
                continue
            optimizer_step(opt, sched, params, cfg)
            pos.step += 1
            if spec.fault.get("kill_at_step") == pos.step and rank == 0 and not Path(spec.fault["marker"]).exists():
                Path(spec.fault["marker"]).write_text(str(pos.step))
                os.kill(os.getpid(), signal.SIGKILL)
            if spec.checkpoint_every and pos.step % spec.checkpoint_every == 0 and b + 1 < nb:
                total, count = _all_reduce([float(loss_sum) + carried[0], n + carried[1]], device)
                loss_sum, n = torch.zeros_like(loss_sum), 0
                carried = [total, int(count)] if rank == 0 else [0.0, 0]
                pos.epoch, pos.batch, pos.loss_sum, pos.loss_n = epoch, b + 1, carried[0], carried[1]
                pos.rng = local.state() if local is not None else None
                _report(rank, {"step": pos.step, "epoch": epoch}, model, opt, sched, pos, final=False)
        total, count = _all_reduce([float(loss_sum) + carried[0], n + carried[1]], device)
        # wall time of this attempt's batches (bench/train.py's samples/s), and the images they held
        metrics = {"epoch": epoch, "loss": total / max(1, count), "seconds": time.perf_counter() - t0,
                   "images": int(count)}
        if rank == 0:
            metrics.update(evaluate(model, val_loader, cfg))
            log.add(val_set.rejects.values())
            pos.history.append(metrics)
        pos.epoch, pos.batch, pos.loss_sum, pos.loss_n = epoch + 1, 0, 0.0, 0
        if local is not None:  # the next epoch starts from the generator as it is now
            local.end_epoch()
            pos.rng = (local.g.get_state(), None)
        _report(rank, {"step": pos.step, **metrics}, model, opt, sched, pos, final=epoch == cfg.epochs - 1)
    if spec.record_ids:
        Path(spec.record_ids).mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha1(b"".join(v.detach().cpu().numpy().tobytes() for v in model.state_dict().values()))
        (Path(spec.record_ids) / f"rank-{rank}.json").write_text(json.dumps(
            {"shard": sorted(ds.image_id(i) for i in range(len(ds))), "seen": sorted(seen),
             "rejected": sorted(ds.rejects), "steps": pos.step,
             "weights_sha1": digest.hexdigest()}))
    return {"history": pos.history, "steps": pos.step, "resumed_at": resumed_at} if rank == 0 else None
