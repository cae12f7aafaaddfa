"""The training objective: ASL on the tagging logits (RAM's), optional distillation, RAM++'s image-text
alignment and RAM's caption generation, as one module's ``forward`` (DDP reduces what it computes)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model.data import EMPTY_ROW
from model.ram import RAM
from model.train import TrainConfig, autocast


def asl_loss(logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float = 7.0, gamma_pos: float = 0.0,
             clip: float = 0.05, eps: float = 1e-8) -> torch.Tensor:
    """Asymmetric loss (Ridnik et al.), summed over classes and batch; a target < 0 (unknown) counts nothing."""
    known = (targets >= 0).float()
    targets = targets.clamp(min=0)
    p = torch.sigmoid(logits.float())
    p_neg = (1 - p + clip).clamp(max=1) if clip > 0 else 1 - p
    loss = targets * torch.log(p.clamp(min=eps)) + (1 - targets) * torch.log(p_neg.clamp(min=eps))
    pt = p * targets + p_neg * (1 - targets)
    gamma = gamma_pos * targets + gamma_neg * (1 - targets)
    return -(loss * torch.pow(1 - pt, gamma) * known).sum()


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
        if cfg.loss == "bce":  # a target < 0 is unknown (model.data.UNKNOWN): left out of the loss
            loss = F.binary_cross_entropy_with_logits(logits.float(), y.clamp(min=0), weight=(y >= 0).float(),
                                                      reduction="sum") / x.shape[0]
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
