"""model/infer.Inference, the one inference path, through the stages' BaseTagger: the class-restricted
head, precisions, torch.compile."""
import numpy as np
import pytest
import torch
from PIL import Image

from model.infer import Inference, resolve_precision
from model.ram import create_model
from stages.vision import BaseTagger

RAM_ARGS = {"num_classes": 12, "image_size": 64, "window_size": 4, "embed_dim": 8, "depths": [2, 2, 2],
            "num_heads": [1, 2, 4], "head_hidden": 32, "head_intermediate": 64, "label_dim": 16}


def _model(name: str, **kw):
    torch.manual_seed(0)
    model = create_model(name, **{**RAM_ARGS, **kw})
    for p in model.parameters():  # away from the init, so that classes differ clearly
        p.data.normal_(0, 0.3)
    return model.eval()


def _images(n: int = 5):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (48 + 8 * i, 80, 3), dtype=np.uint8)) for i in range(n)]


def _tagger(model, **kw) -> BaseTagger:
    """Tagset (14 tags): the model's 12 classes in another order, and two it lacks (ids 3 and 10)."""
    names = [f"c{i}" for i in range(12)]
    tags = names[::-1][:3] + ["unknown"] + names[::-1][3:9] + ["other"] + names[::-1][9:]
    return BaseTagger.from_model(model, names, tags, [0.5] * len(tags), **kw)


# -- the class-restricted head ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ram_test", "ram_plus_test"])
def test_restricted_head_scores_equal_the_full_heads_for_those_classes(name):
    """Scoring only the classes a call needs (verify's crops, views, ground's candidates) gives what
    the full head gives them: RAM's head has no self-attention between queries and one shared fc."""
    kw = {"descriptions_per_class": 3} if name == "ram_plus_test" else {}
    tagger = _tagger(_model(name, **kw), batch_size=2)
    assert tagger.engine.query_head
    images = _images()
    full, maps = tagger.scores(images, attention=True)
    wanted = [[0, 5], [3], [11, 2, 10, 4], [], [7]]  # tags 3 and 10: the model lacks them
    got = tagger.scores_for(images, wanted)
    with_maps = tagger.scores_for(images, wanted, attention=True)
    for i, w in enumerate(wanted):
        np.testing.assert_allclose(got[i], full[i, w], atol=1e-6, rtol=1e-5)
        np.testing.assert_allclose(with_maps[i][0], full[i, w], atol=1e-6, rtol=1e-5)
        np.testing.assert_allclose(with_maps[i][1], maps[i, w], atol=1e-6, rtol=1e-5)
    assert np.isnan(got[1]).all() and np.isnan(got[2][2]) and not np.isnan(got[2][[0, 1, 3]]).any()
    crops = tagger.crop_scores(images, [0, 3, 11, 2, 7])
    np.testing.assert_allclose(crops, full[np.arange(5), [0, 3, 11, 2, 7]], atol=1e-6, rtol=1e-5)
    # and the head really was restricted: a batch's head sees only the classes it needs
    seen = []
    head = tagger.model.tagging_head
    hook = head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    tagger.scores_for(images, wanted)
    hook.remove()
    assert seen == [2, 3, 1]  # batches {0, 5, 3}, {11, 2, 10, 4}, {7}: the known classes only


def test_a_model_without_a_query_head_scores_every_class_as_before():
    """The CNN's head is a 1x1 convolution: it is always called on every known class (the numbers
    the default run was built on), and the wanted ones are read off."""
    tagger = _tagger(create_model("cnn_tagger_tiny", num_classes=12, widths=[8, 8, 8, 8]).eval())
    assert not tagger.engine.query_head
    images = _images(3)
    full = tagger.scores(images)
    got = tagger.scores_for(images, [[1, 3], [0], [10]])
    np.testing.assert_array_equal(got[0], full[0, [1, 3]])
    np.testing.assert_array_equal(got[2], full[2, [10]])


# -- precision, TF32, compile ----------------------------------------------------------------------------

def test_precision_is_bf16_on_cuda_and_fp32_on_cpu_unless_asked():
    assert resolve_precision("auto", "cuda") == torch.bfloat16
    assert resolve_precision("auto", "cpu") == torch.float32
    assert resolve_precision("fp16", "cuda") == torch.float16 and resolve_precision("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("int8", "cuda")
    model = _model("ram_test")
    with Inference(model).autocast():
        assert not torch.is_autocast_enabled("cpu")  # fp32 on CPU: no autocast at all
    with Inference(model, precision="bf16").autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_bf16_autocast_scores_stay_close_to_fp32():
    """bf16 autocast (the CUDA default; here on CPU) through the fused attention with its float mask."""
    model = _model("ram_test")
    images = _images(4)
    fp32 = _tagger(model).scores(images)
    tagger = _tagger(_model("ram_test"), precision="bf16")
    assert tagger.engine.dtype == torch.bfloat16
    bf16 = tagger.scores(images)
    known = ~np.isnan(fp32[0])
    assert bf16.dtype == np.float32 and np.abs(bf16 - fp32)[:, known].max() < 0.03
    assert tagger.embed(images).dtype == np.float32


def test_compiled_backbone_gives_the_same_scores():
    """``compile: true`` wraps the backbone in torch.compile (backend ``eager`` here: no C++ toolchain)."""
    images = _images(2)
    want = _tagger(_model("ram_test")).scores(images)
    compiled = _tagger(_model("ram_test"), compile="eager")
    assert compiled.engine._embed is not compiled.model.image_embeds
    np.testing.assert_allclose(compiled.scores(images), want, atol=1e-5)
