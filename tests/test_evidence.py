"""evidence.v1 (one decode per image, shared forwards) against its parts computed one by one with the
tagger's plain forwards, and the decode workers: same rows, same order, same reject codes. Real parts:
tiny real RAM and CNN taggers, Arrow tables, real threads."""

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from common.images import ImageLimits, open_image
from pipeline.stage import Resources
from stages.vision.decode import Decoder
from stages.vision.evidence import EvidenceConfig, EvidenceStage
from stages.vision.parts import (PseudoLabelFields, RegionView, attention_regions, candidate_tags, crop_items,
                                 pick_scores, view_scores)
from stages.vision.tagger import BaseTagger, TaggerConfig
from tests.test_vision_stages import _ctx, _png, artifacts, cnn_artifacts  # noqa: F401  (fixtures)

VIEWS = [RegionView(window=1.0, mirror=True), RegionView(window=0.75)]


def _photos(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        out.append(_png(img, "JPEG" if i % 2 else "PNG"))
    return out


def _bad_rows(tmp_path) -> list[dict]:
    """Twelve kinds of bad image, each with the code open_image gives it."""
    rgb = Image.new("RGB", (60, 40), (10, 20, 30))
    jpeg, png = _png(rgb, "JPEG"), _png(rgb)
    (tmp_path / "text.jpg").write_text("not a picture")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "folder.jpg").mkdir(exist_ok=True)
    return [
        {"image_id": "garbage", "image_bytes": b"GIF89a but not really an image"},
        {"image_id": "empty_bytes", "image_bytes": b""},
        {"image_id": "truncated_jpeg", "image_bytes": jpeg[:200]},
        {"image_id": "truncated_png", "image_bytes": png[: len(png) // 2]},
        {"image_id": "one_pixel", "image_bytes": _png(Image.new("RGB", (1, 1)))},
        {"image_id": "thin", "image_bytes": _png(Image.new("RGB", (300, 2)))},
        {"image_id": "huge", "image_bytes": _png(Image.new("RGB", (200, 200)))},
        {"image_id": "no_image"},
        {"image_id": "web_url", "image": "https://example.com/a.jpg"},
        {"image_id": "missing_file", "image": str(tmp_path / "nowhere.jpg")},
        {"image_id": "text_file", "image": str(tmp_path / "text.jpg")},
        {"image_id": "a_folder", "image": str(tmp_path / "folder.jpg")},
    ]


def _batch(tmp_path, n_good: int = 6) -> pa.Table:
    """Good photos interleaved with the twelve bad kinds; labels from a 5-tag tagset."""
    good = [{"image_id": f"g{i}", "image_bytes": b} for i, b in enumerate(_photos(n_good))]
    bad = _bad_rows(tmp_path)
    rows = []
    for i in range(max(len(good), len(bad))):
        rows += ([good[i]] if i < len(good) else []) + ([bad[i]] if i < len(bad) else [])
    rng = np.random.default_rng(1)
    return pa.table({
        "image_id": [r["image_id"] for r in rows],
        "image": [r.get("image") for r in rows],
        "image_bytes": pa.array([r.get("image_bytes") for r in rows], pa.binary()),
        "union_label_id": [sorted(rng.choice(5, size=int(rng.integers(0, 3)), replace=False).tolist()) for _ in rows],
    })


PSEUDO, GROUND = {"floor": 0.2, "top_k": 2}, {"candidate_score": 0.3, "max_candidates": 4}


def _part_by_part(tmp_path, arts, batch, tagger: dict) -> tuple[pa.Table, list]:
    """The evidence computed part after part, each with the tagger's plain forward (no shared backbone
    pass, no decode pool): scores, then attention maps for the candidates, then the crops' features,
    then their scores, then the views."""
    from tagset.tagset import TagSet

    tagset = TagSet.load(arts["tagset"])
    cfg = TaggerConfig(**{k: v for k, v in tagger.items() if k in TaggerConfig.model_fields})
    model = BaseTagger.load(cfg, arts, tagset.names, tagset.thresholds())
    limits = ImageLimits(**{k: v for k, v in tagger.items() if k in ImageLimits.model_fields})
    pool = Decoder(1)
    keep, images, rejects = [], [], []
    for i, row in enumerate(batch.to_pylist()):
        img, rej = open_image(row, tmp_path, limits, 1333)
        (rejects.append(rej) if rej is not None else (keep.append(i), images.append(img)))
    parse = [batch.column("union_label_id")[i].as_py() for i in keep]
    pixels = [model.prepare(im) for im in images]
    scores = model.scores(pixels) if pixels else np.zeros((0, 0))
    tag_scores = [pick_scores(s, p, PseudoLabelFields(**PSEUDO), model.threshold_of_tag) for s, p in zip(scores, parse)]
    cands = [candidate_tags(p, ts, GROUND["candidate_score"], GROUND["max_candidates"]) for p, ts in zip(parse, tag_scores)]
    maps = model.scores_for(pixels, cands, attention=True)
    regions = [attention_regions(im, c, m, model.class_of_tag, 0.5) for im, c, (_, m) in zip(images, cands, maps)]
    native = model.fully_convolutional
    items = crop_items(model, pool, images, regions, 0.1, native)
    feats = model.embed([c for _, _, c in items], native=native)
    own = model.crop_scores([c for _, _, c in items], [t for _, t, _ in items], native=native)
    embeds, crops = [[] for _ in keep], [[] for _ in keep]
    for k, (j, t, _) in enumerate(items):
        embeds[j].append({"tag_id": t, "embedding": feats[k]})
        if not np.isnan(own[k]):
            crops[j].append({"tag_id": t, "score": float(own[k])})
    view_tags = {t.tag_id for t in tagset.tags if t.kind in ("object", "scene")}
    views = view_scores(model, pool, images, regions, parse, VIEWS, view_tags)
    ids = [batch.column("image_id")[i].as_py() for i in keep]
    return pa.table({"image_id": ids, "tag_scores": tag_scores, "regions": regions, "region_embeds": embeds,
                     "crop_scores": crops, "view_scores": views}), rejects


def _fused(tmp_path, arts, batch, tagger: dict, workers: int) -> tuple[pa.Table, list]:
    cfg = EvidenceConfig(**tagger, pseudolabel=PSEUDO, ground=GROUND, verify={"views": VIEWS})
    st = EvidenceStage(cfg, _ctx(tmp_path, arts))
    st.resources = Resources(decode_workers=workers)
    st.setup()
    res = st(batch)
    return res.table, res.rejects


def _assert_same_evidence(a: pa.Table, b: pa.Table) -> int:
    """Equal ids, tags, boxes; scores and embeddings within float tolerance. Returns the regions compared."""
    assert a.column("image_id").to_pylist() == b.column("image_id").to_pylist()
    n = 0
    for col in ("tag_scores", "regions", "region_embeds", "crop_scores", "view_scores"):
        for ra, rb in zip(a.column(col).to_pylist(), b.column(col).to_pylist()):
            assert [d["tag_id"] for d in ra] == [d["tag_id"] for d in rb], col
            for da, db in zip(ra, rb):
                for key in ("score", "threshold", "box", "embedding"):
                    if key in da:
                        np.testing.assert_allclose(np.asarray(da[key], np.float32), np.asarray(db[key], np.float32),
                                                   rtol=1e-3, atol=1e-5 if key != "embedding" else 2e-3, err_msg=col)
                n += col == "regions"
    return n


@pytest.mark.parametrize("which", ["ram", "cnn"])
def test_shared_forwards_give_each_parts_own_evidence(tmp_path, which, request):
    """Scores, boxes, embeddings, crop scores and view scores equal those of each part computed alone with
    the tagger's plain forwards (float tolerance); the same rows leave as rejects with the same codes."""
    arts = request.getfixturevalue("artifacts" if which == "ram" else "cnn_artifacts")
    batch = _batch(tmp_path)
    tagger = {"batch_size": 3, "max_pixels": 100 * 100}  # batches smaller than the rows: several forwards, several head calls
    want, want_rej = _part_by_part(tmp_path, arts, batch, tagger)
    got, got_rej = _fused(tmp_path, arts, batch, tagger, workers=2)
    regions = _assert_same_evidence(got, want)
    assert regions >= 6  # every good image has parse or pseudo candidates with boxes
    assert sum(len(v) for v in got.column("view_scores").to_pylist()) > 0  # the views ran
    assert [(r.image_id, r.code) for r in got_rej] == [(r.image_id, r.code) for r in want_rej]
    assert got.num_rows + len(got_rej) == batch.num_rows


def test_decode_workers_keep_row_order_and_reject_codes(tmp_path):
    """Two decode threads give, row for row, what open_image gives alone: same images, same rejects in
    the same order, the twelve kinds of bad image each with its code."""
    rows = _batch(tmp_path).to_pylist()
    limits = ImageLimits(min_side=8, max_pixels=100 * 100)
    serial = [open_image(r, tmp_path, limits) for r in rows]
    dec = Decoder(2, tmp_path, limits, ahead=3)
    pooled = list(dec.decode(rows, prepare=lambda im: im.size))
    dec.close()
    assert [i for i, *_ in pooled] == list(range(len(rows)))
    for (img, rej), (_, img2, rej2, size) in zip(serial, pooled):
        assert (rej.code, rej.image_id, rej.reason) == (rej2.code, rej2.image_id, rej2.reason) if rej else rej2 is None
        if img is not None:
            assert img2.tobytes() == img.tobytes() and size == img.size
    assert not any(" at 0x" in rej.reason for _, rej in serial if rej is not None)  # the same text in every run
    codes = {r["image_id"]: rej.code for r, (_, rej) in zip(rows, serial) if rej is not None}
    assert codes == {
        "garbage": "image_decode_failed", "empty_bytes": "image_decode_failed", "truncated_jpeg": "image_truncated",
        "truncated_png": "image_truncated", "one_pixel": "image_too_small", "thin": "image_too_small",
        "huge": "image_too_large", "no_image": "row_no_image", "web_url": "row_image_url_only",
        "missing_file": "image_decode_failed", "text_file": "image_decode_failed", "a_folder": "image_decode_failed"}


def test_the_fused_step_decodes_each_image_once(tmp_path, artifacts, monkeypatch):
    """One decode per row for all five columns, whatever the decode workers."""
    import common.images as images

    calls: list[str] = []
    real = images.open_image
    monkeypatch.setattr(images, "open_image", lambda row, *a: (calls.append(row["image_id"]), real(row, *a))[1])
    batch = _batch(tmp_path, n_good=4)
    _fused(tmp_path, artifacts, batch, {"max_pixels": 100 * 100}, workers=2)
    assert sorted(calls) == sorted(batch.column("image_id").to_pylist())
    calls.clear()
    _fused(tmp_path, artifacts, batch, {"max_pixels": 100 * 100}, workers=1)
    assert calls == batch.column("image_id").to_pylist()  # one worker: in row order


# -- the working size: a photo is held at most work_size large, its boxes stay in its own pixels ----------
def _scene(w: int, h: int) -> Image.Image:
    """A smooth picture with a few blocks (compresses well, so a test can afford 12 MP of it)."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1).astype(np.uint8)
    for k, (a, b) in enumerate(((0.1, 0.2), (0.55, 0.5), (0.3, 0.7))):
        img[int(b * h):int((b + 0.2) * h), int(a * w):int((a + 0.25) * w)] = (250 - 80 * k, 40 * k, 200)
    return Image.fromarray(img)


def test_open_image_decodes_a_large_photo_at_the_working_size_and_knows_its_own(tmp_path):
    """A 4000x3000 JPEG (reduced while decoding) or PNG comes back 1333 px on its longer side, its file's
    size kept as source_size; an EXIF turn of 90 degrees turns both. Under the working size nothing changes."""
    from common.images import SOURCE_SIZE, source_size
    from stages.vision.geometry import to_source_box, to_work_box

    big = _scene(4000, 3000)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, seen portrait
    turned = io.BytesIO()
    big.save(turned, "JPEG", exif=exif)
    rows = {"jpeg": _png(big, "JPEG"), "png": _png(big), "turned": turned.getvalue()}
    for name, data in rows.items():
        img, rej = open_image({"image_id": name, "image_bytes": data}, None, ImageLimits(), work_size=1333)
        want = ((1000, 1333), (3000, 4000)) if name == "turned" else ((1333, 1000), (4000, 3000))
        assert rej is None and (img.size, source_size(img)) == want, name
        assert np.asarray(img).nbytes == 1333 * 1000 * 3
    full, _ = open_image({"image_id": "png", "image_bytes": rows["png"]}, None, ImageLimits())
    small, _ = open_image({"image_id": "png", "image_bytes": rows["png"]}, None, ImageLimits(), work_size=1333)
    # the reduced picture is the full one, smaller: a block's colour sits where the block is
    assert np.asarray(small)[int(0.3 * 1000), int(0.2 * 1333)].tolist() == np.asarray(full)[900, 800].tolist()
    box = [400.0, 600.0, 1400.0, 1200.0]
    np.testing.assert_allclose(to_source_box(to_work_box(box, small), small), box, rtol=1e-6)
    np.testing.assert_allclose(to_work_box(box, small), [133.3, 200.0, 466.6, 400.0], atol=0.1)

    photo = _png(_scene(128, 96))  # the scene world's size: the same image, the same bytes, no source size
    a, _ = open_image({"image_id": "p", "image_bytes": photo}, None, ImageLimits())
    b, _ = open_image({"image_id": "p", "image_bytes": photo}, None, ImageLimits(), work_size=1333)
    assert a.tobytes() == b.tobytes() and a.size == b.size == (128, 96) and SOURCE_SIZE not in b.info
    assert to_work_box(box, b) == box == to_source_box(box, b)


def test_evidence_under_the_working_size_is_a_full_size_decodes(tmp_path, artifacts):
    """Photos under the working size (the batch's are 40-89 px): every column equal, value for value, to a
    full-size decode's, with the default working size or one just above the largest photo; one below
    changes the scores (the key is in effect)."""
    batch = _batch(tmp_path, n_good=4)
    tagger = {"max_pixels": 100 * 100}
    full, rej = _fused(tmp_path, artifacts, batch, {**tagger, "work_size": None}, workers=2)
    for work_size in (1333, 90):
        got, got_rej = _fused(tmp_path, artifacts, batch, {**tagger, "work_size": work_size}, workers=2)
        assert got.equals(full), work_size
        assert [(r.image_id, r.code, r.reason) for r in got_rej] == [(r.image_id, r.code, r.reason) for r in rej]
    smaller, _ = _fused(tmp_path, artifacts, batch, {**tagger, "work_size": 64}, workers=2)
    assert not smaller.equals(full)


def test_evidence_holds_a_large_photo_at_the_working_size_and_boxes_it_in_its_own_pixels(
        tmp_path, artifacts, monkeypatch):
    """A 4000x3000 photo, JPEG and PNG: the step holds each decoded at the working size (what open_image
    gave it), and writes the regions a full-size decode gives, in the photo's pixels."""
    import common.images as images

    big = _scene(4000, 3000)
    batch = pa.table({"image_id": ["jpeg", "png"], "image": [None, None],
                      "image_bytes": pa.array([_png(big, "JPEG"), _png(big)], pa.binary()),
                      "union_label_id": [[0, 1], [2, 3]]})
    held: list[tuple[int, int]] = []
    real = images.open_image
    monkeypatch.setattr(images, "open_image", lambda *a: (lambda got: (held.append(got[0].size), got)[1])(real(*a)))
    tagger = {"work_size": 256, "max_pixels": 13_000_000}
    got, rejects = _fused(tmp_path, artifacts, batch, tagger, workers=2)
    assert not rejects and held == [(256, 192), (256, 192)]
    full, _ = _fused(tmp_path, artifacts, batch, {**tagger, "work_size": None}, workers=2)
    assert held[2:] == [(4000, 3000), (4000, 3000)]
    boxes = got.column("regions").to_pylist()
    assert sum(len(rs) for rs in boxes) >= 2 and boxes == full.column("regions").to_pylist()
    assert max(r["box"][2] for rs in boxes for r in rs) > 256  # not the working image's pixels


def test_boxes_and_crops_of_a_photo_worked_small_are_in_its_own_pixels(tmp_path, artifacts):
    """An attention peak over a block gives the block's box in the photo's pixels, whatever size it was
    decoded at; a region stored in the photo's pixels is cut from the small image where the block is."""
    big = _scene(4000, 3000)
    row = {"image_id": "p", "image_bytes": _png(big)}
    small, _ = open_image(row, None, ImageLimits(), work_size=400)
    full, _ = open_image(row, None, ImageLimits())
    from tagset.tagset import TagSet

    tagger = BaseTagger.load(TaggerConfig(), artifacts, TagSet.load(artifacts["tagset"]).names)
    amap = np.zeros((1, 10, 10), np.float32)
    amap[0, 5:7, 5:8] = 1.0  # the second block: x 0.55-0.8, y 0.5-0.7 of the image
    (r,) = attention_regions(small, [0], amap, tagger.class_of_tag, 0.5)
    assert r["box"] == [2000.0, 1500.0, 3200.0, 2100.0] == attention_regions(full, [0], amap, tagger.class_of_tag,
                                                                             0.5)[0]["box"]
    block = [0.55 * 4000 + 40, 0.5 * 3000 + 40, 0.8 * 4000 - 40, 0.7 * 3000 - 40]  # inside the block
    (_, tag, pixels), = crop_items(tagger, Decoder(1), [small], [[{"tag_id": 1, "box": block}]], 0.0, native=False)
    colour = pixels.float().mean(dim=(1, 2)).round().tolist()
    assert tag == 1 and colour == [170.0, 40.0, 200.0]  # the block's colour, all of it
