"""A reduce's per-shard partial on storage as data: JSON with a few tagged types, never a pickle.

A partial is a worker's summary of one input shard (counts, a bounded sample), written to the step's
``_partials/`` and read back by the driver one at a time. A pickle there would rebuild whatever objects
the file names, so anything that can write to the shared run directory could run code in the driver.
This encoding rebuilds only data: None, bool, int, float, str, list, dict (any hashable keys), tuple,
bytes (e.g. a report's PNG crops, as base64), ``collections.Counter``, and numpy scalars (as Python
numbers) and numeric arrays. A stage whose partial holds anything else fails in the worker, naming
the type.
"""
from __future__ import annotations

import base64
import json
from collections import Counter
from pathlib import Path
from typing import Any

TAG = "__type__"  # marks an encoded value that plain JSON cannot hold; a dict with this key is tagged too


def partial_path(step_dir: str | Path, shard: int) -> Path:
    return Path(step_dir) / "_partials" / f"part-{shard:05d}.json"


def dumps(obj: Any) -> bytes:
    return json.dumps(_encode(obj), separators=(",", ":")).encode()


def loads(data: bytes) -> Any:
    return _decode(json.loads(data))


def _encode(obj: Any) -> Any:
    import numpy as np

    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return _encode(obj.item())
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biufc":
            raise TypeError(f"a reduce partial may hold numeric numpy arrays only, not dtype {obj.dtype}")
        return {TAG: "ndarray", "dtype": obj.dtype.str, "shape": list(obj.shape),
                "data": base64.b64encode(np.ascontiguousarray(obj).tobytes()).decode()}
    if isinstance(obj, (bytes, bytearray)):
        return {TAG: "bytes", "data": base64.b64encode(obj).decode()}
    if isinstance(obj, list):
        return [_encode(v) for v in obj]
    if isinstance(obj, tuple):
        return {TAG: "tuple", "items": [_encode(v) for v in obj]}
    if isinstance(obj, Counter):
        return {TAG: "counter", "items": [[_encode(k), _encode(v)] for k, v in obj.items()]}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and TAG not in obj:
            return {k: _encode(v) for k, v in obj.items()}
        return {TAG: "dict", "items": [[_encode(k), _encode(v)] for k, v in obj.items()]}
    raise TypeError(f"a reduce partial is data only (None, bool, int, float, str, bytes, list, tuple, dict, "
                    f"Counter, numpy numbers and arrays); got {type(obj).__module__}.{type(obj).__qualname__}")


def _decode(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    kind = obj.get(TAG)
    if kind is None:
        return {k: _decode(v) for k, v in obj.items()}
    if kind == "bytes":
        return base64.b64decode(obj["data"])
    if kind == "tuple":
        return tuple(_decode(v) for v in obj["items"])
    if kind == "counter":
        return Counter({_decode(k): _decode(v) for k, v in obj["items"]})
    if kind == "dict":
        return {_decode(k): _decode(v) for k, v in obj["items"]}
    if kind == "ndarray":
        import numpy as np

        dtype = np.dtype(obj["dtype"])
        if dtype.kind not in "biufc":
            raise ValueError(f"a reduce partial's array has dtype {dtype}; only numeric arrays are read")
        return np.frombuffer(base64.b64decode(obj["data"]), dtype=dtype).reshape(obj["shape"]).copy()
    raise ValueError(f"a reduce partial holds an unknown encoded type {kind!r}")
