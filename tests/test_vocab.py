import json

import pytest

from tagset.tagset import Tag, TagSet
from tagset.vocab import TagCounts, adopt_vocab, apply_overrides, build_vocab, load_overrides, merge_synonyms


def counts_of(images: list[list[str]], kind: str = "objects") -> TagCounts:
    c = TagCounts()
    for names in images:
        c.add_image([{kind: names}])
    return c


NO_OVERRIDES = {"force_merge": [], "force_split": [], "drop": []}


def test_car_and_automobile_merge_into_the_more_frequent_name():
    counts = counts_of([["car"], ["car"], ["automobile"], ["dog"]])
    ts, decisions = build_vocab(counts, stoplist=set(), overrides=NO_OVERRIDES)
    assert ts.id_of("automobile") == ts.id_of("car")
    assert ts.tags[ts.id_of("car")].name == "car"
    assert {"tag": "automobile", "action": "merge", "into": "car", "rule": "same_first_synset",
            "synset": "car.n.01"} in decisions


def test_glass_and_glasses_stay_apart():
    counts = counts_of([["glass"], ["glasses"], ["glasses"]])
    ts, _ = build_vocab(counts, stoplist=set(), overrides=NO_OVERRIDES)
    assert ts.id_of("glass") != ts.id_of("glasses")


def test_cup_and_mug_stay_apart_without_override():
    groups, _, _ = merge_synonyms(["cup", "mug"], {"cup": "object", "mug": "object"})
    assert groups == [["cup"], ["mug"]]


def test_forced_override_wins_over_wordnet():
    counts = counts_of([["cup"], ["mug"], ["car"], ["automobile"], ["tree"]])
    overrides = {"force_merge": [["cup", "mug"]], "force_split": [["car", "automobile"]], "drop": ["tree"]}
    ts, decisions = build_vocab(counts, stoplist=set(), overrides=overrides)
    assert ts.id_of("cup") == ts.id_of("mug")
    assert ts.id_of("car") != ts.id_of("automobile")
    assert ts.id_of("tree") is None
    rules = {(d["tag"], d["action"], d["rule"]) for d in decisions}
    assert {("mug", "merge", "override"), ("automobile", "split", "override"), ("tree", "drop", "override")} <= rules


def test_checked_in_overrides_file_parses_and_splits_bike():
    ov = load_overrides(__import__("tagset.vocab", fromlist=["DATA"]).DATA / "overrides.yaml")
    groups, _ = apply_overrides([["bike", "motorcycle"]], ov)
    assert ["bike"] in groups and ["motorcycle"] in groups


def test_selection_stoplist_min_count_and_top_n():
    counts = counts_of([["front", "dog", "cat", "owl"], ["dog", "cat"], ["dog"]])
    ts, decisions = build_vocab(counts, num_tags=1, min_count=2, stoplist={"front"}, overrides=NO_OVERRIDES)
    assert ts.names == ["dog"]
    by_tag = {d["tag"]: d["rule"] for d in decisions}
    assert by_tag == {"front": "stoplist", "owl": "min_count", "cat": "top_n"}


def test_kinds_pick_part_of_speech_for_merging():
    c = TagCounts()
    c.add_image([{"actions": ["jump"]}, {"actions": ["leap"]}])
    ts, _ = build_vocab(c, stoplist=set(), overrides=NO_OVERRIDES)
    assert ts.id_of("leap") == ts.id_of("jump") and ts.tags[0].kind == "action"


def test_adopt_maps_sidewalk_onto_pavement():
    base = TagSet([Tag(0, "pavement"), Tag(1, "car"), Tag(2, "dog")])
    ts, decisions = adopt_vocab(base, counts_of([["sidewalk"], ["automobile"], ["unicorn"]]))
    assert ts.id_of("sidewalk") == 0 and ts.id_of("automobile") == 1
    assert ts.id_of("unicorn") is None
    assert {"tag": "unicorn", "action": "unmapped", "rule": "not_in_vocabulary", "count": 1} in decisions


def test_ram_files_round_trip(tmp_path, shared):
    ref = shared / "ref" / "ram"
    ts = TagSet.from_ram_files(ref / "ram_tag_list.txt", ref / "ram_tag_list_threshold.txt",
                               ref / "ram_tag_list_chinese.txt")
    assert len(ts) == 4585
    files = ts.files()
    assert files["tag_list.txt"] == (ref / "ram_tag_list.txt").read_bytes()
    assert files["tag_list_chinese.txt"].decode().splitlines() == (ref / "ram_tag_list_chinese.txt").read_text(
        encoding="utf-8").splitlines()
    assert [float(x) for x in files["tag_list_threshold.txt"].decode().splitlines()] == ts.thresholds()
    assert ts.id_of("Eiffel tower") == ts.id_of("eiffel tower") is not None


def test_tagset_table_round_trip():
    ts = TagSet([Tag(0, "car", ["automobile"], "object", 3, "car.n.01", 0.7), Tag(1, "red", [], "attribute")])
    back = TagSet.from_table(ts.to_table())
    assert back.tags == ts.tags
    assert json.loads(ts.files()["synonyms.json"]) == {"car": ["automobile"]}


def test_tag_ids_must_be_dense():
    with pytest.raises(ValueError):
        TagSet([Tag(1, "car")])
