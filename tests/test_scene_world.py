import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from stages.world.generate import COLOURS, NoiseRates, make_image
from stages.world.score import score, score_labels, truth_by_image, ImageTruth
from stages.world.tables import TRUTH_SCHEMA, to_tables, world_images, write_world


def test_same_seed_gives_byte_identical_parquet_and_another_seed_differs(tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        write_world(tmp_path / name, seed=seed, images=60)
    for f in ("captions.parquet", "truth.parquet"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
        assert (tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes()


def test_images_are_independent_of_shard_boundaries():
    whole = world_images(5, 0, 20, 128, NoiseRates())
    parts = world_images(5, 0, 7, 128, NoiseRates()) + world_images(5, 7, 20, 128, NoiseRates())
    assert [w.png for w in whole] == [w.png for w in parts]


def _occluded(objects, k) -> bool:
    a = objects[k].box
    for b in (o.box for o in objects[k + 1:]):
        if min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1]):
            return True
    return False


def test_truth_boxes_hold_their_objects_colour():
    checked = 0
    for i in range(80):
        w = make_image(11, i)
        px = np.asarray(Image.open(io.BytesIO(w.png)).convert("RGB")).astype(int)
        for k, ob in enumerate(w.objects):
            if _occluded(w.objects, k):
                continue
            x0, y0, x1, y1 = (int(round(v)) for v in ob.box)
            inside = (px[y0:y1, x0:x1] == COLOURS[ob.colour]).all(-1)
            share_in = inside.mean()
            mask = np.ones(px.shape[:2], bool)  # background: outside every object's box
            for o in w.objects:
                a0, b0, a1, b1 = (int(round(v)) for v in o.box)
                mask[b0:b1, a0:a1] = False
            share_out = (px[mask] == COLOURS[ob.colour]).all(-1).mean()
            assert share_in > 0.2, (w.image_id, ob.cls, share_in)
            assert share_in > 5 * share_out
            checked += 1
    assert checked > 100


def test_noise_is_recorded_and_true_to_the_captions():
    omitted = hallucinated = wrong = 0
    for i in range(300):
        w = make_image(2, i)
        text = " ".join(w.captions).lower()
        for ob in w.objects:
            if ob.omitted and all(o.omitted for o in w.objects if o.cls == ob.cls):
                omitted += 1
                assert ob.cls not in text.replace(",", " ").split() or any(
                    ob.cls == h for h in w.hallucinated), (w.image_id, ob.cls, w.captions)
        for h in w.hallucinated:
            hallucinated += 1
            assert h not in {o.cls for o in w.objects}
            assert any(h in c.lower() or h + "s" in c.lower() for c in w.captions) or h in (
                "car", "cup", "boat", "hat", "house", "bottle")  # may be said with a synonym
        wrong += sum(1 for o in w.objects if o.wrong_colour)
        assert 1 <= len(w.captions) <= 5
    n_obj = sum(len(make_image(2, i).objects) for i in range(300))
    assert 0.15 < omitted / n_obj < 0.40
    assert 0.08 < hallucinated / 300 < 0.25
    assert 0.04 < wrong / n_obj < 0.18


def test_world_has_enough_classes_colours_and_scenes():
    from stages.world.generate import SCENES
    from stages.world.shapes import SHAPES
    from tagset.wordnet import first_synset

    assert len(SHAPES) >= 24 and len(COLOURS) >= 8 and len(SCENES) >= 6
    assert all(first_synset(c) is not None for c in SHAPES)


def _truth(rows):
    return pa.Table.from_pylist(rows, schema=TRUTH_SCHEMA)


def _ob(cls, colour="red", omitted=False):
    return {"cls": cls, "colour": colour, "size": "small", "box": [0, 0, 1, 1], "omitted": omitted,
            "wrong_colour": None}


def test_scorer_on_hand_made_tables():
    truth = _truth([
        {"image_id": "a", "scene": "grass", "scene_mentioned": True, "objects": [_ob("car"), _ob("cup", "blue", True)],
         "hallucinated": ["kite"]},
        {"image_id": "b", "scene": "sky", "scene_mentioned": True, "objects": [_ob("kite", "red")], "hallucinated": []},
    ])
    # a: truth {car, cup, grass, red, blue}; b: truth {kite, sky, red}
    labels = pa.table({"image_id": ["a", "b"],
                       "tags": [["automobile", "grass", "red", "kite", "big"], ["kite", "sky", "red", "blue"]]})
    q = score_labels(labels, truth, column="tags")
    # a: tp car grass red (3), fp kite (1), fn cup blue (2); b: tp 3, fp blue (1), fn 0
    assert (q["tp"], q["fp"], q["fn"]) == (6, 2, 2)
    assert q["precision"] == 0.75 and q["recall"] == 0.75 and q["f1"] == 0.75
    assert q["unscored_tags"] == 1  # "big"
    assert q["omissions"] == {"total": 1, "recovered": 0, "rate": 0.0}
    assert q["hallucinations"] == {"total": 1, "removed": 0, "rate": 0.0}
    assert q["per_class"]["kite"] == {"precision": 0.5, "recall": 1.0, "f1": 0.6667, "tp": 1, "fp": 1, "fn": 0}


def test_scorer_with_ids_and_tagset_counts_recovered_and_removed(tmp_path):
    from tagset.tagset import Tag, TagSet

    ts = TagSet([Tag(0, "cup", ["mug"]), Tag(1, "car"), Tag(2, "grass"), Tag(3, "kite")])
    truth = _truth([{"image_id": "a", "scene": "grass", "scene_mentioned": False,
                     "objects": [_ob("cup", omitted=True), _ob("car")], "hallucinated": ["kite"]}])
    labels = pa.table({"image_id": ["a"], "union_label_id": [[0, 1]]})
    q = score_labels(labels, truth, ts, out=tmp_path / "q.json")
    assert q["omissions"] == {"total": 2, "recovered": 1, "rate": 0.5}  # cup recovered, grass not
    assert q["hallucinations"] == {"total": 1, "removed": 1, "rate": 1.0}
    assert (tmp_path / "q.json").exists()


def test_perfect_labels_score_one():
    rows, truth = to_tables(world_images(1, 0, 30, 64, NoiseRates()))
    t = truth_by_image(truth)
    q = score({k: v.tags for k, v in t.items()}, t)
    assert q["precision"] == q["recall"] == q["f1"] == 1.0
