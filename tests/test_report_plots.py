"""report.v1's charts (matplotlib figures) and its contact sheet's right / wrong drops, on hand-made inputs;
then the report stage itself on a hand-made shard with a scene world's truth."""
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from PIL import Image

from pipeline.stage import StageContext
from stages.output import report_plots as plots
from stages.columns import TAG_EVENT
from stages.cleaning.decide import STAGE_LABELS
from stages.output.report import ReportConfig, ReportStage
from stages.world.tables import TRUTH_SCHEMA
from tagset.tagset import Tag, TagSet

COUNTS = {"label": {"add": {"parse": 12}}, "cluster": {"flag": {"cluster_outlier": 3}, "pass": {"cluster_inlier": 9}},
          "decide": {"drop": {"dropped": 2}, "add": {"added": 4}, "keep": {"kept": 10}}}
QUALITY = {"parse": {"precision": 0.9, "recall": 0.6, "f1": 0.72}, "final": {"precision": 0.92, "recall": 0.8,
                                                                             "f1": 0.856}}


def _png(colour=(200, 30, 30), size=(92, 92)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def _image_axes(fig: Figure) -> list:
    """Axes showing a crop, in drawing order (a figure's axes include its subfigures')."""
    return [ax for ax in fig.axes if ax.images]


def _check_png(make) -> None:
    """``make()``'s figure renders to a PNG of the figure's size, the same bytes each time it is made."""
    fig = make()
    data = plots.png_bytes(fig)
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    w, h = fig.get_size_inches() * plots.DPI
    assert abs(img.size[0] - w) <= 1 and abs(img.size[1] - h) <= 1
    assert "Software" not in img.info  # no version stamp: the bytes follow the inputs
    assert plots.png_bytes(make()) == data


@pytest.mark.parametrize("make,xlabel,ylabel,legend", [
    (lambda: plots.stage_chart(COUNTS), "tags (events)", "stage: reason", ["add", "flag", "drop"]),
    (lambda: plots.long_tail_chart(["ball", "sky", "car"], [9, 5, 1], [7, 6, 0]), "tag (most frequent final label first)",
     "images with the tag", ["final", "parse"]),
    (lambda: plots.quality_chart(QUALITY), "labels after", "score vs truth", ["precision", "recall", "f1"]),
])
def test_charts_are_figures_with_axis_labels_titles_and_legends(make, xlabel, ylabel, legend):
    fig = make()
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert (ax.get_xlabel(), ax.get_ylabel()) == (xlabel, ylabel)
    assert ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == legend
    _check_png(make)


def test_stage_chart_draws_one_bar_per_stage_and_reason_coloured_by_action():
    ax = plots.stage_chart(COUNTS).axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    # pass / keep events are not changes: only add, flag and drop get a bar
    assert labels == ["cluster: cluster_outlier", "decide: added", "decide: dropped", "label: parse"]
    assert [p.get_width() for p in ax.patches] == [3, 4, 2, 12]
    assert [p.get_facecolor() for p in ax.patches] == [to_rgba(plots.ACTION_COLOURS[a]) for a in
                                                        ("flag", "add", "drop", "add")]


def test_quality_chart_bars_are_the_scores():
    ax = plots.quality_chart(QUALITY).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["parse", "final"]
    assert [round(p.get_height(), 3) for p in ax.patches] == [0.9, 0.92, 0.6, 0.8, 0.72, 0.856]
    assert ax.get_ylim()[0] == 0


@pytest.mark.parametrize("names,truth,verdict", [
    ({"ball"}, {"ball", "grass", "red"}, False),  # the ball is there: dropping it was wrong
    ({"car"}, {"ball", "grass", "red"}, True),  # no car: dropping it was right
    ({"car", "cup"}, {"cup", "sky"}, False),  # a tag standing for several world names: any one present
    (set(), {"ball"}, None),  # "big": nothing the world scores
    ({"ball"}, None, None),  # no truth for the image
])
def test_drop_verdict(names, truth, verdict):
    assert plots.drop_verdict(names, truth) is verdict


def test_contact_sheet_frames_right_and_wrong_drops_when_there_is_truth():
    sheet = {"combined: low_score+far_region": [(1, _png(), "car", "a", True), (2, _png(), "ball", "a", False),
                                                (3, _png(), "big", "b", None)],
             "paper: cluster_outlier": [(i, _png(), "sky", f"i{i}", True) for i in range(9)]}
    fig = plots.contact_sheet(sheet, judged=True)
    crops = _image_axes(fig)
    assert len(crops) == 12
    frames = [ax.spines["top"].get_edgecolor() for ax in crops]
    assert frames[:3] == [to_rgba(plots.VERDICT_STYLE[v][0]) for v in (True, False, None)]
    assert set(frames[3:]) == {to_rgba(plots.VERDICT_STYLE[True][0])}
    assert [ax.get_xlabel().split("\n")[0] for ax in crops[:3]] == ["car", "ball", "big"]
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [text for _, text in plots.VERDICT_STYLE.values()]
    _check_png(lambda: plots.contact_sheet(sheet, judged=True))

    plain = plots.contact_sheet(sheet, judged=False)  # no truth: no verdict colours, no legend
    assert not plain.legends
    assert {ax.spines["top"].get_edgecolor() for ax in _image_axes(plain)} == {to_rgba("0.3")}
    _check_png(lambda: plots.contact_sheet({}, judged=False))


# -- the stage: verdicts made in the worker from the shard's truth ------------------------------------------
NAMES = ["ball", "car", "grass", "big"]


def _write_run(tmp_path, shards: list[pa.Table], row_group_size: int | None = None) -> dict:
    """A run directory as the report finds it: the input step wrote the images, decide the rest (real
    Parquet shards); returns the report's view."""
    for i, t in enumerate(shards):
        for step, cols in (("input", ["image_id", "image_bytes"]), ("decide", [c for c in t.column_names
                                                                               if c != "image_bytes"])):
            (tmp_path / step).mkdir(exist_ok=True)
            pq.write_table(t.select(cols), tmp_path / step / f"part-{i:05d}.parquet", row_group_size=row_group_size)
    owners = {c: "decide" for c in shards[0].column_names}
    return {"rows": "decide", "owners": {**owners, "image_bytes": "input"}}


def _drop_table(ids: list[str], parse: list[int], colours: list[tuple], box=(4.0, 4.0, 40.0, 40.0)) -> pa.Table:
    """One row per id: parse said ``parse`` and the combined rule dropped all of it, each tag's region
    ``box``; each image a flat ``colours[k]``."""
    drop = [{"tag_id": t, "stage": "decide", "action": "drop", "reason": "dropped", "score": 0.01,
             "evidence": json.dumps({"votes": ["low_score", "far_region"]})} for t in parse]
    labels = {"parse": parse, "pseudolabel": parse, "cluster": parse, "verify": parse, "paper": parse,
              "combined": []}
    n = len(ids)
    return pa.table({
        "image_id": ids, "union_label_id": pa.array([[]] * n, pa.list_(pa.int32())),
        "tag_events": pa.array([drop] * n, pa.list_(TAG_EVENT)), "stage_labels": pa.array([labels] * n, STAGE_LABELS),
        "regions": [[{"tag_id": t, "box": list(box), "score": 0.9} for t in parse]] * n,
        "image_bytes": [_png(c, (64, 64)) for c in colours],
    })


def _tagset(tmp_path) -> str:
    vocab = tmp_path / "vocab"
    vocab.mkdir()
    pq.write_table(TagSet([Tag(i, n) for i, n in enumerate(NAMES)]).to_table(), vocab / "tagset.parquet")
    return str(vocab)


def _shard(tmp_path):
    """One image: truth has a red ball on grass; parse said ball, car and big, and the combined rule dropped
    all three (ball wrongly, car rightly, big unjudgeable)."""
    vocab = _tagset(tmp_path)
    (tmp_path / "input" / "truth").mkdir(parents=True)
    pq.write_table(pa.table({"image_id": ["a"], "scene": ["grass"], "scene_mentioned": [True],
                             "objects": [[{"cls": "ball", "colour": "red", "size": "large", "box": [4, 4, 40, 40],
                                           "omitted": False, "wrong_colour": None}]],
                             "hallucinated": [["car"]]}, schema=TRUTH_SCHEMA),
                   tmp_path / "input" / "truth" / "part-00000.parquet")
    table = _drop_table(["a"], [0, 1, 3], [(40, 170, 60)])
    view = _write_run(tmp_path, [table])
    artifacts = {"tagset": vocab, "truth": str(tmp_path / "input"), "decisions": str(tmp_path / "decide")}
    stage = ReportStage(ReportConfig(), StageContext(str(tmp_path), "report", 0, artifacts, view))
    return stage, stage.context.rows().read_shard(0, ReportStage.inputs)


def test_report_judges_each_dropped_crop_in_the_worker_and_draws_the_plots(tmp_path):
    stage, table = _shard(tmp_path)
    part = stage.partial(table, 0)
    (items,) = part["sheet"].values()
    assert {NAMES[tag]: verdict for *_, tag, _, verdict in items} == {"ball": False, "car": True, "big": None}
    first = stage.merge([part])
    assert set(first.files) == {"stages.png", "long_tail.png", "quality.png", "dropped_regions.png", "report.json",
                                "report.md"}
    for name in ("stages.png", "long_tail.png", "quality.png", "dropped_regions.png"):
        assert first.files[name][:8] == b"\x89PNG\r\n\x1a\n", name
    again = stage.merge([stage.partial(table, 0)])
    assert again.files["report.json"] == first.files["report.json"]  # deterministic
    assert again.files["dropped_regions.png"] == first.files["dropped_regions.png"]

    without_truth = ReportStage(ReportConfig(), StageContext(str(tmp_path), "report", 0, {
        k: v for k, v in stage.context.artifacts.items() if k != "truth"}, stage.context.view))
    (items,) = without_truth.partial(table, 0)["sheet"].values()
    assert {verdict for *_, verdict in items} == {None}


def test_report_reads_the_image_bytes_of_the_sheets_rows_only(tmp_path, monkeypatch):
    """Two shards of 12 images, every row a row group of its own: the workers read no image column, and
    the driver reads the bytes of the three rows the sheet shows (the lowest priorities over both shards),
    nothing else; the crops are those of the decoded images."""
    import pipeline.view as views
    from pipeline import partials
    from pipeline.executor import ShardWorker
    from stages.output.report import _priority
    from common.images import ImageLimits, open_image
    from stages.vision.geometry import crop

    ids = [[f"s{i}-{k:02d}" for k in range(12)] for i in range(2)]
    colours = {iid: (20 * k, 100 + 50 * i, 250 - 20 * k) for i, row in enumerate(ids) for k, iid in enumerate(row)}
    shards = [_drop_table(row, [1], [colours[iid] for iid in row], box=(8.0, 8.0, 56.0, 48.0)) for row in ids]
    view = _write_run(tmp_path, shards, row_group_size=1)
    assert pq.ParquetFile(tmp_path / "input" / "part-00000.parquet").metadata.num_row_groups == 12
    ctx = StageContext(str(tmp_path), "report", 0, {"tagset": _tagset(tmp_path)}, view)
    config = ReportConfig(sheet_per_reason=3)
    worker = ShardWorker("report.v1", config.model_dump_json(), ctx.to_json(), str(tmp_path / "report"), "fp", 256,
                         setup=False)
    assert "image_bytes" not in worker.read_input(0).column_names  # the workers read no pixel
    reads: list[tuple[str, list[int]]] = []
    real = views.read_rows
    monkeypatch.setattr(views, "read_rows", lambda path, column, rows: (reads.append((column, list(rows))),
                                                                         real(path, column, rows))[1])
    for i in range(2):
        worker.process(i, {"op": "partial"})
    assert reads == []
    stored = [(tmp_path / "report" / "_partials" / f"part-{i:05d}.json").read_bytes() for i in range(2)]
    assert not any(b'"bytes"' in b for b in stored)  # candidates only: no image in a partial

    stage = ReportStage(config, ctx)
    res = stage.merge(partials.loads(b) for b in stored)
    key = "combined: low_score+far_region"
    shown = sorted((iid for row in ids for iid in row), key=lambda iid: _priority(iid, 1, key))[:3]
    touched = sorted({int(iid[1]) for iid in shown})  # the shards holding a shown row, one read each
    assert [col for col, _ in reads] == ["image_bytes"] * len(touched)
    assert sorted(ids[i][r] for i, (_, rows) in zip(touched, reads) for r in rows) == sorted(shown)
    assert res.files["dropped_regions.png"][:8] == b"\x89PNG\r\n\x1a\n"
    sheet = stage._cut_sheet({key: [(_priority(iid, 1, key), int(iid[1]), iid, 1, [8.0, 8.0, 56.0, 48.0], None)
                                    for iid in shown]}, stage.context.rows())
    for _, png, name, iid, _ in sheet[key]:
        img, _ = open_image({"image_id": iid, "image_bytes": _png(colours[iid], (64, 64))}, None, ImageLimits())
        want = io.BytesIO()
        crop(img, [8.0, 8.0, 56.0, 48.0], 0.1).resize((92, 92)).save(want, "PNG")
        assert (png, name) == (want.getvalue(), "car")


def test_outcome_section_without_held_out_images_says_so():
    """A run whose held-out sample is empty has no mAP to compare: the report says so instead of failing."""
    from stages.output.report_markdown import outcome_markdown

    empty = {"mAP": None, "precision": 0.0, "recall": 0.0, "f1": 0.0, "by_kind": {}, "by_frequency": {}}
    o = {"judge": "labels", "judge_note": "no truth", "eval_images": 0, "judged_tags": 0, "start": "base",
         "base_labels_mAP": None, "retrained_labels_mAP": None, "gain_points": None,
         "base": empty, "retrained": empty}
    text = "\n".join(outcome_markdown(o))
    assert "no held-out image to judge by" in text and "| mAP | - | - |" in text
