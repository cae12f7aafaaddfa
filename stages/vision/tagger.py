"""The base tagger as the evidence step sees it: tagset ids in, scores, attention maps and pooled
features out, every forward through ``model/infer.Inference``.

The base tagger is either the ``tagger`` artifact of an earlier ``train`` step (``model.json`` +
``model.pth``) or a released checkpoint named in the stage config (entrypoint, local checkpoint, the
checkpoint's tag list). Tags of the run's tagset are matched to the model's classes by name; a tag the
model does not know gets no score (NaN), never a made-up one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import Field

from pipeline.stage import StageConfig


class TaggerConfig(StageConfig):
    """Which base tagger a stage uses: the run's ``tagger`` artifact, or a released checkpoint."""

    model: str | None = Field(None, description="entrypoint of a released checkpoint (null: the train step's)")
    checkpoint: str | None = Field(None, description="local checkpoint path (official layout)")
    tag_list: str | None = Field(None, description="the checkpoint's tag list (one name per line)")
    model_args: dict = Field(default_factory=dict, description="entrypoint overrides")
    device: str = Field("auto", description="auto (cuda when this worker sees a GPU: under Ray, when the "
                        "step's resources ask for one), cpu or cuda")
    batch_size: int = Field(32, ge=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="inference dtype: auto is bf16 autocast on CUDA and fp32 on CPU (the golden "
        "numerics); bf16 / fp16 autocast anywhere; fp32 off")
    tf32: bool = Field(True, description="on CUDA, fp32 matmuls and convolutions in TF32")
    compile: bool = Field(False, description="torch.compile the backbone (minutes of warm-up per worker)")


@dataclass
class BaseTagger:
    """The base tagger as the evidence step sees it: tagset ids in, scores out. Every forward goes through
    ``model/infer.Inference`` (device, precision, pinned copies, cached queries, restricted head)."""

    model: object  # model.ram.RAM or model.cnn.CnnTagger
    class_of_tag: np.ndarray  # tagset id -> model class index, -1 when the model has no such class
    threshold_of_tag: np.ndarray  # tagset id -> the tag's threshold (NaN when the model lacks the tag)
    device: str = "cpu"
    batch_size: int = 32
    precision: str = "auto"
    compile: bool | str = False  # True: inductor; a string names another torch.compile backend
    tf32: bool = True
    head_chunk: int | None = None
    pin_memory: bool | None = None  # None: on CUDA

    def __post_init__(self) -> None:
        from model.infer import Inference

        self.engine = Inference(self.model, self.device, self.precision, self.compile, self.tf32, self.head_chunk,
                                self.pin_memory)
        self.model = self.engine.model

    @classmethod
    def from_model(cls, model, model_names: list[str], tag_names: list[str] | None = None,
                   tag_thresholds: list[float] | None = None, **kw) -> "BaseTagger":
        """Tags matched to the model's classes by name (``tag_names``: default the model's own);
        thresholds are ``tag_thresholds`` where given, else the model's own ``class_threshold``."""
        tag_names = list(model_names) if tag_names is None else list(tag_names)
        index = {n: i for i, n in enumerate(model_names)}
        class_of_tag = np.array([index.get(n, -1) for n in tag_names], dtype=np.int64)
        own = model.class_threshold.cpu().numpy()
        th = np.array([np.nan if c < 0 else (own[c] if tag_thresholds is None else tag_thresholds[t])
                       for t, c in enumerate(class_of_tag)], dtype=np.float32)
        return cls(model, class_of_tag, th, **kw)

    @classmethod
    def load(cls, cfg: TaggerConfig, artifacts: dict[str, str], tag_names: list[str],
             tag_thresholds: list[float] | None = None) -> "BaseTagger":
        """``tag_thresholds`` (the tagset's) apply where the tagger brings none of its own."""
        import torch

        torch.set_num_threads(max(1, torch.get_num_threads()))
        model, model_names, thresholds = load_model(cfg, artifacts, tag_names)
        if thresholds is not None:
            model.set_thresholds(thresholds)
        model = model.eval()
        if hasattr(model, "for_inference"):  # same function, faster (CNN: BatchNorm folded, channels-last)
            model = model.for_inference()
        fallback = None if thresholds is not None else \
            (tag_thresholds if tag_thresholds is not None else [0.65] * len(tag_names))
        return cls.from_model(model, model_names, tag_names, fallback, device=resolve_device(cfg.device),
                              batch_size=cfg.batch_size, precision=cfg.precision, compile=cfg.compile, tf32=cfg.tf32)

    @property
    def image_size(self) -> int:
        return self.model.cfg.image_size

    @property
    def fully_convolutional(self) -> bool:
        """True when the model takes inputs of any size (a crop can keep the whole image's scale)."""
        return bool(getattr(self.model, "fully_convolutional", False))

    def _pixels(self, images: list, native: bool = False):
        """A batch on the model's device; ``images``: PIL images, or uint8 ``[3, H, W]`` tensors already at
        their input size (:meth:`prepare`); ``native``: PIL images already at their input size (all equal)."""
        from model.preprocess import to_uint8

        x = self.engine.stack([to_uint8(im, self.model.cfg, im.size if native else None)
                               if isinstance(im, Image.Image) else im for im in images])
        return self.engine.to_device(x)

    def prepare(self, img: Image.Image, native: bool = False):
        """What a decode worker hands the model: uint8 pixels at the model's input (``native``: at the
        image's own size, already the input size)."""
        from model.preprocess import to_uint8

        return to_uint8(img, self.model.cfg, img.size if native else None)

    def _slices(self, n: int):
        return (list(range(i, min(n, i + self.batch_size))) for i in range(0, n, self.batch_size))

    def native_batches(self, images: list[Image.Image]):
        """Indices of ``images`` grouped by size, at most ``batch_size`` each (inputs of one size stack)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(_size(im), []).append(i)
        for size in sorted(groups):
            idx = groups[size]
            for s in range(0, len(idx), self.batch_size):
                yield idx[s:s + self.batch_size]

    def crop_scores(self, crops: list[Image.Image], tags: list[int], native: bool = False) -> np.ndarray:
        """Each crop's score for its own tag (NaN when the model lacks the tag); ``native``: crops are
        already at their input size (:func:`native_crop`), scored batch by batch of equal size."""
        if not native:
            got = self.scores_for(crops, [[t] for t in tags])
            return np.array([g[0] for g in got], dtype=np.float32)
        out = np.full(len(crops), np.nan, dtype=np.float32)
        jobs = ((idx, lambda idx=idx: self.engine.scores(self._pixels([crops[i] for i in idx], native=True)))
                for idx in self.native_batches(crops))
        for idx, p in self.engine.run(jobs):
            p = p.numpy()
            for k, i in enumerate(idx):
                c = self.class_of_tag[tags[i]]
                if c >= 0:
                    out[i] = p[k, c]
        return out

    def scores(self, images: list[Image.Image], attention: bool = False):
        """``[B, tags]`` sigmoid scores (NaN for tags the model lacks); with ``attention`` also the last
        tagging layer's attention over image tokens, ``[B, tags, g, g]`` (zeros for unknown tags)."""
        known = self.class_of_tag >= 0
        classes = self.class_of_tag[known]
        out = np.full((len(images), len(self.class_of_tag)), np.nan, dtype=np.float32)
        maps = None
        jobs = ((idx, lambda idx=idx: self.engine.scores(self._pixels([images[i] for i in idx]), classes, attention))
                for idx in self._slices(len(images)))
        for idx, res in self.engine.run(jobs):
            i, n = idx[0], len(idx)
            if attention:
                res, a = res
                g = int(round(a.shape[-1] ** 0.5))
                if maps is None:
                    maps = np.zeros((len(images), len(self.class_of_tag), g, g), dtype=np.float32)
                maps[i:i + n, known] = a.reshape(n, -1, g, g).numpy()
            out[i:i + n, known] = res.numpy()
        return (out, maps) if attention else out

    def scores_for(self, images: list[Image.Image], wanted: list[list[int]], attention: bool = False) -> list:
        """Each image's scores for its own tags only (``wanted[i]``, tagset ids; NaN where the model lacks
        the tag), with ``attention`` as (scores, maps ``[len(wanted[i]), g, g]``). A model with a query
        head (RAM) scores only the classes its batch needs, exactly what the full head gives them; other
        models score every class and the wanted ones are read off."""
        if not self.engine.query_head:
            if not images:
                return []
            full = self.scores(images, attention)
            if attention:
                return [(full[0][i, w], full[1][i, w]) for i, w in enumerate(wanted)]
            return [full[i, w] for i, w in enumerate(wanted)]
        scores = [np.full(len(w), np.nan, dtype=np.float32) for w in wanted]
        maps: list = [None] * len(wanted)

        def jobs():
            for idx in self._slices(len(images)):
                need = sorted({int(self.class_of_tag[t]) for i in idx for t in wanted[i] if self.class_of_tag[t] >= 0})
                if need:
                    yield (idx, need), lambda idx=idx, need=need: self.engine.scores(
                        self._pixels([images[i] for i in idx]), need, attention)

        for (idx, need), res in self.engine.run(jobs()):
            s, a = res if attention else (res, None)
            g = int(round(a.shape[-1] ** 0.5)) if attention else 0
            for k, i in enumerate(idx):
                hit, cols = self._columns(wanted[i], need)
                scores[i][hit] = s[k].numpy()[cols]
                if attention:
                    maps[i] = np.zeros((len(wanted[i]), g, g), np.float32)
                    maps[i][hit] = a[k].numpy()[cols].reshape(-1, g, g)
        if attention:
            return [(s, m if m is not None else np.zeros((len(s), 0, 0), np.float32)) for s, m in zip(scores, maps)]
        return scores

    def scores_then_maps(self, images: list, choose) -> list[tuple[np.ndarray, list[int], np.ndarray]]:
        """pseudolabel and attention grounding from one backbone pass per batch. For each batch: every
        tag's score (as :meth:`scores`), then ``choose(i, scores_i) -> tag ids`` per image, then those
        tags' attention maps from the same image tokens (as :meth:`scores_for` with ``attention``; a query
        head or a CNN scores only the chosen classes, exactly their full-head values). Returns per image
        ``(scores [tags], chosen, maps [len(chosen), g, g])``; the host waits for each batch's scores."""
        from model.infer import to_host

        known = self.class_of_tag >= 0
        classes = self.class_of_tag[known]
        out: list = []
        for idx in self._slices(len(images)):
            enc = self.engine.encode(self._pixels([images[i] for i in idx]))
            part = np.full((len(idx), len(self.class_of_tag)), np.nan, dtype=np.float32)
            part[:, known] = to_host(self.engine.scores_from(enc, classes)).numpy()
            chosen = [list(choose(i, part[k])) for k, i in enumerate(idx)]
            need = sorted({int(self.class_of_tag[t]) for c in chosen for t in c if self.class_of_tag[t] >= 0})
            amaps = to_host(self.engine.scores_from(enc, need, attention=True)[1]).numpy() if need else None
            for k, c in enumerate(chosen):
                if amaps is None:
                    maps = np.zeros((len(c), 0, 0), np.float32)
                else:
                    hit, cols = self._columns(c, need)
                    g = int(round(amaps.shape[-1] ** 0.5))
                    maps = np.zeros((len(c), g, g), np.float32)
                    maps[hit] = amaps[k, cols].reshape(-1, g, g)
                out.append((part[k], c, maps))
        return out

    def embed_and_score(self, crops: list, tags: list[int], native: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """embed and verify from one pass over each crop batch: the pooled feature (as :meth:`embed`) and
        the crop's score for its own tag (as :meth:`crop_scores`; NaN where the model lacks the tag), both
        from the same backbone output. Returns ``(features [n, label_dim], scores [n])``."""
        feats = np.zeros((len(crops), self.model.cfg.label_dim), np.float32)
        scores = np.full(len(crops), np.nan, dtype=np.float32)
        cls = self.class_of_tag[np.asarray(tags, dtype=np.int64)] if len(tags) else np.zeros(0, np.int64)

        def jobs():
            for idx in (self.native_batches(crops) if native else self._slices(len(crops))):
                idx = np.asarray(idx)
                known = idx[cls[idx] >= 0]
                yield (idx, known), lambda idx=idx, known=known: self._pool_and_score(
                    self._pixels([crops[i] for i in idx], native=native), cls[idx], cls[idx] >= 0)

        for (idx, known), (f, s) in self.engine.run(jobs()):
            feats[idx] = f.numpy()
            scores[known] = s.numpy()
        return feats, scores

    def _pool_and_score(self, x, cls: np.ndarray, known: np.ndarray):
        """The pooled features of a crop batch, and each known crop's score for its own class alone."""
        enc = self.engine.encode(x)
        pooled = self.engine.pooled_from(enc)
        if not known.any():
            return pooled, pooled[:0, 0]
        if not known.all():
            import torch

            enc = enc.index_select(0, self.engine.upload(torch.from_numpy(np.nonzero(known)[0])))
        return pooled, self.engine.own_scores_from(enc, cls[known])

    def _columns(self, tags: list[int], need: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """For an image's ``tags``, the positions of those the model knows and their columns in the
        output of a call that scored the sorted class list ``need``."""
        cls = self.class_of_tag[tags] if tags else np.zeros(0, np.int64)
        hit = np.nonzero(cls >= 0)[0]
        return hit, np.searchsorted(need, cls[hit])

    def embed(self, images: list[Image.Image], native: bool = False) -> np.ndarray:
        """The pooled image feature (``image_embeds[:, 0]``), ``[B, label_dim]`` float32; ``native`` as in
        :meth:`crop_scores`."""
        out = np.zeros((len(images), self.model.cfg.label_dim), np.float32)
        batches = self.native_batches(images) if native else self._slices(len(images))
        jobs = ((idx, lambda idx=idx: self.engine.pooled(self._pixels([images[i] for i in idx], native=native)))
                for idx in batches)
        for idx, f in self.engine.run(jobs):
            out[idx] = f.numpy()
        return out


def _size(im) -> tuple[int, int]:
    """(w, h) of a PIL image or a ``[3, H, W]`` tensor."""
    return im.size if isinstance(im, Image.Image) else (int(im.shape[-1]), int(im.shape[-2]))


def load_model(cfg: TaggerConfig, artifacts: dict[str, str], tag_names: list[str]):
    """(model, the model's class names, its own thresholds or None) from the run's tagger artifact or a
    released checkpoint."""
    import torch

    from model.checkpoint import load_checkpoint, load_state

    from model.registry import create_model

    if cfg.model is None:
        if "tagger" not in artifacts:
            raise ValueError("no base tagger: set model + checkpoint in the stage config, or run a train "
                             "step (it provides the 'tagger' artifact) before this one")
        d = Path(artifacts["tagger"])
        spec = json.loads((d / "model.json").read_text())
        model = create_model(spec["entrypoint"], **spec["model_args"])
        state = load_state(d / spec["checkpoint"])
        if "label_embed" in state["model"]:  # RAM / RAM++
            n = state["model"]["label_embed"].shape[0] // (
                model.cfg.descriptions_per_class if model.cfg.variant == "ram_plus" else 1)
            if n != model.cfg.num_classes:
                model.set_vocabulary(state["model"]["label_embed"])
            load_checkpoint(model, state)
        else:  # a tagger without label queries (model/cnn.py): its own strict load
            model.load_state_dict(state["model"])
        model_names = (d / "tag_list.txt").read_text().split("\n") if (d / "tag_list.txt").exists() \
            else list(tag_names)
        thresholds = json.loads((d / "thresholds.json").read_text()) if (d / "thresholds.json").exists() else None
    else:
        if not cfg.checkpoint:
            raise ValueError(f"model {cfg.model!r} needs a local checkpoint path (checkpoint:)")
        state = load_state(cfg.checkpoint)
        sd = state.get("model", state)
        model = create_model(cfg.model, **cfg.model_args)
        if "label_embed" not in sd and not hasattr(model, "set_vocabulary"):
            model.load_state_dict(sd)
        else:
            per = model.cfg.descriptions_per_class if model.cfg.variant == "ram_plus" else 1
            if "label_embed" in sd and sd["label_embed"].shape[0] // per != model.cfg.num_classes:
                model.set_vocabulary(sd["label_embed"] if sd["label_embed"].shape[1] == model.cfg.label_dim
                                     else torch.zeros(sd["label_embed"].shape[0], model.cfg.label_dim))
            load_checkpoint(model, state)
        model_names = Path(cfg.tag_list).read_text().split("\n") if cfg.tag_list else list(tag_names)
        thresholds = None
    return model, [n.strip() for n in model_names if n.strip()], thresholds


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def planned_runtime(cfg: TaggerConfig, stage) -> str:
    """Where a step's workers will compute and in what precision, resolved on the driver before they start,
    for the step's fingerprint: ``device: auto`` is a GPU in a worker that gets one and ``precision: auto``
    is bf16 there and fp32 on a CPU, so one config gives two results. Under Ray a worker sees a GPU when
    the step's ``resources.num_gpus`` asks for one; in-process (``ray.enabled: false``), when the driver has
    one."""
    device = cfg.device
    if device == "auto":
        under_ray = stage.context.ray.get("enabled", True)
        device = "cuda" if (stage.resources.num_gpus > 0 if under_ray else resolve_device("auto") == "cuda") \
            else "cpu"
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device == "cuda" else "fp32")
    return f"device={device};precision={precision}"


def checkpoint_fingerprint(cfg: TaggerConfig) -> str:
    """A released checkpoint's identity (size + mtime) joins the step fingerprint."""
    parts = []
    for p in (cfg.checkpoint, cfg.tag_list):
        if p and Path(p).exists():
            st = Path(p).stat()
            parts.append(f"{p}:{st.st_size}:{int(st.st_mtime)}")
    return ";".join(parts)
