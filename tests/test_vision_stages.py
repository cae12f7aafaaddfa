"""The vision stages on hand-made batches: images (good and bad), a tiny random tagger, boxes, clusters,
decisions. Real parts throughout: a real RAM model (tiny config), faiss, Arrow tables."""
import functools
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from common.images import ImageLimits, open_image
from pipeline.stage import StageContext
from stages.cleaning.cluster import fit_tag, kmeans_pp_init
from stages.cleaning.decide import REASONS, DecideConfig, DecideStage
from stages.vision.evidence import EvidenceConfig, EvidenceStage
from stages.vision.geometry import attention_box, clip_box
from stages.vision.parts import RegionView, candidate_tags
from tagset.tagset import Tag, TagSet

NAMES = ["red", "ball", "grass", "sky", "tree"]


def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


RAM_ARGS = {"num_classes": len(NAMES), "image_size": 64, "window_size": 4, "embed_dim": 8, "depths": [2, 2, 2],
            "num_heads": [1, 2, 4], "head_hidden": 32, "head_intermediate": 64, "label_dim": 16}


def _tagset_dir(tmp_path):
    vocab = tmp_path / "vocab"
    if not vocab.exists():
        vocab.mkdir()
        pq.write_table(TagSet([Tag(i, n) for i, n in enumerate(NAMES)]).to_table(), vocab / "tagset.parquet")
    return vocab


def _tagger_dir(d, entrypoint: str, args: dict, prepare=None):
    """What a train step provides: a seeded random model of ``entrypoint`` saved with its model.json."""
    from model.registry import create_model

    torch.manual_seed(0)
    model = create_model(entrypoint, **args)
    if prepare is not None:
        prepare(model)
    d.mkdir(exist_ok=True)
    torch.save({"model": model.state_dict()}, d / "model.pth")
    (d / "model.json").write_text(json.dumps({"entrypoint": entrypoint, "model_args": args,
                                              "checkpoint": "model.pth"}))
    return d


@pytest.fixture
def artifacts(tmp_path):
    """A tagset dir and a 'tagger' dir holding a tiny random RAM (what a train step provides)."""
    return {"tagset": str(_tagset_dir(tmp_path)), "tagger": str(_tagger_dir(tmp_path / "train", "ram_test", RAM_ARGS))}


def _ctx(tmp_path, artifacts, step="s"):
    return StageContext(str(tmp_path), step, 0, artifacts)


def _batch() -> pa.Table:
    rng = np.random.default_rng(0)
    good = Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8))
    rgba = Image.new("RGBA", (70, 70), (255, 0, 0, 128))
    return pa.table({
        "image_id": ["a", "b", "bad"],
        "image": [None, None, None],
        "image_bytes": [_png(good), _png(rgba), b"not an image"],
        "union_label_id": [[0, 1], [2], [3]],
    })


# -- images --------------------------------------------------------------------------------------------

def test_open_image_handles_every_kind_of_bad_and_odd_image():
    limits = ImageLimits(min_side=2, max_pixels=100 * 100)
    rgb = Image.new("RGB", (40, 30), (10, 20, 30))
    full = _png(rgb)
    cases = {
        "decode": {"image_id": "x", "image_bytes": b"GIF89a but not really an image"},
        "truncated": {"image_id": "x", "image_bytes": _png(rgb, "JPEG")[:200]},
        "tiny": {"image_id": "x", "image_bytes": _png(Image.new("RGB", (1, 1)))},
        "huge": {"image_id": "x", "image_bytes": _png(Image.new("RGB", (200, 200)))},
        "none": {"image_id": "x"},
        "web": {"image_id": "x", "image": "https://example.com/a.jpg"},  # a CC3M row: download it first
    }
    codes = {k: open_image(r, None, limits)[1].code for k, r in cases.items()}
    assert codes == {"decode": "image_decode_failed", "truncated": "image_truncated", "tiny": "image_too_small",
                     "huge": "image_too_large", "none": "row_no_image", "web": "row_image_url_only"}
    assert "img2dataset" in open_image(cases["web"], None, limits)[1].reason
    # a photo whose EXIF says "rotate 90 CW" (orientation 6) is decoded upright: 30x40 stored -> 40x30 seen
    ex = Image.Exif()
    ex[0x0112] = 6
    stored = Image.new("RGB", (30, 40), (200, 10, 10))
    stored.paste((10, 10, 200), (0, 0, 30, 5))  # blue band along the stored top edge
    buf = io.BytesIO()
    stored.save(buf, "JPEG", exif=ex.tobytes(), quality=95)
    seen, rej = open_image({"image_id": "p", "image_bytes": buf.getvalue()}, None, limits)
    assert rej is None and seen.size == (40, 30)
    assert seen.getpixel((38, 15))[2] > 150 and seen.getpixel((2, 15))[0] > 150  # the band is now on the right
    from model.preprocess import load_rgb

    assert load_rgb(buf.getvalue()).size == (40, 30)  # training decodes the same way
    # usable odd formats become RGB, not rejects
    grey16 = Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16))
    cmyk = Image.new("CMYK", (20, 20), (0, 255, 255, 0))
    rgba = Image.new("RGBA", (20, 20), (0, 0, 255, 0))  # fully transparent -> white background
    for img in (grey16, cmyk, rgba):
        out, rej = open_image({"image_id": "x", "image_bytes": _png(img, "TIFF" if img.mode == "CMYK" else "PNG")},
                              None, limits)
        assert rej is None and out.mode == "RGB" and out.size == (20, 20)
    assert open_image({"image_id": "x", "image_bytes": _png(rgba)}, None, limits)[0].getpixel((0, 0)) == (255, 255, 255)
    assert open_image({"image_id": "x", "image_bytes": full}, None, limits)[0].getpixel((0, 0)) == (10, 20, 30)


def test_boxes_are_clipped_and_outside_boxes_dropped():
    assert clip_box([-10, 5, 50, 200], 40, 30) == [0.0, 5.0, 40.0, 30.0]
    assert clip_box([50, 50, 60, 60], 40, 30) is None  # wholly outside
    assert clip_box([10, 10, 10.5, 20], 40, 30) is None  # degenerate
    assert clip_box([30, 20, 10, 5], 40, 30) == [10.0, 5.0, 30.0, 20.0]  # corners given in any order
    assert clip_box([float("nan"), 0, 1, 1], 40, 30) is None


def test_attention_box_takes_the_connected_peak_region():
    amap = np.zeros((4, 4), np.float32)
    amap[1, 1], amap[1, 2], amap[3, 3] = 1.0, 0.8, 0.9  # (3,3) is high but not connected to the peak
    box, mass = attention_box(amap, 80, 40)
    assert box == [20.0, 10.0, 60.0, 20.0]
    assert mass == pytest.approx(1.8 / 2.7)


def test_candidates_keep_parse_tags_and_cut_pseudo_tags_by_score():
    scores = [{"tag_id": 4, "score": 0.9}, {"tag_id": 3, "score": 0.6}, {"tag_id": 2, "score": 0.4}]
    assert candidate_tags([0, 1], scores, 0.5) == [0, 1, 3, 4]
    assert candidate_tags([0, 1], scores, 0.5, limit=3) == [0, 1, 4]
    assert candidate_tags([0, 1, 2], scores, 0.5, limit=2) == [0, 1, 2]  # parse tags are never cut


# -- stages with the tiny tagger -------------------------------------------------------------------------

def _evidence(tmp_path, arts, **cfg) -> EvidenceStage:
    st = EvidenceStage(EvidenceConfig(**cfg), _ctx(tmp_path, arts))
    st.setup()
    return st


def test_evidence_on_a_hand_made_batch(tmp_path, artifacts):
    """Scores of every tag (floor 0), boxes for the parse tags only (candidate_score 1.0) inside each
    image, one float16 embedding and one crop score per region, no views; the bad row is a reject."""
    batch = _batch()
    st = _evidence(tmp_path, artifacts, pseudolabel={"floor": 0.0, "top_k": 2}, ground={"candidate_score": 1.0})
    res = st(batch)
    assert [r.code for r in res.rejects] == ["image_decode_failed"] and res.rejects[0].image_id == "bad"
    rows = res.table.to_pylist()
    assert [r["image_id"] for r in rows] == ["a", "b"]
    assert len(rows[0]["tag_scores"]) == len(NAMES)  # floor 0 keeps everything
    assert all(0 <= d["score"] <= 1 for d in rows[0]["tag_scores"])

    regions = res.table.column("regions").to_pylist()
    assert [sorted(r["tag_id"] for r in rs) for rs in regions] == [[0, 1], [2]]  # only parse tags at 1.0
    for rs, size in zip(regions, [(96, 80), (70, 70)]):
        for r in rs:
            x0, y0, x1, y1 = r["box"]
            assert 0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1]
            assert r["backend"] == "attention" and 0 < r["score"] <= 1

    embs = res.table.column("region_embeds")
    assert embs.type.value_type.field("embedding").type == pa.list_(pa.float16())
    vecs = embs.to_pylist()
    assert [[v["tag_id"] for v in row] for row in vecs] == [[r["tag_id"] for r in rs] for rs in regions]
    assert len(vecs[0][0]["embedding"]) == 16

    crops = res.table.column("crop_scores").to_pylist()
    assert [[d["tag_id"] for d in c] for c in crops] == [[0, 1], [2]]
    # the crop score is the tagger's score on exactly that crop
    from common.images import open_image as oi
    from stages.vision.geometry import crop

    img, _ = oi(batch.to_pylist()[0], None, ImageLimits())
    box = regions[0][0]["box"]
    direct = st.tagger.scores([crop(img, box, 0.1)])[0, regions[0][0]["tag_id"]]
    assert crops[0][0]["score"] == pytest.approx(float(direct), abs=1e-6)
    assert res.table.column("view_scores").to_pylist() == [[], []]  # no views configured


def test_a_released_checkpoint_maps_tags_by_name(tmp_path, artifacts):
    """A checkpoint with its own tag list: our tags it lacks get no score (NaN), never a made-up one."""
    from stages.vision.tagger import BaseTagger, TaggerConfig

    spec = json.loads((tmp_path / "train" / "model.json").read_text())
    (tmp_path / "ckpt_tags.txt").write_text("\n".join(["tree", "sky", "dog", "red", "car"]))
    cfg = TaggerConfig(model="ram_test", checkpoint=str(tmp_path / "train" / "model.pth"),
                       tag_list=str(tmp_path / "ckpt_tags.txt"), model_args=spec["model_args"])
    t = BaseTagger.load(cfg, {}, NAMES)
    assert t.class_of_tag.tolist() == [3, -1, -1, 1, 0]
    s = t.scores([Image.new("RGB", (64, 64))])
    assert np.isnan(s[0, 1]) and np.isnan(s[0, 2]) and not np.isnan(s[0, [0, 3, 4]]).any()


# -- cluster ---------------------------------------------------------------------------------------------

def test_kmeans_pp_and_distances_find_the_outlier():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.05, (30, 8)) + np.eye(8)[0]
    b = rng.normal(0, 0.05, (30, 8)) + np.eye(8)[1]
    x = np.vstack([a, b, np.eye(8)[5:6] * 3]).astype(np.float32)
    init = kmeans_pp_init(x, 2, np.random.default_rng(1))
    assert init.shape == (2, 8)
    centroids, dist, assign, k = fit_tag(x, 2, 10, seed=3, fit_sample=1000)
    assert k == 2 and int(np.argmax(dist)) == 60
    assert len(set(assign[:30].tolist())) == 1 and assign[0] != assign[30]
    again = fit_tag(x, 2, 10, seed=3, fit_sample=1000)
    np.testing.assert_array_equal(dist, again[1])


def test_kmeans_on_a_gpu_finds_the_cpus_centroids():
    """With a faiss-gpu build on a GPU node (the ``gpu`` extra), fits run there by default."""
    from stages.cleaning.cluster import faiss_gpus, fit_centroids

    if faiss_gpus() == 0:
        pytest.skip("faiss sees no GPU (faiss-cpu, or no GPU given to this process)")
    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(0, 0.05, (200, 16)) + np.eye(16)[i] for i in range(4)]).astype(np.float32)
    np.testing.assert_allclose(fit_centroids(x, 4, 10, 3), fit_centroids(x, 4, 10, 3, gpu=False), atol=1e-4)


# -- decide ----------------------------------------------------------------------------------------------

# the image's cluster_distances: tag 1's region is far (relative 2.0) and among the outermost 10%
DISTS = [{"tag_id": t, "cluster": 0, "distance": d, "quantile": q, "relative": r}
         for t, d, q, r in ((0, 0.1, 0.2, 0.5), (1, 0.9, 0.95, 2.0), (2, 0.2, 0.5, 1.0))]


def _decide(tmp_path, **cfg) -> DecideStage:
    cdir = tmp_path / "cluster"
    cdir.mkdir(exist_ok=True)
    pq.write_table(pa.table({"tag_id": pa.array([0, 1, 2, 5], pa.int32()), "regions": [9, 9, 9, 1],
                             "k": pa.array([1, 1, 1, 0], pa.int32()),
                             "status": ["clustered"] * 3 + ["too_few_regions"]}), cdir / "clusters.parquet")
    vocab = tmp_path / "decide_vocab"
    vocab.mkdir(exist_ok=True)
    kinds = ["object", "attribute", "object", "object", "object", "object", "scene"]
    pq.write_table(TagSet([Tag(i, f"tag{i}", kind=k) for i, k in enumerate(kinds)]).to_table(),
                   vocab / "tagset.parquet")
    st = DecideStage(DecideConfig(**cfg), StageContext(str(tmp_path), "decide", 0,
                                                       {"clusters": str(cdir), "tagset": str(vocab)}))
    st.setup()
    st.decide_row = functools.partial(st.decide_row, dists=DISTS)  # every test image carries DISTS
    return st


EVIDENCE = dict(
    parse=[0, 1, 5],
    scores=[{"tag_id": 0, "score": 0.9}, {"tag_id": 1, "score": 0.1}, {"tag_id": 2, "score": 0.95},
            {"tag_id": 3, "score": 0.8}, {"tag_id": 5, "score": 0.6}],
    regions=[{"tag_id": t, "box": [0.0, 0.0, 10.0, 10.0], "score": 0.5, "backend": "attention"} for t in (0, 1, 2, 5)],
    crops=[{"tag_id": 0, "score": 0.8}, {"tag_id": 1, "score": 0.1}, {"tag_id": 2, "score": 0.7},
           {"tag_id": 3, "score": 0.1}, {"tag_id": 5, "score": 0.5}],
)


def test_combined_rule_needs_two_signals_and_logs_every_step(tmp_path):
    st = _decide(tmp_path, add_threshold=0.7, add_crop_min=0.3, crop_threshold=0.3, drop_score=0.3,
                 trust="calibrated")
    labels, events = st.decide_row("a", EVIDENCE["parse"], EVIDENCE["scores"], EVIDENCE["regions"],
                                   EVIDENCE["crops"])
    # tag 1: low score + low crop + far region -> dropped; tag 2: pseudo 0.95 with a good crop -> added;
    # tag 3: pseudo 0.8 but its crop disagrees -> not added; tags 0 and 5 kept
    assert labels["combined"] == [0, 2, 5]
    assert labels["pseudolabel"] == [0, 1, 2, 3, 5]
    assert labels["cluster"] == [0, 2, 3, 5]  # paper: tag 1 is in the outermost 10%
    assert labels["verify"] == labels["paper"] == [0, 2, 5]
    drop = [e for e in events if e["tag_id"] == 1 and e["stage"] == "decide"][0]
    ev = json.loads(drop["evidence"])
    assert drop["action"] == "drop" and ev["votes"] == ["low_score", "low_crop_score", "far_region"]
    assert ev["box"] == [0.0, 0.0, 10.0, 10.0] and ev["crop_score"] == 0.1 and ev["distance"] == pytest.approx(0.9)
    assert [e["stage"] for e in events if e["tag_id"] == 1] == ["ground", "cluster", "verify", "decide"]
    assert [e["reason"] for e in events if e["tag_id"] == 5 and e["stage"] == "cluster"] == ["too_few_regions"]
    skip = [e for e in events if e["tag_id"] == 3 and e["stage"] == "decide"][0]
    assert (skip["action"], skip["reason"]) == ("skip", "pseudo_below")
    assert {e["reason"] for e in events} <= set(REASONS)


def test_paper_rule_writes_its_labels_and_one_signal_never_drops(tmp_path):
    st = _decide(tmp_path, rule="paper", add_threshold=0.7, crop_threshold=0.3)
    labels, events = st.decide_row("a", EVIDENCE["parse"], EVIDENCE["scores"], EVIDENCE["regions"],
                                   EVIDENCE["crops"])
    assert labels["paper"] == [0, 2, 5]
    one = _decide(tmp_path, votes_to_drop=2, drop_score=0.3)
    labels, _ = one.decide_row("a", [0], [{"tag_id": 0, "score": 0.1}], [], [])  # low score alone
    assert labels["combined"] == [0]


def test_decide_appends_events_and_replaces_labels(tmp_path):
    st = _decide(tmp_path, add_threshold=0.7, add_crop_min=0.3, crop_threshold=0.3, drop_score=0.3)
    old = [{"tag_id": 0, "stage": "label", "action": "add", "reason": "parse", "score": 1.0, "evidence": "{}"}]
    batch = pa.table({"image_id": ["a"], "union_label_id": [EVIDENCE["parse"]], "tag_events": [old],
                      "tag_scores": [EVIDENCE["scores"]], "regions": [EVIDENCE["regions"]],
                      "crop_scores": [EVIDENCE["crops"]], "cluster_distances": [DISTS]})
    out = st(batch).table.to_pylist()[0]
    assert out["union_label_id"] == [0, 2, 5]
    assert out["tag_events"][0]["stage"] == "label" and len(out["tag_events"]) > 1
    assert out["stage_labels"]["parse"] == [0, 1, 5]


def _box(x, y, side=10.0):
    return {"box": [x, y, x + side, y + side], "score": 0.5, "backend": "attention"}


def test_explaining_away_adds_weak_tags_on_free_regions_and_skips_claimed_ones(tmp_path):
    # parse: tag 0 (object) at the top left, kept; tag 5 (object) at the bottom right, dropped (low score,
    # low crop, far region) so its box claims nothing. Pseudo tags, all below add_threshold 0.4 except 2:
    scores = [{"tag_id": 0, "score": 0.9}, {"tag_id": 5, "score": 0.01},
              {"tag_id": 2, "score": 0.6},   # object on tag 0's box: claimed, 0.6 < add_claimed 0.7
              {"tag_id": 3, "score": 0.35},  # object on a free box: added at add_unclaimed 0.3
              {"tag_id": 4, "score": 0.32},  # object on tag 3's box: claimed by the tag added before it
              {"tag_id": 6, "score": 0.31},  # scene on tag 5's box: free, since tag 5 is dropped
              {"tag_id": 1, "score": 0.35}]  # attribute: not a region kind, needs add_threshold
    regions = [{"tag_id": 0, **_box(0, 0)}, {"tag_id": 5, **_box(50, 50)}, {"tag_id": 2, **_box(1, 1)},
               {"tag_id": 3, **_box(20, 20)}, {"tag_id": 4, **_box(21, 20)}, {"tag_id": 6, **_box(50, 52)},
               {"tag_id": 1, **_box(20, 20)}]
    crops = [{"tag_id": 5, "score": 0.01}]
    on = _decide(tmp_path, add_threshold=0.4, add_unclaimed=0.3, add_claimed=0.7, claim_iou=0.2, drop_score=0.05,
                 crop_threshold=0.1)
    labels, events = on.decide_row("a", [0, 5], scores, regions, crops)
    assert labels["combined"] == [0, 3, 6]
    assert labels["pseudolabel"] == [0, 2, 5]  # the paper's chain: add_threshold alone
    dec = {e["tag_id"]: e for e in events if e["stage"] == "decide"}
    assert (dec[5]["action"], dec[2]["action"], dec[2]["reason"]) == ("drop", "skip", "region_claimed")
    ev2 = json.loads(dec[2]["evidence"])
    assert ev2["claimed_by"] == "tag0" and ev2["claim_iou"] == pytest.approx(81 / 119, abs=1e-3)
    assert (dec[3]["reason"], json.loads(dec[3]["evidence"])["claimed_by"]) == ("region_free", None)
    assert (dec[4]["reason"], json.loads(dec[4]["evidence"])["claimed_by"]) == ("region_claimed", "tag3")
    assert dec[6]["reason"] == "region_free" and 1 not in dec  # the attribute never was a candidate
    cand = [e for e in events if e["tag_id"] == 3 and e["stage"] == "pseudolabel"]
    assert [(e["action"], e["reason"]) for e in cand] == [("candidate", "pseudo_candidate")]
    assert {e["reason"] for e in events} <= set(REASONS)
    # off (the default): the old rule, add_threshold for everything
    off = _decide(tmp_path, add_threshold=0.4, drop_score=0.05, crop_threshold=0.1)
    labels, _ = off.decide_row("a", [0, 5], scores, regions, crops)
    assert labels["combined"] == [0, 2]


def test_tags_the_tagger_cannot_predict_never_pseudo_label_nor_vote(tmp_path):
    st = _decide(tmp_path, add_threshold=0.5, drop_score=0.3, crop_threshold=0.3, trust="calibrated")
    scores = [{"tag_id": 0, "score": 0.05, "threshold": 1.0},  # parse tag, unreliable: its low score is ignored
              {"tag_id": 2, "score": 0.99, "threshold": 1.0},  # unreliable: never added
              {"tag_id": 3, "score": 0.80, "threshold": 0.85},  # below its own threshold: not added
              {"tag_id": 4, "score": 0.90, "threshold": 0.85}]  # added
    crops = [{"tag_id": 0, "score": 0.01}, {"tag_id": 4, "score": 0.9}]
    labels, events = st.decide_row("a", [0], scores, [], crops)
    assert labels["combined"] == [0, 4] and labels["pseudolabel"] == [0, 4]
    keep = [e for e in events if e["tag_id"] == 0 and e["stage"] == "decide"][0]
    assert keep["action"] == "keep" and json.loads(keep["evidence"])["tagger_reliable"] is False


def test_a_capped_threshold_lets_a_tag_the_captions_often_omit_be_added(tmp_path):
    """A tag calibrated high (0.85: captions name it in few of its images) is added at 0.7 only under
    threshold_cap; the cap never lowers the bar below add_threshold, and never makes a tag the tagger
    cannot predict (1.0) addable."""
    scores = [{"tag_id": 1, "score": 0.70, "threshold": 0.85},  # an attribute calibrated high
              {"tag_id": 2, "score": 0.45, "threshold": 0.85},  # under the cap's bar
              {"tag_id": 4, "score": 0.99, "threshold": 1.0}]   # cannot predict: not a calibrated bar
    added = {}
    for cap, trust in ((None, "calibrated"), (0.6, "calibrated"), (0.6, "all"), (0.3, "calibrated")):
        st = _decide(tmp_path, add_threshold=0.5, threshold_cap=cap, trust=trust)
        labels, events = st.decide_row("a", [0], scores, [], [])
        added[(cap, trust)] = labels["combined"]
        if cap == 0.6 and trust == "calibrated":
            ev = json.loads([e for e in events if e["tag_id"] == 1 and e["reason"] == "pseudo_label"][0]["evidence"])
            assert ev["tag_threshold"] == 0.6  # the event names the bar the tag met
    assert added[(None, "calibrated")] == [0]
    assert added[(0.6, "calibrated")] == [0, 1]
    assert added[(0.6, "all")] == [0, 1, 4]  # trust all: 4 is uncalibrated, added at add_threshold as before
    assert added[(0.3, "calibrated")] == [0, 1]  # 0.45 < add_threshold 0.5, whatever the cap


def test_calibrated_thresholds_reach_the_precision_or_never_fire():
    from stages.training.holdout import calibrate

    scores = np.array([[0.9, 0.9], [0.8, 0.8], [0.7, 0.7], [0.6, 0.6], [0.5, 0.5]])
    labels = np.array([[1, 0], [1, 1], [1, 0], [0, 1], [1, 0]])
    th = calibrate(scores, labels, precision=0.75, min_hits=2)
    assert th[0] == pytest.approx(0.5)  # 4 of 5 above 0.5 are right (0.8 >= 0.75)
    assert th[1] == 1.0  # precision never reaches 0.75 with 2 hits


def test_detector_prompts_are_chunked_to_the_text_limit():
    from stages.vision.detectors import build_prompts

    names = ["red ball", "tree", "brick wall", "sky", "car"]
    count = lambda text: len(text.split()) + 2  # noqa: E731 - words + [CLS] [SEP]
    prompts = build_prompts(names, count, limit=8)
    assert [[n for n, _, _ in spans] for _, spans in prompts] == [["red ball", "tree"], ["brick wall", "sky"], ["car"]]
    for text, spans in prompts:
        assert count(text) <= 8
        for name, s, e in spans:
            assert text[s:e] == name
    assert build_prompts(["a very long tag name indeed"], count, limit=3)[0][1][0][0] == "a very long tag name indeed"


# -- the CNN tagger's fast paths: inference form, native-scale crops -------------------------------------

def _random_bn_stats(model):
    """BatchNorm statistics that are not the identity, so folding them matters."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)


@pytest.fixture
def cnn_artifacts(tmp_path):
    """A tagset dir and a 'tagger' dir holding a small random CNN tagger with smooth-max pooling."""
    args = {"num_classes": len(NAMES), "widths": [8, 16, 16, 16], "pool": "lse"}
    return {"tagset": str(_tagset_dir(tmp_path)),
            "tagger": str(_tagger_dir(tmp_path / "cnn", "cnn_tagger_tiny", args, _random_bn_stats))}


def test_cnn_inference_form_computes_the_same_function():
    """BatchNorm folded into the convolutions and channels-last weights: logits, class maps and the
    pooled feature agree with the training form; the smooth max lies between the mean and the max."""
    from model.registry import create_model

    torch.manual_seed(0)
    model = create_model("cnn_tagger_tiny", num_classes=6, widths=[8, 16, 16, 16], pool="lse")
    _random_bn_stats(model)
    model.eval()
    fast = model.for_inference()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        want_logits, want_attn = model(x, return_attn=True)
        got_logits, got_attn = fast(x.contiguous(memory_format=torch.channels_last), return_attn=True)
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_attn, want_attn, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast.image_embeds(x), model.image_embeds(x), rtol=1e-5, atol=1e-5)
        maps = torch.nn.functional.conv2d(model.features_of(x), model.classifier.weight,
                                          model.classifier.bias).flatten(2)
    assert torch.all(want_logits <= maps.amax(-1) + 1e-6) and torch.all(want_logits >= maps.mean(-1) - 1e-6)
    with pytest.raises(ValueError, match="pool"):
        create_model("cnn_tagger_tiny", num_classes=2, pool="mean")


def test_native_crops_keep_the_whole_image_scale():
    """A native crop is what the model sees of that box in the whole image: sides rounded up to a
    multiple of 8 px (at least 16), the box inside it, and a whole-image box gives the whole input."""
    from model.preprocess import to_tensor
    from model.cnn import CnnConfig
    from stages.vision.geometry import native_crop

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))  # w 128, h 96
    c = native_crop(img, [10, 20, 50, 40], 0.1, 64)
    # x: 48 px wide at 64/128 -> 24 model px; y: 24 px tall at 64/96 -> 16 model px
    assert c.size == (24, 16)
    small = native_crop(img, [60, 60, 62, 62], 0.0, 64)
    assert small.size == (16, 16)
    whole = native_crop(img, [0, 0, 128, 96], 0.0, 64)
    assert whole.size == (64, 64)
    cfg = CnnConfig()
    torch.testing.assert_close(to_tensor(whole, cfg, whole.size), to_tensor(img, cfg))


def test_verify_and_embed_score_native_crops_in_size_batches(tmp_path, cnn_artifacts):
    """With a fully convolutional tagger, crops keep the image's scale; batching crops of equal size
    gives what scoring each alone gives; asking a RAM tagger for native crops is a config error."""
    from common.images import open_image as oi
    from stages.vision.geometry import native_crop

    batch = _batch()
    every = {"pseudolabel": {"floor": 0.0, "top_k": 2}, "ground": {"candidate_score": 0.0}}
    st = _evidence(tmp_path, cnn_artifacts, batch_size=3, **every)
    assert st.native
    got = st(batch).table
    crops = got.column("crop_scores").to_pylist()
    regions = got.column("regions").to_pylist()
    assert [[d["tag_id"] for d in c] for c in crops] == [[r["tag_id"] for r in rs] for rs in regions]
    img, _ = oi(batch.to_pylist()[0], None, ImageLimits())
    for r, c in zip(regions[0], crops[0]):
        alone = st.tagger.crop_scores([native_crop(img, r["box"], 0.1, 64)], [r["tag_id"]], native=True)[0]
        assert c["score"] == pytest.approx(float(alone), abs=1e-5)
    vecs = got.column("region_embeds").to_pylist()
    assert [len(v) for v in vecs] == [len(rs) for rs in regions] and len(vecs[0][0]["embedding"]) == 16

    assert not _evidence(tmp_path, cnn_artifacts, crops={"crop_size": "model"}).native
    with pytest.raises(ValueError, match="crop_size"):
        ram = {"tagset": str(_tagset_dir(tmp_path)), "tagger": str(_tagger_dir(tmp_path / "ram", "ram_test", RAM_ARGS))}
        _evidence(tmp_path, ram, crops={"crop_size": "native"})


def test_view_crops_zoom_in_around_the_box_and_the_whole_view_is_the_model_input():
    from model.cnn import CnnConfig
    from model.preprocess import to_tensor
    from stages.vision.geometry import view_crop

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))  # w 128, h 96
    cfg = CnnConfig()
    whole = view_crop(img, [10, 10, 20, 20], 1.0, False, 64)
    assert whole.size == (64, 64)
    torch.testing.assert_close(to_tensor(whole, cfg, whole.size), to_tensor(img, cfg))
    mirrored = view_crop(img, [10, 10, 20, 20], 1.0, True, 64)
    np.testing.assert_array_equal(np.asarray(mirrored), np.asarray(whole)[:, ::-1])
    # window 0.5 around a box in the middle: the centre 64 x 48 px, at 64 x 64
    mid = view_crop(img, [54, 38, 74, 58], 0.5, False, 64)
    np.testing.assert_array_equal(np.asarray(mid), np.asarray(img.resize((64, 64), Image.BILINEAR,
                                                                          box=(32, 24, 96, 72))))
    # a box at the corner: the window stays inside the image
    corner = view_crop(img, [0, 0, 4, 4], 0.5, False, 64)
    np.testing.assert_array_equal(np.asarray(corner), np.asarray(img.resize((64, 64), Image.BILINEAR,
                                                                             box=(0, 0, 64, 48))))


def test_verify_views_score_pseudo_candidates_of_region_kinds_only(tmp_path, cnn_artifacts):
    """view_scores: each pseudo candidate's mean score over its views; labels already on the image and
    tags of other kinds get none."""
    from common.images import open_image as oi
    from stages.vision.geometry import view_crop

    vocab = tmp_path / "kinds"
    vocab.mkdir()
    kinds = ["attribute", "object", "scene", "scene", "object"]  # red, ball, grass, sky, tree
    pq.write_table(TagSet([Tag(i, n, kind=k) for i, (n, k) in enumerate(zip(NAMES, kinds))]).to_table(),
                   vocab / "tagset.parquet")
    arts = dict(cnn_artifacts, tagset=str(vocab))
    batch = _batch()
    views = [RegionView(window=1.0, mirror=True), RegionView(window=0.5)]
    ve = _evidence(tmp_path, arts, batch_size=4, pseudolabel={"floor": 0.0, "top_k": 5},
                   ground={"candidate_score": 0.0}, verify={"views": views})
    g = ve(batch).table
    got = g.column("view_scores").to_pylist()
    regions = g.column("regions").to_pylist()
    labels = g.column("union_label_id").to_pylist()
    want = [[r["tag_id"] for r in rs if r["tag_id"] not in lab and kinds[r["tag_id"]] != "attribute"]
            for rs, lab in zip(regions, labels)]
    assert [[d["tag_id"] for d in row] for row in got] == want and want[0] == [2, 3, 4]
    img, _ = oi(batch.to_pylist()[0], None, ImageLimits())
    for d in got[0]:
        box = next(r["box"] for r in regions[0] if r["tag_id"] == d["tag_id"])
        each = [ve.tagger.crop_scores([view_crop(img, box, v.window, v.mirror, 64)], [d["tag_id"]], native=True)[0]
                for v in views]
        assert d["score"] == pytest.approx(float(np.mean(each)), abs=1e-5)


def test_region_views_weigh_in_on_unclaimed_pseudo_tags(tmp_path):
    """With view scores, an unclaimed region tag is judged by (1 - view_weight) x its score + view_weight x
    its view score: a weak score with a strong view is added, a passing score with a poor view is not;
    a claimed tag still needs add_claimed on its whole-image score."""
    scores = [{"tag_id": 0, "score": 0.9},
              {"tag_id": 2, "score": 0.2},   # free box, view 0.6 -> 0.4: added
              {"tag_id": 3, "score": 0.35},  # free box, view 0.05 -> 0.2: skipped
              {"tag_id": 4, "score": 0.5}]   # on tag 0's box, view 0.99: claimed, 0.5 < add_claimed
    regions = [{"tag_id": 0, **_box(0, 0)}, {"tag_id": 2, **_box(30, 30)}, {"tag_id": 3, **_box(60, 0)},
               {"tag_id": 4, **_box(1, 0)}]
    views = [{"tag_id": 2, "score": 0.6}, {"tag_id": 3, "score": 0.05}, {"tag_id": 4, "score": 0.99}]
    st = _decide(tmp_path, add_threshold=0.4, add_unclaimed=0.3, add_claimed=0.8, view_weight=0.5)
    labels, events = st.decide_row("a", [0], scores, regions, [], views)
    assert labels["combined"] == [0, 2]
    dec = {e["tag_id"]: e for e in events if e["stage"] == "decide"}
    ev2 = json.loads(dec[2]["evidence"])
    assert dec[2]["reason"] == "region_free" and ev2["judged_score"] == pytest.approx(0.4)
    assert ev2["view_score"] == 0.6 and ev2["view_weight"] == 0.5
    assert (dec[3]["action"], dec[3]["reason"]) == ("skip", "pseudo_weak")
    assert (dec[4]["action"], dec[4]["reason"]) == ("skip", "region_claimed")
    assert [e["score"] for e in events if e["reason"] == "region_views" and e["tag_id"] == 2] == [pytest.approx(0.6)]
    # view_weight 0: the views are recorded but the whole-image score alone decides
    labels0, _ = _decide(tmp_path, add_threshold=0.4, add_unclaimed=0.3, view_weight=0.0).decide_row(
        "a", [0], scores, regions, [], views)
    assert labels0["combined"] == [0, 3]


def test_a_tag_scored_but_left_out_is_unknown_not_absent(tmp_path):
    """uncertain_score: a tag the tagger scored >= it that the rule left out and the captions did not name is
    unknown (uncertain_label_id, with an 'uncertain' event); a caption tag the rule dropped stays a negative,
    and so does one scored below; off (null), there are none."""
    args = (EVIDENCE["parse"], EVIDENCE["scores"], EVIDENCE["regions"], EVIDENCE["crops"])
    cfg = dict(add_threshold=0.7, add_crop_min=0.3, crop_threshold=0.3, drop_score=0.3, trust="calibrated")
    st = _decide(tmp_path, **cfg, uncertain_score=0.05)
    labels, events = st.decide_row("a", *args)
    # as in test_combined_rule_needs_two_signals...: 2 added, 3 skipped (its crop), 1 dropped (three signals)
    assert labels["combined"] == [0, 2, 5]
    assert st.uncertain(events) == [3]  # 1 scored 0.1 >= 0.05, but the captions named it and the rule dropped it
    unknown = [e for e in events if e["reason"] == "uncertain"]
    assert [(e["tag_id"], e["stage"], e["action"]) for e in unknown] == [(3, "decide", "unknown")]
    assert json.loads(unknown[0]["evidence"]) == {"score": 0.8, "uncertain_score": 0.05}
    assert {e["reason"] for e in events} <= set(REASONS)
    high = _decide(tmp_path, **cfg, uncertain_score=0.9)
    assert high.uncertain(high.decide_row("a", *args)[1]) == []  # 3 scored 0.8 < 0.9: a negative
    off = _decide(tmp_path, **cfg)
    assert off.uncertain(off.decide_row("a", *args)[1]) == []
    row = {"image_id": ["a"], "union_label_id": [EVIDENCE["parse"]], "tag_events": [[]],
           "tag_scores": [EVIDENCE["scores"]], "regions": [EVIDENCE["regions"]], "crop_scores": [EVIDENCE["crops"]]}
    assert off(pa.table(row)).table.column("uncertain_label_id").to_pylist() == [[]]
    assert st(pa.table(row)).table.column("uncertain_label_id").to_pylist() == [[3]]
