"""RAM and RAM++ tagging models with the official parameter names, timm-style anatomy.

Order: helpers, blocks (the cross-attention tagging head), model classes, ``checkpoint_filter_fn``,
factory, default configs, registered entrypoints. RAM's caption branch (``tag_encoder.*``,
``text_decoder.*``: image-tag interaction encoder and image-tag-text decoder, ``model/bert.py``) is
built with ``caption_branch=True`` — then every official key loads strictly, the lowest tag-encoder
layers being the tagging head's own tensors, as in the official model. A tagging-only model (the
default; inference never reads the branch) ignores those keys and their ``position_ids``; every other
key loads strictly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from model.bert import Attention, BertEncoder, BertLayer, TextDecoder, TextEncoder
from model.entrypoints import register_model
from model.swin import SwinTransformer, WindowAttention

# -- helpers ---------------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def set_fused_attention(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Every Swin and BERT attention of ``model`` through ``scaled_dot_product_attention`` (True, the
    default) or the explicit softmax (False: the reference formula, plain matmuls for exporters)."""
    for m in model.modules():
        if isinstance(m, (WindowAttention, Attention)):
            m.fused = enabled
    return model


# -- blocks: the tagging head (BERT layers with only cross-attention) --------------------------------

class TaggingHead(nn.Module):
    """Label queries attend to image tokens (``tagging_head.encoder.layer.N`` in the checkpoints)."""

    def __init__(self, layers: int, hidden: int, heads: int, inter: int, kv_width: int, eps: float = 1e-12):
        super().__init__()
        self.encoder = BertEncoder([BertLayer(hidden, heads, inter, kv_width, eps, self_attention=False)
                                    for _ in range(layers)])

    def forward(self, queries: torch.Tensor, image_embeds: torch.Tensor, return_attn: bool = False):
        """Tagged queries and, with ``return_attn``, the last layer's attention (the one the stages read;
        the layers below keep the fused kernel)."""
        x, probs = queries, None
        last = len(self.encoder.layer) - 1
        for i, layer in enumerate(self.encoder.layer):
            x, probs = layer(x, image_embeds, return_attn=return_attn and i == last)
        return x, probs


def _init_weights(m: nn.Module) -> None:
    """timm's transformer init (truncated normal 0.02 for linear layers and position tables). Loading a
    checkpoint replaces all of it; it matters when a model is trained from scratch (tiny taggers)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):  # the caption branch's token and position tables (BERT's init)
        nn.init.normal_(m.weight, std=0.02)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif hasattr(m, "relative_position_bias_table"):
        nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)


# -- model -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RamConfig:
    """Everything that shapes a model; preprocessing is derived from it, never re-declared."""

    variant: str = "ram"  # ram | ram_plus
    image_size: int = 384
    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 12
    num_classes: int = 4585
    label_dim: int = 512  # label-embedding width (CLIP ViT-B/16 text width)
    head_hidden: int = 768
    head_layers: int = 2
    head_heads: int = 12
    head_intermediate: int = 3072
    descriptions_per_class: int = 51  # RAM++ only
    # RAM's caption branch (tag_encoder + text_decoder), built only when asked: tagging never reads it.
    # Its width, heads and feed-forward are the tagging head's (the lowest layers are the same tensors).
    caption_branch: bool = False
    text_layers: int = 12
    text_vocab: int = 30524  # bert-base-uncased + [DEC] + [ENC]
    text_max_positions: int = 512
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    tag_names: tuple[str, ...] = field(default=(), compare=False)

    @property
    def vision_width(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    @property
    def label_rows(self) -> int:
        return self.num_classes * (self.descriptions_per_class if self.variant == "ram_plus" else 1)


class ThresholdedTagger:
    """What every tagger shares: a ``class_threshold`` buffer and RAM's firing rule."""

    class_threshold: torch.Tensor

    @torch.no_grad()
    def generate_tag(self, pixels: torch.Tensor, classes: torch.Tensor | None = None):
        """Official rule: a tag fires when ``sigmoid(logit) > class_threshold`` (strict)."""
        scores = torch.sigmoid(self(pixels, classes))  # type: ignore[operator]
        th = self.class_threshold if classes is None else self.class_threshold[classes]
        return scores, scores > th

    def set_thresholds(self, thresholds) -> None:
        self.class_threshold.copy_(torch.as_tensor(list(thresholds), dtype=torch.float32))


class RAM(ThresholdedTagger, nn.Module):
    """RAM (``variant='ram'``) and RAM++ (``variant='ram_plus'``) tagging path."""

    def __init__(self, cfg: RamConfig):
        super().__init__()
        self.cfg = cfg
        self.label_embed = nn.Parameter(torch.zeros(cfg.label_rows, cfg.label_dim))
        if cfg.variant == "ram_plus":
            self.reweight_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.visual_encoder = SwinTransformer(cfg.image_size, cfg.embed_dim, list(cfg.depths), list(cfg.num_heads),
                                              cfg.window_size)
        head = TaggingHead(cfg.head_layers, cfg.head_hidden, cfg.head_heads, cfg.head_intermediate, cfg.label_dim)
        if cfg.caption_branch:
            if cfg.variant != "ram":
                raise ValueError("the caption branch (tag_encoder, text_decoder) exists in RAM only, not RAM++")
            # registered before tagging_head: the official state_dict order
            self.tag_encoder = TextEncoder(cfg.text_vocab, cfg.head_hidden, cfg.text_layers, cfg.head_heads,
                                           cfg.head_intermediate, cfg.label_dim, cfg.text_max_positions,
                                           shared=list(head.encoder.layer))
            self.text_decoder = TextDecoder(cfg.text_vocab, cfg.head_hidden, cfg.text_layers, cfg.head_heads,
                                            cfg.head_intermediate, cfg.head_hidden, cfg.text_max_positions)
        self.tagging_head = head
        self.wordvec_proj = nn.Linear(cfg.label_dim, cfg.head_hidden)
        self.fc = nn.Linear(cfg.head_hidden, 1)
        self.image_proj = nn.Linear(cfg.vision_width, cfg.label_dim)
        self.register_buffer("class_threshold", torch.full((cfg.num_classes,), 0.65), persistent=False)
        self.apply(_init_weights)


    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_proj(self.visual_encoder(pixels))

    def label_queries(self, image_embeds: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, N, head_hidden]`` queries; RAM++ reweights each class's descriptions per image."""
        emb = self.label_embed
        if self.cfg.variant == "ram":
            if classes is not None:
                emb = emb[classes]
            return F.relu(self.wordvec_proj(emb)).unsqueeze(0).expand(image_embeds.shape[0], -1, -1)
        d = self.cfg.descriptions_per_class
        emb = emb.view(-1, d, emb.shape[-1])
        if classes is not None:
            emb = emb[classes]
        cls = F.normalize(image_embeds[:, 0, :], dim=-1)
        logits = self.reweight_scale.exp() * torch.einsum("bc,ndc->bnd", cls, emb)
        weights = logits.softmax(dim=-1)
        label = torch.einsum("bnd,ndc->bnc", weights, emb)
        return F.relu(self.wordvec_proj(label))

    def row_queries(self, image_embeds: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """``[B, 1, head_hidden]``: row b's query for its own class ``classes[b]`` alone, what
        ``label_queries(image_embeds[b:b+1], classes[b:b+1])`` gives. The tagging head has no
        self-attention, so a query's output does not depend on which others are asked with it: a batch of
        crops, each to be scored on its own tag, needs one query per crop, not every crop's tag for each."""
        emb = self.label_embed
        if self.cfg.variant == "ram":
            return F.relu(self.wordvec_proj(emb[classes])).unsqueeze(1)
        d = self.cfg.descriptions_per_class
        emb = emb.view(-1, d, emb.shape[-1])[classes]  # [B, d, C]
        cls = F.normalize(image_embeds[:, 0, :], dim=-1)
        weights = (self.reweight_scale.exp() * torch.einsum("bc,bdc->bd", cls, emb)).softmax(dim=-1)
        return F.relu(self.wordvec_proj(torch.einsum("bd,bdc->bc", weights, emb))).unsqueeze(1)

    def forward(self, pixels: torch.Tensor, classes: torch.Tensor | None = None, return_attn: bool = False):
        """Logits ``[B, N]`` (before the sigmoid); with ``return_attn`` also the last layer's attention."""
        img = self.image_embeds(pixels)
        tagged, attn = self.tagging_head(self.label_queries(img, classes), img, return_attn)
        logits = self.fc(tagged).squeeze(-1)
        return (logits, attn) if return_attn else logits

    def caption_loss(self, image_embeds: torch.Tensor, tags, captions, label_smoothing: float = 0.1) -> torch.Tensor:
        """Image-tag-text generation loss: the tag encoder reads the tag text against the image, the
        decoder predicts the caption from it. ``tags``/``captions``: :class:`model.caption.TokenBatch`
        (``model.caption.CaptionTokenizer`` makes them; only caption words are targets, not the prompt)."""
        if not self.cfg.caption_branch:
            raise ValueError("this model has no caption branch; build it with caption_branch=True")
        tag_hidden = self.tag_encoder(tags.ids, tags.mask, image_embeds)
        return self.text_decoder.loss(captions.ids, captions.mask, captions.targets, tag_hidden, tags.mask,
                                      label_smoothing)

    @torch.no_grad()
    def generate_caption(self, pixels: torch.Tensor, tags, tokenizer, max_new_tokens: int = 30) -> list[str]:
        """Greedy captions for ``pixels`` given tag text (``tags``: a TokenBatch), after the prompt."""
        tag_hidden = self.tag_encoder(tags.ids, tags.mask, self.image_embeds(pixels))
        ids = tokenizer.prompt_ids(pixels.shape[0]).to(pixels.device)
        done = torch.zeros(pixels.shape[0], dtype=torch.bool, device=pixels.device)
        for _ in range(max_new_tokens):
            logits = self.text_decoder(ids, torch.ones_like(ids), tag_hidden, tags.mask)[:, -1]
            nxt = logits.argmax(-1).masked_fill(done, tokenizer.pad_token_id)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done |= nxt == tokenizer.sep_token_id
            if bool(done.all()):
                break
        return tokenizer.decode_captions(ids)

    def set_vocabulary(self, label_embed: torch.Tensor, thresholds=None, trainable: bool = True) -> None:
        """Open set: new label rows (``[N, dim]``, or ``[N*D, dim]`` for RAM++) and thresholds."""
        if label_embed.shape[1] != self.cfg.label_dim:
            raise ValueError(f"label embeddings are {label_embed.shape[1]}-d but the model's label_dim is "
                             f"{self.cfg.label_dim}; build the model with label_dim={label_embed.shape[1]}")
        per = self.cfg.descriptions_per_class if self.cfg.variant == "ram_plus" else 1
        if label_embed.shape[0] % per:
            raise ValueError(f"RAM++ needs {per} description rows per class; got {label_embed.shape[0]} rows")
        n = label_embed.shape[0] // per
        self.cfg = replace(self.cfg, num_classes=n)
        self.label_embed = nn.Parameter(label_embed.detach().clone().to(self.fc.weight), requires_grad=trainable)
        th = torch.full((n,), 0.65) if thresholds is None else torch.as_tensor(list(thresholds), dtype=torch.float32)
        self.class_threshold = th.to(self.fc.weight.device)


def _build(cfg: RamConfig, **overrides) -> RAM:
    return RAM(replace(cfg, **overrides))


CFG_RAM_SWIN_L_384 = RamConfig()
CFG_RAM_PLUS_SWIN_L_384 = RamConfig(variant="ram_plus")
# The golden set's tiny official configs (../shared/ref/ram/golden): Swin 24-d, q2l hidden 64, 50 classes.
CFG_RAM_TEST = RamConfig(image_size=224, embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7,
                         num_classes=50, head_hidden=64, head_heads=2, head_intermediate=128)


@register_model
def ram_swin_l_384(**kw) -> RAM:
    return _build(CFG_RAM_SWIN_L_384, **kw)


@register_model
def ram_plus_swin_l_384(**kw) -> RAM:
    return _build(CFG_RAM_PLUS_SWIN_L_384, **kw)


@register_model
def ram_test(**kw) -> RAM:
    return _build(CFG_RAM_TEST, **kw)


@register_model
def ram_plus_test(**kw) -> RAM:
    return _build(replace(CFG_RAM_TEST, variant="ram_plus"), **kw)
