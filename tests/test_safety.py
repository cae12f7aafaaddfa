"""No code from data: temp names unique across nodes, reduce partials that are data only, checkpoints that
load without running anything."""
import socket

from common.files import temp_path
from pipeline.store import write_bytes_atomic


def test_temp_names_differ_between_writers_and_name_the_host(tmp_path):
    """Two writers of one file (on two nodes, their pids may be equal) never share a temp name, and a
    commit leaves only the file."""
    dest = tmp_path / "part-00000.parquet"
    a, b = temp_path(dest), temp_path(dest)
    assert a != b and a.parent == dest.parent
    assert a.name.startswith(".part-00000.parquet.tmp-") and socket.gethostname() in a.name
    write_bytes_atomic(b"x", dest)
    assert [p.name for p in tmp_path.iterdir()] == ["part-00000.parquet"]


class Payload:
    """Stands for whatever a pickled checkpoint may carry besides tensors (unpickling it runs its class's code)."""

    def __init__(self, note: str):
        self.note = note


def _checkpoints(folder):
    """The same tiny RAM's weights saved alone, and saved beside a pickled object."""
    import torch

    from model.registry import create_model

    model = create_model("ram_test", num_classes=4, image_size=64, window_size=4, embed_dim=8, head_hidden=32,
                         head_intermediate=64)
    torch.save({"model": model.state_dict()}, folder / "weights.pth")
    torch.save({"model": model.state_dict(), "extra": Payload("not data")}, folder / "user.pth")
    return folder / "weights.pth", folder / "user.pth"


def test_a_checkpoint_that_pickles_code_is_refused_by_the_vision_steps_and_by_train(tmp_path):
    """A user's checkpoint holding a pickled object (here an instance of a class of this file) is read with
    weights_only and refused, naming the file and the class, where the vision steps load a released
    tagger and where train starts from ``init_checkpoint``; the same weights saved alone load."""
    import pyarrow.parquet as pq
    import pytest

    from model.checkpoint import CheckpointError
    from pipeline.stage import RowSource, StageContext
    from stages.training.train import TrainStage, TrainStageConfig
    from stages.vision.tagger import TaggerConfig, load_model
    from tagset.tagset import Tag, TagSet

    good, bad = _checkpoints(tmp_path)
    names = ["red", "green", "blue", "yellow"]
    tagger = TaggerConfig(model="ram_test", checkpoint=str(bad), device="cpu",
                          model_args={"num_classes": 4, "image_size": 64, "window_size": 4, "embed_dim": 8,
                                      "head_hidden": 32, "head_intermediate": 64})
    with pytest.raises(CheckpointError, match=rf"{bad}: refused: .*test_safety\.Payload"):
        load_model(tagger, {}, names)

    vocab = tmp_path / "vocab"
    vocab.mkdir()
    pq.write_table(TagSet([Tag(i, n) for i, n in enumerate(names)]).to_table(), vocab / "tagset.parquet")
    cfg = TrainStageConfig(model="ram_test", text_encoder="none", init_checkpoint=str(bad),
                           init_tag_list=str(tmp_path / "tags.txt"),
                           model_args={"image_size": 64, "window_size": 4, "embed_dim": 8, "head_hidden": 32,
                                       "head_intermediate": 64})
    stage = TrainStage(cfg, StageContext(str(tmp_path), "train", artifacts={"tagset": str(vocab)}))
    with pytest.raises(CheckpointError, match=rf"{bad}: refused: .*test_safety\.Payload"):
        stage.run(RowSource([]))

    model, got, _ = load_model(tagger.model_copy(update={"checkpoint": str(good)}), {}, names)
    assert got == names and model.cfg.num_classes == 4


def test_reduce_partials_round_trip_as_data_and_merge_to_the_same_report(tmp_path):
    """report's partial (Counters keyed by tag id, nested counts, the sheet's (priority, PNG bytes, ...)
    tuples) and vocab's (name Counters) come back equal from their stored form, and the report merged from
    the stored partial is the one merged from the partial in memory; an object is refused in the worker."""
    from collections import Counter

    import numpy as np
    import pytest

    from pipeline import partials
    from test_report_plots import _shard

    stage, table = _shard(tmp_path)
    part = stage.partial(table, 0)
    stored = partials.loads(partials.dumps(part))
    assert stored == part and isinstance(stored["parse_tail"], Counter) and stored["parse_tail"][1] == 1
    (items,) = stored["sheet"].values()
    # a sheet candidate is (priority, shard, image_id, tag, box, verdict): where a crop is, never its pixels
    assert items and all(isinstance(i, tuple) and len(i) == 6 and not any(isinstance(x, bytes) for x in i)
                         for i in items)
    direct, via_disk = stage.merge([part]), stage.merge([stored])
    assert via_disk.files["report.json"] == direct.files["report.json"]
    assert via_disk.files["dropped_regions.png"] == direct.files["dropped_regions.png"]

    vocab = {"captions": Counter({"dog": 2}), "images": Counter({"dog": 1}), "kinds": {"dog": Counter(object=2)},
             "odd": {(1, "a"): np.float32(0.5), "__type__": [np.arange(3, dtype=np.int16)]}}
    back = partials.loads(partials.dumps(vocab))
    assert back["kinds"] == vocab["kinds"] and back["odd"][(1, "a")] == 0.5
    assert back["odd"]["__type__"][0].dtype == np.int16 and back["odd"]["__type__"][0].tolist() == [0, 1, 2]
    with pytest.raises(TypeError, match="test_safety.Payload"):
        partials.dumps({"counts": Counter(), "sample": [Payload("x")]})
    with pytest.raises(ValueError, match="unknown encoded type 'pickle'"):
        partials.loads(b'{"__type__": "pickle", "data": ""}')
