"""Stable reject codes and the reject record. Rows that fail carry one of these codes into their step's
rejects table; every layer (readers, stages, the trainer, the engine) raises them the same way.

Codes are part of the data contract: add new ones, never rename or reuse. A test pins this list.
"""
from __future__ import annotations

from dataclasses import dataclass

REJECT_CODES: dict[str, str] = {
    # captions (level "caption": the caption is removed from the row, the row goes on)
    "caption_null": "caption is null",
    "caption_not_string": "caption is not a string",
    "caption_empty": "caption is empty",
    "caption_whitespace": "caption is whitespace only",
    "caption_too_long": "caption has more words than parse.max_words",
    "caption_control_chars": "caption contains control characters",
    "caption_html": "caption contains HTML markup",
    "caption_not_english": "caption does not look like English",
    # rows (level "row": the row leaves the dataset here)
    "row_no_image": "row has neither an image path nor image bytes",
    "row_no_captions": "row has no usable caption left",
    "row_duplicate_id": "image_id already seen earlier in the input",
    "row_bad_record": "record in the input file has the wrong shape",
    "row_image_url_only": "row's image is only an http(s) URL: download it first (img2dataset), then read its output",
    "row_no_labels": "row carries no labels from its source (label.source.v1, unlabelled: reject)",
    "image_decode_failed": "image could not be decoded",
    "image_truncated": "image file ends early (truncated)",
    "image_too_small": "image is smaller than the stage's min_side",
    "image_too_large": "image has more pixels than the stage's max_pixels",
    # input files (level "input": a whole file could not be read; the run goes on without it)
    "input_missing": "input file does not exist",
    "input_unreadable": "input file could not be read or parsed",
}


@dataclass(frozen=True)
class Reject:
    image_id: str | None
    code: str
    reason: str
    level: str = "row"  # row | caption | input
    caption_index: int | None = None
    payload: str | None = None

    def __post_init__(self) -> None:
        if self.code not in REJECT_CODES:
            raise ValueError(f"unknown reject code {self.code!r}; add it to common.rejects.REJECT_CODES")
        if self.level not in ("row", "caption", "input"):
            raise ValueError(f"bad reject level {self.level!r}")
