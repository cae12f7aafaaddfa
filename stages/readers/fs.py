"""Input paths on any fsspec filesystem: plain paths, ``file://``, ``memory://``, ``s3://``, ``gs://``.

Readers open, list, glob and fingerprint their inputs here and nowhere else. A path keeps the user's
spelling in everything a reader writes (a relative path stays relative, a URI keeps its scheme), so a
plain-path run and a URI run of the same files give the same rows apart from that prefix.
"""
from __future__ import annotations

import os
import re
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs

_MAGIC = re.compile(r"[*?\[]")
_HTTP = re.compile(r"^https?://", re.IGNORECASE)


def is_uri(path: str) -> bool:
    return "://" in path


def is_http_url(s: str | None) -> bool:
    """True for an ``http(s)://`` address: an image that must be downloaded before it can be opened."""
    return bool(s) and bool(_HTTP.match(s))  # type: ignore[arg-type]


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem holding ``path`` and the path as that filesystem spells it."""
    return url_to_fs(path if is_uri(path) else os.path.expanduser(path))


def _glob_one(pattern: str, dirs: bool) -> list[str]:
    fs, stripped = filesystem(pattern)
    found = fs.glob(stripped, detail=True)  # types come with the listing: no stat per hit on an object store
    hits = sorted(h for h, info in found.items() if (info.get("type") == "directory") == dirs)
    # Stripping only rewrites the part before the first wildcard: map hits back to the user's spelling.
    m = _MAGIC.search(stripped)
    tail = stripped[stripped.rfind("/", 0, m.start()) + 1:] if m else ""
    user = pattern if is_uri(pattern) else os.path.expanduser(pattern)
    if not tail or not user.endswith(tail):
        return [fs.unstrip_protocol(h) if is_uri(pattern) else h for h in hits]
    user_pre, fs_pre = user[:len(user) - len(tail)], stripped[:len(stripped) - len(tail)]
    return [user_pre + h[len(fs_pre):] if h.startswith(fs_pre) else h for h in hits]


def expand(paths: list[str] | str, dirs: bool = False) -> list[str]:
    """Files (``dirs``: folders) named by paths and globs, in order; a pattern that matches nothing
    stays, and is reported missing."""
    out: list[str] = []
    for p in [paths] if isinstance(paths, str) else paths:
        hits = _glob_one(p, dirs) if _MAGIC.search(p) else []
        out.extend(hits or [p if is_uri(p) else os.path.expanduser(p)])
    return out


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.exists(p)


def isdir(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.isdir(p)


def size(path: str) -> int:
    fs, p = filesystem(path)
    return int(fs.size(p))


def open_input(path: str, block_size: int = 1 << 20) -> IO[bytes]:
    """A seekable binary file (object stores read it in ``block_size`` ranged requests)."""
    fs, p = filesystem(path)
    if type(fs).__name__ == "LocalFileSystem":
        return fs.open(p, "rb")
    return fs.open(p, "rb", block_size=block_size)


def _stamp(info: dict[str, Any]) -> str:
    for k in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "updated", "created"):
        if info.get(k) is not None:
            return str(info[k])
    return ""


def file_key(path: str) -> str:
    """Identity of an input file for fingerprints: its size and etag or modification time."""
    fs, p = filesystem(path)
    try:
        info = fs.info(p)
    except (FileNotFoundError, OSError):
        return f"{path}:missing"
    return f"{path}:{info.get('size')}:{_stamp(info)}"


def find_files(root: str) -> list[str]:
    """Every file under ``root``, as paths relative to it ("/"-separated), in no particular order."""
    fs, p = filesystem(root)
    base = p.rstrip("/")
    return [h[len(base) + 1:] for h in fs.find(p) if h.startswith(base + "/")]


def join(root: str, rel: str) -> str:
    """``root/rel`` spelt as ``os.path.join`` spells it (a URI's "/" rules are the same)."""
    return os.path.join(root, rel)


def dirname(path: str) -> str:
    return os.path.dirname(path)
