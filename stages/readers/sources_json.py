"""Streamed readers for the JSON lists other taggers train on: RAM's own training json and BLIP/ALBEF's
caption json. Both read a JSON array by element ranges or a JSONL file by line ranges
(``stages/readers/ranged.py``), so a 3.5 GB file is never loaded whole.

An image given only as an http(s) URL is rejected by default (``row_image_url_only``: download it
first with img2dataset); ``urls: keep`` keeps such rows for workflows that read captions only.
"""
from __future__ import annotations

import json
from typing import Literal

import pyarrow as pa
from pydantic import Field

from common.rejects import Reject
from pipeline.registry import register
from stages.columns import ROWS_SCHEMA
from stages.readers import fs
from stages.readers.ids import path_id, stem_id, url_id
from stages.readers.ranged import Entry, Parsed, RangeReader, RangeReaderConfig, dedupe, merge_by_key, text_of

_INT32 = 2**31


class JsonListConfig(RangeReaderConfig):
    format: Literal["auto", "json", "jsonl"] = Field("auto", description="auto: a JSON array if the file starts "
                                                                         "with '[', else JSON lines")
    image_id: Literal["path", "stem"] = Field("path", description="path: the image's path relative to image_dir, "
                                                                  "without extension (VG_100K/1); stem: its file "
                                                                  "name without extension (1), which collides "
                                                                  "across folders")
    urls: Literal["reject", "keep"] = Field("reject", description="rows whose image is only an http(s) URL: reject "
                                                                  "(download them first, with img2dataset) or keep")


class _JsonListReader(RangeReader):
    Config = JsonListConfig

    def detect(self, head: bytes) -> Literal["json", "lines"]:
        lead = head.lstrip(b" \t\r\n\xef\xbb\xbf")[:1]
        fmt = self.config.format
        if fmt == "json" or (fmt == "auto" and lead == b"["):
            if lead not in (b"[", b""):
                raise ValueError(f"not a JSON array (starts with {lead!r})")
            return "json"
        return "lines"

    def record(self, raw: bytes, where: str) -> dict | Reject | None:
        if not raw.strip():
            return None
        try:
            item = json.loads(raw)
        except ValueError as e:
            return Reject(None, "row_bad_record", f"{where}: not valid JSON: {e}", payload=text_of(raw))
        if not isinstance(item, dict):
            return Reject(None, "row_bad_record", f"{where}: record is not an object", payload=text_of(raw))
        return item

    def image_id(self, image: str) -> str:
        """The path relative to the image root (or the stem) of a file name; a URL's id is a hash of it, as
        for CC3M (``stages/readers/ids.py``)."""
        if fs.is_http_url(image):
            return url_id(image)
        return path_id(image, self.config.image_dir) if self.config.image_id == "path" else stem_id(image)

    def resolve(self, image: str, path: str) -> str:
        return image if fs.is_http_url(image) else self.image_path(image, path)


def _captions(v: object) -> list[str | None] | None:
    """A caption field as a list (a string is one caption; null or missing is none)."""
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(c is None or isinstance(c, str) for c in v):
        return list(v)
    return None


def _ids(v: object) -> bool:
    return isinstance(v, list) and all(type(x) is int and -_INT32 <= x < _INT32 for x in v)


RAM_ROWS_SCHEMA = ROWS_SCHEMA.append(pa.field("source_union_label_id", pa.list_(pa.int32()))).append(
    pa.field("source_parse_label_id", pa.list_(pa.list_(pa.int32()))))


@register("source.ram_json.v1")
class RamJson(_JsonListReader):
    """RAM's training json (the released ``ram_train`` annotations): a list of ``{image_path, caption,
    union_label_id, parse_label_id}``. The released labels are kept as evidence in
    ``source_union_label_id`` / ``source_parse_label_id`` (ids into the tag list the file was built with,
    RAM's 4,585 tags for the released files); null when the record has none.

    image_id is the path relative to ``image_dir`` without extension (``image_id: stem``: the file name):
    a second record of an id in the same range, or right after it, is rejected (``row_duplicate_id``,
    its captions kept as payload); one in another range fails the input step.
    """

    outputs = ("image", "image_bytes", "captions", "source_union_label_id", "source_parse_label_id")
    schema = RAM_ROWS_SCHEMA

    def parse(self, raw: bytes, where: str, path: str) -> Parsed:
        item = self.record(raw, where)
        if not isinstance(item, dict):
            return item
        name = item.get("image_path")
        if not name or not isinstance(name, str):
            return Reject(None, "row_bad_record", f"{where}: record without image_path", payload=text_of(raw))
        iid = self.image_id(name)
        caps = _captions(item.get("caption"))
        union, per_caption = item.get("union_label_id"), item.get("parse_label_id")
        problem = ("caption is not a string or a list of strings" if caps is None else
                   "union_label_id is not a list of int32 tag ids" if union is not None and not _ids(union) else
                   "parse_label_id is not a list of lists of int32 tag ids" if per_caption is not None and not (
                       isinstance(per_caption, list) and all(_ids(x) for x in per_caption)) else None)
        if problem:
            return Reject(iid, "row_bad_record", f"{where}: {problem}", payload=text_of(raw))
        return Entry(iid, {"image_id": iid, "image": self.resolve(name, path), "captions": caps,
                           "source_union_label_id": union, "source_parse_label_id": per_caption})


@register("source.caption_json.v1")
class CaptionJson(_JsonListReader):
    """BLIP/ALBEF caption json: a list of ``{image, caption}`` (caption a string or a list; BLIP's
    web-caption files name the image ``url``). Records of one image in a row are merged into one row
    with all their captions, across range boundaries too. Records of an image that are not
    consecutive are merged when they fall in the same range; in different ranges they give two rows
    of one image_id, which fails the input step, so sort such a file by image first
    (``jq 'sort_by(.image)'``). image_id is the path relative to ``image_dir`` without extension; with
    ``image_id: stem``, two different images with one stem in a range: the later is rejected
    (``row_duplicate_id``).
    """

    def parse(self, raw: bytes, where: str, path: str) -> Parsed:
        item = self.record(raw, where)
        if not isinstance(item, dict):
            return item
        name = item.get("image") if item.get("image") is not None else item.get("url")
        if not name or not isinstance(name, str):
            return Reject(None, "row_bad_record", f"{where}: record without image (or url)", payload=text_of(raw))
        caps = _captions(item.get("caption"))
        iid = self.image_id(name)
        if caps is None:
            return Reject(iid, "row_bad_record", f"{where}: caption is not a string or a list of strings",
                          payload=text_of(raw))
        return Entry(name, {"image_id": iid, "image": self.resolve(name, path), "captions": caps})

    def combine(self, entries: list[Entry]) -> tuple[list[dict], list[Reject]]:
        return dedupe(merge_by_key(entries), "this shard's range of the file (another image with this id)")
