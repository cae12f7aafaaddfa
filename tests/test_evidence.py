"""evidence.v1 (the four vision steps in one: one decode per image, shared forwards) against the four
separate steps, and the decode workers: same rows, same order, same reject codes. Real parts: tiny real
RAM and CNN taggers, Arrow tables, real threads."""

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.stage import Resources
from stages.evidence import EvidenceConfig, EvidenceStage
from stages.pseudolabel import GroundConfig, GroundStage, PseudoLabelConfig, PseudoLabelStage
from stages.regions import CropConfig, EmbedStage, RegionView, VerifyConfig, VerifyStage
from stages.vision import Decoder, ImageLimits, open_image
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


def _separate(tmp_path, arts, batch, tagger: dict) -> tuple[pa.Table, list]:
    """The four steps one after another, each decoding on its own (one decode worker)."""
    ctx = _ctx(tmp_path, arts)
    parts = [PseudoLabelStage(PseudoLabelConfig(**tagger, floor=0.2, top_k=2), ctx),
             GroundStage(GroundConfig(**tagger, candidate_score=0.3, max_candidates=4), ctx),
             EmbedStage(CropConfig(**tagger), ctx), VerifyStage(VerifyConfig(**tagger, views=VIEWS), ctx)]
    for p in parts:
        p.setup()
    pl = parts[0](batch)
    gr = parts[1](pl.table)
    em = parts[2](gr.table)
    ve = parts[3](gr.table)
    cols = {"image_id": pl.table.column("image_id"), "tag_scores": pl.table.column("tag_scores"),
            "regions": gr.table.column("regions"), "region_embeds": em.table.column("region_embeds"),
            "crop_scores": ve.table.column("crop_scores"), "view_scores": ve.table.column("view_scores")}
    assert [r.image_id for r in gr.rejects + em.rejects + ve.rejects] == []  # later steps see good rows only
    return pa.table(cols), pl.rejects


def _fused(tmp_path, arts, batch, tagger: dict, workers: int) -> tuple[pa.Table, list]:
    cfg = EvidenceConfig(**tagger, pseudolabel={"floor": 0.2, "top_k": 2},
                         ground={"candidate_score": 0.3, "max_candidates": 4}, verify={"views": VIEWS})
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
def test_one_step_gives_the_four_steps_evidence(tmp_path, which, request):
    """Scores, boxes, embeddings, crop scores and view scores equal the separate passes' (float
    tolerance); the same rows leave as rejects with the same codes."""
    arts = request.getfixturevalue("artifacts" if which == "ram" else "cnn_artifacts")
    batch = _batch(tmp_path)
    tagger = {"batch_size": 3, "max_pixels": 100 * 100}  # batches smaller than the rows: several forwards, several head calls
    want, want_rej = _separate(tmp_path, arts, batch, tagger)
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
    """One decode per row across pseudolabel, ground, embed and verify (the four steps take four)."""
    import stages.vision as vision

    calls: list[str] = []
    real = vision.open_image
    monkeypatch.setattr(vision, "open_image", lambda row, *a: (calls.append(row["image_id"]), real(row, *a))[1])
    batch = _batch(tmp_path, n_good=4)
    _fused(tmp_path, artifacts, batch, {"max_pixels": 100 * 100}, workers=2)
    assert sorted(calls) == sorted(batch.column("image_id").to_pylist())
    calls.clear()
    _separate(tmp_path, artifacts, batch, {"max_pixels": 100 * 100})
    good = batch.num_rows - 12
    assert len(calls) == batch.num_rows + 3 * good
