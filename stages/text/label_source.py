"""label.source.v1: a source's own labels as the run's labels, mapped by name, no caption parsed.

``source.ram_json.v1`` and ``source.ram_export.v1`` carry a file's labels as ``source_union_label_id`` /
``source_parse_label_id``: ids into the tag list the file was built with (``source_tag_list``). Each id
becomes its name, and the name the run tagset's id through its names and synonyms (``TagSet.id_of``), so
the two lists may order, name and size their tags differently. The output is what ``label.v1`` writes:
``parse_label_id`` per caption, ``union_label_id``, one ``tag_events`` entry per label (stage ``label``,
action ``add``, reason ``source``, score 1.0: the label is given, not scored).

* A name the run tagset lacks is skipped and kept in ``source_unmapped`` (the row's skipped names), and the
  manifest counts them (``unmapped``, most frequent first): a smaller run vocabulary drops labels visibly.
* The union is the file's union, mapped; a record without one gets the union of its per-caption ids. It
  is never widened by the per-caption ids: an export's union is decide's cleaned labels, and its
  ``parse_label_id`` the parse labels before cleaning.
* A record without per-caption ids gets ``parse_label_id`` [] (training then uses the union per caption).
* A row with neither (no labels at all, as opposed to an empty list) is rejected ``row_no_labels``, or,
  with ``unlabelled: keep``, kept with empty labels (a workflow whose decide step adds pseudo-labels).
* An id outside the source list is a broken record: ``row_bad_record``, naming the id and the list.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Literal

import pyarrow as pa
from pydantic import Field

from common.rejects import Reject
from pipeline.registry import register
from pipeline.stage import Stage, StageConfig, StageResult
from stages.columns import TAG_EVENT
from stages.text.vocab_list import read_tag_names, tag_list_file

TOP_UNMAPPED = 25  # names listed in the manifest; the per-shard counts are bounded by the source list


class SourceLabelConfig(StageConfig):
    source_tag_list: str = Field(..., description="the tag list the source's label ids index, line i = id i "
                                 "(RAM's ram_tag_list.txt for the released json), or an export directory "
                                 "(its tag_list.txt)")
    unlabelled: Literal["reject", "keep"] = Field("reject", description="rows with no source labels at all: "
                                                  "reject (row_no_labels) or keep with empty labels")


@register("label.source.v1")
class SourceLabelStage(Stage):
    """Maps a source's own label ids (source_*_label_id) by name into the run's tagset; no caption parsed."""

    Config = SourceLabelConfig
    inputs = ("image_id", "source_union_label_id", "source_parse_label_id")
    outputs = ("parse_label_id", "union_label_id", "tag_events", "source_unmapped")
    needs = ("tagset",)

    def _list_file(self):
        return tag_list_file(self.config.source_tag_list, f"{self.context.step}.source_tag_list")

    def input_fingerprint(self) -> str:
        """The source list's contents (a changed list maps differently); checked here, on the driver, so a
        missing list fails before any shard runs."""
        return hashlib.sha256(self._list_file().read_bytes()).hexdigest()[:16]

    def setup(self) -> None:
        from tagset.tagset import TagSet

        self.list_path = self._list_file()
        self.source_names = read_tag_names(self.list_path)
        self.tagset = TagSet.load(self.context.artifact("tagset"))
        self.to_run = [self.tagset.id_of(n) for n in self.source_names]

    def _map(self, ids: list[int], where: str) -> tuple[list[int], dict[int, list[str]], list[str]]:
        """Run ids (sorted, once each), the source names behind each, and the names the run lacks."""
        n = len(self.source_names)
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise IndexError(f"{where} holds id(s) {bad[:5]}, outside {self.list_path} ({n} names, ids 0..{n - 1})")
        names: dict[int, list[str]] = {}
        unmapped: list[str] = []
        for i in ids:
            name, t = self.source_names[i], self.to_run[i]
            if t is None:
                unmapped.append(name)
            elif name not in names.setdefault(t, []):
                names[t].append(name)
        return sorted(names), names, unmapped

    def label_row(self, union: list[int] | None, per_caption: list[list[int]] | None) -> dict:
        """One row's labels; raises IndexError for an id outside the source list."""
        caps, by_tag, skipped = [], {}, []
        for ci, ids in enumerate(per_caption or []):
            got, names, unmapped = self._map(ids or [], f"source_parse_label_id[{ci}]")
            caps.append(got)
            skipped += unmapped
            for t, ns in names.items():
                ev = by_tag.setdefault(t, {"captions": [], "names": []})
                ev["captions"].append(ci)
                ev["names"] += [x for x in ns if x not in ev["names"]]
        if union is not None:
            got, names, unmapped = self._map(union, "source_union_label_id")
            skipped += unmapped
            for t, ns in names.items():
                ev = by_tag.setdefault(t, {"captions": [], "names": []})
                ev["names"] += [x for x in ns if x not in ev["names"]]
        else:
            got = sorted(by_tag)
        events = [{"tag_id": t, "stage": "label", "action": "add", "reason": "source", "score": 1.0,
                   "evidence": json.dumps(by_tag[t], sort_keys=True)} for t in got]
        return {"parse_label_id": caps, "union_label_id": got, "tag_events": events,
                "source_unmapped": sorted(set(skipped))}

    def __call__(self, batch: pa.Table) -> StageResult:
        ids = batch.column("image_id").to_pylist()
        unions = batch.column("source_union_label_id").to_pylist()
        parses = batch.column("source_parse_label_id").to_pylist()
        keep, rows, rejects = [], [], []
        for k, (iid, union, per) in enumerate(zip(ids, unions, parses)):
            if union is None and per is None and self.config.unlabelled == "reject":
                rejects.append(Reject(iid, "row_no_labels", "the source gave this row no labels (no "
                                      "union_label_id nor parse_label_id); unlabelled: keep keeps it unlabelled"))
                continue
            try:
                rows.append(self.label_row(union, per))
            except IndexError as e:
                rejects.append(Reject(iid, "row_bad_record", str(e), payload=json.dumps(
                    {"union_label_id": union, "parse_label_id": per})[:2000]))
                continue
            keep.append(k)
        out = batch.take(pa.array(keep, pa.int64())).select(["image_id"])
        for name, typ in (("parse_label_id", pa.list_(pa.list_(pa.int32()))), ("union_label_id", pa.list_(pa.int32())),
                          ("tag_events", pa.list_(TAG_EVENT)), ("source_unmapped", pa.list_(pa.string()))):
            out = out.append_column(name, pa.array([r[name] for r in rows], typ))
        return StageResult(out, rejects)

    def shard_summary(self, table: pa.Table, shard: int) -> dict:
        """Labels kept and the source names skipped in one shard (at most the source list's size)."""
        labels = sum(len(u) for u in table.column("union_label_id").to_pylist())
        empty = sum(1 for u in table.column("union_label_id").to_pylist() if not u)
        skipped = Counter(n for names in table.column("source_unmapped").to_pylist() for n in names)
        return {"labels": labels, "rows_without_labels": empty, "unmapped": dict(skipped)}

    def merge_summaries(self, summaries: list) -> dict:
        labels = sum(s["labels"] for s in summaries if s)
        empty = sum(s["rows_without_labels"] for s in summaries if s)
        skipped: Counter = Counter()
        for s in summaries:
            skipped.update((s or {}).get("unmapped", {}))
        top = sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_UNMAPPED]
        summary = f"{labels} labels kept by name; {len(skipped)} source name(s) not in the run's tagset"
        if skipped:
            summary += (f", skipped {sum(skipped.values())} times (most frequent: "
                        f"{', '.join(n for n, _ in top[:8])})")
        return {"labels": labels, "rows_without_labels": empty, "unmapped_names": len(skipped),
                "unmapped_row_names": sum(skipped.values()), "top_unmapped": [list(kv) for kv in top],
                "summary": summary}
