"""Deterministic scene generator: one image, its captions and its truth from (seed, index).

Every image draws from its own ``random.Random(f"{seed}:{index}")``, so any shard of a world can be
made alone, in any order, on any worker, and the bytes are the same.
"""
from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from stages.world.shapes import SHAPES

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "orange": (245, 140, 30), "purple": (140, 60, 180), "pink": (245, 130, 190), "white": (250, 250, 250),
    "black": (20, 20, 20), "brown": (130, 80, 40),
}
SCENES = ("grass", "sky", "sand", "water", "snow", "brick wall", "wood floor")
SCENE_PHRASES = {
    "grass": ["on the grass", "on the green grass", "in the grass"],
    "sky": ["in the sky", "in the blue sky", "against the sky"],
    "sand": ["on the sand", "in the sand"],
    "water": ["in the water", "on the water"],
    "snow": ["in the snow", "on the snow"],
    "brick wall": ["in front of a brick wall", "against a brick wall"],
    "wood floor": ["on the wood floor", "on a wood floor"],
}
# How captions name a class. Some pairs WordNet merges (car / automobile / auto share car.n.01),
# some it does not (cup / mug, boat / ship, hat / cap, house / home, bottle / flask).
SYNONYMS = {"car": ["automobile", "auto"], "cup": ["mug"], "boat": ["ship"], "hat": ["cap"],
            "house": ["home"], "bottle": ["flask"]}
PLURALS = {"box": "boxes", "fish": "fish", "mushroom": "mushrooms", "candle": "candles",
           "mug": "mugs", "ship": "ships", "auto": "autos", "flask": "flasks", "cap": "caps"}
SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["big", "large", "huge"]}
NUMBERS = {2: "two", 3: "three", 4: "four"}
ACTIONS = {"kite": "flying", "fish": "swimming", "boat": "floating", "ball": "lying", "car": "parked"}


@dataclass
class NoiseRates:
    omit: float = 0.30  # share of objects missing from every caption of their image
    hallucinate: float = 0.15  # share of images whose captions mention an absent object
    wrong_colour: float = 0.10  # share of objects described with a wrong colour


@dataclass
class WorldObject:
    cls: str
    colour: str
    size: str
    box: list[float]
    omitted: bool = False
    wrong_colour: str | None = None
    angle: float = 0.0
    center: tuple[float, float] = (0.0, 0.0)
    scale: float = 1.0


@dataclass
class WorldImage:
    image_id: str
    png: bytes
    scene: str
    objects: list[WorldObject]
    captions: list[str]
    hallucinated: list[str] = field(default_factory=list)
    scene_mentioned: bool = True


def image_id(seed: int, index: int) -> str:
    return f"sw{seed}-{index:07d}"


def _shade(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    if sum(rgb) < 120:
        return tuple(min(255, c + 90) for c in rgb)  # type: ignore[return-value]
    return tuple(int(c * 0.55) for c in rgb)  # type: ignore[return-value]


def _background(draw: ImageDraw.ImageDraw, scene: str, size: int, rng: random.Random) -> None:
    s = size
    if scene == "grass":
        draw.rectangle([0, 0, s, s], fill=(92, 150, 64))
        for _ in range(s * 2):
            x, y = rng.uniform(0, s), rng.uniform(0, s)
            draw.line([x, y, x + rng.uniform(-2, 2), y - rng.uniform(3, 7)], fill=(70, 124, 48))
    elif scene == "sky":
        for y in range(s):
            t = y / s
            draw.line([0, y, s, y], fill=(int(120 + 70 * t), int(175 + 45 * t), int(232 + 12 * t)))
    elif scene == "sand":
        draw.rectangle([0, 0, s, s], fill=(222, 200, 152))
        for _ in range(s * 3):
            x, y = rng.uniform(0, s), rng.uniform(0, s)
            draw.point([x, y], fill=(196, 172, 122))
    elif scene == "water":
        draw.rectangle([0, 0, s, s], fill=(58, 118, 168))
        for y in range(4, s, 9):
            off = rng.uniform(0, 12)
            pts = [(x, y + 2 * math.sin((x + off) / 5)) for x in range(0, s + 1, 3)]
            draw.line(pts, fill=(96, 156, 200))
    elif scene == "snow":
        draw.rectangle([0, 0, s, s], fill=(234, 238, 245))
        for _ in range(s):
            x, y = rng.uniform(0, s), rng.uniform(0, s)
            draw.ellipse([x, y, x + 2, y + 2], fill=(212, 220, 232))
    elif scene == "brick wall":
        draw.rectangle([0, 0, s, s], fill=(196, 188, 176))
        bh = max(6, s // 14)
        for row, y in enumerate(range(0, s, bh)):
            off = (row % 2) * bh
            for x in range(-off, s, 2 * bh):
                draw.rectangle([x + 1, y + 1, x + 2 * bh - 1, y + bh - 1], fill=(164, 74, 54))
    elif scene == "wood floor":
        draw.rectangle([0, 0, s, s], fill=(176, 128, 78))
        for x in range(0, s, max(8, s // 10)):
            draw.line([x, 0, x, s], fill=(146, 100, 58))
    else:
        raise ValueError(f"unknown scene {scene!r}")


def _transform(pts, cx: float, cy: float, scale: float, angle: float):
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + scale * (x * ca - y * sa), cy + scale * (x * sa + y * ca)) for x, y in pts]


def _place(rng: random.Random, size: int, scale: float, boxes: list[list[float]]) -> tuple[float, float]:
    best = None
    for _ in range(20):
        cx = rng.uniform(scale * 0.9, size - scale * 0.9)
        cy = rng.uniform(scale * 0.9, size - scale * 0.9)
        box = [cx - scale, cy - scale, cx + scale, cy + scale]
        worst = max((_iou(box, b) for b in boxes), default=0.0)
        if best is None or worst < best[0]:
            best = (worst, cx, cy)
        if worst < 0.15:
            break
    assert best is not None
    return best[1], best[2]


def _iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def draw_objects(img: Image.Image, objects: list[WorldObject]) -> None:
    draw = ImageDraw.Draw(img)
    w, h = img.size
    for ob in objects:
        rgb = COLOURS[ob.colour]
        xs, ys = [], []
        for role, pts in SHAPES[ob.cls]:
            poly = _transform(pts, ob.center[0], ob.center[1], ob.scale, ob.angle)
            draw.polygon(poly, fill=rgb if role == "body" else _shade(rgb))
            xs += [p[0] for p in poly]
            ys += [p[1] for p in poly]
        ob.box = [round(max(0.0, min(xs)), 1), round(max(0.0, min(ys)), 1),
                  round(min(float(w), max(xs)), 1), round(min(float(h), max(ys)), 1)]


def make_image(seed: int, index: int, size: int = 128, noise: NoiseRates | None = None) -> WorldImage:
    noise = noise or NoiseRates()
    rng = random.Random(f"{seed}:{index}")
    classes = sorted(SHAPES)
    scene = rng.choice(SCENES)
    n = rng.choices([1, 2, 3, 4], weights=[3, 4, 3, 2])[0]
    objects: list[WorldObject] = []
    boxes: list[list[float]] = []
    for k in range(n):
        cls = objects[-1].cls if k and rng.random() < 0.15 else rng.choice(classes)
        size_name = rng.choice(["small", "large"])
        unit = size / 128
        scale = unit * (rng.uniform(10, 14) if size_name == "small" else rng.uniform(20, 27))
        cx, cy = _place(rng, size, scale, boxes)
        boxes.append([cx - scale, cy - scale, cx + scale, cy + scale])
        colour = rng.choice(sorted(COLOURS))
        ob = WorldObject(cls, colour, size_name, [], angle=math.radians(rng.uniform(-25, 25)), center=(cx, cy),
                         scale=scale)
        ob.omitted = rng.random() < noise.omit
        if rng.random() < noise.wrong_colour:
            ob.wrong_colour = rng.choice([c for c in sorted(COLOURS) if c != colour])
        objects.append(ob)
    if all(o.omitted for o in objects):
        rng.choice(objects).omitted = False  # every image keeps one described object
    img = Image.new("RGB", (size, size))
    _background(ImageDraw.Draw(img), scene, size, rng)
    draw_objects(img, objects)
    present = {o.cls for o in objects}
    hallucinated = [rng.choice([c for c in classes if c not in present])] if rng.random() < noise.hallucinate else []
    captions, scene_mentioned = write_captions(rng, objects, scene, hallucinated)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return WorldImage(image_id(seed, index), buf.getvalue(), scene, objects, captions, hallucinated, scene_mentioned)


def _noun(rng: random.Random, cls: str, plural: bool) -> str:
    word = cls
    if cls in SYNONYMS and rng.random() < 0.35:
        word = rng.choice(SYNONYMS[cls])
    if plural:
        return PLURALS.get(word, word + "s")
    return word


def _phrase(rng: random.Random, group: list[WorldObject]) -> str:
    ob = group[0]
    colours = {o.wrong_colour or o.colour for o in group}
    words = []
    if len(colours) == 1 and rng.random() < 0.75:
        words.append(next(iter(colours)))
    if len(group) == 1 and rng.random() < 0.3:
        words.insert(0, rng.choice(SIZE_WORDS[ob.size]))
    noun = _noun(rng, ob.cls, len(group) > 1)
    if len(group) > 1:
        return " ".join([NUMBERS[len(group)], *words, noun])
    head = " ".join([*words, noun])
    return ("an " if head[0] in "aeiou" else "a ") + head


def _relation(a: WorldObject, b: WorldObject) -> str:
    dy = a.center[1] - b.center[1]
    dx = a.center[0] - b.center[0]
    if abs(dy) > 1.5 * abs(dx):
        return "above" if dy < 0 else "below"
    return "next to" if abs(dx) > 20 else "near"


def write_captions(rng: random.Random, objects: list[WorldObject], scene: str,
                   hallucinated: list[str]) -> tuple[list[str], bool]:
    shown = [o for o in objects if not o.omitted]
    n_caps = rng.randint(1, 5)
    captions, scene_mentioned = [], False
    fake = [WorldObject(c, rng.choice(sorted(COLOURS)), rng.choice(["small", "large"]), [0, 0, 0, 0])
            for c in hallucinated]
    fake_caps = set(rng.sample(range(n_caps), k=max(1, n_caps // 2))) if fake else set()
    for ci in range(n_caps):
        mention = [o for o in shown if rng.random() < 0.8] or [rng.choice(shown)]
        if ci in fake_caps:
            mention = mention + fake
        groups: dict[str, list[WorldObject]] = {}
        for o in mention:
            groups.setdefault(o.cls, []).append(o)
        phrases = [_phrase(rng, g) for g in groups.values()]
        firsts = [g[0] for g in groups.values()]
        place = rng.choice(SCENE_PHRASES[scene]) if rng.random() < 0.7 else ""
        scene_mentioned |= bool(place)
        template = rng.randrange(4)
        if len(phrases) >= 2 and template == 0:
            body = f"{phrases[0]} {_relation(firsts[0], firsts[1])} {phrases[1]}"
            if len(phrases) > 2:
                body += " and " + " and ".join(phrases[2:])
        elif template == 1 and len(phrases) == 1 and firsts[0].cls in ACTIONS:
            body = f"{phrases[0]} {ACTIONS[firsts[0].cls]}"
        elif template == 2:
            body = "there is " + _join(phrases)
        else:
            body = _join(phrases)
        text = " ".join(p for p in (body, place) if p)
        text = text[0].upper() + text[1:] if rng.random() < 0.6 else text
        captions.append(text + ("." if rng.random() < 0.7 else ""))
    return captions, scene_mentioned


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]
