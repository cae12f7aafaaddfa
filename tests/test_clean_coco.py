"""stages/clean_coco.yaml with tiny random models: a RAM checkpoint in the official layout with its own
tag list, and a Hugging Face Grounding DINO directory (the transformers backend)."""
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.cli import main
from pipeline.view import read_step

REPO = Path(__file__).resolve().parent.parent
TAGS = ["red", "blue", "green", "ball", "car", "tree", "grass", "sky", "sand", "boat", "water", "snow"]
RAM_ARGS = {"image_size": 64, "window_size": 4, "embed_dim": 8, "depths": [2, 2, 2], "num_heads": [1, 2, 4],
            "head_hidden": 32, "head_intermediate": 64, "label_dim": 16, "num_classes": len(TAGS)}


def tiny_grounding_dino(path: Path, words: list[str]) -> Path:
    from stages.vision.detectors import write_random_grounding_dino

    return write_random_grounding_dino(path, words, tiny=True, max_text_len=16)


def coco_from_world(tmp: Path, n: int = 12) -> Path:
    from stages.world.generate import NoiseRates
    from stages.world.tables import to_tables, world_images

    rows, _ = to_tables(world_images(5, 0, n, 64, NoiseRates()))
    (tmp / "images").mkdir()
    images, anns = [], []
    for k, r in enumerate(rows.to_pylist()):
        name = f"{r['image_id']}.png"
        (tmp / "images" / name).write_bytes(r["image_bytes"])
        images.append({"id": k + 1, "file_name": name})
        anns += [{"id": len(anns) + 1, "image_id": k + 1, "caption": c} for c in r["captions"]]
    (tmp / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    images.append({"id": n + 1, "file_name": "broken.png"})
    anns.append({"id": len(anns) + 1, "image_id": n + 1, "caption": "A red ball on the grass."})
    path = tmp / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path


def run_clean_coco(tmp_path: Path, capsys, sets: list[str]) -> Path:
    """``clean_coco.yaml`` with tiny released-style models (a RAM and a Grounding DINO made here, random
    weights), Ray off, plus ``sets``; returns the run directory."""
    from model.registry import create_model

    (tmp_path / "tags.txt").write_text("\n".join(TAGS))
    torch.manual_seed(0)
    torch.save({"model": create_model("ram_test", **RAM_ARGS).state_dict()}, tmp_path / "ram.pth")
    gd = tiny_grounding_dino(tmp_path / "gdino", [w for t in TAGS for w in t.split()])
    sets = [*sets, "ray.enabled=false", f"vocab.tag_list={tmp_path / 'tags.txt'}", "vocab.threshold_file=null",
            "vocab.chinese_file=null", f"evidence.ground.detector={gd}", "cluster.min_regions=2",
            "evidence.model=ram_test", f"evidence.checkpoint={tmp_path / 'ram.pth'}",
            f"evidence.tag_list={tmp_path / 'tags.txt'}", "evidence.device=cpu",
            f"evidence.model_args={json.dumps(RAM_ARGS)}", "evidence.resources.num_gpus=0",
            "evidence.resources.decode_workers=2"]
    out = tmp_path / "run"
    argv = ["run", str(REPO / "stages" / "clean_coco.yaml"), "--out", str(out)]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0, capsys.readouterr()
    return out


def test_clean_coco_with_tiny_released_style_models(tmp_path, capsys):
    captions = coco_from_world(tmp_path)
    out = run_clean_coco(tmp_path, capsys, [f"input.path={captions}", "evidence.ground.box_threshold=0.0",
                                             "evidence.ground.text_threshold=0.0", "cluster.regions_per_cluster=3"])
    # the broken image leaves at the evidence step with a stable code; everything else goes through
    rej = pq.read_table(out / "evidence" / "rejects").to_pylist()
    assert [r["code"] for r in rej] == ["image_truncated"]
    decide = read_step(out / "decide", ["image_id", "regions", "union_label_id"]).to_pylist()
    assert len(decide) == 12
    regions = [r for row in decide for r in row["regions"]]
    assert regions and {r["backend"] for r in regions} == {"transformers"}
    for row in decide:
        for r in row["regions"]:
            assert 0 <= r["box"][0] < r["box"][2] <= 64 and 0 <= r["box"][1] < r["box"][3] <= 64
    report = json.loads((out / "report.json").read_text())
    assert "quality" not in report  # no truth on real data
    assert report["images"] == 12 and report["tags"]["parse"] > 0


@pytest.mark.skipif(not (REPO.parent / "shared" / "data" / "coco20").exists(),
                    reason="../shared/data/coco20 is absent (real COCO photos live beside the repo)")
def test_clean_coco_default_input_reads_the_real_coco20(tmp_path):
    from stages.readers.sources import CocoCaptions

    cfg = CocoCaptions.Config(path=str(REPO.parent / "shared" / "data" / "coco20" / "captions_train2017.json"))
    recs, rejects = CocoCaptions(cfg, None).records(cfg.path)
    assert len(recs) == 20 and not rejects and all(Path(r["image"]).exists() for r in recs)


def test_batched_grounding_equals_one_prompt_at_a_time(tmp_path):
    """Prompts of different lengths padded into one batch give the boxes each gives alone."""
    import numpy as np
    from PIL import Image

    from stages.vision.detectors import HFGroundingDino

    gd = HFGroundingDino(str(tiny_grounding_dino(tmp_path / "gd", TAGS)), "cpu", max_text_tokens=8)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
    names = [["red", "ball", "grass", "sky", "tree"], ["car"], ["blue", "water"]]  # 5 names -> 2 prompts
    one = gd.detect(images, names, 0.0, 0.0, batch_size=1)
    many = gd.detect(images, names, 0.0, 0.0, batch_size=8)
    assert [[d["label"] for d in x] for x in one] == [[d["label"] for d in x] for x in many] == names
    for a, b in zip(one, many):
        for da, db in zip(a, b):
            assert da["score"] == pytest.approx(db["score"], abs=1e-4)
            assert da["box"] == pytest.approx(db["box"], abs=1e-2)
