"""A step's figures from its shards' stats: row counts, rejects by code, where its workers ran, their peak
memory; and where a duplicated image id sits."""
from __future__ import annotations

import json


def places(image_id: str, shards: list[int], specs: list[dict]) -> str:
    where = " and ".join(f"shard {i} ({shard_input(specs[i])})" for i in sorted(set(shards)))
    return f"{image_id!r} in {where}" + (" (twice in one shard)" if len(set(shards)) < len(shards) else "")


def shard_input(spec: dict) -> str:
    """A source shard's input, from its read spec: the source's name, the file, the range."""
    parts = [f"source {spec['name']}"] if "name" in spec else []
    parts += [str(spec["file"])] if "file" in spec else []
    if "start" in spec and "stop" in spec:
        parts.append(f"{'bytes' if 'format' in spec else 'rows'} {spec['start']}-{spec['stop']}")
    return ", ".join(parts) or json.dumps(spec, sort_keys=True)[:200]


def sum_stats(shards: list[dict]) -> dict:
    codes: dict[str, int] = {}
    for s in shards:
        for k, v in s["rejects_by_code"].items():
            codes[k] = codes.get(k, 0) + v
    return {
        "rows_in": sum(s["rows_in"] for s in shards),
        "rows_out": sum(s["rows_out"] for s in shards),
        "rows_rejected": sum(s["rows_rejected"] for s in shards),
        "rejects_by_code": dict(sorted(codes.items())),
        "shard_seconds": round(sum(s["seconds"] for s in shards), 3),
        "worker_peak_rss_mb": peak_rss(shards),
        "workers": placement(shards),
    }


def placement(shards: list[dict]) -> dict:
    """How many workers ran a step's shards and where, from the node and process each shard's stats name:
    ``{"used": workers, "nodes": {node_id: {"shards": n, "workers": n}}}`` (O(nodes), not O(shards)).
    Stats written before they named a node are left out."""
    nodes: dict[str, dict[str, int]] = {}
    seen: set[tuple[str, object]] = set()
    for st in shards:
        node = st.get("node_id")
        if node is None:
            continue
        entry = nodes.setdefault(node, {"shards": 0, "workers": 0})
        entry["shards"] += 1
        if (node, st.get("worker_pid")) not in seen:
            seen.add((node, st.get("worker_pid")))
            entry["workers"] += 1
    return {"used": len(seen), "nodes": dict(sorted(nodes.items()))}


def peak_rss(shards: list[dict]) -> float:
    """The largest worker peak RSS (MiB) among the shards' stats (0 for stats written before it was kept)."""
    return max((s.get("peak_rss_mb", 0.0) for s in shards), default=0.0)
