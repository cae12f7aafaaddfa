"""Training as a Ray Train job on CPU: two DDP workers (gloo) on a tiny RAM from a small export."""
import json
import math

import pyarrow.parquet as pq
import pytest
import torch

from test_train import _colour_tagset, _model, _tiny_export

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ARGS = {"num_classes": 4, "image_size": 64, "window_size": 4, "embed_dim": 8, "head_hidden": 32,
        "head_intermediate": 64}


def _spec(tmp_path, files, **kw):
    import functools
    from dataclasses import asdict

    from model.distributed import JobSpec
    from model.train import TrainConfig
    from stages.training.holdout import held_out

    init = tmp_path / "init.pth"
    if not init.exists():
        torch.save({"model": _model().state_dict()}, init)
    held = functools.partial(held_out, fraction=0.2)
    ids = [r["image_id"] for r in pq.read_table(files[0]).to_pylist()]
    cfg = TrainConfig(epochs=6, batch_size=8, warmup_steps=2, lr=3e-3, hflip=True, seed=0)
    spec = JobSpec("ram_test", ARGS, str(init), True, files, 4, asdict(cfg), held, frozenset(),
                   [i for i in ids if held(i)], ["red", "green", "blue", "yellow"], **kw)
    return spec, {i for i in ids if not held(i)}


def _fit(spec, storage, name, workers=2):
    from model.distributed import train_loop_per_worker
    from pipeline.trainer import TrainJob, run_torch_job

    result = run_torch_job(train_loop_per_worker, {"spec": spec},
                           TrainJob(workers=workers, storage_path=str(storage), name=name, max_failures=1))
    with result.checkpoint.as_directory() as d:
        final = torch.load(f"{d}/model.pth", weights_only=True)
    return result, final


def _padding(n: int, world: int) -> int:
    return math.ceil(n / world) * world - n


def test_two_workers_train_on_disjoint_rows_and_resume_after_a_sigkill(ray_local, tmp_path):
    """Loss goes down; each epoch the workers' rows are disjoint (but for DistributedSampler's padding) and
    together the training split, a different share each epoch, and each worker opens only the images of
    its own rows; a worker SIGKILLed mid-epoch (step 5 of 18, checkpoints every 2 steps and at epoch ends)
    is restarted by Ray Train from the latest checkpoint and ends at the same step with bit-identical
    weights and losses."""
    files = _tiny_export(tmp_path, 48)
    spec, train_ids = _spec(tmp_path, files, checkpoint_every=2, record_ids=str(tmp_path / "ids"))
    result, final = _fit(spec, tmp_path / "storage", "plain")
    losses = [h["loss"] for h in result.return_value["history"][1:]]
    # it learns (a tiny RAM, three steps an epoch: the first epochs are noisy, so against their mean)
    assert len(losses) == 6 and losses[-1] < 0.95 * (losses[0] + losses[1]) / 2, losses
    a, b = (json.loads((tmp_path / "ids" / f"rank-{r}.json").read_text()) for r in (0, 1))
    assert a["rows"] == b["rows"] == len(train_ids)  # each holds the index of every training row
    pad = _padding(len(train_ids), 2)
    for e in map(str, range(6)):
        ea, eb = set(a["seen"][e]), set(b["seen"][e])
        assert len(ea & eb) <= pad and ea | eb == train_ids, e
        assert len(ea) == len(eb) == math.ceil(len(train_ids) / 2)
    assert a["seen"]["0"] != a["seen"]["1"]  # one permutation per epoch, split anew
    for r in (a, b):  # decoded: exactly the rows of its batches, each time it met them (no cache here)
        assert len(r["opened"]) == 6 * math.ceil(len(train_ids) / 2)
        assert set(r["opened"]) == set().union(*map(set, r["seen"].values()))
    assert a["weights_sha1"] == b["weights_sha1"]  # DDP kept the two replicas identical
    assert set(final) == {"model"}  # the official layout

    spec_kill, _ = _spec(tmp_path, files, checkpoint_every=2,
                         fault={"kill_at_step": 5, "marker": str(tmp_path / "killed")})
    killed, final_killed = _fit(spec_kill, tmp_path / "storage", "killed")
    assert (tmp_path / "killed").read_text() == "5"  # it did die
    assert killed.return_value["steps"] == result.return_value["steps"] == 6 * math.ceil(math.ceil(len(train_ids) / 2) / 8)
    # from the latest checkpoint Ray Train had registered: step 4's, or the epoch end's (step 3) when the
    # kill came before the controller took step 4's report; never from scratch
    assert killed.return_value["resumed_at"] in (3, 4) and result.return_value["resumed_at"] is None
    for k, v in final["model"].items():
        assert torch.equal(v, final_killed["model"][k]), k
    assert [h["loss"] for h in killed.return_value["history"]] == [h["loss"] for h in result.return_value["history"]]


def test_one_worker_trains_the_local_loops_weights_even_after_a_sigkill(ray_local, tmp_path):
    """A local run is the one loop as a one-worker job, so a one-worker Ray Train job ends with the local
    backend's weights, bit for bit at the same thread count (2 threads against 1 differ by float
    rounding); killed mid-epoch and resumed from a checkpoint, it still does."""
    import dataclasses

    from model.loop import train
    from model.data import ExportDataset
    from model.train import TrainConfig

    files = _tiny_export(tmp_path, 48)
    spec, train_ids = _spec(tmp_path, files, checkpoint_every=2)
    spec.train = dataclasses.asdict(TrainConfig(**{**spec.train, "epochs": 3}))
    local_model = _model()
    held = spec.is_held_out
    train_set = ExportDataset(files, 4, local_model.cfg, keep=lambda i: not held(i))
    val_set = ExportDataset(files, 4, local_model.cfg, set(spec.eval_ids))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker (one CPU): float sums then add up in the same order
    try:
        res = train(local_model, train_set, val_set, TrainConfig(**spec.train), tmp_path / "local", log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    assert len(train_set) == len(train_ids) and res["steps"] == 3 * math.ceil(len(train_ids) / 8)
    result, final = _fit(spec, tmp_path / "storage", "one", workers=1)
    assert result.return_value["steps"] == res["steps"]
    for k, v in local_model.state_dict().items():
        assert torch.equal(final["model"][k], v), k
    kill = dataclasses.replace(spec, fault={"kill_at_step": res["steps"] // 2 + 1, "marker": str(tmp_path / "k")})
    killed, final_killed = _fit(kill, tmp_path / "storage", "one-killed", workers=1)
    assert (tmp_path / "k").exists() and killed.return_value["resumed_at"] is not None
    for k, v in final["model"].items():
        assert torch.equal(v, final_killed["model"][k]), k


def test_train_step_with_the_ray_train_backend(ray_local, tmp_path):
    """The train step as a Ray Train job: it trains, calibrates and publishes like the local backend."""
    from pipeline.stage import RowSource, StageContext
    from stages.training.train import TrainStage, TrainStageConfig

    files = _tiny_export(tmp_path, 24)
    vocab = _colour_tagset(tmp_path)
    cfg = TrainStageConfig(text_encoder="none", epochs=2, batch_size=4, warmup_steps=1, val_fraction=0.3,
                           backend="ray_train", workers=2, global_batch_size=16,
                           model_args={k: v for k, v in ARGS.items() if k != "num_classes"})
    res = TrainStage(cfg, StageContext(str(tmp_path), "train", artifacts={"tagset": str(vocab)})).run(RowSource(files))
    # 2 workers x batch 4, accumulated twice: 16 images per step
    assert res.stats["steps"] >= 2 and res.stats["train_images"] + res.stats["held_out_images"] == 24
    sd = torch.load(tmp_path / "train" / "model.pth", weights_only=True)["model"]
    assert not torch.equal(sd["fc.weight"], _model().state_dict()["fc.weight"])  # trained
    assert json.loads(res.files["thresholds.json"])


DRIVER = """
import pickle, sys
import ray
sys.path.insert(0, {tests!r})
from test_train_ray import _fit
ray.init(address={address!r}, log_to_driver=False)
_fit(pickle.load(open({spec!r}, "rb")), {storage!r}, "driver")
"""


def test_a_killed_driver_resumes_from_the_latest_checkpoint(ray_local, tmp_path):
    """The driver (a job launched as a subprocess) is SIGKILLed once Ray Train has registered a checkpoint
    on the run's storage; the same job started again finds its run there and finishes from that
    checkpoint, with the weights of an uninterrupted run."""
    import pickle
    import subprocess
    import sys
    import time
    from pathlib import Path

    files = _tiny_export(tmp_path, 48)
    spec, _ = _spec(tmp_path, files, checkpoint_every=2)
    spec.train["epochs"] = 2
    (tmp_path / "spec.pkl").write_bytes(pickle.dumps(spec))
    storage = tmp_path / "storage"
    code = DRIVER.format(tests=str(Path(__file__).parent), address=ray_local.get_runtime_context().gcs_address,
                         spec=str(tmp_path / "spec.pkl"), storage=str(storage))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    snapshot = storage / "driver" / "checkpoint_manager_snapshot.json"  # Ray Train registered a checkpoint
    while not snapshot.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, f"the driver ended before a checkpoint: {proc.stderr.read()[-2000:]}"
    proc.kill()
    proc.wait()
    resumed, final = _fit(spec, storage, "driver")
    assert resumed.return_value["resumed_at"] is not None and resumed.return_value["steps"] == 6
    plain, final_plain = _fit(spec, storage, "plain")
    for k, v in final_plain["model"].items():
        assert torch.equal(v, final["model"][k]), k


def test_bad_images_met_in_ray_training_are_the_steps_rejects(ray_local, tmp_path):
    """Nothing decodes images before training: a truncated and a missing training image are found by
    the worker that meets them, while it trains (its rank-N.jsonl, once per worker), and a broken evaluation
    image by the evaluation; all three are the step's rejects with the vision steps' codes, training runs
    its full step count (DDP: the same on both workers), and rows in = trained + held out + rejected."""
    from pipeline.stage import RowSource, StageContext
    from stages.training.holdout import held_out
    from stages.training.train import TrainStage, TrainStageConfig

    files = _tiny_export(tmp_path, 24)
    rows = pq.read_table(files[0]).to_pylist()
    train_rows = [r for r in rows if not held_out(r["image_id"], 0.3)]
    held = [r for r in rows if held_out(r["image_id"], 0.3)]
    truncated, missing, broken = train_rows[0], train_rows[1], held[0]
    path = tmp_path / truncated["image_path"]
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    (tmp_path / missing["image_path"]).unlink()
    (tmp_path / broken["image_path"]).write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    cfg = TrainStageConfig(text_encoder="none", epochs=2, batch_size=4, warmup_steps=1, val_fraction=0.3,
                           backend="ray_train", workers=2,
                           model_args={k: v for k, v in ARGS.items() if k != "num_classes"})
    vocab = _colour_tagset(tmp_path)
    res = TrainStage(cfg, StageContext(str(tmp_path), "train", artifacts={"tagset": str(vocab)})).run(RowSource(files))

    assert sorted((r.image_id, r.code) for r in res.rejects) == sorted([
        (truncated["image_id"], "image_truncated"), (missing["image_id"], "image_decode_failed"),
        (broken["image_id"], "image_decode_failed")])
    logs = {p.name: [json.loads(line)["image_id"] for line in p.read_text().splitlines()]
            for p in (tmp_path / "train" / "ray_train" / "rejects").glob("*/rank-*.jsonl")}
    for r in (truncated, missing):  # found in training, at most once by each worker, by one at least
        counts = [ids.count(r["image_id"]) for ids in logs.values()]
        assert max(counts) == 1 and sum(counts) >= 1, (r["image_id"], logs)
    s = res.stats
    assert (s["rows_in"], s["rejected_images"]) == (24, 3)
    assert s["train_images"] == len(train_rows) - 2 and s["held_out_images"] == len(held) - 1
    assert s["rows_in"] == s["train_images"] + s["held_out_images"] + s["rejected_images"]
    assert s["val_images"] == len(held) - 1 and s["rejected_by_code"] == {"image_decode_failed": 2,
                                                                          "image_truncated": 1}
    assert s["steps"] == 2 * math.ceil(math.ceil(len(train_rows) / 2) / 4)  # rejects shrink batches, not steps
    sd = torch.load(tmp_path / "train" / "model.pth", weights_only=True)["model"]
    assert not torch.equal(sd["fc.weight"], _model().state_dict()["fc.weight"])


def test_a_local_ray_polls_training_workers_often(ray_local):
    """The Ray the runner starts passes its short Ray Train poll interval to its processes (they inherit
    the driver's environment, so Ray Train's controller reads it)."""
    from pipeline.executor import TRAIN_POLL_ENV, TRAIN_POLL_S

    @ray_local.remote
    def seen() -> str | None:
        import os

        return os.environ.get(TRAIN_POLL_ENV)

    assert ray_local.get(seen.remote()) == TRAIN_POLL_S
