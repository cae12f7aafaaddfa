"""Scene world <-> Arrow tables (the captions contract + a truth table), and the contact sheet."""
from __future__ import annotations

import io
import textwrap
from pathlib import Path

import pyarrow as pa
from PIL import Image, ImageDraw, ImageFont

from pipeline.registry import register_command
from stages.columns import ROWS_SCHEMA
from stages.world.generate import NoiseRates, WorldImage, make_image

OBJECT_TYPE = pa.struct([
    ("cls", pa.string()), ("colour", pa.string()), ("size", pa.string()),
    ("box", pa.list_(pa.float32())), ("omitted", pa.bool_()), ("wrong_colour", pa.string()),
])
TRUTH_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("scene", pa.string()), ("scene_mentioned", pa.bool_()),
    ("objects", pa.list_(OBJECT_TYPE)), ("hallucinated", pa.list_(pa.string())),
])


def world_images(seed: int, start: int, stop: int, size: int, noise: NoiseRates) -> list[WorldImage]:
    return [make_image(seed, i, size, noise) for i in range(start, stop)]


def to_tables(images: list[WorldImage]) -> tuple[pa.Table, pa.Table]:
    rows = pa.table({
        "image_id": [w.image_id for w in images],
        "image": [None] * len(images),
        "image_bytes": [w.png for w in images],
        "captions": [w.captions for w in images],
    }, schema=ROWS_SCHEMA)
    truth = pa.table({
        "image_id": [w.image_id for w in images],
        "scene": [w.scene for w in images],
        "scene_mentioned": [w.scene_mentioned for w in images],
        "objects": [[{"cls": o.cls, "colour": o.colour, "size": o.size, "box": o.box, "omitted": o.omitted,
                      "wrong_colour": o.wrong_colour} for o in w.objects] for w in images],
        "hallucinated": [w.hallucinated for w in images],
    }, schema=TRUTH_SCHEMA)
    return rows, truth


def contact_sheet(rows: pa.Table, truth: pa.Table, path: Path, n: int = 12, cols: int = 4) -> None:
    """A grid of images at 2x with truth boxes (dashed for omitted objects) and their captions."""
    n = min(n, rows.num_rows)
    cell_w, img_px, text_h = 300, 256, 150
    sheet = Image.new("RGB", (cols * cell_w, ((n + cols - 1) // cols) * (img_px + text_h)), "white")
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(sheet)
    tr = truth.to_pylist()
    for k in range(n):
        x0, y0 = (k % cols) * cell_w + 22, (k // cols) * (img_px + text_h)
        im = Image.open(io.BytesIO(rows["image_bytes"][k].as_py())).convert("RGB")
        scale = img_px / im.width
        sheet.paste(im.resize((img_px, img_px), Image.NEAREST), (x0, y0 + 4))
        t = tr[k]
        for ob in t["objects"]:
            b = [v * scale for v in ob["box"]]
            box = [x0 + b[0], y0 + 4 + b[1], x0 + b[2], y0 + 4 + b[3]]
            draw.rectangle(box, outline=(255, 0, 255) if ob["omitted"] else (0, 0, 0), width=2)
            label = ob["cls"] + (" (omitted)" if ob["omitted"] else "") + (
                f" said {ob['wrong_colour']}" if ob["wrong_colour"] else "")
            draw.text((box[0] + 2, box[1] + 1), label, fill=(0, 0, 0), font=font)
        lines = [f"{t['image_id']}  scene: {t['scene']}"]
        if t["hallucinated"]:
            lines.append("hallucinated: " + ", ".join(t["hallucinated"]))
        for c in rows["captions"][k].as_py():
            lines += textwrap.wrap("- " + c, 44)
        draw.multiline_text((x0, y0 + img_px + 8), "\n".join(lines[:10]), fill=(0, 0, 0), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def write_world(out: Path, seed: int, images: int, size: int = 128, preview: Path | None = None,
                noise: NoiseRates | None = None) -> dict:
    from pipeline.store import write_parquet_atomic

    rows, truth = to_tables(world_images(seed, 0, images, size, noise or NoiseRates()))
    write_parquet_atomic(rows, out / "captions.parquet")
    write_parquet_atomic(truth, out / "truth.parquet")
    if preview is not None:
        contact_sheet(rows, truth, preview)
    return {"images": rows.num_rows, "objects": sum(len(o) for o in truth["objects"].to_pylist())}


@register_command("scene-world", "write a generated scene world (images, captions, truth)")
def _configure(p) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--out", required=True)
    p.add_argument("--preview", help="also write a contact sheet PNG here")
    p.set_defaults(fn=_run)


def _run(args) -> int:
    info = write_world(Path(args.out), seed=args.seed, images=args.images, size=args.size,
                       preview=Path(args.preview) if args.preview else None)
    print(f"scene world: {info['images']} images, {info['objects']} objects -> {args.out}")
    return 0
