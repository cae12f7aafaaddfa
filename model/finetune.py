"""Fine-tuning a released RAM / RAM++ on a new tag list, in the checkpoint's own label space.

A released checkpoint's ``label_embed`` rows are CLIP ViT-B/16 text embeddings (512-d) of its 4,585 tags
(RAM: one prompt-ensembled row per tag; RAM++: 51 description rows per tag), and everything after them
(``wordvec_proj``, the tagging head, ``image_proj``) was trained against that space. So a new tag list keeps
it: a tag the checkpoint knows (by name or synonym, through the checkpoint's tag list) keeps its official
rows bit for bit; a new tag gets rows from the configured text encoder. Those rows are only meaningful in
the same space, which by width alone cannot be told apart from another 512-d space:

* ``new_rows='encoder'``: the encoder's rows as they are. Right for CLIP ViT-B/16 (``text_encoder: clip``
  with local weights); any other width is an error, never a silent mix of widths.
* ``new_rows='project'``: a ridge-regression map from the encoder's space (e.g. MiniLM, 384-d) onto the
  checkpoint's, fit on the tags both know, each projected row normalised. What it costs is measured, not
  guessed: ``projection_cosine`` is the mean cosine between the official row of a known tag and its
  projection when that tag was left out of the fit (5 folds), beside ``baseline_cosine``, what predicting
  every tag as the mean known row scores. A projected row is a guess in the label space; the model has
  never seen it, so new tags lean on fine-tuning more than with CLIP rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


FIT_MAX_TAGS = 2000  # known tags the projection is fit on (RAM++: 51 texts each to encode)


def _key(s: str) -> str:
    return " ".join(s.lower().split())


@dataclass
class LabelTransfer:
    label_embed: torch.Tensor  # [N * per, dim]: the new tag list's rows in the checkpoint's space
    known: dict[int, int]  # our tag id -> the checkpoint's class index
    new: list[int]  # our tag ids whose rows come from the text encoder
    stats: dict = field(default_factory=dict)
    projection: torch.Tensor | None = None  # [encoder dim, dim] with new_rows='project'


class ProjectedEncoder:
    """A text encoder whose embeddings are mapped into a checkpoint's label space (RAM++'s alignment
    loss compares caption embeddings with the image embedding in that space)."""

    def __init__(self, encoder, projection: torch.Tensor):
        self.encoder, self.projection = encoder, projection.double()
        self.dim = projection.shape[1]

    def encode(self, texts: list[str]) -> torch.Tensor:
        return F.normalize((self.encoder.encode(texts).double() @ self.projection).float(), dim=-1)


def match_tags(ckpt_names: list[str], tags: list[tuple[str, list[str]]]) -> dict[int, int]:
    """Our tag id -> the checkpoint's index: by name first, then by synonym (first match in the list wins)."""
    index: dict[str, int] = {}
    for i, n in enumerate(ckpt_names):
        index.setdefault(_key(n), i)
    out = {}
    for t, (name, synonyms) in enumerate(tags):
        for cand in (name, *synonyms):
            if _key(cand) in index:
                out[t] = index[_key(cand)]
                break
    return out


def ridge_map(x: torch.Tensor, y: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """``W`` minimising ``|x W - y|² + alpha |W|²`` (float64; ``x``: [n, a], ``y``: [n, b])."""
    x, y = x.double(), y.double()
    a = x.T @ x + alpha * torch.eye(x.shape[1], dtype=x.dtype)
    return torch.linalg.solve(a, x.T @ y)


def projection_quality(x: torch.Tensor, y: torch.Tensor, folds: int = 5, alpha: float = 0.1) -> dict:
    """Held-out cosine of a ridge projection (``folds``-fold over rows) and of the mean-row baseline."""
    n = x.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    cos, base = [], []
    for f in range(min(folds, n)):
        test = order[f::min(folds, n)]
        train = order[torch.isin(order, test, invert=True)]
        if len(train) == 0:
            continue
        w = ridge_map(x[train], y[train], alpha)
        cos.append(F.cosine_similarity(x[test].double() @ w, y[test].double(), dim=-1))
        base.append(F.cosine_similarity(y[train].double().mean(0, keepdim=True), y[test].double(), dim=-1))
    if not cos:
        return {"projection_cosine": None, "baseline_cosine": None}
    return {"projection_cosine": round(float(torch.cat(cos).mean()), 4),
            "baseline_cosine": round(float(torch.cat(base).mean()), 4)}


def transfer_labels(ckpt_embed: torch.Tensor, ckpt_names: list[str], tags: list[tuple[str, list[str]]],
                    per: int, new_texts=None, encoder=None, new_rows: str = "encoder",
                    encoder_name: str = "the text encoder") -> LabelTransfer:
    """Rows for ``tags`` ((name, synonyms) in tag-id order) in the space of ``ckpt_embed`` ([C * per, dim]).

    ``new_texts(names) -> list[str]``: the texts a tag's rows are encoded from, ``per`` per tag, each row
    its own text (RAM++ descriptions) or, with ``per == 1``, one prompt-ensembled row per tag (then
    ``new_texts`` is None and :func:`model.text.label_embeddings` is used).
    """
    from model.text import label_embeddings

    if ckpt_embed.shape[0] != len(ckpt_names) * per:
        raise ValueError(f"the checkpoint has {ckpt_embed.shape[0]} label rows but its tag list names "
                         f"{len(ckpt_names)} tags ({per} row(s) per tag expected): wrong init_tag_list?")
    dim = ckpt_embed.shape[1]
    rows = ckpt_embed.detach().float().view(len(ckpt_names), per, dim)
    known = match_tags(ckpt_names, tags)
    new = [t for t in range(len(tags)) if t not in known]
    out = torch.empty(len(tags), per, dim)
    for t, c in known.items():
        out[t] = rows[c]
    stats = {"tags_known": len(known), "tags_new": len(new), "label_dim": dim}

    def encode(names: list[str]) -> torch.Tensor:  # [len(names), per, encoder dim]
        if new_texts is None:
            return label_embeddings(encoder, names).unsqueeze(1)
        emb = F.normalize(encoder.encode(new_texts(names)).float(), dim=-1)
        return emb.view(len(names), per, -1)

    if new:
        if encoder is None:
            raise ValueError(f"{len(new)} tag(s) are not in the checkpoint's tag list (e.g. "
                             f"{tags[new[0]][0]!r}) and no text encoder is set to give them label rows")
        enc_new = encode([tags[t][0] for t in new])
        if enc_new.shape[-1] != dim and new_rows != "project":
            raise ValueError(
                f"{encoder_name} is {enc_new.shape[-1]}-d but the checkpoint's label space is {dim}-d: its "
                f"rows for the {len(new)} new tag(s) would not fit. Use text_encoder: clip with local ViT-B/16 "
                f"weights (the checkpoint's own space), or new_tag_rows: project to map {encoder_name}'s rows "
                f"into the checkpoint's space by a linear fit on the {len(known)} tags both know (a guess: "
                f"the step reports its held-out cosine)")
        if new_rows == "project":
            if len(known) < 2:
                raise ValueError(f"new_tag_rows: project fits on the tags the checkpoint knows; only "
                                 f"{len(known)} of the tag list's are in its tag list")
            ids = sorted(known)[:FIT_MAX_TAGS]
            x = encode([tags[t][0] for t in ids]).mean(1)  # class means on both sides (RAM++: 51 rows each)
            y = torch.stack([rows[known[t]].mean(0) for t in ids])
            w = ridge_map(x, y)
            enc_new = F.normalize((enc_new.double() @ w).float(), dim=-1)
            stats.update({"new_rows": "project", **projection_quality(x, y)})
        else:
            stats["new_rows"] = "encoder"
        out[new] = enc_new.to(out.dtype)
    return LabelTransfer(out.view(len(tags) * per, dim), known, new, stats,
                         w if new and new_rows == "project" else None)
