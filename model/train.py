"""Training RAM / RAM++ from the engine's export Parquet.

Losses: ASL on the tagging logits (γ−=7, γ+=0, clip 0.05, summed, as RAM); optional L1 distillation of
the pooled image embedding towards a teacher's (CLIP image features in RAM); for RAM++ an image–text
alignment term (ASL γ−=4 over image·caption similarities, the matching caption as the positive).
AdamW, linear warm-up then cosine decay, bf16 autocast on CUDA. Checkpoints keep the official layout
(``{'model': state_dict}`` plus optimizer, scheduler and step) so official tools load ours, and a run
resumes from its last checkpoint. When the model has RAM's caption branch, the image-tag-text
generation loss is added (``caption_weight``): each step picks one caption per image (seeded) and that
caption's own parse tags, as the official data loader does, with the prompt masking done right
(``model/caption.py`` says how).
"""
from __future__ import annotations

import bisect
import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from common.images import IMAGE_COLUMNS, ImageLimits, open_image
from common.rejects import Reject
from common.rows import ParquetRows
from model.preprocess import to_tensor
from model.ram import RAM


def asl_loss(logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float = 7.0, gamma_pos: float = 0.0,
             clip: float = 0.05, eps: float = 1e-8) -> torch.Tensor:
    """Asymmetric loss (Ridnik et al.), summed over classes and batch."""
    p = torch.sigmoid(logits.float())
    p_neg = (1 - p + clip).clamp(max=1) if clip > 0 else 1 - p
    loss = targets * torch.log(p.clamp(min=eps)) + (1 - targets) * torch.log(p_neg.clamp(min=eps))
    pt = p * targets + p_neg * (1 - targets)
    gamma = gamma_pos * targets + gamma_neg * (1 - targets)
    return -(loss * torch.pow(1 - pt, gamma)).sum()


def average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-class AP (classes without positives get NaN)."""
    aps = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        y = targets[:, c]
        if y.sum() == 0:
            continue
        order = np.argsort(-scores[:, c], kind="stable")
        hits = y[order]
        prec = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        aps[c] = float((prec * hits).sum() / hits.sum())
    return aps


ROW_IMAGE_COLUMNS = ("image_id", *IMAGE_COLUMNS)  # a row's id and where its image is
ROW_COLUMNS = ROW_IMAGE_COLUMNS + ("caption", "captions", "union_label_id", "parse_label_id")
# what the caption terms read of a batch that was rejected whole (model/train.BatchLoss)
EMPTY_ROW = {"image_id": "", "caption": [""], "union_label_id": [], "parse_label_id": []}


def _rows(source):
    """The engine's rows as they are, or a list of Parquet files of whole rows."""
    return source if hasattr(source, "iter_refs") else ParquetRows(source)


def row_tables(source, columns):
    """(table, folder relative image paths resolve against) per shard, with those of ``columns`` that exist:
    from Parquet files of whole rows, or from anything with ``iter_tables_with_base`` (the engine's rows)."""
    yield from _rows(source).iter_tables_with_base(columns)


def row_refs(source, columns, by_reference: str = "image_bytes"):
    """As :func:`row_tables`, with column ``by_reference`` given as where its values are, ``(file,
    positions)`` per shard (None when the rows have no such column), instead of the values."""
    yield from _rows(source).iter_refs(columns, by_reference)


class ByteReader:
    """Values of one binary column fetched by (file, row): reads the row group that holds the row and keeps
    the most recently read groups up to ``budget`` bytes, so a worker's memory is bounded by the budget and
    it reads only the groups its rows are in."""

    def __init__(self, column: str, budget: int = 64 << 20):
        from collections import OrderedDict

        self.column, self.budget = column, budget
        self._groups: OrderedDict = OrderedDict()
        self._files: dict = {}
        self.reads = 0  # row groups read (a benchmark's and a test's measure)

    def __getstate__(self):  # loader processes start with an empty cache
        return {"column": self.column, "budget": self.budget}

    def __setstate__(self, st):
        self.__init__(st["column"], st["budget"])

    def get(self, path: Path, row: int) -> bytes | None:
        meta = self._files.get(path)
        if meta is None:
            md = pq.ParquetFile(path).metadata
            starts = [0]
            for g in range(md.num_row_groups):
                starts.append(starts[-1] + md.row_group(g).num_rows)
            meta = self._files[path] = starts
        g = bisect.bisect_right(meta, row) - 1
        key = (path, g)
        col = self._groups.get(key)
        if col is None:
            col = pq.ParquetFile(path).read_row_group(g, columns=[self.column]).column(0)
            self.reads += 1
            self._groups[key] = col
            while len(self._groups) > 1 and sum(c.nbytes for c in self._groups.values()) > self.budget:
                self._groups.popitem(last=False)
        else:
            self._groups.move_to_end(key)
        return col[row - meta[g]].as_py()


class Batch(NamedTuple):
    """What the loader gives: the images that decoded, their targets and dataset indices, and a reject
    (with the vision steps' stable code) for each row of the batch whose image did not."""

    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor
    rejects: list


class ExportDataset(torch.utils.data.Dataset):
    """Rows of the export Parquet (``image_path``, relative paths resolve against the shard's folder) or
    of any earlier step (``image`` path or inline ``image_bytes``) + ``union_label_id``.

    The rows are read shard by shard and only the kept ones stay, as Arrow tables (paths or inline
    bytes, labels, captions), never as Python objects per row: at most one input shard plus the kept
    rows are in memory. Images decode lazily, per item, through ``common.images.open_image``: a row
    whose image does not decode is left out of its batch and comes back in ``Batch.rejects`` with the
    vision steps' code; :func:`batches` records it in ``rejects`` (by image_id, once).

    ``ids``: keep these image_ids; ``keep``: a predicate on image_id (a Ray Train worker's own rows).
    ``cache``: keep decoded, resized tensors in memory after the first epoch (tiny corpora only: a
    64 px image is 48 KiB as a tensor; with loader processes each keeps its own copy).
    """

    def __init__(self, files, num_classes: int, cfg, ids: set[str] | None = None, cache: bool = False, keep=None,
                 record_opened: bool = False):
        self.tables: list[pa.Table] = []
        self.bases: list[Path] = []
        self.refs: list[tuple[Path, pa.Array] | None] = []
        starts = [0]
        wanted = pa.array(sorted(ids), pa.string()) if ids is not None else None
        for table, base, ref in row_refs(files, ROW_COLUMNS):
            iid = table.column("image_id")
            mask = pc.is_in(iid, value_set=wanted.cast(iid.type)) if wanted is not None else None
            if keep is not None:
                mine = pa.array([keep(i) for i in iid.to_pylist()], pa.bool_())
                mask = mine if mask is None else pc.and_(mask, mine)
            t = (table.filter(mask) if mask is not None else table).combine_chunks()
            if ref is not None and mask is not None:
                ref = (ref[0], pc.filter(ref[1], mask))
            del table, iid  # only the kept rows stay, and inline images as where they are
            if t.num_rows:
                self.tables.append(t)
                self.bases.append(base)
                self.refs.append(ref)
                starts.append(starts[-1] + t.num_rows)
        self._starts = starts
        self.num_classes, self.cfg = num_classes, cfg
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None
        self.rejects: dict[str, Reject] = {}
        self.bytes = ByteReader("image_bytes")
        self.opened: list[str] | None = [] if record_opened else None  # image_ids decoded, in order (tests)

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def nbytes(self) -> int:
        """Bytes the kept rows hold (the Arrow buffers)."""
        return sum(t.nbytes for t in self.tables)

    def _locate(self, i: int) -> tuple[pa.Table, int, Path]:
        s = bisect.bisect_right(self._starts, i) - 1
        return self.tables[s], i - self._starts[s], self.bases[s]

    def _ref(self, i: int) -> tuple[Path, int] | None:
        s = bisect.bisect_right(self._starts, i) - 1
        ref = self.refs[s]
        return None if ref is None else (ref[0], ref[1][i - self._starts[s]].as_py())

    def row(self, i: int, columns=ROW_COLUMNS) -> dict:
        """Row ``i`` as a dict (``caption``: the list of captions, from ``caption`` or ``captions``)."""
        t, j, _ = self._locate(i)
        r = {c: t.column(c)[j].as_py() for c in columns if c in t.column_names}
        if "caption" in columns or "captions" in columns:
            r["caption"] = r.get("caption") or r.pop("captions", None) or []
        return r

    def image_id(self, i: int) -> str:
        t, j, _ = self._locate(i)
        return t.column("image_id")[j].as_py()

    def decode(self, i: int) -> tuple[torch.Tensor | None, Reject | None]:
        """Row ``i``'s image as the model's input tensor, or the reject of why it has none."""
        if self.cache is not None and i in self.cache:
            return self.cache[i], None
        t, j, base = self._locate(i)
        r = {c: t.column(c)[j].as_py() for c in ROW_IMAGE_COLUMNS if c in t.column_names}
        ref = self._ref(i)
        if ref is not None:
            r["image_bytes"] = self.bytes.get(*ref)
        if self.opened is not None:
            self.opened.append(r["image_id"])
        img, rej = open_image(r, base, ImageLimits(min_side=1))
        if rej is not None:
            return None, rej
        x = to_tensor(img, self.cfg)
        if self.cache is not None:
            self.cache[i] = x
        return x, None

    def __getitem__(self, i: int):
        x, rej = self.decode(i)
        t, j, _ = self._locate(i)
        y = torch.zeros(self.num_classes)
        y[[k for k in t.column("union_label_id")[j].as_py() if k < self.num_classes]] = 1
        return x, y, i, rej

    def collate(self, items: list) -> Batch:
        good = [it for it in items if it[0] is not None]
        s = self.cfg.image_size
        return Batch(torch.stack([it[0] for it in good]) if good else torch.zeros((0, 3, s, s)),
                     torch.stack([it[1] for it in good]) if good else torch.zeros((0, self.num_classes)),
                     torch.tensor([it[2] for it in good], dtype=torch.long),
                     [it[3] for it in items if it[0] is None])

    def check(self, indices) -> list[Reject]:
        """Decode rows ``indices`` (those an epoch's ``drop_last`` never gave to the loop) for their
        rejects, so that every row is either trained on or rejected."""
        new = []
        for i in indices:
            if self.image_id(int(i)) in self.rejects:
                continue
            _, rej = self.decode(int(i))
            if rej is not None:
                self.rejects[rej.image_id] = rej
                new.append(rej)
        return new


def batches(loader, on_reject=None):
    """``(x, y, idx)`` of each of ``loader``'s batches; the batch's rejects go to its dataset's
    ``rejects`` (once per image_id) and, the new ones, to ``on_reject``."""
    seen = getattr(loader.dataset, "rejects", {})
    for b in loader:
        if not isinstance(b, Batch):  # a dataset of plain (x, y, idx) items
            yield b
            continue
        new = [r for r in b.rejects if r.image_id not in seen]
        for r in new:
            seen[r.image_id] = r
        if new and on_reject is not None:
            on_reject(new)
        yield b.x, b.y, b.idx


@dataclass
class TrainConfig:
    epochs: int = 8
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    distill_weight: float = 0.0
    align_weight: float = 0.0
    seed: int = 0
    num_workers: int = 0
    save_every_epochs: int = 1
    loss: str = "asl"  # asl (RAM's) | bce
    hflip: bool = False  # flip half of each batch left-right (tags do not depend on left and right)
    caption_weight: float = 1.0  # image-tag-text generation loss, when the model has RAM's caption branch
    # weights and batches channels-last: convolutions run faster on CPU (bench/cnn_train.py measures it),
    # but the float sums differ, so the trained model (and what later steps decide) differs a little too
    channels_last: bool = False
    bf16: bool = True  # bf16 autocast on CUDA (a CPU always trains in fp32)
    grad_clip: float | None = None  # clip the global gradient norm to this before each optimizer step
    # images per optimizer step over all workers; a multiple of batch_size x workers, reached by
    # accumulating gradients over several batches (None: one batch per step)
    global_batch_size: int | None = None
    # batches each loader worker decodes ahead (num_workers > 0). Loader workers change nothing trained:
    # each epoch's order and each batch's draws come from their own seeds, not from how far a loader runs
    # ahead (tests/test_train.py: test_loader_workers_decode_the_same_batches)
    prefetch_factor: int = 2


def lr_lambda(cfg: TrainConfig, total: int):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast(device: torch.device, cfg: TrainConfig | None = None):
    """bf16 autocast on CUDA (unless ``cfg.bf16`` is off); nothing elsewhere (fp32 on CPU, and any device
    type, ``meta`` included, works)."""
    if device.type == "cuda" and (cfg is None or cfg.bf16):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_loader(dataset, batch_size: int, device: torch.device, num_workers: int = 0, prefetch_factor: int = 2,
                **kw) -> torch.utils.data.DataLoader:
    """A DataLoader that decodes in ``num_workers`` processes, ``prefetch_factor`` batches ahead each, into
    pinned memory when the model is on CUDA (so the copy to the device overlaps compute). With 0 workers
    it is the plain in-process loader. An :class:`ExportDataset` collates into a :class:`Batch` (read it
    through :func:`batches`)."""
    extra = {"prefetch_factor": prefetch_factor, "persistent_workers": True} if num_workers > 0 else {}
    if hasattr(dataset, "collate"):
        kw.setdefault("collate_fn", dataset.collate)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                       pin_memory=device.type == "cuda", **extra, **kw)


def predict(model, loader, cfg: TrainConfig | None = None):
    """``(sigmoid scores, targets, indices)`` per batch, every tensor on the model's device: the batch
    goes to the model, never the model's output to the host (callers copy what they keep). Rows whose
    image was rejected are not among them (the dataset's ``rejects`` has them)."""
    device = model_device(model)
    model.eval()
    for x, y, idx in batches(loader):
        if len(x) == 0:
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.no_grad(), autocast(device, cfg):  # per batch: grad mode is not held across a yield
            scores = torch.sigmoid(model(x)).float()
        yield scores, y, idx


def predict_all(model, loader, cfg: TrainConfig | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores, targets and dataset indices of a whole (bounded) held-out loader, on the host."""
    scores, targets, index = [], [], []
    for s, y, idx in predict(model, loader, cfg):
        scores.append(s.cpu().numpy())
        targets.append(y.cpu().numpy())
        index.append(np.asarray(idx))
    if not scores:  # nothing held out, or every held-out image rejected
        c = loader.dataset.num_classes
        return np.zeros((0, c), np.float32), np.zeros((0, c), np.float32), np.zeros(0, np.int64)
    return np.concatenate(scores), np.concatenate(targets), np.concatenate(index)


def predict_arrays(model, loader, cfg: TrainConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scores and targets of a whole (bounded) held-out loader, on the host."""
    s, t, _ = predict_all(model, loader, cfg)
    return s, t


def evaluate(model: RAM, loader, cfg: TrainConfig | None = None) -> dict:
    if len(loader.dataset) == 0:  # nothing held out (a benchmark, a tiny corpus)
        return {"mAP": float("nan"), "chance_mAP": float("nan"), "classes_with_positives": 0}
    s, t = predict_arrays(model, loader, cfg)
    if len(s) == 0:  # every held-out image was rejected
        return {"mAP": float("nan"), "chance_mAP": float("nan"), "classes_with_positives": 0}
    aps = average_precision(s, t)
    rng = np.random.default_rng(0)
    chance = average_precision(rng.random(s.shape), t)
    return {"mAP": float(np.nanmean(aps)), "chance_mAP": float(np.nanmean(chance)),
            "classes_with_positives": int(np.sum(~np.isnan(aps)))}


def alignment_loss(model: RAM, img: torch.Tensor, caption_emb: torch.Tensor) -> torch.Tensor:
    """RAM++ image–text alignment: each image's own caption is its positive among the batch's."""
    cls = F.normalize(img[:, 0].float(), dim=-1)
    logits = model.reweight_scale.exp() * cls @ F.normalize(caption_emb.float(), dim=-1).T
    return asl_loss(logits, torch.eye(len(cls), device=cls.device), gamma_neg=4.0) / len(cls)


def caption_batch(rows: list[dict], tag_names: list[str], g: torch.Generator) -> tuple[list[list[str]], list[str]]:
    """One caption per image (drawn from ``g``) and the tags parsed from that caption (the image's
    ``union_label_id`` when the row has no per-caption parse)."""
    tags, caps = [], []
    for r in rows:
        captions = r["caption"] or [""]
        j = int(torch.randint(len(captions), (1,), generator=g))
        parsed = r.get("parse_label_id") or []
        ids = parsed[j] if j < len(parsed) else r["union_label_id"]
        tags.append([tag_names[t] for t in ids if t < len(tag_names)])
        caps.append(captions[j])
    return tags, caps


class Objective(torch.nn.Module):
    """The training loss as one module's ``forward``. DDP all-reduces the gradients of what its wrapped
    module computes, so every trained parameter is used inside this call; the local loop runs the same
    module, so both paths compute the same objective."""

    def __init__(self, model, cfg: TrainConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, x, y, teacher_emb=None, caption_emb=None, tags=None, captions=None) -> torch.Tensor:
        model, cfg = self.model, self.cfg
        if isinstance(model, RAM):
            img = model.image_embeds(x)
            logits = model.fc(model.tagging_head(model.label_queries(img), img)[0]).squeeze(-1)
        else:
            img, logits = None, model(x)
        if cfg.loss == "bce":
            loss = F.binary_cross_entropy_with_logits(logits.float(), y, reduction="sum") / x.shape[0]
        else:
            loss = asl_loss(logits, y) / x.shape[0]
        if teacher_emb is not None:
            loss = loss + cfg.distill_weight * F.l1_loss(img[:, 0].float(), teacher_emb.float())
        if caption_emb is not None:
            loss = loss + cfg.align_weight * alignment_loss(model, img, caption_emb)
        if tags is not None:
            loss = loss + cfg.caption_weight * model.caption_loss(img, tags, captions)
        return loss


class BatchLoss:
    """A batch of the loader -> its loss: moves it to the model's device, flips, and makes the inputs of
    the optional terms (the teacher's embedding, RAM++ caption embeddings, RAM's caption tokens)."""

    def __init__(self, model, cfg: TrainConfig, teacher=None, caption_encoder=None, tag_names=None,
                 caption_tokenizer=None):
        ram = isinstance(model, RAM)
        self.cfg, self.teacher, self.caption_encoder = cfg, teacher, caption_encoder
        self.distill = ram and teacher is not None and cfg.distill_weight > 0
        self.align = ram and caption_encoder is not None and cfg.align_weight > 0 and model.cfg.variant == "ram_plus"
        self.captioning = getattr(model.cfg, "caption_branch", False) and cfg.caption_weight > 0
        if self.captioning:
            if tag_names is None:
                raise ValueError("training RAM's caption branch needs the tag names (tag_names=...)")
            if caption_tokenizer is None:
                from model.caption import CaptionTokenizer

                caption_tokenizer = CaptionTokenizer()
        self.tag_names, self.tokenizer = tag_names, caption_tokenizer

    def __call__(self, objective, x, y, rows, g: torch.Generator, device: torch.device) -> torch.Tensor:
        """``rows``: a callable giving the batch's row dicts (only the caption terms read them).

        A batch whose every image was rejected still runs the model, on one blank image at weight 0:
        under DDP each worker's backward joins the same gradient all-reduce, so no worker waits alone."""
        cfg = self.cfg
        if x.shape[0] == 0:
            blank_x, blank_y = torch.zeros((1, *x.shape[1:])), torch.zeros((1, y.shape[1]))
            return 0.0 * self(objective, blank_x, blank_y, lambda: [EMPTY_ROW], g, device)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if cfg.hflip:
            flip = torch.rand(x.shape[0], generator=g) < 0.5
            x = torch.where(flip.to(device)[:, None, None, None], x.flip(-1), x)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        kw = {}
        with autocast(device, cfg):
            if self.align:
                caps = [(r["caption"] or [""])[0] for r in rows()]
                kw["caption_emb"] = self.caption_encoder.encode(caps).to(device)
            if self.captioning:
                tags, caps = caption_batch(rows(), self.tag_names, g)
                kw["tags"] = self.tokenizer.tags(tags).to(device)
                kw["captions"] = self.tokenizer.captions(caps).to(device)
            if self.distill:
                kw["teacher_emb"] = self.teacher(x)
            return objective(x, y, **kw)


def accumulation_steps(cfg: TrainConfig, workers: int = 1) -> int:
    """Batches per optimizer step so that one step sees ``global_batch_size`` images over all workers."""
    if cfg.global_batch_size is None:
        return 1
    per_step = cfg.batch_size * workers
    if cfg.global_batch_size % per_step:
        raise ValueError(f"global_batch_size {cfg.global_batch_size} is not a multiple of batch_size x workers "
                         f"= {cfg.batch_size} x {workers}")
    return cfg.global_batch_size // per_step


def optimizer_step(opt, sched, params, cfg: TrainConfig) -> None:
    if cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    sched.step()
