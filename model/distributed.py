"""Training as a Ray Train job: what every worker runs (``pipeline/trainer.py`` launches it).

The loop is ``model/loop.py``'s, the same one a local run uses; this module gives it a Ray Train session:
``ray.train.torch.prepare_model`` wraps the :class:`model.objective.Objective` in DDP (gloo on CPU, NCCL on
GPU) so the gradient of every trained parameter is all-reduced, checkpoints go through
``ray.train.report`` (rank 0 attaches them; every worker reports, which is a barrier) and come back
through ``ray.train.get_checkpoint`` after a restart. Every worker holds the index of all training rows
(ids, labels, where each image is: paths, or a row of an input shard for inline bytes) and decodes only
the rows of its own batches, a different share each epoch (``DistributedSampler`` semantics).

Images decode in the worker, per item (``model/data.ExportDataset``): one that does not is left out of
its batch (a smaller batch; a batch rejected whole still joins the all-reduce at weight 0, so the step
count stays the same on every worker) and its reject goes, as found, to the worker's
``rank-N.jsonl`` in ``rejects_dir``, once per image_id across epochs and restarts; the driver merges
those files into the step's rejects (:func:`read_rejects`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from common.rejects import Reject
from model.checkpoint import load_state
from model.data import ExportDataset, make_loader
from model.objective import BatchLoss
from model.train import TrainConfig


@dataclass
class JobSpec:
    """Everything a worker needs, picklable: the model to rebuild, its starting weights, the rows."""

    entrypoint: str
    model_args: dict
    init_state: str  # the driver's starting model ({'model': state_dict}, label rows set): the same on every worker
    label_embed_trainable: bool
    source: Any  # model.data.row_tables input: Parquet files or the engine's RowSource
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
    from model.registry import create_model

    model = create_model(spec.entrypoint, **spec.model_args)  # the arguments give the tagset's shapes
    model.load_state_dict(load_state(spec.init_state)["model"])
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


class RaySession:
    """This worker's place in a Ray Train job, in the terms of ``model/loop.py``."""

    def __init__(self, unused_parameters: bool = False):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self._unused = unused_parameters

    def wrap(self, objective: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(objective, move_to_device=False,
                                             parallel_strategy_kwargs={"find_unused_parameters": self._unused})

    def all_reduce(self, values: list[float], device: torch.device, op: str = "sum") -> list[float]:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.tolist()

    def restore(self) -> dict | None:
        import ray.train

        ck = ray.train.get_checkpoint()
        if ck is None:
            return None
        with ck.as_directory() as d:
            return load_state(Path(d) / "state.pth")

    def save(self, state: dict, metrics: dict, final_model: dict | None) -> None:
        import ray.train

        if self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / "state.pth")
            if final_model is not None:
                torch.save(final_model, Path(d) / "model.pth")  # the official layout alone
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def train_loop_per_worker(config: dict) -> dict | None:
    """Ray Train's per-worker function; rank 0 returns ``{"history", "steps", "resumed_at"}`` as
    :func:`model.loop.run` does."""
    import ray.train.torch

    from model.loop import Hooks, run

    spec: JobSpec = config["spec"]
    device = ray.train.torch.get_device()
    cfg = TrainConfig(**spec.train)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)  # as model/loop.train
    model = _build(spec, device)
    session = RaySession(getattr(model.cfg, "caption_branch", False) and cfg.caption_weight == 0)
    rank = session.rank
    ds = ExportDataset(spec.source, spec.num_classes, model.cfg, cache=spec.cache_images,
                       keep=lambda i: i not in spec.exclude and not spec.is_held_out(i),
                       record_opened=bool(spec.record_ids), unknown=True)
    teacher, captions = _extras(spec, model, device)
    batch_loss = BatchLoss(model, cfg, teacher, captions, spec.tag_names)
    log = RejectLog(spec.rejects_dir, rank)
    val_loader = None
    if rank == 0:
        val_set = ExportDataset(spec.source, spec.num_classes, model.cfg, set(spec.eval_ids), cache=spec.cache_images)
        val_loader = make_loader(val_set, cfg.batch_size * 2, device, cfg.num_workers, cfg.prefetch_factor)
    seen: dict[int, set] | None = {} if spec.record_ids else None
    res = run(model, ds, cfg, session, batch_loss, val_loader,
              Hooks(on_reject=log.add, checkpoint_every=spec.checkpoint_every, fault=spec.fault, seen=seen))
    if rank == 0:
        log.add(val_set.rejects.values())
    if spec.record_ids:
        Path(spec.record_ids).mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha1(b"".join(v.detach().cpu().numpy().tobytes() for v in model.state_dict().values()))
        (Path(spec.record_ids) / f"rank-{rank}.json").write_text(json.dumps(
            {"seen": {str(e): sorted(v) for e, v in sorted(seen.items())}, "opened": ds.opened,
             "rows": len(ds), "rejected": sorted(ds.rejects), "steps": res["steps"],
             "weights_sha1": digest.hexdigest()}))
    return res if rank == 0 else None
