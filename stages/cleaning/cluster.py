"""cluster.v1: per tag, K-Means++ over what its regions look like; each region's distance to its centroid.

At the mission's size (40M regions, 4,585 tags) no process may hold the embeddings, so the step runs
in three phases, all in the workers:

1. **sample** (per input shard): every region gets a priority, a hash of ``(image_id, tag_id)``; the
   shard keeps, per tag, the ``fit_sample`` regions of lowest priority and writes them under
   ``sample/b=BB/`` (bucket ``tag_id % fit_buckets``). Lowest-priority-k is mergeable: the k lowest of
   the shards' k lowest are the k lowest overall, so the sample does not depend on how rows are
   sharded or in what order shards finish. The driver merges only per-tag region counts.
2. **fit** (one task per bucket, many tags each): a tag's sample is merged file by file (never more
   than k rows per tag in memory), then k-means++ seeding + faiss Lloyd iterations, seeded by
   ``(seed, tag_id)``. The task writes the tag's centroids and its sample's sorted distances (or, past
   ``quantile_points``, that many quantiles of them) and median to ``fit/``. Only these ever meet.
3. **score** (the map over shards, shard i -> shard i): each worker loads every tag's centroids and
   writes ``cluster_distances`` beside the shard: per region its cluster, distance, quantile within its
   tag and distance / the tag's median. ``decide`` reads them with the rest of its row.

Quantiles come from the tag's sample: exact ranks while a tag has at most ``fit_sample`` regions and its
sample at most ``quantile_points`` (then they equal the rank among all the tag's regions), otherwise
a uniform sample's estimate, off by about sqrt(q(1-q)/fit_sample) + 1/quantile_points (tested).
"""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from pipeline.registry import register
from pipeline.stage import Stage, StageConfig, StageResult
from pipeline.store import write_parquet_atomic

DISTANCE = pa.struct([("tag_id", pa.int32()), ("cluster", pa.int32()), ("distance", pa.float32()),
                      ("quantile", pa.float32()), ("relative", pa.float32())])
CLUSTERS = pa.schema([("tag_id", pa.int32()), ("regions", pa.int64()), ("k", pa.int32()), ("status", pa.string())])


class ClusterConfig(StageConfig):
    regions_per_cluster: int = Field(25, ge=1, description="k = regions // this, within [1, max_k]")
    max_k: int = Field(8, ge=1)
    k: int | None = Field(None, ge=1, description="fixed k for every tag (overrides the rule above)")
    min_regions: int = Field(5, ge=1, description="tags with fewer regions are not clustered")
    niter: int = Field(20, ge=1, description="Lloyd iterations (faiss)")
    fit_sample: int = Field(20000, ge=2, description="at most this many regions per tag (a deterministic sample) "
                            "fit its centroids and give its distance quantiles")
    quantile_points: int = Field(2048, ge=16, description="a tag's distance distribution is kept as its sample's "
                                 "sorted distances up to this many, else as this many quantiles of them")
    fit_buckets: int = Field(64, ge=1, description="tags are fitted in this many parallel tasks (tag_id mod "
                             "fit_buckets); results do not depend on it")
    seed: int | None = Field(None, description="default: the run seed")


def sq_dist(x: np.ndarray, c: np.ndarray, rows: int = 4096) -> np.ndarray:
    """Each row's squared Euclidean distance to ``c``, over row chunks: the temporary is ``rows x d``,
    never ``n x d`` (each row's sum is the same as in one pass)."""
    out = np.empty(len(x), np.result_type(x, c))
    for s in range(0, len(x), rows):
        out[s:s + rows] = ((x[s:s + rows] - c) ** 2).sum(1)
    return out


def kmeans_pp_init(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii): each next centre drawn with probability ~ D(x)^2."""
    centres = [x[rng.integers(len(x))]]
    d2 = sq_dist(x, centres[0])
    for _ in range(1, k):
        total = float(d2.sum())
        i = int(rng.choice(len(x), p=d2 / total)) if total > 0 else int(rng.integers(len(x)))
        centres.append(x[i])
        np.minimum(d2, sq_dist(x, x[i]), out=d2)
    return np.stack(centres).astype(np.float32)


def faiss_gpus() -> int:
    """GPUs this process's faiss can use: a faiss-gpu build (the ``gpu`` extra) in a task that was given
    one (``cluster.resources.num_gpus``); 0 with faiss-cpu."""
    import faiss

    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def fit_centroids(x: np.ndarray, k: int, niter: int, seed: int, gpu: bool | None = None) -> np.ndarray:
    """k-means++ seeding, then faiss Lloyd iterations over all of ``x`` (no faiss-side subsampling), on
    one GPU when faiss sees one (``gpu`` None; same code, same seeding; the assignment runs there)."""
    import faiss

    k = min(k, len(x))
    if k == 1:
        return x.mean(0, keepdims=True).astype(np.float32)
    init = kmeans_pp_init(x, k, np.random.default_rng(seed))
    on_gpu = {"gpu": 1} if (faiss_gpus() > 0 if gpu is None else gpu) else {}
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=False, min_points_per_centroid=1,
                      max_points_per_centroid=max(256, len(x)), **on_gpu)
    km.train(np.ascontiguousarray(x), init_centroids=init)
    return km.centroids


def nearest(x: np.ndarray, centroids: np.ndarray, rows: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Each row's nearest centroid and its Euclidean distance, one centroid at a time (:func:`sq_dist`): never
    an ``n x k x d`` temporary (a tag's whole sample times k would be the worker's peak)."""
    d2 = np.empty((len(x), len(centroids)), np.float32)
    for j, c in enumerate(centroids):
        d2[:, j] = sq_dist(x, c, rows)
    a = d2.argmin(1)
    return a.astype(np.int32), np.sqrt(np.maximum(d2[np.arange(len(x)), a], 0)).astype(np.float32)


def fit_tag(x: np.ndarray, k: int, niter: int, seed: int, fit_sample: int):
    """One process, one tag: centroids from (a sample of) ``x``; every row's distance and cluster."""
    rng = np.random.default_rng(seed)
    fit = x if len(x) <= fit_sample else x[np.sort(rng.choice(len(x), fit_sample, replace=False))]
    centroids = fit_centroids(fit, k, niter, seed)
    assign, dist = nearest(x, centroids)
    return centroids, dist, assign, len(centroids)


def normalise(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)  # a copy: divided in place, so a tag's sample exists once more, not twice
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)
    return x


def priorities(image_ids: list[str], tags: np.ndarray) -> np.ndarray:
    """A region's sampling priority: 64 bits of a hash of (image_id, tag_id), so any shard computes it."""
    return np.array([int.from_bytes(hashlib.blake2b(f"{i}\x00{t}".encode(), digest_size=8).digest(), "little")
                     for i, t in zip(image_ids, tags.tolist())], dtype=np.uint64)


def flatten_regions(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row index, tag_id, embedding [n, d] float16) of every region of ``region_embeds``, without Python
    objects per value."""
    col = table.column("region_embeds").combine_chunks()
    rows = pc.list_parent_indices(col).to_numpy(zero_copy_only=False).astype(np.int64)
    structs = pc.list_flatten(col)
    tags = structs.field("tag_id").to_numpy(zero_copy_only=False).astype(np.int32)
    emb = structs.field("embedding")
    flat = pc.list_flatten(emb).to_numpy(zero_copy_only=False)
    dim = len(flat) // max(1, len(tags)) if len(tags) else 0
    return rows, tags, flat.reshape(len(tags), dim) if len(tags) else np.zeros((0, 0), np.float16)


def bottom_k(t: pa.Table, k: int) -> pa.Table:
    """Per tag, the k rows of lowest (priority, image_id): the sample, whatever order rows came in."""
    t = t.sort_by([("tag_id", "ascending"), ("priority", "ascending"), ("image_id", "ascending")])
    tags = t.column("tag_id").to_numpy()
    if not len(tags):
        return t
    starts = np.r_[0, np.flatnonzero(np.diff(tags)) + 1]
    rank = np.arange(len(tags)) - np.repeat(starts, np.diff(np.r_[starts, len(tags)]))
    return t.filter(pa.array(rank < k))


def merge_samples(files: list[Path], tags: list[int], k: int) -> pa.Table:
    """The k lowest-priority rows per tag of ``tags`` over the shards' sample ``files``, as :func:`bottom_k`
    of their concatenation. The merge runs on the keys alone (tag, priority, image_id: a few dozen bytes a
    row); each file's embeddings are then read once, for its selected rows only, so the task holds the
    final sample and one file's embeddings, not a growing table re-sorted with every file."""
    keys, want = None, pa.array(tags, pa.int32())
    for i, f in enumerate(files):
        t = pq.read_table(f, columns=["tag_id", "priority", "image_id"])
        t = t.append_column("file", pa.array(np.full(t.num_rows, i, np.int32))) \
             .append_column("row", pa.array(np.arange(t.num_rows, dtype=np.int64)))
        t = t.filter(pc.is_in(t.column("tag_id"), want))
        keys = bottom_k(t if keys is None else pa.concat_tables([keys, t]), k)
    parts = []
    for i, f in enumerate(files):
        sel = keys.filter(pc.equal(keys.column("file"), i))
        if sel.num_rows:
            emb = pq.read_table(f, columns=["embedding"]).column("embedding").take(sel.column("row"))
            parts.append(sel.drop_columns(["file", "row"]).append_column("embedding", emb))
            del emb
            pa.default_memory_pool().release_unused()  # Arrow's allocator keeps each read's decode buffers
    if not parts:
        return pq.read_table(files[0]).slice(0, 0)
    return pa.concat_tables(parts).sort_by([("tag_id", "ascending"), ("priority", "ascending"),
                                            ("image_id", "ascending")])


def sample_table(table: pa.Table, k: int) -> tuple[pa.Table, Counter]:
    """The shard's per-tag sample rows (tag_id, priority, image_id, embedding) and its regions per tag."""
    rows, tags, emb = flatten_regions(table)
    ids = table.column("image_id").to_numpy(zero_copy_only=False)[rows].tolist() if len(rows) else []
    dim = emb.shape[1] if emb.ndim == 2 else 0
    t = pa.table({"tag_id": pa.array(tags, pa.int32()), "priority": pa.array(priorities(ids, tags), pa.uint64()),
                  "image_id": pa.array(ids, pa.string()),
                  "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float16()), dim)
                  if dim else pa.array([], pa.list_(pa.float16(), 1))})
    return bottom_k(t, k), Counter(tags.tolist())


def k_for(c: ClusterConfig, n: int) -> int:
    return c.k or max(1, min(c.max_k, n // c.regions_per_cluster))


@register("cluster.v1")
class ClusterStage(Stage):
    """Writes ``cluster_distances`` per row (per region: cluster, distance, quantile within its tag, distance /
    the tag's median) and ``clusters.parquet`` (per tag: regions, k, or why it was not clustered)."""

    Config = ClusterConfig
    inputs = ("image_id", "region_embeds")
    outputs = ("cluster_distances",)
    provides = ("clusters",)

    @property
    def seed(self) -> int:
        return self.config.seed if self.config.seed is not None else self.context.seed

    # -- phase 1: sample (a call per input shard) ---------------------------------------------------------
    def sample_shard(self, table: pa.Table, shard: int) -> dict[int, int]:
        sample, counts = sample_table(table, self.config.fit_sample)
        buckets = pc.remainder(sample.column("tag_id"), self.config.fit_buckets) if sample.num_rows else None
        for b in sorted(set(buckets.to_pylist())) if buckets is not None else []:
            part = sample.filter(pc.equal(buckets, b))
            write_parquet_atomic(part, self.context.step_dir / "sample" / f"b={b:04d}" / f"part-{shard:05d}.parquet")
        return dict(counts)

    # -- phase 2: fit (a task per bucket) -----------------------------------------------------------------
    def fit_bucket(self, arg: dict) -> dict:
        c = self.config
        want = {int(t): int(k) for t, k in arg["tags"]}
        files = sorted((self.context.step_dir / "sample" / f"b={arg['bucket']:04d}").glob("part-*.parquet"))
        sample = merge_samples(files, sorted(want), c.fit_sample) if files else None
        out = {n: [] for n in ("tag_id", "k", "centroids", "grid", "exact", "median", "sample")}
        tags = sample.column("tag_id").to_numpy() if sample is not None else np.zeros(0, np.int32)
        for tag in sorted(want):
            rows = np.flatnonzero(tags == tag)
            emb = sample.column("embedding").take(pa.array(rows))
            x = normalise(pc.list_flatten(emb).to_numpy(zero_copy_only=False).reshape(len(rows), -1))
            centroids = fit_centroids(x, want[tag], c.niter, self.seed * 100003 + tag)
            _, dist = nearest(x, centroids)
            dist.sort()
            exact = len(dist) <= c.quantile_points
            grid = dist if exact else np.quantile(dist, np.linspace(0, 1, c.quantile_points)).astype(np.float32)
            out["tag_id"].append(tag)
            out["k"].append(len(centroids))
            out["centroids"].append(centroids.astype(np.float32).reshape(-1))
            out["grid"].append(grid)
            out["exact"].append(exact)
            out["median"].append(float(np.median(dist)))
            out["sample"].append(len(dist))
        table = pa.table({"tag_id": pa.array(out["tag_id"], pa.int32()), "k": pa.array(out["k"], pa.int32()),
                          "centroids": pa.array(out["centroids"], pa.list_(pa.float32())),
                          "grid": pa.array(out["grid"], pa.list_(pa.float32())),
                          "exact": pa.array(out["exact"], pa.bool_()),
                          "median": pa.array(out["median"], pa.float32()),
                          "sample": pa.array(out["sample"], pa.int32())})
        write_parquet_atomic(table, self.context.step_dir / "fit" / f"b={arg['bucket']:04d}.parquet")
        return {"bucket": arg["bucket"], "tags": len(want)}

    def prepare(self, engine) -> dict:
        c = self.config
        counts: Counter = Counter()
        for _, shard_counts in engine.over_shards("sample_shard", ["image_id", "region_embeds"]):
            counts.update(shard_counts)  # O(tags): all the driver merges
        fit = {t: k_for(c, n) for t, n in counts.items() if n >= c.min_regions}
        buckets: dict[int, list] = {}
        for t in sorted(fit):
            buckets.setdefault(t % c.fit_buckets, []).append([t, fit[t]])
        for _ in engine.tasks("fit_bucket", [{"bucket": b, "tags": tags} for b, tags in sorted(buckets.items())]):
            pass
        fitted = {}
        for f in sorted((engine.step_dir / "fit").glob("b=*.parquet")):
            t = pq.read_table(f, columns=["tag_id", "k"])
            fitted.update(zip(t.column("tag_id").to_pylist(), t.column("k").to_pylist()))
        tags = sorted(counts)
        table = pa.table({"tag_id": tags, "regions": [counts[t] for t in tags],
                          "k": [fitted.get(t, 0) for t in tags],
                          "status": ["clustered" if t in fitted else "too_few_regions" for t in tags]}, schema=CLUSTERS)
        write_parquet_atomic(table, engine.step_dir / "clusters.parquet")
        regions = sum(counts[t] for t in fitted)
        return {"tags": len(tags), "tags_clustered": len(fitted), "regions": regions,
                "summary": f"{regions} regions, {len(fitted)} of {len(tags)} tags clustered"}

    # -- phase 3: score (the map) -------------------------------------------------------------------------
    def setup(self) -> None:
        # Columns go to numpy whole, never through Python lists: a worker holds every tag's centroids, so a
        # per-value Python float would multiply its memory by the number of tags fitted.
        self.fits: dict[int, tuple] = {}
        for f in sorted((self.context.step_dir / "fit").glob("b=*.parquet")):
            t = pq.read_table(f)
            cen_all, grid_all = (_list_rows(t.column(n)) for n in ("centroids", "grid"))
            for i, (tag, k, exact, med, m) in enumerate(zip(*(t.column(n).to_numpy(zero_copy_only=False).tolist()
                                                               for n in ("tag_id", "k", "exact", "median", "sample")))):
                self.fits[tag] = (cen_all[i].reshape(k, -1), grid_all[i], exact, med, m)

    def quantile(self, tag: int, dist: np.ndarray) -> np.ndarray:
        _, grid, exact, _, m = self.fits[tag]
        if exact:  # the share of the tag's sample at or below this distance
            return np.searchsorted(grid, dist, side="right") / m
        return np.interp(dist, grid, np.linspace(0, 1, len(grid)))

    def __call__(self, batch: pa.Table) -> StageResult:
        rows, tags, emb = flatten_regions(batch)
        x = normalise(emb) if len(tags) else emb
        cluster = np.full(len(tags), -1, np.int32)
        dist, quant, rel = (np.zeros(len(tags), np.float32) for _ in range(3))
        for tag in np.unique(tags):
            if int(tag) not in self.fits:
                continue
            idx = np.flatnonzero(tags == tag)
            cen, _, _, med, _ = self.fits[int(tag)]
            cluster[idx], dist[idx] = nearest(x[idx], cen)
            quant[idx] = self.quantile(int(tag), dist[idx])
            rel[idx] = dist[idx] / (med or 1e-6)
        out: list[list[dict]] = [[] for _ in range(batch.num_rows)]
        for j in np.flatnonzero(cluster >= 0):
            out[rows[j]].append({"tag_id": int(tags[j]), "cluster": int(cluster[j]), "distance": float(dist[j]),
                                 "quantile": float(quant[j]), "relative": float(rel[j])})
        return StageResult(batch.append_column("cluster_distances", pa.array(out, pa.list_(DISTANCE))))


def _list_rows(col: pa.ChunkedArray) -> list[np.ndarray]:
    """A list<float32> column as one float32 array per row (views into one flat copy)."""
    arr = col.combine_chunks()
    flat = pc.list_flatten(arr).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    offsets = arr.offsets.to_numpy() - arr.offsets[0].as_py()
    return [flat[offsets[i]:offsets[i + 1]] for i in range(len(arr))]


def clusters_of(step_dir: Path) -> pa.Table:
    return pq.read_table(Path(step_dir) / "clusters.parquet")
