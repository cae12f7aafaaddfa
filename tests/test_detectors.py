"""Grounding DINO backends (stages/vision/detectors.py): the detector's own resize, the transformers backend's
tensor preprocessing against its processor, bf16 autocast, the original backend's checkpoint spec."""
import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image
from test_clean_coco import TAGS, tiny_grounding_dino

from stages.vision.detectors import HFGroundingDino, OriginalGroundingDino, detector_size, original_checkpoint

HAS_ORIGINAL = importlib.util.find_spec("groundingdino") is not None


@pytest.mark.parametrize("size, detr, hf", [
    ((640, 480), (1066, 800), (1066, 800)),  # a COCO photo: short side 800
    ((480, 640), (800, 1066), (800, 1066)),
    ((2000, 500), (1332, 333), (1333, 333)),  # the long side capped at 1333: DETR rounds the short side first
    ((500, 2000), (333, 1332), (333, 1333)),
    ((800, 800), (800, 800), (800, 800)),
    ((1333, 800), (1333, 800), (1333, 800)),  # already the size: unchanged
    ((100, 37), (1332, 493), (1333, 493)),  # small images grow
])
def test_detector_resize_keeps_the_aspect_with_short_side_800_and_long_side_at_most_1333(size, detr, hf):
    assert detector_size(*size) == detr
    assert detector_size(*size, rule="hf") == hf


def test_hf_resize_rule_is_the_processors_own():
    from transformers.models.grounding_dino import GroundingDinoImageProcessorPil

    proc = GroundingDinoImageProcessorPil()  # the released checkpoints' default: 800 / 1333
    for w, h in ((640, 480), (2000, 500), (500, 2000), (100, 37), (1333, 800)):
        got = proc(images=Image.new("RGB", (w, h)), return_tensors="pt")["pixel_values"].shape
        assert (got[-1], got[-2]) == detector_size(w, h, rule="hf")


@pytest.fixture(scope="module")
def tiny_gd(tmp_path_factory):
    return str(tiny_grounding_dino(tmp_path_factory.mktemp("gd"), TAGS))


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, s, dtype=np.uint8)) for s in ((48, 64, 3), (120, 30, 3), (64, 64, 3))]


def test_tensor_preprocessing_matches_the_processor(tiny_gd):
    """Resize (antialiased bilinear, rounded as PIL's uint8 output), rescale, normalise and pad on tensors:
    the processor's sizes and pixel mask exactly, its pixels to within one intensity level."""
    gd = HFGroundingDino(tiny_gd, "cpu")
    images = _images()
    want = gd.processor(images=images, text=["red ."] * 3, return_tensors="pt", padding=True)
    pixels, mask = gd.pixels(images)
    assert pixels.shape == want["pixel_values"].shape and torch.equal(mask, want["pixel_mask"])
    assert (pixels - want["pixel_values"]).abs().max() < 1.01 / 255 / min(gd.processor.image_processor.image_std)


def test_bf16_autocast_detects_what_fp32_does(tiny_gd):
    """bf16 (the CUDA default) through the detector's own code path: the same names found, boxes close."""
    images, names = _images(), [["red", "ball"], ["car"], ["blue", "water", "tree"]]
    fp32 = HFGroundingDino(tiny_gd, "cpu").detect(images, names, 0.0, 0.0)
    bf16 = HFGroundingDino(tiny_gd, "cpu", precision="bf16")
    assert bf16.place.dtype == torch.bfloat16
    got = bf16.detect(images, names, 0.0, 0.0)
    assert [[d["label"] for d in x] for x in got] == [[d["label"] for d in x] for x in fp32] == names
    for a, b in zip(got, fp32):
        for da, db in zip(a, b):
            assert da["score"] == pytest.approx(db["score"], abs=0.05)


def test_original_checkpoint_spec_is_split_and_each_file_checked(tmp_path):
    (tmp_path / "GroundingDINO_SwinT_OGC.py").write_text("batch_size = 1\n")
    (tmp_path / "groundingdino_swint_ogc.pth").write_bytes(b"")
    cfg, weights = tmp_path / "GroundingDINO_SwinT_OGC.py", tmp_path / "groundingdino_swint_ogc.pth"
    assert original_checkpoint(f"{cfg}:{weights}") == (cfg, weights)
    with pytest.raises(ValueError, match="config file .*missing.py"):
        original_checkpoint(f"{tmp_path / 'missing.py'}:{weights}")
    with pytest.raises(ValueError, match="weights file .*missing.pth"):
        original_checkpoint(f"{cfg}:{tmp_path / 'missing.pth'}")
    for bad in (str(weights), None, f"{weights}:{cfg}"):
        with pytest.raises(ValueError, match="CONFIG.py:WEIGHTS.pth"):
            original_checkpoint(bad)
    if not HAS_ORIGINAL:  # a valid spec gets past the paths: only the missing package stops it
        with pytest.raises(ValueError, match=r"optional extra"):
            OriginalGroundingDino(f"{cfg}:{weights}")


def test_original_backend_resizes_as_its_own_loader():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8))
    x = OriginalGroundingDino.pixels(img)
    assert x.shape == (3, 800, 1066)  # not squashed to 800 x 800
    want = np.asarray(img.resize((1066, 800), Image.BILINEAR), dtype=np.float32) / 255
    np.testing.assert_allclose(x[0].numpy(), (want[..., 0] - 0.485) / 0.229, atol=1e-5)


@pytest.mark.skipif(not HAS_ORIGINAL, reason="groundingdino-py is not installed: it needs torchvision, which "
                    "replaces the CPU torch wheel here (pip install 'ram-data-engine[groundingdino]' elsewhere)")
def test_original_backend_detects_with_a_released_checkpoint(tmp_path):  # pragma: no cover - extra
    import os

    spec = os.environ.get("GROUNDINGDINO_CHECKPOINT")
    if not spec:
        pytest.skip("set GROUNDINGDINO_CHECKPOINT=CONFIG.py:WEIGHTS.pth to run the original backend")
    gd = OriginalGroundingDino(spec)
    found = gd.detect(_images()[:1], [["red", "ball"]], 0.0, 0.0)
    assert len(found) == 1 and all(len(d["box"]) == 4 for d in found[0])
