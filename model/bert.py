"""BERT blocks with the official RAM parameter names (the "MED" layout of BLIP-style models).

RAM uses three stacks of these layers: the tagging head (cross-attention only, no embeddings), the
image–tag interaction encoder ``tag_encoder`` (self-attention over tag tokens, then cross-attention to
the image) and the image–tag–text decoder ``text_decoder`` (causal self-attention over caption tokens,
then cross-attention to the tag encoder's output, then a tied LM head). Names follow the checkpoints:
``attention.self.query``, ``crossattention.output.LayerNorm``, ``intermediate.dense``, ``cls.predictions``…

Numerics follow the official code: LayerNorm eps 1e-12, exact (erf) GELU, additive attention masks of
-10000 for hidden positions. Attention runs through ``F.scaled_dot_product_attention`` (the additive
mask as its float ``attn_mask``) unless a caller wants the probabilities (``return_attn``: the grounding
maps) or sets ``Attention.fused = False``, which selects the explicit softmax, the reference formula.
No dropout: the engine trains small models for minutes and evaluates released ones; a dropout rate
would be one more knob with nothing here to tune it on.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MASK_VALUE = -10000.0


def additive_mask(keep: torch.Tensor | None, causal_len: int | None = None) -> torch.Tensor | None:
    """``[B, L]`` 1/0 keep-mask (and optionally a causal square) -> additive ``[B, 1, Lq|1, L]``."""
    if keep is None and causal_len is None:
        return None
    mask = None
    if keep is not None:
        mask = (1.0 - keep[:, None, None, :].float()) * MASK_VALUE
    if causal_len is not None:
        tri = torch.ones(causal_len, causal_len, device=keep.device if keep is not None else None).tril()
        causal = ((1.0 - tri) * MASK_VALUE)[None, None]
        mask = causal if mask is None else (mask + causal).clamp(min=MASK_VALUE)
    return mask


class Attention(nn.Module):
    """Multi-head scaled dot-product attention; ``key``/``value`` read ``kv_width``-d inputs."""

    def __init__(self, hidden: int, heads: int, kv_width: int):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).permute(0, 2, 1, 3)

    fused = True  # scaled_dot_product_attention; False: the explicit softmax (same function)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None = None,
                return_attn: bool = False):
        qh, kh, vh = self._split(self.query(q)), self._split(self.key(kv)), self._split(self.value(kv))
        if return_attn or not self.fused:
            ctx, probs = self.explicit(qh, kh, vh, mask)
        else:
            ctx = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=None if mask is None else mask.to(qh.dtype))
            probs = None
        out = ctx.permute(0, 2, 1, 3).reshape(q.shape[0], q.shape[1], -1)
        return (out, probs) if return_attn else (out, None)

    def explicit(self, qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, mask: torch.Tensor | None):
        """The reference formula on split heads: (``softmax(q·kᵀ/√d + mask) v``, the probabilities)."""
        scores = (qh @ kh.transpose(-1, -2)) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores + mask.to(scores.dtype)
        probs = scores.softmax(dim=-1)
        return probs @ vh, probs


class AddNorm(nn.Module):
    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class AttentionBlock(nn.Module):
    """``attention`` / ``crossattention`` in the checkpoints: ``.self`` then ``.output`` (dense + norm)."""

    def __init__(self, hidden: int, heads: int, kv_width: int, eps: float):
        super().__init__()
        self.self = Attention(hidden, heads, kv_width)
        self.output = AddNorm(hidden, hidden, eps)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None = None,
                return_attn: bool = False):
        a, probs = self.self(x, kv, mask, return_attn)
        return self.output(a, x), probs


class Intermediate(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.dense = nn.Linear(hidden, inter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    """[self-attention] -> cross-attention -> feed-forward. The tagging head has no self-attention.

    ``shared``: a layer whose cross-attention and feed-forward modules this layer reuses (RAM ties the
    lowest tag-encoder layers to the tagging head: the same tensors under two names).
    """

    def __init__(self, hidden: int, heads: int, inter: int, kv_width: int, eps: float = 1e-12,
                 self_attention: bool = True, shared: "BertLayer | None" = None):
        super().__init__()
        if self_attention:
            self.attention = AttentionBlock(hidden, heads, hidden, eps)
        if shared is not None:
            self.crossattention, self.intermediate, self.output = shared.crossattention, shared.intermediate, shared.output
        else:
            self.crossattention = AttentionBlock(hidden, heads, kv_width, eps)
            self.intermediate = Intermediate(hidden, inter)
            self.output = AddNorm(inter, hidden, eps)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, self_mask: torch.Tensor | None = None,
                cross_mask: torch.Tensor | None = None, return_attn: bool = False):
        if hasattr(self, "attention"):
            x, _ = self.attention(x, x, self_mask)
        a, probs = self.crossattention(x, kv, cross_mask, return_attn)
        return self.output(self.intermediate(a), a), probs


class BertEncoder(nn.Module):
    def __init__(self, layers: list[BertLayer]):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class BertEmbeddings(nn.Module):
    """Word + absolute position embeddings, LayerNorm (no token types, as in the official MED)."""

    def __init__(self, vocab_size: int, hidden: int, max_positions: int, eps: float = 1e-12):
        super().__init__()
        self.register_buffer("position_ids", torch.arange(max_positions).unsqueeze(0))
        self.word_embeddings = nn.Embedding(vocab_size, hidden)
        self.position_embeddings = nn.Embedding(max_positions, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = self.position_ids[:, : input_ids.shape[1]]
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(pos))


class TextEncoder(nn.Module):
    """``tag_encoder`` (and ``text_decoder.bert``): token embeddings through self+cross-attention layers."""

    def __init__(self, vocab_size: int, hidden: int, layers: int, heads: int, inter: int, kv_width: int,
                 max_positions: int = 512, eps: float = 1e-12, shared: list[BertLayer] | tuple = ()):
        super().__init__()
        self.embeddings = BertEmbeddings(vocab_size, hidden, max_positions, eps)
        self.encoder = BertEncoder([
            BertLayer(hidden, heads, inter, kv_width, eps, shared=shared[i] if i < len(shared) else None)
            for i in range(layers)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        x = self.embeddings(input_ids)
        self_mask = additive_mask(attention_mask, input_ids.shape[1] if causal else None)
        cross_mask = additive_mask(encoder_attention_mask)
        for layer in self.encoder.layer:
            x, _ = layer(x, encoder_hidden_states, self_mask, cross_mask)
        return x


class PredictionTransform(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class LMPredictionHead(nn.Module):
    """``cls.predictions``: transform, then a decoder whose weight is the word embedding matrix."""

    def __init__(self, hidden: int, vocab_size: int, eps: float):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self.transform = PredictionTransform(hidden, eps)
        self.decoder = nn.Linear(hidden, vocab_size, bias=False)
        self.decoder.bias = self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


class LMHead(nn.Module):
    def __init__(self, hidden: int, vocab_size: int, eps: float):
        super().__init__()
        self.predictions = LMPredictionHead(hidden, vocab_size, eps)


class TextDecoder(nn.Module):
    """``text_decoder``: a causal :class:`TextEncoder` plus the tied LM head (BertLMHeadModel layout)."""

    def __init__(self, vocab_size: int, hidden: int, layers: int, heads: int, inter: int, kv_width: int,
                 max_positions: int = 512, eps: float = 1e-12):
        super().__init__()
        self.bert = TextEncoder(vocab_size, hidden, layers, heads, inter, kv_width, max_positions, eps)
        self.cls = LMHead(hidden, vocab_size, eps)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits ``[B, L, vocab]``."""
        h = self.bert(input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask, causal=True)
        return self.cls.predictions(h)

    def loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor,
             encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor | None = None,
             label_smoothing: float = 0.1) -> torch.Tensor:
        """Mean cross-entropy of each position's prediction of the next token (``-100`` targets ignored)."""
        logits = self(input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets[:, 1:].reshape(-1),
                               ignore_index=-100, label_smoothing=label_smoothing)
