"""The engine at the mission's scale: column groups, distributed cluster, rows counted across steps,
fingerprints that follow imports. Regions here are SIMULATED (source.synthetic_regions.v1)."""
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_run_config
from pipeline.fingerprint import ROOT, code_hash, import_closure
from pipeline.stage import StageContext
from pipeline.store import StepDir
from pipeline.view import View, step_view
from pipeline.workflow import Runner
from stages.cleaning.cluster import (ClusterConfig, ClusterStage, bottom_k, fit_centroids, merge_samples, normalise,
                            sample_table)
from tests.conftest import run_to_end, run_until_killed, write_config

REPO = Path(__file__).resolve().parent.parent

SIM = """
workflow: regions_simulated
seed: 0
ray: {{enabled: {ray}, num_cpus: 2, progress: false}}
input: {{images: {images}, tags: 40, dim: 16, shard_rows: {shard_rows}}}
cluster: {{fit_buckets: 3, min_regions: 5}}
"""


def _regions(n: int, tag: int, dim: int, seed: int, start: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows = [{"image_id": f"img{start + i:05d}",
             "region_embeds": [{"tag_id": tag, "embedding": rng.normal(size=dim).astype(np.float16).tolist()}]}
            for i in range(n)]
    t = pa.Table.from_pylist(rows)
    return t.cast(pa.schema([("image_id", pa.string()), ("region_embeds", pa.list_(pa.struct(
        [("tag_id", pa.int32()), ("embedding", pa.list_(pa.float16()))])))]))


def _fit(tmp: Path, shards: list[pa.Table], cfg: ClusterConfig) -> ClusterStage:
    st = ClusterStage(cfg, StageContext(str(tmp), "cluster", 0, {}))
    counts = {}
    for i, t in enumerate(shards):
        for tag, n in st.sample_shard(t, i).items():
            counts[tag] = counts.get(tag, 0) + n
    for b in range(cfg.fit_buckets):
        tags = [[t, 4] for t in sorted(counts) if t % cfg.fit_buckets == b]
        if tags:
            st.fit_bucket({"bucket": b, "tags": tags})
    st.setup()
    return st


def test_distributed_fit_equals_one_fit_on_the_same_sample(tmp_path):
    """A tag whose regions lie in three shards: per-shard bottom-k samples merged in the fit task give the
    sample (and so the centroids) a single process computes from all regions at once."""
    cfg = ClusterConfig(fit_sample=100, fit_buckets=2, niter=10)
    whole = _regions(300, tag=7, dim=8, seed=1)
    parts = [whole.slice(0, 120), whole.slice(120, 90), whole.slice(210, 90)]
    dist = _fit(tmp_path / "three", parts, cfg)
    one = _fit(tmp_path / "one", [whole], cfg)
    a, b = dist.fits[7], one.fits[7]
    np.testing.assert_array_equal(a[0], b[0])  # centroids
    np.testing.assert_array_equal(a[1], b[1])  # the sample's sorted distances
    assert a[4] == b[4] == 100  # sample size: fit_sample, not the 300 regions
    # and they are what one fit on that sample gives
    sample, _ = sample_table(whole, cfg.fit_sample)
    x = normalise(np.asarray(sample.column("embedding").to_pylist(), np.float32))
    np.testing.assert_array_equal(fit_centroids(x, 4, cfg.niter, 0 * 100003 + 7), a[0])
    # shard order does not matter either
    rev = _fit(tmp_path / "reversed", parts[::-1], cfg)
    np.testing.assert_array_equal(rev.fits[7][0], a[0])


def test_bottom_k_is_the_k_lowest_priorities_per_tag():
    t = pa.table({"tag_id": pa.array([1, 1, 1, 2, 2], pa.int32()), "priority": pa.array([5, 1, 3, 9, 2], pa.uint64()),
                  "image_id": ["a", "b", "c", "d", "e"]})
    got = bottom_k(t, 2)
    assert got.column("image_id").to_pylist() == ["b", "c", "e", "d"]


def test_merging_sample_files_on_keys_equals_bottom_k_of_their_concatenation(tmp_path):
    """The fit task merges the shards' sample files on their keys and reads only the chosen embeddings:
    the same rows, in the same order, as bottom-k over every file's rows of the wanted tags."""
    tables = [sample_table(pa.concat_tables([_regions(40, tag, 8, seed=10 * s + tag, start=100 * s)
                                             for tag in (3, 5, 8)]), 1000)[0] for s in range(3)]
    files = []
    for i, t in enumerate(tables):
        pq.write_table(t, tmp_path / f"part-{i}.parquet")
        files.append(tmp_path / f"part-{i}.parquet")
    got = merge_samples(files, [3, 8], 25)
    want = bottom_k(pa.concat_tables(tables).filter(pc.is_in(pa.concat_tables(tables).column("tag_id"),
                                                                     pa.array([3, 8], pa.int32()))), 25)
    assert got.num_rows == 50 and set(got.column("tag_id").to_pylist()) == {3, 8}
    assert got.equals(want.select(got.column_names))


def _score_quantiles(st: ClusterStage, table: pa.Table) -> np.ndarray:
    out = st(table).table.column("cluster_distances").to_pylist()
    return np.array([r[0]["quantile"] for r in out]), np.array([r[0]["distance"] for r in out])


def _exact(d: np.ndarray) -> np.ndarray:
    """The share of all the tag's regions at or below each distance (ties count as at or below)."""
    return np.searchsorted(np.sort(d), d, side="right") / len(d)


def test_sample_quantiles_against_exact_ranks(tmp_path):
    """Exact while the sample holds every region; otherwise within the DKW bound of a uniform sample of
    m regions (P(error > eps) <= 2 exp(-2 m eps^2): eps = 0.061 at m = 2000 for 1e-6) plus the grid step."""
    whole = _regions(6000, tag=3, dim=8, seed=2)
    exact_cfg = ClusterConfig(fit_sample=6000, quantile_points=8192, fit_buckets=1, niter=5)
    q, d = _score_quantiles(_fit(tmp_path / "exact", [whole], exact_cfg), whole)
    np.testing.assert_allclose(q, _exact(d), atol=1e-6)
    cfg = ClusterConfig(fit_sample=2000, quantile_points=256, fit_buckets=1, niter=5)
    st = _fit(tmp_path / "sampled", [whole.slice(0, 2500), whole.slice(2500)], cfg)
    q, d = _score_quantiles(st, whole)
    err = np.abs(q - _exact(d)).max()
    assert err <= 0.061 + 1 / 256, err
    assert err > 0  # it is an estimate: the sample is a third of the regions


def test_views_join_columns_of_several_steps_by_image_id(tmp_path):
    """A step that rejected a row has fewer ids; earlier columns are aligned to its rows, not by position."""
    for step, table in (("input", pa.table({"image_id": ["a", "b", "c"], "image_bytes": [b"1", b"2", b"3"]})),
                        ("parse", pa.table({"image_id": ["a", "c"], "parsed": ["pa", "pc"]})),
                        ("label", pa.table({"image_id": ["c", "a"], "labels": [[3], [1]]}))):
        (tmp_path / step).mkdir()
        pq.write_table(table, tmp_path / step / "part-00000.parquet")
    v = View(str(tmp_path)).after("input", "source", ["image_bytes"]).after("parse", "map", ["parsed"])
    v = v.after("label", "map", ["labels"])
    assert v.owners == {"image_bytes": "input", "image_id": "label", "labels": "label", "parsed": "parse"}
    got = v.read_shard(0, ["image_id", "image_bytes", "parsed", "labels"]).to_pylist()
    assert got == [{"image_id": "c", "image_bytes": b"3", "parsed": "pc", "labels": [3]},
                   {"image_id": "a", "image_bytes": b"1", "parsed": "pa", "labels": [1]}]
    bad = View(str(tmp_path), "input", {"image_id": "input", "labels": "label"})
    with pytest.raises(ValueError, match="has rows that step 'label' does not"):
        bad.read_shard(0)


def test_a_shard_missing_between_two_steps_fails_naming_both(tmp_path):
    cfg_path = write_config(tmp_path / "sim.yaml", SIM.format(ray="false", images=300, shard_rows=100))
    out = tmp_path / "run"
    Runner(load_run_config(cfg_path), out).run()
    assert step_view(out / "decide").num_rows() == 300
    (out / "cluster" / "part-00001.parquet").unlink()  # e.g. a worker's commit the driver never saw
    with pytest.raises(RuntimeError, match=r"step 'decide' reads the rows of step 'cluster'.*\[1\]"):
        Runner(load_run_config(cfg_path, ["decide.crop_threshold=0.2"]), out).run()
    # and a commit that the driver cannot see is named as such
    from pipeline.checks import check_visible

    step = load_run_config(cfg_path).step("cluster")
    with pytest.raises(RuntimeError, match="driver cannot see"):
        check_visible(step, StepDir(out / "cluster"), [{"shard": 1}], data=True)


def test_only_a_step_whose_later_steps_go_stale_runs_it_and_leaves_them(tmp_path):
    """`--only cluster` after a cluster change: cluster re-runs; decide and report, now stale, are left as
    they were (no step asked for needs them) and the log says so. A stale step that a later listed step
    needs is still an error."""
    from pipeline.errors import ContractError

    cfg_path = write_config(tmp_path / "sim.yaml", SIM.format(ray="false", images=200, shard_rows=100))
    out = tmp_path / "run"
    Runner(load_run_config(cfg_path), out).run()
    decided = (out / "decide" / "_manifest.json").read_text()
    reports = Runner(load_run_config(cfg_path, ["cluster.niter=5"]), out, only=["cluster"]).run()
    assert [(r.step, r.status) for r in reports] == [("input", "skipped"), ("cluster", "ran")]
    assert (out / "decide" / "_manifest.json").read_text() == decided
    assert "left as they were, now stale: decide, report" in (out / "run.log").read_text()
    with pytest.raises(ContractError, match="leaves out step 'cluster'"):
        Runner(load_run_config(cfg_path, ["cluster.niter=6"]), out, only=["decide"]).run()


@pytest.mark.ray
@pytest.mark.slow
def test_sigkill_during_cluster_scoring_resumes_and_equals_an_uninterrupted_run(ray_local, tmp_path):
    cfg = write_config(tmp_path / "sim.yaml", SIM.format(ray="true", images=1000, shard_rows=100))
    run_until_killed(cfg, tmp_path / "killed", "kill_after:cluster:3")
    cdir = tmp_path / "killed" / "cluster"
    assert not (cdir / "_manifest.json").exists() and (cdir / "_prepared.json").exists()
    done_before = len(list((cdir / "_stats").glob("*.json")))
    assert 3 <= done_before < 10
    for run in ("killed", "clean"):
        run_to_end(cfg, tmp_path / run)
    m = json.loads((cdir / "_manifest.json").read_text())
    assert m["shards_resumed"] >= done_before and m["shards"] == 10
    for step in ("cluster", "decide"):
        a = step_view(tmp_path / "killed" / step).read()
        b = step_view(tmp_path / "clean" / step).read()
        assert a.equals(b), step
    assert (tmp_path / "killed" / "report.json").read_bytes() == (tmp_path / "clean" / "report.json").read_bytes()
    for f in ("clusters.parquet",):
        assert pq.read_table(cdir / f).equals(pq.read_table(tmp_path / "clean" / "cluster" / f))


def test_fingerprints_follow_imports_not_folders(tmp_path):
    root = tmp_path / "proj"
    files = {
        "stages/__init__.py": "", "tagset/__init__.py": "", "model/__init__.py": "",
        "stages/parse.py": '"""Parse."""\nimport json\n\ndef run():\n    from tagset.helper import f\n    return f()\n',
        "tagset/helper.py": '"""Helper."""\n\ndef f():\n    """Doc."""\n    return 1\n',
        "tagset/data/words.txt": "red\n",
        "model/bert.py": '"""BERT."""\nX = 1\n',
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    parse = root / "stages" / "parse.py"
    base = code_hash(parse, root)
    (root / "model/bert.py").write_text('"""BERT, a docstring edited."""\nX = 1\n')
    (root / "tagset/helper.py").write_text('"""Helper, reworded."""\n\ndef f():\n    """Other doc."""\n    return 1  # why\n')
    assert code_hash(parse, root) == base  # docstrings, comments and modules parse never imports
    (root / "model/bert.py").write_text('"""BERT."""\nX = 2\n')
    assert code_hash(parse, root) == base
    (root / "tagset/helper.py").write_text('"""Helper."""\n\ndef f():\n    return 2\n')
    changed = code_hash(parse, root)
    assert changed != base  # a helper it imports (inside a function) changed
    (root / "tagset/data/words.txt").write_text("red\nblue\n")
    assert code_hash(parse, root) != changed  # the imported package's checked-in data
    # the project's own stages
    rel = {str(p.relative_to(ROOT)) for p in import_closure(ROOT / "stages" / "text" / "parse.py")}
    assert "tagset/sng.py" in rel and not any(p.startswith("model/") for p in rel)
    rel = {str(p.relative_to(ROOT)) for p in import_closure(ROOT / "stages" / "vision" / "evidence.py")}
    assert {"model/ram.py", "model/cnn.py", "stages/vision/tagger.py"} <= rel


def test_run_dir_is_absolute_and_may_be_a_file_uri(tmp_path, monkeypatch):
    from pipeline.errors import ConfigError
    from pipeline.store import run_dir_path

    monkeypatch.chdir(tmp_path)
    assert run_dir_path("runs/x") == tmp_path / "runs" / "x"
    assert run_dir_path(f"file://{tmp_path}/a%20b") == tmp_path / "a b"
    with pytest.raises(ConfigError, match="mount the object store"):
        run_dir_path("s3://bucket/run")
    cfg_path = write_config(tmp_path / "sim.yaml", SIM.format(ray="false", images=200, shard_rows=100))
    from pipeline.cli import main

    assert main(["run", str(cfg_path), "--out", f"file://{tmp_path}/uri-run"]) == 0
    m = json.loads((tmp_path / "uri-run" / "cluster" / "_manifest.json").read_text())
    assert m["rows_out"] == 200 and (tmp_path / "uri-run" / "report.json").exists()


CLUSTER = {"CPU": 64.0, "GPU": 8.0, "memory": 5e11}


@pytest.mark.parametrize("resources, totals, tasks, actors, pool", [
    # a CPU step: every CPU of the cluster at the step's num_cpus
    ({}, CLUSTER, 500, True, {"kind": "actors", "size": 64, "from": "cluster: 64 CPU / 1 per worker"}),
    ({"num_cpus": 2}, CLUSTER, 500, False, {"kind": "tasks", "size": 32, "from": "cluster: 64 CPU / 2 per worker"}),
    # a GPU step: one actor per GPU; a quarter GPU each where CPUs are scarcer: the CPUs decide
    ({"num_gpus": 1}, CLUSTER, 500, True, {"kind": "actors", "size": 8, "from": "cluster: 8 GPU / 1 per worker"}),
    ({"num_cpus": 4, "num_gpus": 0.25}, {"CPU": 16.0, "GPU": 2.0}, 500, True,
     {"kind": "actors", "size": 4, "from": "cluster: 16 CPU / 4 per worker"}),
    # never more workers than shards, never fewer than one (a GPU step on a cluster whose GPU nodes are not up yet)
    ({}, CLUSTER, 6, True, {"kind": "actors", "size": 6, "from": "cluster: 64 CPU / 1 per worker"}),
    ({"num_gpus": 1}, {"CPU": 4.0}, 500, True, {"kind": "actors", "size": 1, "from": "cluster: 0 GPU / 1 per worker"}),
    # the config pins it, or asks for an autoscaling pool
    ({"pool_size": 3}, CLUSTER, 500, True, {"kind": "actors", "size": 3, "from": "resources.pool_size"}),
    ({"max_pool_size": 16}, CLUSTER, 500, True,
     {"kind": "actors", "min_size": 1, "max_size": 16, "from": "resources.min_pool_size/max_pool_size"}),
    ({"min_pool_size": 2}, CLUSTER, 500, True, {"kind": "actors", "min_size": 2, "max_size": 64,
     "from": "resources.min_pool_size/max_pool_size; max cluster: 64 CPU / 1 per worker"}),
    ({"min_pool_size": 2, "max_pool_size": 16}, CLUSTER, 500, False,
     {"kind": "tasks", "size": 16, "from": "resources.min_pool_size/max_pool_size"}),
])
def test_a_steps_pool_is_what_the_cluster_offers_unless_the_config_says(resources, totals, tasks, actors, pool):
    from pipeline.executor import plan_pool
    from pipeline.stage import Resources

    assert plan_pool(Resources(**resources), tasks, actors, True, totals).to_dict() == pool


def test_a_gpu_step_on_a_local_ray_without_gpus_fails_at_once_naming_the_key():
    """A GPU step on the Ray a run started itself, on a machine without GPUs, would wait the pool's start
    timeout for actors that never fit; it fails at once naming the key. On a joined cluster it waits (an
    autoscaler may add GPU nodes); with enough GPUs, or none asked, nothing is said."""
    from pipeline.executor import gpu_shortfall
    from pipeline.stage import Resources

    why = gpu_shortfall("evidence", Resources(num_gpus=1), {"CPU": 2.0}, joined=False)
    assert why is not None and "evidence.resources.num_gpus" in why and "has 0" in why
    assert gpu_shortfall("evidence", Resources(num_gpus=1), {"CPU": 2.0}, joined=True) is None
    assert gpu_shortfall("evidence", Resources(num_gpus=1), {"CPU": 2.0, "GPU": 1.0}, joined=False) is None
    assert gpu_shortfall("parse", Resources(), {"CPU": 2.0}, joined=False) is None


def test_without_ray_a_step_runs_in_process_on_one_worker():
    from pipeline.executor import plan_pool
    from pipeline.stage import Resources

    assert plan_pool(Resources(), 500, True, enabled=False).to_dict() == {
        "kind": "in-process", "size": 1, "from": "ray.enabled: false"}
