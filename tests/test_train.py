"""Training pieces: ASL, AP, checkpoint round trip, deterministic resume, the text encoder."""
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from model.checkpoint import load_checkpoint

from model.registry import create_model
from model.loop import train
from model.data import ExportDataset
from model.metrics import average_precision
from model.objective import asl_loss
from model.train import TrainConfig


def test_asl_matches_its_definition():
    logits = torch.tensor([[2.0, -1.0], [0.5, -3.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.sigmoid(logits)
    pn = (1 - p + 0.05).clamp(max=1)
    expect = -(y * torch.log(p) + (1 - y) * torch.log(pn) * (1 - pn) ** 7).sum()
    torch.testing.assert_close(asl_loss(logits, y), expect)


def test_an_unknown_target_is_left_out_of_either_loss_and_a_training_set_reads_it(tmp_path):
    """A target < 0 (decide's uncertain_label_id) adds nothing to ASL or BCE and gets no gradient; a training
    set (unknown=True) marks those tags, a label wins over an unknown, an evaluation set stays 0/1."""
    from model.data import UNKNOWN
    from model.objective import Objective

    logits = torch.tensor([[2.0, -1.0, 0.3], [0.5, -3.0, 1.0]], requires_grad=True)
    y = torch.tensor([[1.0, UNKNOWN, 0.0], [0.0, 1.0, UNKNOWN]])
    known = y >= 0
    torch.testing.assert_close(asl_loss(logits, y), asl_loss(logits[known][None], y[known][None]))
    model = torch.nn.Identity()
    loss = Objective(model, TrainConfig(loss="bce"))(logits, y)
    expect = torch.nn.functional.binary_cross_entropy_with_logits(logits[known], y[known], reduction="sum") / 2
    torch.testing.assert_close(loss, expect)
    loss.backward()
    assert (logits.grad[~known] == 0).all() and (logits.grad[known] != 0).all()

    files = _tiny_export(tmp_path, 4)
    t = pq.read_table(files[0])
    unknown = [[3], [0, 1], [], None]  # row 1: tag 0 or 1 may also be a label
    pq.write_table(t.append_column("uncertain_label_id", pa.array(unknown, pa.list_(pa.int32()))), files[0])
    cfg = _model().cfg
    train_set, eval_set = ExportDataset(files, 4, cfg, unknown=True), ExportDataset(files, 4, cfg)
    for i, labels in enumerate(t.column("union_label_id").to_pylist()):
        ty, ey = train_set[i][1], eval_set[i][1]
        want = torch.zeros(4)
        want[list(unknown[i] or [])] = UNKNOWN
        want[labels] = 1.0
        assert torch.equal(ty, want) and torch.equal(ey, want.clamp(min=0)), i


def test_average_precision_known_values():
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.3]])
    targets = np.array([[1, 0], [0, 0], [1, 0]])
    ap = average_precision(scores, targets)
    assert ap[0] == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert np.isnan(ap[1])


def _tiny_export(tmp_path, n=24):
    from stages.world.generate import NoiseRates
    from stages.world.tables import to_tables, world_images

    rows, truth = to_tables(world_images(4, 0, n, 64, NoiseRates(0, 0, 0)))
    (tmp_path / "images").mkdir()
    recs = []
    for r, t in zip(rows.to_pylist(), truth.to_pylist()):
        (tmp_path / "images" / f"{r['image_id']}.png").write_bytes(r["image_bytes"])
        colours = sorted({o["colour"] for o in t["objects"]})
        labels = [["red", "green", "blue", "yellow"].index(c) for c in colours if c in ("red", "green", "blue", "yellow")]
        recs.append({"image_id": r["image_id"], "image_path": f"images/{r['image_id']}.png", "caption": r["captions"],
                     "union_label_id": labels, "parse_label_id": [labels]})
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "part-00000.parquet")
    return [tmp_path / "part-00000.parquet"]


def _colour_tagset(tmp_path):
    """A four-tag vocabulary directory (red, green, blue, yellow), what the train step needs."""
    from tagset.tagset import Tag, TagSet

    vocab = tmp_path / "vocab"
    vocab.mkdir()
    pq.write_table(TagSet([Tag(i, n) for i, n in enumerate(["red", "green", "blue", "yellow"])]).to_table(),
                   vocab / "tagset.parquet")
    return vocab


def _model():
    torch.manual_seed(0)
    return create_model("ram_test", num_classes=4, image_size=64, window_size=4, embed_dim=8, head_hidden=32,
                        head_intermediate=64)


def test_checkpoint_round_trip_is_exact(tmp_path):
    files = _tiny_export(tmp_path)
    model = _model()
    ds = ExportDataset(files, 4, model.cfg)
    train(model, ds, ds, TrainConfig(epochs=1, batch_size=8, warmup_steps=1), tmp_path / "ck", log=lambda m: None)
    reloaded = load_checkpoint(_model(), str(tmp_path / "ck" / "model.pth"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k
    x = torch.stack([ds[i][0] for i in range(4)])
    assert torch.equal(model.eval()(x), reloaded.eval()(x))
    assert set(torch.load(tmp_path / "ck" / "model.pth", weights_only=True)) == {"model"}  # official layout


class Crash(Exception):
    pass


def _crash_after_first_epoch(msg: str) -> None:
    if '"epoch": 0' in msg:
        raise Crash


def test_resumed_training_equals_uninterrupted(tmp_path):
    files = _tiny_export(tmp_path)
    cfg = TrainConfig(epochs=2, batch_size=8, warmup_steps=2, lr=3e-3)
    a = _model()
    ds = ExportDataset(files, 4, a.cfg)
    train(a, ds, ds, cfg, tmp_path / "a", log=lambda m: None)
    with pytest.raises(Crash):  # dies right after the first epoch's checkpoint
        train(_model(), ds, ds, cfg, tmp_path / "b", log=_crash_after_first_epoch)
    b = _model()
    logs = []
    res = train(b, ds, ds, cfg, tmp_path / "b", log=logs.append)  # picks up last.pth
    assert any("resumed" in m for m in logs)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert len(res["history"]) == 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_falls_on_colour_tags(tmp_path, seed):
    files = _tiny_export(tmp_path, 48)
    model = _model()
    ds = ExportDataset(files, 4, model.cfg)
    res = train(model, ds, ds, TrainConfig(epochs=6, batch_size=8, warmup_steps=4, lr=3e-3, seed=seed),
                tmp_path / "ck", log=lambda m: None)
    losses = [h["loss"] for h in res["history"][1:]]
    assert losses[-1] < 0.9 * losses[0], losses


def test_minilm_label_queries_put_synonyms_close():
    from model.text import MiniLMEncoder, label_embeddings

    enc = MiniLMEncoder()
    e = label_embeddings(enc, ["car", "automobile", "banana"])
    assert e.shape == (3, 384)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.1


def test_open_set_vocabulary_and_ram_plus_description_layout():
    m = create_model("ram_plus_test", label_dim=16)
    desc = torch.nn.functional.normalize(torch.randn(3 * 51, 16), dim=-1)
    m.set_vocabulary(desc, [0.5, 0.6, 0.7])
    assert m.cfg.num_classes == 3 and m(torch.randn(1, 3, 224, 224)).shape == (1, 3)
    with pytest.raises(ValueError, match="description rows"):
        m.set_vocabulary(desc[:100])
    with pytest.raises(ValueError, match="label_dim"):
        create_model("ram_test").set_vocabulary(torch.randn(5, 16))


def test_train_stage_rejects_undecodable_images_and_records_map(tmp_path):
    from pipeline.stage import RowSource, StageContext
    from stages.training.train import TrainStage, TrainStageConfig

    files = _tiny_export(tmp_path, 20)
    first = pq.read_table(files[0]).to_pylist()[0]
    (tmp_path / first["image_path"]).write_bytes(b"\x89PNG\r\n\x1a\n not really")
    vocab = _colour_tagset(tmp_path)
    cfg = TrainStageConfig(text_encoder="none", epochs=1, batch_size=8, warmup_steps=1, val_fraction=0.3,
                           model_args={"image_size": 64, "window_size": 4, "embed_dim": 8, "head_hidden": 32,
                                       "head_intermediate": 64})
    stage = TrainStage(cfg, StageContext(str(tmp_path), "train", artifacts={"tagset": str(vocab)}))
    res = stage.run(RowSource(files))
    assert [(r.image_id, r.code) for r in res.rejects] == [(first["image_id"], "image_decode_failed")]
    assert res.stats["train_images"] + res.stats["val_images"] == 19
    assert 0 <= res.stats["val_mAP_after"] <= 1 and (tmp_path / "train" / "model.pth").exists()


def test_truth_map_scores_perfect_and_reversed_rankings():
    from stages.training.holdout import truth_map
    from stages.world.score import ImageTruth

    truth = {"a": ImageTruth({"car", "red"}), "b": ImageTruth({"cup"}), "c": ImageTruth({"car"})}
    id_names = {0: {"car"}, 1: {"cup"}, 2: set()}  # tag 2 names nothing in the world: not scored
    perfect = np.array([[0.9, 0.1, 0.5], [0.1, 0.9, 0.5], [0.8, 0.2, 0.5]])
    assert truth_map(perfect, ["a", "b", "c"], truth, id_names)[0] == 1.0
    worst = 1 - perfect
    m, _ = truth_map(worst, ["a", "b", "c"], truth, id_names)
    assert m < 0.6


def test_ram_plus_alignment_loss_prefers_matching_captions():
    from model.objective import alignment_loss

    m = create_model("ram_plus_test", label_dim=16)
    caps = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    img = torch.zeros(4, 5, 16)
    img[:, 0] = caps  # each image's pooled token points at its own caption
    matched = alignment_loss(m, img, caps)
    shuffled = alignment_loss(m, img, caps[[1, 2, 3, 0]])
    assert matched.ndim == 0 and matched.item() < shuffled.item()


def test_cnn_tagger_interface_training_and_round_trip(tmp_path):
    """The small CNN base tagger: RAM-shaped outputs for the vision stages, BCE + flips train it,
    and a saved state loads back exactly through the stages' loader."""
    import json

    from stages.vision.tagger import BaseTagger, TaggerConfig

    torch.manual_seed(0)
    model = create_model("cnn_tagger_tiny", num_classes=4, widths=[8, 16, 16, 16])
    x = torch.randn(3, 3, 64, 64)
    logits, attn = model(x, return_attn=True)
    assert logits.shape == (3, 4) and attn.shape == (3, 1, 4, 17)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 1, 4))
    assert torch.all(attn[..., 0] == 0)  # no pooled-token slot in use
    torch.testing.assert_close(model(x, torch.tensor([2, 0])), logits[:, [2, 0]])
    assert model.image_embeds(x).shape == (3, 17, 16)

    files = _tiny_export(tmp_path, 48)
    ds = ExportDataset(files, 4, model.cfg, cache=True)
    res = train(model, ds, ds, TrainConfig(epochs=6, batch_size=8, warmup_steps=4, lr=3e-3, loss="bce",
                                           hflip=True), tmp_path / "ck", log=lambda m: None)
    losses = [h["loss"] for h in res["history"][1:]]
    assert losses[-1] < 0.8 * losses[0]

    d = tmp_path / "tagger"
    d.mkdir()
    torch.save({"model": model.state_dict()}, d / "model.pth")
    (d / "model.json").write_text(json.dumps({"entrypoint": "cnn_tagger_tiny", "checkpoint": "model.pth",
                                              "model_args": {"num_classes": 4, "widths": [8, 16, 16, 16]}}))
    loaded = BaseTagger.load(TaggerConfig(device="cpu"), {"tagger": str(d)}, ["red", "green", "blue", "yellow"])
    model.eval()
    torch.testing.assert_close(loaded.model(x), model(x))


def test_training_with_the_caption_branch_round_trips_with_ties(tmp_path):
    """RAM with its caption branch trains from the export (tagging + generation loss), and the saved
    official-layout checkpoint loads back exactly with the tag encoder still tied to the tagging head."""
    files = _tiny_export(tmp_path, 16)
    names = ["red", "green", "blue", "yellow"]

    def build():
        torch.manual_seed(0)
        return create_model("ram_test", caption_branch=True, text_layers=2, num_classes=4, image_size=64,
                            window_size=4, embed_dim=8, head_hidden=32, head_intermediate=64)

    model = build()
    ds = ExportDataset(files, 4, model.cfg)
    with pytest.raises(ValueError, match="tag names"):
        train(build(), ds, ds, TrainConfig(epochs=1), tmp_path / "none", log=lambda m: None)
    res = train(model, ds, ds, TrainConfig(epochs=2, batch_size=8, warmup_steps=1, lr=3e-3), tmp_path / "ck",
                log=lambda m: None, tag_names=names)
    no_caption = train(build(), ds, ds, TrainConfig(epochs=2, batch_size=8, warmup_steps=1, lr=3e-3,
                                                    caption_weight=0.0), tmp_path / "ck0", log=lambda m: None)
    # the generation loss is part of the objective (several nats per token at the start)
    assert res["history"][1]["loss"] > no_caption["history"][1]["loss"] + 1.0
    reloaded = load_checkpoint(build(), str(tmp_path / "ck" / "model.pth"))
    sd = reloaded.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    layer = reloaded.tagging_head.encoder.layer[0]
    assert layer.crossattention is reloaded.tag_encoder.encoder.layer[0].crossattention


def test_distillation_pulls_the_pooled_embedding_to_a_ram_teacher(tmp_path):
    """A frozen RAM teacher at another input size: the student's token 0 moves towards the teacher's
    embedding with the distillation term, and does not without it."""
    from model.teacher import make_teacher

    files = _tiny_export(tmp_path, 24)
    torch.manual_seed(1)
    tm = create_model("ram_test", num_classes=4, image_size=32, window_size=4, embed_dim=8, head_hidden=32,
                      head_intermediate=64)
    torch.save({"model": tm.state_dict()}, tmp_path / "teacher.pth")
    args = {"num_classes": 4, "image_size": 32, "window_size": 4, "embed_dim": 8, "head_hidden": 32,
            "head_intermediate": 64}

    def gap(model, ds, teacher):
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        model.eval()
        with torch.no_grad():
            return float((model.image_embeds(x)[:, 0] - teacher(x)).abs().mean())

    results = {}
    for weight in (0.0, 5.0):
        model = _model()
        ds = ExportDataset(files, 4, model.cfg)
        teacher = make_teacher("ram", str(tmp_path / "teacher.pth"), model.cfg, "ram_test", args)
        before = gap(model, ds, teacher)
        train(model, ds, ds, TrainConfig(epochs=6, batch_size=8, warmup_steps=1, lr=3e-3, distill_weight=weight),
              tmp_path / f"ck{weight}", teacher=teacher, log=lambda m: None)
        results[weight] = gap(model, ds, teacher) / before
    assert results[5.0] < 0.7 and results[5.0] < results[0.0] - 0.2, results
    with pytest.raises(ValueError, match="label_dim"):
        make_teacher("ram", str(tmp_path / "teacher.pth"), create_model("ram_test", label_dim=16).cfg,
                     "ram_test", args)


def test_a_teacher_without_weights_is_a_config_error(tmp_path):
    from pipeline.config import ConfigError, load_run_config

    cfg = tmp_path / "t.yaml"
    cfg.write_text("workflow: train\ntrain: {teacher: ram}\n")
    with pytest.raises(ConfigError, match=r"t\.yaml.*train.*teacher_weights"):
        load_run_config(cfg)


def _check_devices(model):
    """Every submodule asserts that the tensors it is called with are on the model's device."""
    device = next(model.parameters()).device

    def hook(module, args, kwargs):
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                assert a.device == device, f"{type(module).__name__} called with a {a.device} tensor, model on {device}"

    for m in model.modules():
        m.register_forward_pre_hook(hook, with_kwargs=True)
    return model


def _meta_models():
    yield "ram", _model()
    yield "cnn", create_model("cnn_tagger_tiny", num_classes=4, widths=[8, 16, 16, 16], pool="lse")
    yield "ram_caption", create_model("ram_test", caption_branch=True, text_layers=2, num_classes=4, image_size=64,
                                      window_size=4, embed_dim=8, head_hidden=32, head_intermediate=64)
    yield "ram_plus", create_model("ram_plus_test", num_classes=4, image_size=64, window_size=4, embed_dim=8,
                                   head_hidden=32, head_intermediate=64, label_dim=384)


def test_the_loop_keeps_every_tensor_on_the_model_device(tmp_path):
    """No GPU here, so the model goes to the ``meta`` device (a second device without data): a CPU batch fed
    to it fails the submodules' device checks, and the host copy of a score is the one place it may stop."""
    from model.teacher import RamTeacher
    from model.text import MiniLMEncoder
    from model.data import batches, make_loader
    from model.metrics import evaluate, predict
    from model.objective import BatchLoss, Objective
    from model.train import optimizer_step
    from pipeline.stage import StageContext
    from stages.training.train import TrainStage, TrainStageConfig

    files = _tiny_export(tmp_path, 16)
    meta = torch.device("meta")
    encoder = MiniLMEncoder()
    for name, model in _meta_models():
        model = _check_devices(model.to(meta))
        with pytest.raises(AssertionError, match="called with a cpu tensor"):  # the checks do catch a mix-up
            model(torch.zeros(2, 3, 64, 64))
        ds = ExportDataset(files, 4, model.cfg)
        loader = make_loader(ds, 8, meta)
        for s, y, _ in predict(model, loader):
            assert s.device == meta and y.device == meta and s.shape == (8, 4), name
        cfg = TrainConfig(hflip=True, grad_clip=1.0, distill_weight=1.0, align_weight=1.0, channels_last=name == "cnn")
        teacher = None
        if name.startswith("ram"):
            teacher = RamTeacher(_check_devices(create_model(
                "ram_test", num_classes=4, image_size=32, window_size=4, embed_dim=8, head_hidden=32,
                head_intermediate=64, label_dim=model.cfg.label_dim).to(meta)), model.cfg)
        objective = Objective(model, cfg)
        batch_loss = BatchLoss(model, cfg, teacher, encoder if name == "ram_plus" else None,
                               ["red", "green", "blue", "yellow"])
        assert batch_loss.distill == (teacher is not None) and batch_loss.align == (name == "ram_plus")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        objective.train()
        x, y, idx = next(batches(loader))
        loss = batch_loss(objective, x, y, lambda: [ds.row(int(i)) for i in idx], torch.Generator(), meta)
        loss.backward()
        optimizer_step(opt, sched, params, cfg)
        assert loss.device == meta and all(p.grad.device == meta for p in params if p.grad is not None), name
        with pytest.raises(NotImplementedError, match="meta tensor"):  # stops at the host copy, nowhere before
            evaluate(model, loader)
    stage = TrainStage(TrainStageConfig(), StageContext(str(tmp_path), "train"))
    with pytest.raises(NotImplementedError, match="meta tensor"):
        stage._calibrate(model, ds, 4)


def test_gradient_accumulation_equals_one_larger_batch(tmp_path):
    """Two batches of 8 accumulated into one step: the same update as one batch of 16, half the steps."""
    files = _tiny_export(tmp_path, 32)
    big, acc = _model(), _model()
    ds = ExportDataset(files, 4, big.cfg)
    kw = {"epochs": 1, "warmup_steps": 1, "lr": 3e-3}
    r_big = train(big, ds, ds, TrainConfig(batch_size=16, **kw), tmp_path / "big", log=lambda m: None)
    r_acc = train(acc, ds, ds, TrainConfig(batch_size=8, global_batch_size=16, **kw), tmp_path / "acc",
                  log=lambda m: None)
    assert r_big["steps"] == r_acc["steps"] == 2
    for k, v in big.state_dict().items():
        torch.testing.assert_close(acc.state_dict()[k], v, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="multiple of batch_size"):
        train(_model(), ds, ds, TrainConfig(batch_size=8, global_batch_size=12, **kw), tmp_path / "bad")


def test_gradient_clipping_bounds_the_update():
    from model.train import optimizer_step

    w = torch.nn.Parameter(torch.zeros(4))
    w.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])  # norm 5
    opt = torch.optim.SGD([w], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    optimizer_step(opt, sched, [w], TrainConfig(grad_clip=0.5))
    torch.testing.assert_close(w.detach(), torch.tensor([-0.3, -0.4, 0.0, 0.0]))


def test_loader_workers_decode_the_same_batches(tmp_path):
    """Training with num_workers > 0 (prefetching processes) trains the very same model as the in-process
    loader, flips and all, over several epochs: each epoch's order is drawn from its own seed and each
    batch's flips from the batch's, so nothing depends on how far a loader runs ahead."""
    files = _tiny_export(tmp_path, 24)
    a, b = _model(), _model()
    ds = ExportDataset(files, 4, a.cfg)
    cfg = {"epochs": 2, "batch_size": 8, "warmup_steps": 1, "hflip": True}
    train(a, ds, ds, TrainConfig(**cfg), tmp_path / "a", log=lambda m: None)
    train(b, ds, ds, TrainConfig(num_workers=2, prefetch_factor=2, **cfg), tmp_path / "b", log=lambda m: None)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_held_out_evaluation_is_a_bounded_sample_by_hash():
    from stages.training.holdout import eval_sample

    ids = [f"img{i:04d}" for i in range(500)]
    s = eval_sample(ids, 40)
    assert len(s) == 40 and s == eval_sample(reversed(ids), 40) and s <= set(ids)
    assert eval_sample(ids[:30], 40) == set(ids[:30])
    assert eval_sample(ids, 40) & set(ids[:250]) != s  # not simply the first ids


def test_the_driver_reads_ids_only_and_a_dataset_keeps_only_its_rows_undecoded(tmp_path):
    """The train step's driver pass (``split_rows``) needs only the image_id column: it gives the counts
    and the evaluation sample of the whole split with every image file gone. A dataset holds its rows'
    ids and labels and, for inline images, where their bytes are (file, row), not the bytes; it reads the
    bytes of a row only when the row is decoded, decodes nothing until an item is read, and caches
    nothing unless asked."""
    import shutil

    from pipeline.stage import RowSource
    from stages.training.holdout import eval_sample, held_out, split_rows
    from stages.training.train import TrainStageConfig
    from stages.world.generate import NoiseRates
    from stages.world.tables import to_tables, world_images

    files = _tiny_export(tmp_path, 40)
    ids = pq.read_table(files[0], columns=["image_id"]).column("image_id").to_pylist()
    shutil.rmtree(tmp_path / "images")
    split = split_rows(RowSource(files), 0.5, 6)
    held = [i for i in ids if held_out(i, 0.5)]
    assert (split.rows, split.held_out) == (40, len(held)) and split.eval_ids == eval_sample(held, 6)

    rows, _ = to_tables(world_images(4, 0, 40, 64, NoiseRates(0, 0, 0)))  # inline image bytes
    full = rows.select(["image_id", "image_bytes"]).append_column("union_label_id", pa.array([[0]] * 40))
    pq.write_table(full, tmp_path / "inline.parquet")
    mine = [held_out(i, 0.5) for i in full.column("image_id").to_pylist()]
    ds = ExportDataset([tmp_path / "inline.parquet"], 4, _model().cfg, keep=lambda i: held_out(i, 0.5),
                       record_opened=True)
    own = full.filter(pa.array(mine))
    assert len(ds) == own.num_rows == sum(mine) < 40 and ds.cache is None
    assert ds.nbytes < 0.2 * own.select(["image_bytes"]).nbytes  # ids and labels: the bytes stay in the file
    assert sorted(ds.image_id(i) for i in range(len(ds))) == sorted(own.column("image_id").to_pylist())
    assert ds.bytes.reads == 0 and ds.opened == []
    x, _, _, rej = ds[1]
    assert rej is None and x.shape == (3, 64, 64) and ds.opened == [ds.image_id(1)] and ds.bytes.reads == 1
    gone = ExportDataset(files, 4, _model().cfg)  # built over missing files: it has decoded nothing yet
    x, _, _, rej = gone[0]
    assert x is None and rej.code == "image_decode_failed" and not TrainStageConfig().cache_images


def test_train_stage_scores_at_most_eval_max_images(tmp_path):
    from pipeline.stage import RowSource, StageContext
    from stages.training.train import TrainStage, TrainStageConfig

    files = _tiny_export(tmp_path, 40)
    vocab = _colour_tagset(tmp_path)
    cfg = TrainStageConfig(text_encoder="none", epochs=1, batch_size=8, warmup_steps=1, val_fraction=0.5,
                           eval_max_images=5, model_args={"image_size": 64, "window_size": 4, "embed_dim": 8,
                                                          "head_hidden": 32, "head_intermediate": 64})
    res = TrainStage(cfg, StageContext(str(tmp_path), "train", artifacts={"tagset": str(vocab)})).run(RowSource(files))
    assert res.stats["val_images"] == 5 < res.stats["held_out_images"]
    assert res.stats["train_images"] + res.stats["held_out_images"] == 40


GOLDEN_CKPTS = [("ram_test", "tiny_ram.pth", 1), ("ram_plus_test", "tiny_ram_plus.pth", 51)]
# ids 0-3 are the colours the tiny export labels (new to the checkpoint); then tags its list knows, one
# by a synonym only ("aeroplane" -> "plane") and one by another spelling ("Alarm  Clock")
FINETUNE_TAGS = [("red", []), ("green", []), ("blue", []), ("yellow", []), ("abacus", []), ("airport", []),
                 ("Alarm  Clock", []), ("aeroplane", ["plane"])]


def _finetune_stage(tmp_path, shared, name, ckpt, **overrides):
    from pipeline.stage import StageContext
    from stages.training.train import TrainStage, TrainStageConfig
    from tagset.tagset import Tag, TagSet

    g = shared / "ref/ram/golden"
    vocab = tmp_path / "vocab"
    vocab.mkdir(exist_ok=True)
    pq.write_table(TagSet([Tag(i, n, s) for i, (n, s) in enumerate(FINETUNE_TAGS)]).to_table(),
                   vocab / "tagset.parquet")
    cfg = TrainStageConfig(**{"model": name, "init_checkpoint": str(g / ckpt),
                              "init_tag_list": str(g / "ram_tag_list.txt"), "text_encoder": "minilm",
                              "new_tag_rows": "project", "epochs": 1, "batch_size": 8, "warmup_steps": 1,
                              "val_fraction": 0.3, "cache_images": False, **overrides})
    return TrainStage(cfg, StageContext(str(tmp_path), "train", artifacts={"tagset": str(vocab)}))


@pytest.mark.shared
@pytest.mark.parametrize("name, ckpt, per", GOLDEN_CKPTS)
def test_fine_tuning_a_released_checkpoint_keeps_its_label_rows(shared, tmp_path, name, ckpt, per):
    """Golden set A's official tiny RAM / RAM++ on a tagset that adds four tags: the tags the checkpoint
    knows keep their official 512-d rows exactly, the new ones get MiniLM rows projected into that space,
    the run trains and publishes a model the vision stages load."""
    import json

    from pipeline.stage import RowSource
    from stages.vision.tagger import BaseTagger, TaggerConfig

    g = shared / "ref/ram/golden"
    official = torch.load(g / ckpt, weights_only=True)["model"]["label_embed"].view(50, per, 512)
    ck_names = (g / "ram_tag_list.txt").read_text().splitlines()
    files = _tiny_export(tmp_path, 16)
    res = _finetune_stage(tmp_path, shared, name, ckpt).run(RowSource(files))
    out = tmp_path / "train"
    rows = torch.load(out / "model.pth", weights_only=True)["model"]["label_embed"]
    assert rows.shape == (len(FINETUNE_TAGS) * per, 512)
    rows = rows.view(len(FINETUNE_TAGS), per, 512)
    for ours, theirs in [(4, "abacus"), (5, "airport"), (6, "alarm clock"), (7, "plane")]:
        assert torch.equal(rows[ours], official[ck_names.index(theirs)]), theirs
    new = rows[:4].reshape(-1, 512)
    torch.testing.assert_close(new.norm(dim=-1), torch.ones(len(new)))
    assert not any(torch.equal(r, o) for r in rows[:4] for o in official)
    if per > 1:  # RAM++: 51 different rows per new tag (template texts), not 51 copies of one
        assert torch.unique(rows[0], dim=0).shape[0] == per
    assert res.stats["init_tags_known"] == 4 and res.stats["init_tags_new"] == 4
    assert res.stats["init_new_rows"] == "project" and -1 <= res.stats["init_projection_cosine"] <= 1
    assert res.stats["steps"] >= 1 and np.isfinite(res.stats["loss_last_epoch"])
    for fname, data in res.files.items():
        (out / fname).write_bytes(data)
    assert json.loads((out / "model.json").read_text())["model_args"]["label_dim"] == 512
    tagger = BaseTagger.load(TaggerConfig(device="cpu"), {"tagger": str(out)}, [n for n, _ in FINETUNE_TAGS])
    assert tagger.model(torch.zeros(1, 3, 224, 224)).shape == (1, len(FINETUNE_TAGS))


@pytest.mark.shared
def test_fine_tuning_never_mixes_label_widths(shared, tmp_path):
    from pipeline.stage import RowSource

    files = _tiny_export(tmp_path, 8)
    with pytest.raises(ValueError, match=r"'minilm' is 384-d but the checkpoint's label space is 512-d"):
        _finetune_stage(tmp_path, shared, "ram_test", "tiny_ram.pth", new_tag_rows="encoder").run(RowSource(files))
    with pytest.raises(ValueError, match="init_tag_list"):
        _finetune_stage(tmp_path, shared, "ram_test", "tiny_ram.pth", init_tag_list=None).run(RowSource(files))
    with pytest.raises(ValueError, match="no text encoder"):
        _finetune_stage(tmp_path, shared, "ram_test", "tiny_ram.pth", text_encoder="none").run(RowSource(files))


def test_label_transfer_with_an_encoder_of_the_checkpoints_width():
    """Same width (CLIP's case): new rows are the encoder's own, known rows the checkpoint's."""
    from model.finetune import transfer_labels

    class Hashed:  # a deterministic 8-d text encoder: no CLIP weights on this machine
        dim = 8

        def encode(self, texts):
            return torch.stack([torch.randn(8, generator=torch.Generator().manual_seed(sum(map(ord, t))))
                                for t in texts])

    ck = torch.nn.functional.normalize(torch.randn(3 * 2, 8), dim=-1)  # 3 classes x 2 rows (a RAM++-like layout)
    tr = transfer_labels(ck, ["cat", "dog", "car"], [("Dog", []), ("bus", []), ("kitty", ["cat"])], 2,
                         lambda names: [f"{n} {d}" for n in names for d in ("a", "b")], Hashed())
    assert tr.known == {0: 1, 2: 0} and tr.new == [1]
    rows = tr.label_embed.view(3, 2, 8)
    assert torch.equal(rows[0], ck.view(3, 2, 8)[1]) and torch.equal(rows[2], ck.view(3, 2, 8)[0])
    torch.testing.assert_close(rows[1], torch.nn.functional.normalize(Hashed().encode(["bus a", "bus b"]), dim=-1))
    assert tr.stats["new_rows"] == "encoder"


def test_ram_plus_rows_from_descriptions_and_templates(tmp_path):
    """51 rows per tag: a tag's own descriptions where the JSON has them (official format), else 51
    prompt templates; each row one normalised embedding of one text."""
    import json

    from model.text import DESCRIPTION_TEMPLATES, MiniLMEncoder, description_rows, load_descriptions

    desc = [f"description {d} of an aerial photo" for d in range(51)]
    path = tmp_path / "desc.json"
    path.write_text(json.dumps([{"Aerial  Photography": desc}, {"unused": ["x"] * 51}]))
    descriptions = load_descriptions(path)
    enc = MiniLMEncoder()
    rows = description_rows(enc, ["red", "aerial photography"], descriptions)
    assert rows.shape == (102, 384) and torch.unique(rows[:51], dim=0).shape[0] == 51
    torch.testing.assert_close(rows[:51], enc.encode([t.format("red") for t in DESCRIPTION_TEMPLATES]))
    torch.testing.assert_close(rows[51:], enc.encode(desc))
    with pytest.raises(ValueError, match="has 50 descriptions"):
        description_rows(enc, ["a"], {"a": desc[:50]})


@pytest.mark.shared
def test_official_description_file_loads(shared):
    from model.text import description_texts, load_descriptions

    d = load_descriptions(shared / "ref/ram/openimages_rare_200_llm_tag_descriptions.json")
    assert len(d) == 200 and {len(v) for v in d.values()} == {51}
    texts = description_texts(["Aerial photography"], d)
    assert len(texts) == 51 and texts[0] == "a photo of a aerial photography."


def test_ram_plus_trains_with_description_rows_and_the_alignment_loss(tmp_path):
    """RAM++ from the train step: its label rows are the descriptions' embeddings (frozen, so kept), and
    align_weight switches the image-text alignment loss on (it adds to the objective)."""
    import json

    from model.text import MiniLMEncoder
    from pipeline.stage import RowSource, StageContext
    from stages.training.train import TrainStage, TrainStageConfig
    from tagset.tagset import Tag, TagSet

    files = _tiny_export(tmp_path, 16)
    vocab = tmp_path / "vocab"
    vocab.mkdir()
    names = ["red", "green", "blue", "yellow"]
    pq.write_table(TagSet([Tag(i, n) for i, n in enumerate(names)]).to_table(), vocab / "tagset.parquet")
    desc = [f"something {d} that is coloured blue" for d in range(51)]
    (tmp_path / "desc.json").write_text(json.dumps([{"blue": desc}]))
    args = {"image_size": 64, "window_size": 4, "embed_dim": 8, "head_hidden": 32, "head_intermediate": 64}
    losses = {}
    for weight in (0.0, 1.0):
        cfg = TrainStageConfig(model="ram_plus_test", model_args=args, descriptions=str(tmp_path / "desc.json"),
                               align_weight=weight, epochs=1, batch_size=8, warmup_steps=1, val_fraction=0.3,
                               seed=0)
        res = TrainStage(cfg, StageContext(str(tmp_path), f"train{weight}", artifacts={"tagset": str(vocab)})).run(
            RowSource(files))
        losses[weight] = res.stats["loss_first_epoch"]
    rows = torch.load(tmp_path / "train1.0" / "model.pth", weights_only=True)["model"]["label_embed"]
    torch.testing.assert_close(rows.view(4, 51, 384)[2], MiniLMEncoder().encode(desc))
    assert losses[1.0] > losses[0.0] + 0.1, losses
    with pytest.raises(ValueError, match="alignment loss is RAM\\+\\+'s"):
        TrainStage(TrainStageConfig(model="ram_test", model_args=args, align_weight=1.0),
                   StageContext(str(tmp_path), "t", artifacts={"tagset": str(vocab)})).run(RowSource(files))


def test_cli_train_runs_only_the_train_step(tmp_path, small_world_config, capsys):
    from pipeline.cli import main

    assert main(["train", str(small_world_config()), "--out", str(tmp_path / "a")]) == 2
    assert "has no train step" in capsys.readouterr().err
    cfg = tmp_path / "t.yaml"
    cfg.write_text("workflow: train\nray: {enabled: false}\ninput: {images: 8, size: 64}\n")
    assert main(["train", str(cfg), "--out", str(tmp_path / "b"), "--set", "train.backend=ray_train"]) == 2
    assert "--only leaves out step 'input'" in capsys.readouterr().err  # the data steps must be done first


def test_gpu_recipe_is_the_official_schedule():
    from pipeline.config import load_run_config
    from pipeline.contract import check_contract

    recipe = Path(__file__).resolve().parent.parent / "stages" / "train_ram_gpu.yaml"
    cfg = load_run_config(recipe)
    check_contract(cfg)
    t = cfg.step("train").config
    assert (t.backend, t.device, t.model, t.model_args) == ("ray_train", "cuda", "ram_swin_l_384",
                                                            {"image_size": 224, "window_size": 7})
    assert (t.batch_size, t.lr, t.weight_decay, t.epochs, t.warmup_steps) == (52, 1e-4, 0.05, 5, 3000)
    assert t.teacher == "clip" and t.text_encoder == "clip" and t.freeze_label_embed
    ft = load_run_config(recipe, ["train.model_args={}", "train.batch_size=26",
                                                       "train.lr=5e-6", "train.epochs=2"]).step("train").config
    assert (ft.model_args, ft.batch_size, ft.lr, ft.epochs) == ({}, 26, 5e-6, 2)


def test_gpu_bench_train_part_runs_on_the_cpu_with_a_tiny_ram(tmp_path):
    """bench/gpu.py's --train part (what --smoke runs of it): optimizer steps of the train step's own
    objective on the photos, here a tiny RAM on the CPU; the numbers mean nothing, the code runs."""
    import importlib.util
    import math

    spec = importlib.util.spec_from_file_location("bench_gpu", Path(__file__).resolve().parent.parent / "bench/gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    files = _tiny_export(tmp_path, 4)
    rows = [{"image_id": r["image_id"], "image_path": str(tmp_path / r["image_path"])}
            for r in pq.read_table(files[0]).to_pylist()]
    out = gpu.train_part(rows, 26, 10, smoke=True, device="cpu")
    assert "error" not in out, out
    assert (out["batch"], out["steps"], out["image_size"]) == (4, 2, 64) and math.isfinite(out["loss_last"])


def test_a_cpu_trains_in_bf16_only_when_asked():
    """``cpu_bf16`` turns on bf16 autocast on a CPU (the loop's forward, its evaluation); by default a CPU
    computes in fp32, and the step's runtime fingerprint says which, so the two are different results."""
    from model.train import autocast
    from stages.training.train import TrainStage, TrainStageConfig
    from pipeline.stage import StageContext

    conv, x = torch.nn.Conv2d(3, 4, 3), torch.randn(2, 3, 8, 8)
    cpu = torch.device("cpu")
    with autocast(cpu, TrainConfig()):
        assert conv(x).dtype == torch.float32
    with autocast(cpu, TrainConfig(cpu_bf16=True)):
        assert conv(x).dtype == torch.bfloat16
    import json

    prints = [json.loads(TrainStage(TrainStageConfig(cpu_bf16=b), StageContext("/nonexistent", "train"))
                         .input_fingerprint()) for b in (False, True)]
    assert (prints[0]["train"], prints[1]["train"]) == (["cpu", "fp32"], ["cpu", "bf16"])
