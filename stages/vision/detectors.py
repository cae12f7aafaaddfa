"""Open-vocabulary detector backends for the evidence step's ``ground`` part (``ground.backend``).

``HFGroundingDino``: ``transformers``' ``GroundingDinoForObjectDetection`` + its processor, loaded from
a local directory (never downloaded). Prompts are an image's own tag names, ``"name . name . "``,
chunked so each prompt stays within the text limit. Each tag's phrase score per query is the max
sigmoid logit over the phrase's tokens; the tag's box is the query with the best phrase score, kept
when it reaches ``box_threshold`` (and the phrase's best token reaches ``text_threshold``). Images are
preprocessed on tensors, on the model's device (uint8 uploaded, bilinear antialiased resize to the
processor's short side / long-side cap, rescale, normalise, pad with a pixel mask), so a GPU does the
resize; on CUDA the forward runs in bf16 autocast by default (``precision``).

``OriginalGroundingDino``: the original ``groundingdino`` package's ``.pth`` files, an optional extra,
given as ``CONFIG.py:WEIGHTS.pth``; images resized as its own loader does (short side 800, long side at
most 1333, aspect kept; PIL bilinear).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image


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


def detector_size(w: int, h: int, shortest: int = 800, longest: int = 1333, rule: str = "detr") -> tuple[int, int]:
    """(width, height) a detector resizes a ``w`` x ``h`` image to: the short side to ``shortest``, unless
    the long side would pass ``longest``, then the long side to about ``longest``; aspect kept.

    ``detr``: the original Grounding DINO's transforms (DETR's), the long side from the rounded short
    side; ``hf``: transformers' image processor, the long side from the unrounded one (1333 where DETR
    gives 1332)."""
    raw = None
    if max(w, h) / min(w, h) * shortest > longest:
        raw = longest * min(w, h) / max(w, h)
        shortest = int(round(raw))
    if min(w, h) == shortest:
        return w, h
    scale = raw if rule == "hf" and raw is not None else shortest
    if w < h:
        return shortest, int(scale * h / w)
    return int(scale * w / h), shortest


class HFGroundingDino:
    def __init__(self, path: str, device: str = "cpu", max_text_tokens: int = 256, precision: str = "auto"):
        import torch
        from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

        from model.infer import Placement

        if not Path(path).is_dir():
            raise ValueError(f"ground.detector: {path!r} is not a directory (expected a Hugging Face Grounding "
                             f"DINO checkpoint directory: config.json, weights, processor files)")
        self.processor = GroundingDinoProcessor.from_pretrained(path, local_files_only=True)
        self.place = Placement(device, precision)
        self.model = GroundingDinoForObjectDetection.from_pretrained(path, local_files_only=True).eval().to(device)
        self.device = device
        self.limit = min(max_text_tokens, int(self.model.config.max_text_len))
        ip = self.processor.image_processor
        self.shortest, self.longest = int(ip.size.shortest_edge), int(ip.size.longest_edge)
        self.rescale = float(ip.rescale_factor) if ip.do_rescale else 1.0
        mean, std = (ip.image_mean, ip.image_std) if ip.do_normalize else ((0.0,) * 3, (1.0,) * 3)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32, device=device)[:, None, None]
        self.torch = torch

    def _count(self, text: str) -> int:
        return len(self.processor.tokenizer(text)["input_ids"])

    def pixels(self, images: list):
        """(pixel_values ``[B, 3, H, W]``, pixel_mask ``[B, H, W]``) on the device: each image resized to
        :func:`detector_size` (the processor's rule), normalised, padded to the batch's largest."""
        torch = self.torch
        sizes = [detector_size(*im.size, self.shortest, self.longest, rule="hf") for im in images]
        hh, ww = max(h for _, h in sizes), max(w for w, _ in sizes)
        out = torch.zeros((len(images), 3, hh, ww), device=self.place.device)
        mask = torch.zeros((len(images), hh, ww), dtype=torch.long, device=self.place.device)
        for k, (im, (w, h)) in enumerate(zip(images, sizes)):
            x = self.place.upload(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1))
            x = x.float()[None]
            if (w, h) != im.size:  # as PIL's bilinear on uint8: antialiased, rounded to whole levels
                x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False,
                                                    antialias=True).round_().clamp_(0, 255)
            out[k, :, :h, :w] = (x[0] * self.rescale - self.mean) / self.std
            mask[k, :h, :w] = 1
        return out, mask

    def _forward(self, images: list, texts: list[str]):
        """Queue one batch's forward; returns (sigmoid logits, boxes) on the device."""
        torch = self.torch
        enc = self.processor.tokenizer(texts, padding=True, return_tensors="pt", return_token_type_ids=True)
        pixel_values, pixel_mask = self.pixels(images)
        with torch.inference_mode(), self.place.autocast():
            out = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask,
                             **{k: self.place.upload(v) for k, v in enc.items()})
            return out.logits.float().sigmoid(), out.pred_boxes.float()

    def detect(self, images: list, names: list[list[str]], box_threshold: float, text_threshold: float,
               batch_size: int = 8) -> list[list[dict]]:
        """Per image, the best box of each name (names the detector cannot place are absent).

        (image, prompt chunk) pairs run in batches of ``batch_size``; prompts of a batch are padded
        to the longest, so each keeps its own token positions."""
        found: list[list[dict]] = [[] for _ in images]
        jobs = []  # (image index, prompt text, spans)
        for i, ns in enumerate(names):
            for text, spans in build_prompts(ns, self._count, self.limit):
                jobs.append((i, text, spans))
        parts = (jobs[b:b + batch_size] for b in range(0, len(jobs), batch_size))
        queued = ((part, lambda part=part: self._forward([images[i] for i, _, _ in part], [t for _, t, _ in part]))
                  for part in parts)
        for part, (all_logits, all_boxes) in self.place.run(queued):
            # logits [batch, queries, max_text_len]; boxes cx, cy, w, h in [0, 1]
            for (i, text, spans), logits, boxes in zip(part, all_logits.numpy(), all_boxes.numpy()):
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


def original_checkpoint(spec: str | None) -> tuple[Path, Path]:
    """``CONFIG.py:WEIGHTS.pth`` (the original release's Python config and its weights) -> both paths,
    each checked to exist, the error naming the one that does not."""
    m = re.fullmatch(r"(.+?\.py):(.+)", spec or "")
    if m is None:
        raise ValueError(f"ground.detector: {spec!r}: the groundingdino backend expects 'CONFIG.py:WEIGHTS.pth' "
                         f"(the original release's config file and its weights, joined by ':')")
    cfg, weights = Path(m.group(1)), Path(m.group(2))
    for what, p in (("config", cfg), ("weights", weights)):
        if not p.is_file():
            raise ValueError(f"ground.detector: the {what} file {str(p)!r} does not exist (from {spec!r})")
    return cfg, weights


class OriginalGroundingDino:
    """The original implementation (``pip install groundingdino-py``), for the released ``.pth`` files.
    Runs in fp32 through the package's own ``predict``, one image at a time."""

    def __init__(self, path: str | None, device: str = "cpu"):
        cfg, weights = original_checkpoint(path)
        try:
            from groundingdino.util.inference import load_model  # type: ignore[import-not-found]
        except ImportError as e:
            raise ValueError("ground.backend 'groundingdino' needs the optional extra: pip install "
                             "'ram-data-engine[groundingdino]' (it brings torchvision, which replaces the CPU "
                             "torch wheel)") from e
        self.model = load_model(str(cfg), str(weights), device=device)
        self.device = device

    @staticmethod
    def pixels(img):
        """The package's own test-time transform: short side 800 (long side at most 1333, aspect kept),
        PIL bilinear, ImageNet normalisation; ``[3, H, W]``."""
        import torch

        from model.ram import IMAGENET_MEAN, IMAGENET_STD

        img = img.convert("RGB")
        x = np.asarray(img.resize(detector_size(*img.size), Image.BILINEAR), dtype=np.float32) / 255
        x = torch.from_numpy(x).permute(2, 0, 1)
        return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]

    def detect(self, images, names, box_threshold, text_threshold, batch_size=1):  # pragma: no cover - extra
        from groundingdino.util.inference import predict  # type: ignore[import-not-found]

        out = []
        for img, ns in zip(images, names):
            boxes, logits, phrases = predict(self.model, self.pixels(img), " . ".join(ns) + " .", box_threshold,
                                             text_threshold, device=self.device)
            w, h = img.size
            out.append([{"label": p, "score": float(s), "box": [(cx - bw / 2) * w, (cy - bh / 2) * h,
                                                                 (cx + bw / 2) * w, (cy + bh / 2) * h]}
                        for (cx, cy, bw, bh), s, p in zip(boxes.tolist(), logits.tolist(), phrases)])
        return out


def write_random_grounding_dino(path: Path, words: list[str], tiny: bool = True, max_text_len: int = 16) -> Path:
    """A Grounding DINO directory in Hugging Face format with RANDOM weights and a BERT vocabulary of
    ``words``: the default architecture (Swin-T backbone, BERT-base-sized text encoder, 800/1333 resize)
    or, with ``tiny``, a few-layer one at 64/96 px for tests and CPU smoke checks. For plumbing and speed
    (tests, bench/gpu.py), never for boxes."""
    import torch
    from transformers import (BertConfig, BertTokenizerFast, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoProcessor, SwinConfig)
    from transformers.models.grounding_dino import GroundingDinoImageProcessorPil

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."] + sorted(set(words))
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    if tiny:
        size = {"shortest_edge": 64, "longest_edge": 96}
        cfg = GroundingDinoConfig(
            backbone_config=SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
                                       image_size=64, out_features=["stage2", "stage3", "stage4"]),
            text_config=BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=64),
            d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=20, max_text_len=max_text_len, num_feature_levels=3,
            encoder_n_points=2, decoder_n_points=2)
    else:
        size = {"shortest_edge": 800, "longest_edge": 1333}
        cfg = GroundingDinoConfig(text_config=BertConfig(vocab_size=len(vocab)))
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(cfg).save_pretrained(path)
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessorPil(size=size), tokenizer=tok).save_pretrained(path)
    return Path(path)
