"""Byte ranges of line files (TSV, JSONL) found without reading them: seek near each split point and
move to the start of the next line. A worker reads its range line by line, in chunks."""
from __future__ import annotations

from typing import IO, Iterator

CHUNK = 1 << 20
SAMPLE = 1 << 16  # the head read to estimate bytes per line
MAX_LINE = 64 << 20  # a longer line is skipped as one bad record


def bytes_per_range(head: bytes, rows: int) -> int:
    """``rows`` lines' worth of bytes, judged by the mean line length of the file's head."""
    lines = head.count(b"\n") or 1
    return max(1, round(rows * len(head) / lines))


def next_line_start(f: IO[bytes], pos: int) -> int | None:
    """The first line start at or after ``pos`` (``pos`` > 0), or None when no line starts there."""
    f.seek(pos - 1)
    at = pos - 1
    while True:
        block = f.read(SAMPLE)
        if not block:
            return None
        i = block.find(b"\n")
        if i >= 0:
            return at + i + 1
        at += len(block)


def line_ranges(f: IO[bytes], size: int, target: int) -> list[tuple[int, int]]:
    """``[start, stop)`` byte ranges of about ``target`` bytes, each starting at a line start."""
    starts = [0]
    pos = target
    while pos < size:
        b = next_line_start(f, pos)
        if b is None or b >= size:
            break
        starts.append(b)
        pos = b + target
    return [(s, starts[i + 1] if i + 1 < len(starts) else size) for i, s in enumerate(starts)]


def iter_lines(f: IO[bytes], start: int, chunk: int = CHUNK, max_line: int = MAX_LINE) -> Iterator[tuple[int, bytes | None]]:
    """``(offset, line)`` from ``start`` to the end of the file, without the newline; ``None`` for a
    line longer than ``max_line`` (skipped up to its newline, never held whole)."""
    f.seek(start)
    pending: list[bytes] = []  # the unfinished line's pieces (none while skipping it)
    held, off, skipping = 0, start, False
    while True:
        data = f.read(chunk)
        if not data:
            break
        parts = data.split(b"\n")
        tail = parts.pop()
        for i, part in enumerate(parts):
            if i == 0:  # finishes the line the previous chunks began
                line, n = (None if skipping else b"".join([*pending, part])), held + len(part)
                pending, held, skipping = [], 0, False
            else:
                line, n = part, len(part)
            yield off, (line if line is None or n <= max_line else None)
            off += n + 1
        if not skipping:
            pending.append(tail)
        held += len(tail)
        if held > max_line and not skipping:
            pending, skipping = [], True
    if held:
        yield off, None if skipping else b"".join(pending)


def prev_line(f: IO[bytes], start: int, max_line: int = MAX_LINE) -> bytes | None:
    """The line that ends just before ``start`` (a line start), or None at the top of the file."""
    if start == 0:
        return None
    end = start - 1  # its newline
    parts: list[bytes] = []
    pos = end
    while pos > 0:
        lo = max(0, pos - SAMPLE)
        f.seek(lo)
        block = f.read(pos - lo)
        i = block.rfind(b"\n")
        if i >= 0:
            parts.append(block[i + 1:])
            break
        parts.append(block)
        pos = lo
        if end - pos > max_line:
            return None
    return b"".join(reversed(parts))
