"""The one inference path: every forward of a tagger in this project runs through :class:`Inference`
(the vision stages through ``stages/vision/tagger.BaseTagger``, the benchmarks, the tests).

What it does beside calling the model, and why:

* **precision** — ``auto`` is bf16 autocast on CUDA (Swin-L is bandwidth and matmul bound; bf16
  keeps fp32's range, so no loss scaling or overflow checks) and fp32 on CPU, where the golden tests
  hold the numerics to the official code; ``fp32``, ``bf16`` and ``fp16`` force one. With ``tf32``
  the fp32 matmuls that autocast leaves (and all of them in ``fp32``) use TF32 on CUDA.
* **placement** — batches are stacked into pinned host memory and copied with ``non_blocking`` on
  CUDA; :meth:`Inference.run` keeps one batch in flight, so the host prepares batch *i + 1* while the
  device computes batch *i* and the copy back of *i - 1* is the only wait.
* **label queries** — RAM's queries (``relu(wordvec_proj(label_embed))``) do not depend on the image:
  computed once, in fp32, then indexed. RAM++ reweights its descriptions per image, so its queries are
  computed per batch.
* **class-restricted head** — the tagging head has no self-attention between label queries and one
  ``fc`` shared by every class, so a class's logit depends only on its own query: scoring only the
  classes a call asks for is exact, and cheap next to 4,585 (the full head is 116 GFLOPs per image,
  0.56x the Swin-L backbone's 208). Models without a query head (the CNN: a 1x1 convolution per
  class) are always called as before.
* **head chunks** — the head's activations are ``[images, classes, 4 x hidden]``; a CPU takes two
  images at a time (cache, and 56 MB per image with 4,585 classes), a GPU the whole batch.
* ``compile`` — opt-in ``torch.compile`` of the backbone (minutes of warm-up per process).

Outputs come back to the host as float32.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device_type: str) -> torch.dtype:
    """``auto``: bf16 on CUDA, fp32 elsewhere (the CPU path stays the golden-tested fp32)."""
    if precision == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, not {precision!r}")
    return PRECISIONS[precision]


class Placement:
    """Where and how tensors run: the device, the autocast dtype, TF32, pinned non-blocking uploads and
    one batch in flight (:meth:`run`). Shared by :class:`Inference` and the detectors."""

    def __init__(self, device: str | torch.device = "cpu", precision: str = "auto", tf32: bool = True,
                 pin_memory: bool | None = None):
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.dtype = resolve_precision(precision, self.device.type)
        if cuda and tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.pin_memory = cuda if pin_memory is None else pin_memory

    def stack(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """One host batch, in pinned memory when batches go to a GPU (the copy can then overlap)."""
        if not self.pin_memory:
            return torch.stack(tensors)
        out = torch.empty((len(tensors), *tensors[0].shape), dtype=tensors[0].dtype, pin_memory=True)
        return torch.stack(tensors, out=out)

    def upload(self, x: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device: from pinned memory and without waiting, on a GPU."""
        if self.device.type == "cpu":
            return x
        if self.pin_memory and not x.is_pinned():
            x = x.pin_memory()
        return x.to(self.device, non_blocking=True)

    def autocast(self):
        if self.dtype == torch.float32 or not torch.amp.is_autocast_available(self.device.type):
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def run(self, jobs: Iterable[tuple[object, Callable[[], object]]]) -> Iterator[tuple[object, object]]:
        """``jobs``: (key, thunk) pairs; a thunk prepares a batch on the host and queues its forward.
        Yields (key, outputs on the host, float32) one job behind, so the host prepares the next batch
        while the device computes this one (on a CPU: the same work in the same order)."""
        pending = None
        for key, thunk in jobs:
            out = thunk()
            if pending is not None:
                yield pending[0], to_host(pending[1])
            pending = (key, out)
        if pending is not None:
            yield pending[0], to_host(pending[1])


class Inference(Placement):
    """A tagger on its device with its precision; see the module docstring."""

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu", precision: str = "auto",
                 compile: bool | str = False, tf32: bool = True, head_chunk: int | None = None,
                 pin_memory: bool | None = None):
        super().__init__(device, precision, tf32, pin_memory)
        accelerated = self.device.type != "cpu"
        model = model.eval().to(self.device)
        if accelerated:
            model = model.to(memory_format=torch.channels_last)  # the patch-embedding / conv weights
        self.model = model
        self.channels_last = accelerated or bool(getattr(model, "channels_last", False))
        # RAM / RAM++: label queries through a tagging head and one shared fc
        self.query_head = hasattr(model, "tagging_head") and hasattr(model, "fc")
        self.head_chunk = head_chunk or (None if accelerated else 2)
        self._queries = None
        self._norm: tuple[torch.Tensor, torch.Tensor] | None = None
        self._class_index: dict[bytes, torch.Tensor] = {}
        if self.query_head and model.cfg.variant == "ram":  # fp32, once: indexed per call
            with torch.inference_mode():
                self._queries = torch.relu(model.wordvec_proj(model.label_embed))
        # the backbone pass every output is computed from: RAM's image tokens, a CNN's feature map
        self._encode: Callable | None = model.image_embeds if self.query_head else getattr(model, "features_of", None)
        self._forward: Callable = model
        if compile:
            backend = compile if isinstance(compile, str) else "inductor"
            if self._encode is not None:  # the backbone only: the head's shape follows the classes asked for
                self._encode = torch.compile(self._encode, backend=backend, dynamic=False)
            else:
                self._forward = torch.compile(model, backend=backend, dynamic=False)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A pixel batch on the device, channels-last where the model wants it (on a CPU: the CNN's
        inference form, converted on the host as before). A uint8 batch (decode workers' output:
        ``model/preprocess.to_uint8``) is normalised there, the same arithmetic as ``to_tensor``."""
        x = self.upload(x)
        if x.dtype == torch.uint8:
            if self._norm is None:  # once, on the device: a per-batch host copy would wait for its queue
                cfg = self.model.cfg
                self._norm = tuple(self.upload(torch.tensor(v, dtype=torch.float32).view(3, 1, 1))
                                   for v in (cfg.mean, cfg.std))
            x = (x.to(torch.float32).div(255) - self._norm[0]) / self._norm[1]
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def classes(self, classes) -> torch.Tensor | None:
        """A class index on the device, kept per distinct set: a pageable copy would wait for the
        device's queue and end the overlap (tests/test_infer.py's device guard caught it)."""
        if classes is None:
            return None
        idx = torch.as_tensor(np.asarray(classes, dtype=np.int64))
        key = idx.numpy().tobytes()
        if key not in self._class_index:
            if len(self._class_index) >= 256:
                self._class_index.clear()
            self._class_index[key] = self.upload(idx)
        return self._class_index[key]

    # -- forwards (device tensors in, device tensors out) ---------------------------------------------

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's output for a pixel batch, on the device: computed once, it serves every score,
        attention map and pooled feature of that batch (:meth:`scores_from`, :meth:`pooled_from`)."""
        if self._encode is None:
            raise TypeError(f"{type(self.model).__name__} has no separable backbone (image_embeds / features_of)")
        with torch.inference_mode(), self.autocast():
            return self._encode(x)

    def scores(self, x: torch.Tensor, classes=None, attention: bool = False):
        """Sigmoid scores ``[B, N]`` (float32) for ``classes`` (all when None); with ``attention`` also
        each class's last-layer attention over the image tokens, heads averaged, ``[B, N, L]``."""
        if self._encode is not None:
            return self.scores_from(self.encode(x), classes, attention)
        cls = self.classes(classes)
        with torch.inference_mode(), self.autocast():
            logits, attn = self._forward(x, cls, return_attn=True) if attention else (self._forward(x, cls), None)
            return _scored(logits, attn, attention)

    def scores_from(self, enc: torch.Tensor, classes=None, attention: bool = False):
        """:meth:`scores` from :meth:`encode`'s output: the head alone, restricted to ``classes``."""
        cls = self.classes(classes)
        with torch.inference_mode(), self.autocast():
            if self.query_head:
                logits, attn = self._head(enc, cls, attention)
            else:
                logits, attn = self.model.logits_from(enc, cls, True) if attention \
                    else (self.model.logits_from(enc, cls), None)
            return _scored(logits, attn, attention)

    def own_scores_from(self, enc: torch.Tensor, classes) -> torch.Tensor:
        """Row b's sigmoid score for its own class ``classes[b]`` alone, ``[B]`` float32: what
        ``scores_from(enc, classes)[b, b]`` is, without scoring each row on every other row's class (a
        query head's cost is rows x queries; a class map's is not, so it takes its columns)."""
        classes = np.asarray(classes, dtype=np.int64)
        if not self.query_head:
            need, col = np.unique(classes, return_inverse=True)
            need, col = self.classes(need), self.upload(torch.from_numpy(col.reshape(-1, 1)))
            with torch.inference_mode(), self.autocast():
                return torch.sigmoid(self.model.logits_from(enc, need).gather(1, col)[:, 0].float())
        cls = self.upload(torch.from_numpy(classes))  # outside inference mode, as scores_from's copies
        with torch.inference_mode(), self.autocast():
            m = self.model
            q = self._queries[cls].unsqueeze(1) if self._queries is not None else m.row_queries(enc, cls)
            tagged, _ = m.tagging_head(q, enc, False)
            return torch.sigmoid(m.fc(tagged)[:, 0, 0].float())

    def pooled_from(self, enc: torch.Tensor) -> torch.Tensor:
        """The pooled image feature (what embed stores) from :meth:`encode`'s output, float32."""
        with torch.inference_mode(), self.autocast():
            return (enc[:, 0] if self.query_head else self.model.pooled_from(enc)).float()

    def _head(self, img: torch.Tensor, cls: torch.Tensor | None, attention: bool):
        m, step = self.model, self.head_chunk or img.shape[0]
        logits, attns = [], []
        for i in range(0, img.shape[0], step):
            part = img[i:i + step]
            if m.cfg.variant == "ram":
                q = (self._queries if cls is None else self._queries[cls]).unsqueeze(0).expand(part.shape[0], -1, -1)
            else:
                q = m.label_queries(part, cls)
            tagged, attn = m.tagging_head(q, part, attention)
            logits.append(m.fc(tagged).squeeze(-1))
            attns.append(attn)
        return torch.cat(logits), (torch.cat(attns) if attention else None)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled image feature ``image_embeds[:, 0]`` (what embed stores), float32."""
        if self._encode is not None:
            return self.pooled_from(self.encode(x))
        with torch.inference_mode(), self.autocast():
            return self.model.image_embeds(x)[:, 0].float()


def _scored(logits: torch.Tensor, attn: torch.Tensor | None, attention: bool):
    out = torch.sigmoid(logits.float())
    if not attention:
        return out
    return out, attn.float().mean(dim=1)[:, :, 1:]  # pooled token dropped


def to_host(out):
    if isinstance(out, tuple):
        return tuple(to_host(o) for o in out)
    return out.float().cpu() if out.device.type != "cpu" else out.float()
