"""Files every layer writes the same way: under a temporary name first, renamed into place when whole."""
from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path


def temp_path(path: Path) -> Path:
    """A hidden name beside ``path`` to write before the rename that commits it. A run directory is storage
    every node shares and a pid is unique on one host only (a retried task, a speculative copy or the
    driver may write the same file from another node), so the name carries the host, the pid and a
    random token; no reader globs it (``part-*`` never matches a leading dot)."""
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")
