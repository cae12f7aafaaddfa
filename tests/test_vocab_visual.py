"""vocab.wordnet.v2 (issue 15): visual-word rules, compound and spelling merges, canonical names,
adopt through the same merges, and reference metrics that the build never reads. Real WordNet."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tagset.tagset import Tag, TagSet
from tagset.vocab import DATA, TagCounts, adopt_summary, adopt_vocab, build_vocab, load_overrides, visual_judge

NO_OVERRIDES = {"force_merge": [], "force_split": [], "drop": [], "keep": []}


def counts_of(images: list[list[str]], kind: str = "objects") -> TagCounts:
    c = TagCounts()
    for names in images:
        c.add_image([{kind: names}])
    return c


def v2(counts: TagCounts, overrides: dict | None = None, **kw):
    ov = overrides or NO_OVERRIDES
    return build_vocab(counts, stoplist=set(), overrides=ov, judge=visual_judge(keep=ov.get("keep", [])),
                       variants=True, short_name_share=0.25, **kw)


def drops(decisions: list[dict]) -> dict[str, dict]:
    return {d["tag"]: d for d in decisions if d["action"] == "drop"}


def test_surf_board_and_surfboard_are_one_id_named_surfboard():
    ts, decisions = v2(counts_of([["surf board"], ["surf board"], ["surfboard"], ["dog"]]))
    assert ts.id_of("surf board") == ts.id_of("surfboard") is not None
    tag = ts.tags[ts.id_of("surfboard")]
    assert tag.name == "surfboard" and tag.synonyms == ["surf board"] and tag.count == 3
    assert {"tag": "surfboard", "action": "merge", "into": "surfboard", "rule": "closed_compound",
            "synset": "surfboard.n.01"} not in decisions  # the name is never merged into itself
    assert any(d["action"] == "name" and d["tag"] == "surfboard" and d["rule"] == "wordnet_spelling"
               for d in decisions)


def test_a_split_compound_alone_takes_its_wordnet_spelling_and_keeps_the_parsed_one():
    ts, _ = v2(counts_of([["cell phone"], ["cell phone"], ["tooth brush"]]))
    assert ts.tags[ts.id_of("cell phone")].name == "cellphone"
    assert ts.tags[ts.id_of("tooth brush")].name == "toothbrush"
    assert ts.tags[ts.id_of("cellphone")].synset == "cellular_telephone.n.01"


def test_a_closed_form_of_another_kind_is_not_a_spelling():
    # WordNet's "leatherjacket" is a fish: a leather jacket stays a jacket phrase
    ts, _ = v2(counts_of([["leather jacket"]]))
    assert ts.names == ["leather jacket"]


def test_sizes_amounts_and_ages_are_dropped_with_their_rule():
    ts, decisions = v2(counts_of([["large", "several", "small", "many", "young", "red"]], "attributes"))
    assert ts.names == ["red"]
    d = drops(decisions)
    assert d["large"]["rule"] == "property_not_visible" and d["large"]["property"] == "size.n.01"
    assert d["several"]["rule"] == "no_visible_property"
    assert d["many"]["property"] == "numerousness.n.01" and d["young"]["property"] == "age.n.01"
    assert all(x["kind"] == "attribute" and x["count"] == 1 for x in d.values())


@pytest.mark.parametrize("word", ["red", "wooden", "wet", "gray", "striped", "round", "broken", "plastic", "metal"])
def test_visible_attributes_are_kept(word):
    ts, decisions = v2(counts_of([[word]], "attributes"))
    assert ts.names == [word], drops(decisions)


def test_relational_adjectives_go():
    ts, decisions = v2(counts_of([["musical", "digital", "wooden"]], "attributes"))
    assert ts.names == ["wooden"]
    assert {d["rule"] for d in drops(decisions).values()} == {"relational_adjective"}


def test_light_verbs_and_actions_no_one_sees_are_dropped():
    ts, decisions = v2(counts_of([["hold", "look", "come", "try", "include", "know", "walk", "ride", "eat"]],
                                 "actions"))
    assert sorted(ts.names) == ["eat", "ride", "walk"]
    d = drops(decisions)
    assert {n for n, x in d.items() if x["rule"] == "light_verb"} == {"hold", "look", "come", "try", "include"}
    assert d["know"] == {"tag": "know", "action": "drop", "rule": "action_not_visible", "synset": "know.v.01",
                         "lexfile": "verb.cognition", "kind": "action", "count": 1}


def test_nouns_by_lexicographer_file_with_a_concrete_later_sense():
    ts, decisions = v2(counts_of([["idea", "year", "name", "dog", "heart", "kite", "arrow", "cloud", "fashion week",
                                   "brick wall", "night"]]))
    assert sorted(ts.names) == ["arrow", "brick wall", "cloud", "dog", "heart", "kite", "night"]
    d = drops(decisions)
    assert d["idea"]["rule"] == "noun_not_visual" and d["idea"]["lexfile"] == "noun.cognition"
    assert d["year"]["lexfile"] == "noun.time"
    assert d["fashion week"]["rule"] == "head_not_visual" and d["fashion week"]["head"] == "week"


def test_car_and_automobile_still_merge_and_glass_and_glasses_stay_apart():
    ts, decisions = v2(counts_of([["car"], ["car"], ["automobile"], ["glass"], ["glasses"], ["glasses"]]))
    assert ts.id_of("automobile") == ts.id_of("car") and ts.tags[ts.id_of("car")].name == "car"
    assert {"tag": "automobile", "action": "merge", "into": "car", "rule": "same_first_synset",
            "synset": "car.n.01"} in decisions
    assert ts.id_of("glass") != ts.id_of("glasses")
    shipped = load_overrides(DATA / "overrides.yaml")
    ts, _ = v2(counts_of([["glass"], ["glasses"], ["glasses"]]), shipped)
    assert ts.id_of("glass") != ts.id_of("glasses")


def test_british_and_american_spellings_merge_where_wordnet_lists_both():
    ts, decisions = v2(counts_of([["colour"], ["colour"], ["color"], ["tyre"], ["tire"]]))
    assert ts.id_of("colour") == ts.id_of("color")
    assert ts.tags[ts.id_of("color")].name == "colour"  # the more frequent spelling names it
    assert ts.id_of("tyre") == ts.id_of("tire")
    assert {d["rule"] for d in decisions if d["action"] == "merge"} == {"spelling_variant"}
    # one synset is not enough: crew and crowd share one, but are two words
    ts, _ = v2(counts_of([["crowd"], ["crew"]]))
    assert ts.id_of("crowd") != ts.id_of("crew")


def test_a_shorter_lemma_common_in_english_and_here_names_the_id():
    ts, decisions = v2(counts_of([["airplane"]] * 4 + [["plane"]] * 2))
    tag = ts.tags[ts.id_of("airplane")]
    assert tag.name == "plane" and tag.synonyms == ["airplane"] and tag.count == 6
    assert {"tag": "plane", "action": "name", "rule": "short_lemma", "over": "airplane"} in decisions
    # too rare here: the leader keeps the name
    ts, _ = v2(counts_of([["airplane"]] * 9 + [["plane"]]))
    assert ts.tags[ts.id_of("plane")].name == "airplane"


def test_a_participle_glued_to_its_subject_joins_the_subject():
    ts, decisions = v2(counts_of([["zebra"], ["zebra standing"], ["brick building"]]))
    assert ts.id_of("zebra standing") == ts.id_of("zebra")
    assert ts.id_of("brick building") != ts.id_of("brick")
    assert any(d["tag"] == "zebra standing" and d["rule"] == "noun_then_participle" for d in decisions)


def test_the_overrides_file_still_wins_last():
    counts = counts_of([["large", "red", "cup", "mug", "car", "automobile", "lie"]])
    overrides = {"force_merge": [["cup", "mug"]], "force_split": [["car", "automobile"]], "drop": ["red"],
                 "keep": ["large"]}
    ts, decisions = v2(counts, overrides)
    assert ts.id_of("large") is not None  # keep exempts it from the visual rules
    assert ts.id_of("red") is None and ts.id_of("cup") == ts.id_of("mug")
    assert ts.id_of("car") != ts.id_of("automobile")
    assert ts.id_of("lie") is None  # no keep here: "lie" is a state in WordNet
    rules = {(d["tag"], d["action"], d["rule"]) for d in decisions}
    assert {("red", "drop", "override"), ("mug", "merge", "override"), ("automobile", "split", "override")} <= rules
    shipped = load_overrides(DATA / "overrides.yaml")
    assert "lie" in shipped["keep"]
    ts, _ = v2(counts_of([["lie", "walk"]], "actions"), shipped)
    assert sorted(ts.names) == ["lie", "walk"]


def test_v1_is_unchanged_by_the_v2_keywords():
    counts = counts_of([["large", "surf board", "idea"]])
    ts, decisions = build_vocab(counts, stoplist=set(), overrides=NO_OVERRIDES)
    assert sorted(ts.names) == ["idea", "large", "surf board"]
    assert decisions == []


def test_shard_counts_merge_into_the_counts_of_all_images():
    images = [[{"objects": ["dog", "car"]}], [{"objects": ["dog"], "actions": ["run"]}], [{"attributes": ["red"]}]]
    whole = TagCounts()
    for im in images:
        whole.add_image(im)
    a, b = TagCounts(), TagCounts()
    a.add_image(images[0])
    for im in images[1:]:
        b.add_image(im)
    merged = a.merge(b)
    assert (merged.images, merged.captions, merged.kinds) == (whole.images, whole.captions, whole.kinds)


def test_adopt_maps_through_the_same_merges_and_reports_what_it_cannot():
    base = TagSet([Tag(0, "surfboard"), Tag(1, "pavement"), Tag(2, "person"), Tag(3, "color"), Tag(4, "dog"),
                   Tag(5, "fridge")])
    counts = counts_of([["surf board", "sidewalk", "people"], ["colour", "puppy"], ["unicorn"], ["unicorn"],
                        ["refrigerator"]])
    ts, decisions = adopt_vocab(base, counts, variants=True, overrides=load_overrides(DATA / "overrides.yaml"))
    rule = {d["tag"]: d["rule"] for d in decisions}
    assert ts.id_of("surf board") == 0 and rule["surf board"] == "variant_spelling"
    assert ts.id_of("sidewalk") == 1 and rule["sidewalk"] == "synset_lemma"
    assert ts.id_of("people") == 2 and rule["people"] == "override"
    assert ts.id_of("colour") == 3 and ts.id_of("puppy") == 4 and rule["puppy"] == "synset_hypernym"
    assert ts.id_of("unicorn") is None and ts.id_of("refrigerator") is None  # never down to a hyponym
    summary = adopt_summary(ts, counts)
    assert summary["mapped_share"] == round(5 / 8, 4)
    assert summary["top_unmapped"] == [["unicorn", 2], ["refrigerator", 1]]
    v1, _ = adopt_vocab(base, counts)
    assert v1.id_of("surf board") is None and v1.id_of("sidewalk") == 1


# -- the stage: reference metrics after the build, never read by it ---------------------------


def _rows(tmp_path) -> list:
    parsed = [[{"objects": ["dog", "surf board"], "attributes": ["red", "large"], "actions": ["ride"]}],
              [{"objects": ["dog", "automobile"], "scenes": ["beach"], "actions": ["hold"]}],
              [{"objects": ["car", "idea"], "attributes": ["wooden"]}]]
    path = tmp_path / "part-00000.parquet"
    pq.write_table(pa.Table.from_pylist([{"image_id": str(i), "parsed": p} for i, p in enumerate(parsed)]), path)
    return [path]


def _run(use: str, tmp_path, **config):
    from pipeline.registry import get
    from pipeline.stage import RowSource, StageContext

    cls = get(use)
    stage = cls(cls.Config(**config), StageContext(str(tmp_path), "vocab"))
    return stage.run(RowSource(_rows(tmp_path)))


@pytest.mark.parametrize("use", ["vocab.wordnet.v1", "vocab.wordnet.v2"])
def test_reference_never_changes_the_build(tmp_path, use):
    ref = tmp_path / "ref.txt"
    ref.write_text("dog\ncar\nsurfboard\nred\nbeach\nride")
    plain = _run(use, tmp_path)
    scored = _run(use, tmp_path, reference=str(ref))
    assert "reference" not in plain.stats
    for name in ("tag_list.txt", "tag_list_threshold.txt", "synonyms.json", "decisions.json"):
        assert scored.files[name] == plain.files[name], name
    assert scored.tables["tagset"].equals(plain.tables["tagset"])
    m = scored.stats["reference"]
    assert m["reference_names"] == 6 and m["ids"] == len(scored.tables["tagset"])
    assert "reference precision" in scored.stats["summary"]


def test_v2_stage_on_hand_made_rows(tmp_path):
    res = _run("vocab.wordnet.v2", tmp_path)
    names = res.files["tag_list.txt"].decode().split("\n")
    assert sorted(names) == ["beach", "car", "dog", "red", "ride", "surfboard", "wooden"]
    dropped = {d["tag"]: d["rule"] for d in json.loads(res.files["decisions.json"]) if d["action"] == "drop"}
    assert dropped == {"large": "property_not_visible", "hold": "light_verb", "idea": "noun_not_visual"}
    assert ["car", "automobile"] in res.stats["largest_groups"]


def test_a_missing_reference_is_a_note_not_a_crash(tmp_path):
    res = _run("vocab.wordnet.v2", tmp_path, reference=str(tmp_path / "absent.txt"))
    assert "not found" in res.stats["reference"]["note"] and "metrics skipped" in res.stats["summary"]


def test_adopt_mode_reports_the_mapped_share(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("dog\ncar\nsurfboard")
    res = _run("vocab.wordnet.v2", tmp_path, mode="adopt", tag_list=str(lst))
    a = res.stats["adopt"]
    assert a["names_mapped"] == 4 and ["red", 1] in a["top_unmapped"]  # dog, surf board, car, automobile
    assert "of parsed tag occurrences mapped" in res.stats["summary"]


def test_reference_metrics_by_name_and_by_concept():
    from tagset.reference import reference_metrics

    ts = TagSet([Tag(0, "car", ["automobile"]), Tag(1, "sidewalk"), Tag(2, "red", kind="attribute"), Tag(3, "idea")])
    m = reference_metrics(ts, ["automobile", "pavement", "red", "dog"], ks=(2, 4))
    assert m["precision"] == {"name": {"2": 0.5, "4": 0.5}, "concept": {"2": 1.0, "4": 0.75}}
    assert m["by_kind"]["object"]["4"] == {"ids": 3, "name": 0.3333, "concept": 0.6667}
    assert m["by_kind"]["attribute"]["2"] == {"ids": 0, "name": None, "concept": None}
    assert m["reached"] == {"name": 2, "concept": 3, "by_kind": {"attribute": {"name": 1, "concept": 1},
                                                                  "object": {"name": 1, "concept": 2}}}


# -- the scene world keeps every class, colour and scene --------------------------------------


def test_scene_world_classes_colours_and_scenes_all_stay_tags(parse_stage):
    from stages.columns import ROWS_SCHEMA
    from stages.world.generate import COLOURS, SCENES, make_image
    from stages.world.shapes import SHAPES

    worlds = [make_image(0, i, size=32) for i in range(240)]
    batch = pa.Table.from_pylist([{"image_id": w.image_id, "image": None, "image_bytes": None,
                                   "captions": w.captions} for w in worlds], schema=ROWS_SCHEMA)
    counts = TagCounts()
    for parsed in parse_stage(batch).table.column("parsed").to_pylist():
        counts.add_image(parsed)
    shipped = load_overrides(DATA / "overrides.yaml")
    ts, decisions = build_vocab(counts, min_count=3, overrides=shipped, judge=visual_judge(keep=shipped["keep"]),
                                variants=True, short_name_share=0.25)
    wanted = [*SHAPES, *COLOURS, *SCENES]
    assert len(wanted) == 26 + 10 + 7
    missing = [w for w in wanted if ts.id_of(w) is None]
    assert not missing, [d for d in decisions if d["tag"] in missing]
    v1, _ = build_vocab(counts, min_count=3, overrides=shipped)
    assert {ts.tags[ts.id_of(w)].kind for w in SHAPES} == {v1.tags[v1.id_of(w)].kind for w in SHAPES}
    assert {d["tag"] for d in decisions if d["action"] == "drop" and d["rule"] != "min_count"} <= {
        "small", "large", "big", "little", "tiny", "huge"}
