"""Batched inference: images in -> raw scores (kept) and tags by the per-class thresholds."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from model.preprocess import to_tensor
from model.ram import RAM


@dataclass
class TagResult:
    scores: torch.Tensor  # [num classes in use], sigmoid scores
    tags: list[str]
    tags_zh: list[str] | None


class Tagger:
    """Wraps a RAM model for batched, optionally class-subset inference (GPU: bf16, channels-last)."""

    def __init__(self, model: RAM, names: list[str], names_zh: list[str] | None = None, batch_size: int = 16,
                 device: str = "cpu", classes: list[int] | None = None, head_chunk: int | None = None):
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.names, self.names_zh = names, names_zh
        self.batch_size = batch_size
        self.classes = torch.tensor(classes, device=self.device) if classes is not None else None
        # The tagging head's activations are [images, classes, 4 x hidden]: on a CPU, a few images at a
        # time keep them in cache; a GPU takes the whole batch.
        self.head_chunk = head_chunk or (batch_size if self.device.type == "cuda" else 2)
        self._queries = None  # RAM's label queries do not depend on the image: computed once

    def _ram_queries(self) -> torch.Tensor:
        if self._queries is None:
            emb = self.model.label_embed if self.classes is None else self.model.label_embed[self.classes]
            self._queries = torch.relu(self.model.wordvec_proj(emb))
        return self._queries

    def class_ids(self) -> list[int]:
        return self.classes.tolist() if self.classes is not None else list(range(len(self.names)))

    @torch.inference_mode()
    def scores(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            img = self.model.image_embeds(x)
            chunks = []
            for i in range(0, img.shape[0], self.head_chunk):
                part = img[i:i + self.head_chunk]
                if self.model.cfg.variant == "ram":
                    q = self._ram_queries().unsqueeze(0).expand(part.shape[0], -1, -1)
                else:
                    q = self.model.label_queries(part, self.classes)
                chunks.append(self.model.fc(self.model.tagging_head(q, part)[0]).squeeze(-1))
            logits = torch.cat(chunks)
        return torch.sigmoid(logits.float()).cpu()

    def tag_images(self, images: list[Image.Image]) -> list[TagResult]:
        out: list[TagResult] = []
        ids = self.class_ids()
        th = self.model.class_threshold.cpu()[ids]
        for i in range(0, len(images), self.batch_size):
            batch = torch.stack([to_tensor(im, self.model.cfg) for im in images[i:i + self.batch_size]])
            for s in self.scores(batch):
                fired = [ids[j] for j in torch.nonzero(s > th).flatten().tolist()]
                out.append(TagResult(s, [self.names[c] for c in fired],
                                     [self.names_zh[c] for c in fired] if self.names_zh else None))
        return out
