"""Open-vocabulary detector backends for ``ground.v1``.

``HFGroundingDino``: ``transformers``' ``GroundingDinoForObjectDetection`` + its processor, loaded from
a local directory (never downloaded). Prompts are an image's own tag names, ``"name . name . "``,
chunked so each prompt stays within the text limit. Each tag's phrase score per query is the max
sigmoid logit over the phrase's tokens; the tag's box is the query with the best phrase score, kept
when it reaches ``box_threshold`` (and the phrase's best token reaches ``text_threshold``).

``OriginalGroundingDino``: the original ``groundingdino`` package's ``.pth`` files, an optional extra.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def build_prompts(names: list[str], count_tokens, limit: int) -> list[tuple[str, list[tuple[str, int, int]]]]:
    """Split names into prompts of at most ``limit`` tokens: [(text, [(name, char_start, char_end)])]."""
    out: list[tuple[str, list]] = []
    text, spans = "", []
    for name in names:
        piece = f"{name} . "
        if spans and count_tokens(text + piece) > limit:
            out.append((text.strip(), spans))
            text, spans = "", []
        spans.append((name, len(text), len(text) + len(name)))
        text += piece
    if spans:
        out.append((text.strip(), spans))
    return out


class HFGroundingDino:
    def __init__(self, path: str, device: str = "cpu", max_text_tokens: int = 256):
        import torch
        from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

        if not Path(path).is_dir():
            raise ValueError(f"ground.detector: {path!r} is not a directory (expected a Hugging Face Grounding "
                             f"DINO checkpoint directory: config.json, weights, processor files)")
        self.processor = GroundingDinoProcessor.from_pretrained(path, local_files_only=True)
        self.model = GroundingDinoForObjectDetection.from_pretrained(path, local_files_only=True).eval().to(device)
        self.device = device
        self.limit = min(max_text_tokens, int(self.model.config.max_text_len))
        self.torch = torch

    def _count(self, text: str) -> int:
        return len(self.processor.tokenizer(text)["input_ids"])

    def detect(self, images: list, names: list[list[str]], box_threshold: float, text_threshold: float,
               batch_size: int = 8) -> list[list[dict]]:
        """Per image, the best box of each name (names the detector cannot place are absent).

        (image, prompt chunk) pairs run in batches of ``batch_size``; prompts of a batch are padded
        to the longest, so each keeps its own token positions."""
        torch = self.torch
        found: list[list[dict]] = [[] for _ in images]
        jobs = []  # (image index, prompt text, spans)
        for i, ns in enumerate(names):
            for text, spans in build_prompts(ns, self._count, self.limit):
                jobs.append((i, text, spans))
        for b in range(0, len(jobs), batch_size):
            part = jobs[b:b + batch_size]
            enc = self.processor(images=[images[i] for i, _, _ in part], text=[t for _, t, _ in part],
                                 return_tensors="pt", padding=True)
            with torch.inference_mode():
                out = self.model(**{k: v.to(self.device) for k, v in enc.items()})
            all_logits = out.logits.float().sigmoid().cpu().numpy()  # [batch, queries, max_text_len]
            all_boxes = out.pred_boxes.float().cpu().numpy()  # cx, cy, w, h in [0, 1]
            for (i, text, spans), logits, boxes in zip(part, all_logits, all_boxes):
                offsets = self.processor.tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
                w, h = images[i].size
                for name, s, e in spans:
                    toks = [j for j, (a, c) in enumerate(offsets) if c > a and a >= s and c <= e
                            and j < logits.shape[1]]
                    if not toks:
                        continue
                    phrase = logits[:, toks].max(axis=1)
                    q = int(np.argmax(phrase))
                    if phrase[q] < box_threshold or logits[q, toks].max() < text_threshold:
                        continue
                    cx, cy, bw, bh = boxes[q]
                    found[i].append({"label": name, "score": float(phrase[q]), "box": [
                        (cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]})
        return found


class OriginalGroundingDino:
    """The original implementation (``pip install groundingdino-py``), for the released ``.pth`` files."""

    def __init__(self, path: str | None, device: str = "cpu"):
        try:
            from groundingdino.util.inference import load_model  # type: ignore[import-not-found]
        except ImportError as e:
            raise ValueError("ground.backend 'groundingdino' needs the optional extra: pip install "
                             "'ram-data-engine[groundingdino]' (it brings torchvision, which replaces the CPU "
                             "torch wheel)") from e
        if not path or not Path(path).exists():
            raise ValueError(f"ground.detector: {path!r}: expected 'CONFIG.py:WEIGHTS.pth' of the original release")
        cfg, weights = path.split(":", 1) if ":" in path else (None, path)
        self.model = load_model(cfg, weights, device=device)
        self.device = device

    def detect(self, images, names, box_threshold, text_threshold, batch_size=1):  # pragma: no cover - extra
        import torch
        from groundingdino.util.inference import predict  # type: ignore[import-not-found]

        from model.ram import IMAGENET_MEAN, IMAGENET_STD

        out = []
        for img, ns in zip(images, names):
            x = torch.from_numpy(np.asarray(img.resize((800, 800)), dtype=np.float32) / 255).permute(2, 0, 1)
            x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
            boxes, logits, phrases = predict(self.model, x, " . ".join(ns) + " .", box_threshold, text_threshold,
                                             device=self.device)
            w, h = img.size
            out.append([{"label": p, "score": float(s), "box": [(cx - bw / 2) * w, (cy - bh / 2) * h,
                                                                 (cx + bw / 2) * w, (cy + bh / 2) * h]}
                        for (cx, cy, bw, bh), s, p in zip(boxes.tolist(), logits.tolist(), phrases)])
        return out
