"""The evidence step's decode pool: rows' images decoded on threads, ahead of the model, in row order."""
from __future__ import annotations

from pathlib import Path

from common.images import ImageLimits


class Decoder:
    """Decodes rows' images on ``workers`` threads, ahead of the model, in row order.

    Pillow releases the GIL while it decodes and resizes, so threads decode in parallel beside a
    forward pass (which releases it too): each vision actor keeps ``resources.decode_workers`` images
    in flight while its model computes. ``prepare`` (e.g. the resize to the model's input, as uint8)
    runs in the same thread. Rejects are exactly :func:`open_image`'s: same codes, same order.
    ``workers`` 1 decodes in the calling thread, as before there was a pool. ``work_size``: images come
    back at most that large (:func:`open_image`), so what a batch holds is bounded by its length.
    """

    def __init__(self, workers: int = 1, base: Path | None = None, limits: ImageLimits | None = None,
                 ahead: int | None = None, work_size: int | None = None):
        self.workers, self.base, self.limits = max(1, int(workers)), base, limits or ImageLimits()
        self.work_size = work_size
        self.ahead = ahead or 4 * self.workers  # tasks queued beyond the one being read
        self._pool = None

    def map(self, fn, items, ahead: int | None = None):
        """``fn(item)`` for each item, in order, at most ``ahead`` computed before they are read."""
        ahead = ahead or self.ahead
        if self.workers == 1:
            yield from map(fn, items)
            return
        import collections
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="decode")
        queue: collections.deque = collections.deque()
        for item in items:
            queue.append(self._pool.submit(fn, item))
            if len(queue) > ahead:
                yield queue.popleft().result()
        while queue:
            yield queue.popleft().result()

    def decode(self, rows: list[dict], prepare=None, ahead: int | None = None):
        """``(row index, image or None, reject or None, prepare(image) or None)`` per row, in order."""
        import common.images as images  # looked up per call, so a benchmark can count decodes

        def one(item):
            i, row = item
            img, rej = images.open_image(row, self.base, self.limits, self.work_size)
            return i, img, rej, (prepare(img) if prepare is not None and img is not None else None)

        yield from self.map(one, list(enumerate(rows)), ahead)

    def batches(self, rows: list[dict], size: int, prepare=None):
        """The decoded rows in groups of ``size`` kept images, each yielded as soon as its last image is
        decoded (the threads go on decoding the next group meanwhile): ``(row indices, images,
        prepared, rejects since the last group)``; a last, shorter group and the trailing rejects end it."""
        idx, imgs, prep, rej = [], [], [], []
        # two groups in flight: the threads fill the next group while the model computes on this one
        for i, img, r, extra in self.decode(rows, prepare, ahead=max(self.ahead, 2 * size)):
            if r is not None:
                rej.append(r)
                continue
            idx.append(i), imgs.append(img), prep.append(extra)
            if len(idx) == size:
                yield idx, imgs, prep, rej
                idx, imgs, prep, rej = [], [], [], []
        if idx or rej:
            yield idx, imgs, prep, rej

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
