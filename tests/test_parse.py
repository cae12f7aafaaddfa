import pyarrow as pa
import pytest

from stages.columns import ROWS_SCHEMA


@pytest.mark.parametrize("caption, kind, expected", [
    ("A man riding a horse on the beach.", "actions", ["ride"]),
    ("Two people dining at a table.", "actions", ["dine"]),
    ("A group of people standing in a field.", "objects", ["people"]),
    ("Two red cars parked next to a tree.", "objects", ["car", "tree"]),
    ("Two red cars parked next to a tree.", "attributes", ["red"]),
    ("A woman holding a tennis racket.", "objects", ["woman", "tennis racket"]),
    ("An orange ladder on the grass.", "attributes", ["orange"]),
    ("An orange ladder on the grass.", "objects", ["ladder", "grass"]),
    ("A glass of orange juice.", "objects", ["glass", "orange juice"]),
    ("A man sitting on a bench in the living room.", "scenes", ["living room"]),
    ("He is holding it in his hand.", "objects", ["hand"]),
])
def test_candidates(parse_stage, caption, kind, expected):
    from tagset.sng import candidates

    ((graph, doc),) = list(parse_stage.parser.parse([caption]))
    assert candidates(graph, doc)[kind] == expected


def test_pronouns_are_not_entities(sng):
    ((graph, doc),) = list(sng.parse(["She gives it to him next to a car."]))
    heads = [e["lemma_head"] for e in graph["entities"]]
    assert heads == ["car"]
    assert all(r["subject"] < len(heads) and r["object"] < len(heads) for r in graph["relations"])


def _batch(rows):
    return pa.Table.from_pylist([{"image_id": i, "image": "x.jpg", "image_bytes": None, "captions": c}
                                 for i, c in rows], schema=ROWS_SCHEMA)


BAD = [
    (None, "caption_null"),
    ("", "caption_empty"),
    ("   \t ", "caption_whitespace"),
    ("word " * 1001, "caption_too_long"),
    ("un perro corre en el parque con una pelota roja", "caption_not_english"),
    ("一只狗在公园里跑", "caption_not_english"),
    ("a dog\x07 in the park", "caption_control_chars"),
    ("a <b>dog</b> in the park", "caption_html"),
]


@pytest.mark.parametrize("caption, code", BAD)
def test_bad_caption_lands_in_rejects_with_its_code(parse_stage, caption, code):
    res = parse_stage(_batch([("img1", [caption, "A dog in the park."])]))
    assert [r.code for r in res.rejects] == [code]
    assert res.rejects[0].level == "caption" and res.rejects[0].caption_index == 0
    assert res.table.column("captions").to_pylist() == [["A dog in the park."]]


def test_row_with_only_bad_captions_is_rejected_and_counted(parse_stage):
    res = parse_stage(_batch([("a", [c for c, _ in BAD]), ("b", ["A cat on a sofa."])]))
    row_rejects = [r for r in res.rejects if r.level == "row"]
    assert [(r.image_id, r.code) for r in row_rejects] == [("a", "row_no_captions")]
    assert res.table.column("image_id").to_pylist() == ["b"]
    assert sorted(r.code for r in res.rejects if r.level == "caption") == sorted(code for _, code in BAD)


def test_html_entities_are_decoded_not_rejected(parse_stage):
    res = parse_stage(_batch([("a", ["Salt &amp; pepper on a table"])]))
    assert not res.rejects
    assert res.table.column("captions").to_pylist() == [["Salt & pepper on a table"]]


def test_empty_batch_keeps_schema(parse_stage):
    res = parse_stage(_batch([]))
    assert res.table.num_rows == 0 and "parsed" in res.table.column_names
