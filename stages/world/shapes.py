"""Procedural object shapes in unit coordinates (roughly [-1, 1]², y down), one function per class.

Each shape is a list of parts ``(role, points)``; role ``body`` is drawn in the object's colour, role
``detail`` in a shade of it, so a box around the object holds mostly its colour.
"""
from __future__ import annotations

import math

Part = tuple[str, list[tuple[float, float]]]


def ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 28, a0: float = 0.0, a1: float = 360.0):
    return [(cx + rx * math.cos(math.radians(a0 + (a1 - a0) * k / (n - 1))),
             cy + ry * math.sin(math.radians(a0 + (a1 - a0) * k / (n - 1)))) for k in range(n)]


def rect(x0: float, y0: float, x1: float, y1: float):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def star(r_out: float = 1.0, r_in: float = 0.42, n: int = 5):
    pts = []
    for k in range(2 * n):
        r = r_out if k % 2 == 0 else r_in
        a = -math.pi / 2 + k * math.pi / n
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


def _heart():
    pts = []
    for k in range(40):
        t = 2 * math.pi * k / 40
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x / 17, -y / 17))
    return pts


def _crescent():
    outer = ellipse(0, 0, 1, 1, 24, 70, 290)
    inner = ellipse(0.38, 0, 0.78, 0.78, 24, 250, 110)
    return outer + inner


SHAPES: dict[str, list[Part]] = {
    "ball": [("body", ellipse(0, 0, 1, 1)), ("detail", ellipse(0, 0, 1, 0.18, 20, 0, 360))],
    "box": [("body", rect(-0.8, -0.5, 0.8, 0.9)), ("detail", [(-0.8, -0.5), (-0.4, -0.9), (1.0, -0.9), (0.8, -0.5)]),
            ("detail", [(0.8, -0.5), (1.0, -0.9), (1.0, 0.5), (0.8, 0.9)])],
    "star": [("body", star())],
    "heart": [("body", _heart())],
    "moon": [("body", _crescent())],
    "sun": [("body", ellipse(0, 0, 0.55, 0.55))] + [
        ("body", [(0.62 * math.cos(a - 0.2), 0.62 * math.sin(a - 0.2)), (math.cos(a), math.sin(a)),
                  (0.62 * math.cos(a + 0.2), 0.62 * math.sin(a + 0.2))])
        for a in [k * math.pi / 4 for k in range(8)]],
    "tree": [("detail", rect(-0.15, 0.2, 0.15, 1.0)), ("body", ellipse(0, -0.25, 0.75, 0.75))],
    "house": [("body", rect(-0.75, -0.1, 0.75, 1.0)), ("body", [(-0.95, -0.1), (0, -1.0), (0.95, -0.1)]),
              ("detail", rect(-0.18, 0.4, 0.18, 1.0))],
    "car": [("body", rect(-1.0, -0.1, 1.0, 0.45)), ("body", [(-0.55, -0.1), (-0.35, -0.55), (0.4, -0.55), (0.6, -0.1)]),
            ("detail", ellipse(-0.55, 0.45, 0.25, 0.25, 16)), ("detail", ellipse(0.55, 0.45, 0.25, 0.25, 16))],
    "fish": [("body", ellipse(-0.15, 0, 0.75, 0.45)), ("body", [(0.5, 0), (1.0, -0.5), (1.0, 0.5)]),
             ("detail", ellipse(-0.55, -0.1, 0.09, 0.09, 10))],
    "flower": [("detail", rect(-0.06, 0.2, 0.06, 1.0))] + [
        ("body", ellipse(0.38 * math.cos(a), -0.3 + 0.38 * math.sin(a), 0.3, 0.3, 14))
        for a in [k * 2 * math.pi / 5 for k in range(5)]] + [("detail", ellipse(0, -0.3, 0.2, 0.2, 12))],
    "cup": [("body", [(-0.7, -0.7), (0.5, -0.7), (0.35, 0.9), (-0.55, 0.9)]),
            ("body", ellipse(0.55, 0.05, 0.4, 0.4, 18, -90, 90) + ellipse(0.5, 0.05, 0.2, 0.2, 12, 90, -90))],
    "key": [("body", ellipse(-0.6, 0, 0.4, 0.4, 18)), ("detail", ellipse(-0.6, 0, 0.15, 0.15, 10)),
            ("body", rect(-0.25, -0.1, 1.0, 0.1)), ("body", rect(0.6, 0.1, 0.72, 0.35)),
            ("body", rect(0.82, 0.1, 0.94, 0.3))],
    "umbrella": [("body", ellipse(0, 0, 1.0, 0.7, 24, 180, 360)), ("detail", rect(-0.05, 0, 0.05, 0.85)),
                 ("detail", ellipse(-0.17, 0.85, 0.17, 0.15, 10, 0, 180))],
    "cloud": [("body", ellipse(-0.45, 0.15, 0.45, 0.38)), ("body", ellipse(0.05, -0.15, 0.5, 0.5)),
              ("body", ellipse(0.5, 0.15, 0.45, 0.38)), ("body", rect(-0.45, 0.1, 0.5, 0.53))],
    "bottle": [("body", rect(-0.35, -0.2, 0.35, 1.0)), ("body", rect(-0.14, -0.75, 0.14, -0.2)),
               ("detail", rect(-0.17, -0.95, 0.17, -0.75))],
    "kite": [("body", [(0, -1.0), (0.55, -0.25), (0, 0.5), (-0.55, -0.25)]),
             ("detail", [(0, 0.5), (0.15, 0.7), (-0.1, 0.85), (0.1, 1.0), (0.0, 1.0), (-0.2, 0.85), (0.05, 0.7)])],
    "boat": [("body", [(-1.0, 0.35), (1.0, 0.35), (0.7, 0.8), (-0.7, 0.8)]), ("detail", rect(-0.04, -0.9, 0.04, 0.35)),
             ("body", [(0.08, -0.85), (0.75, 0.25), (0.08, 0.25)])],
    "apple": [("body", ellipse(0, 0.15, 0.8, 0.75)), ("detail", rect(-0.05, -0.85, 0.05, -0.5)),
              ("detail", ellipse(0.25, -0.7, 0.22, 0.1, 12))],
    "mushroom": [("body", ellipse(0, 0, 1.0, 0.75, 24, 180, 360)), ("detail", rect(-0.25, 0, 0.25, 0.9))],
    "clock": [("body", ellipse(0, 0, 1, 1)), ("detail", rect(-0.05, -0.7, 0.05, 0.05)),
              ("detail", rect(-0.05, -0.05, 0.5, 0.05))],
    "ladder": [("body", rect(-0.6, -1.0, -0.45, 1.0)), ("body", rect(0.45, -1.0, 0.6, 1.0))] + [
        ("body", rect(-0.45, y, 0.45, y + 0.12)) for y in (-0.75, -0.3, 0.15, 0.6)],
    "candle": [("body", rect(-0.3, -0.4, 0.3, 1.0)), ("detail", ellipse(0, -0.65, 0.15, 0.3, 14))],
    "bell": [("body", [(-0.2, -0.9), (0.2, -0.9), (0.45, -0.4), (0.55, 0.4), (0.85, 0.7), (-0.85, 0.7),
                       (-0.55, 0.4), (-0.45, -0.4)]), ("detail", ellipse(0, 0.82, 0.16, 0.16, 10))],
    "hat": [("body", rect(-1.0, 0.45, 1.0, 0.65)), ("body", rect(-0.55, -0.7, 0.55, 0.45)),
            ("detail", rect(-0.55, 0.2, 0.55, 0.4))],
    "arrow": [("body", [(-1.0, -0.15), (0.3, -0.15), (0.3, -0.5), (1.0, 0.0), (0.3, 0.5), (0.3, 0.15), (-1.0, 0.15)])],
}
