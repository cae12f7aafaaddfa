"""How readers name images, so that two different images never share an ``image_id``.

- An id taken from a path is the path relative to the image root, without its extension
  (``VG_100K/1.jpg`` -> ``VG_100K/1``), never the bare stem: ``VG_100K/1.jpg`` and ``other/1.jpg`` are
  two images, and the stem would make them one id.
- An id taken from a URL is a hash of the URL (readable ids would be as long as the URL).
- ``source.multi.v1`` prefixes each of its sources' ids with the source's name (``name/key``): two
  img2dataset outputs both number their keys from ``000000000``.

What a scheme cannot rule out (the same key in two files of one source, a record repeated far apart in
a file) the input step catches: it fails naming both shards (``pipeline/workflow.py``).
"""
from __future__ import annotations

import hashlib
import posixpath
import re

SEP = "/"  # between a multi source's name and its source's id
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a source name: one readable path segment


def url_id(url: str) -> str:
    """A URL's id: 16 hex digits of its sha1 (64 bits: no collision expected below ~4e9 URLs)."""
    return hashlib.sha1(url.encode()).hexdigest()[:16]


def path_id(name: str, root: str | None = None) -> str:
    """The image's path relative to its root, ``/``-separated, without the extension.

    A relative name is already relative to the root; an absolute one under ``root`` is made relative to
    it; any other absolute path or URI keeps its whole path (scheme and leading slash dropped). Names that
    differ only by extension, or an absolute and a relative spelling of one path, give one id: the input
    step's uniqueness check reports those."""
    p = name
    if root and (p.startswith("/") or "://" in p):
        base = root.rstrip("/") + "/"
        if p.startswith(base):
            p = p[len(base):]
    if "://" in p:
        p = p.split("://", 1)[1]
    p = posixpath.normpath(p).lstrip("/")
    return posixpath.splitext(p)[0]


def stem_id(name: str) -> str:
    """The file name without folder or extension (``image_id: stem``: ids that match another table's)."""
    return posixpath.splitext(posixpath.basename(name))[0]


def prefixed(name: str, image_id: str) -> str:
    return f"{name}{SEP}{image_id}"
