"""model/infer.Inference, the one inference path, through the stages' BaseTagger: the class-restricted
head, precisions, torch.compile, and the CUDA placement path checked for device mix-ups without a GPU
(the model on the ``meta`` device under a dispatch mode that fails on any op mixing devices)."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from model.infer import Inference, resolve_precision
from model.registry import create_model
from stages.vision.tagger import BaseTagger

aten = torch.ops.aten
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


@pytest.mark.parametrize("name", ["ram_test", "ram_plus_test", "cnn_tagger_tiny"])
def test_each_crop_scored_on_its_own_tag_alone_gives_the_full_heads_score(name):
    """evidence.v1 scores each crop on its own tag only: one query per crop through RAM's head, however
    many tags the batch's crops hold between them (a crop is never scored on its neighbours' tags), and
    the score is the full head's for that tag; a crop whose tag the model lacks stays NaN."""
    kw = ({"num_classes": 12, "widths": [8, 8, 8, 8]} if name.startswith("cnn")
          else {"descriptions_per_class": 3} if name == "ram_plus_test" else {})
    model = create_model(name, **kw).eval() if name.startswith("cnn") else _model(name, **kw)
    tagger = _tagger(model, batch_size=3)
    images = _images()
    full = tagger.scores(images)
    tags = [0, 5, 11, 3, 7]  # the model lacks tag 3
    seen = []
    hook = (tagger.model.tagging_head.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape[:2])))
            if tagger.engine.query_head else None)
    feats, own = tagger.embed_and_score([tagger.prepare(im) for im in images], tags)
    if hook is not None:
        hook.remove()
        assert seen == [(3, 1), (1, 1)]  # batches of 3 and 2 crops (one unknown): one query per known crop
    np.testing.assert_allclose(own[[0, 1, 2, 4]], full[[0, 1, 2, 4], [0, 5, 11, 7]], atol=1e-6, rtol=1e-5)
    assert np.isnan(own[3]) and feats.shape == (5, tagger.model.cfg.label_dim)


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
    assert compiled.engine._encode is not compiled.model.image_embeds
    np.testing.assert_allclose(compiled.scores(images), want, atol=1e-5)


# -- the CUDA path without a GPU -------------------------------------------------------------------------

class DeviceGuard(TorchDispatchMode):
    """Fails on any op whose tensors live on more than one device (host scalars aside). It stands in
    for what needs a GPU: pinned host memory (allocated unpinned, remembered) and copies from the model's
    ``meta`` device back to the host (zeros of the right shape). ``copies``: (non_blocking, pinned) of
    each host -> device copy."""

    def __init__(self):
        super().__init__()
        self.pinned: set[int] = set()
        self.copies: list[tuple[bool, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs.get("pin_memory"):
            out = func(*args, **{**kwargs, "pin_memory": False})
            self.pinned.add(out.data_ptr())
            return out
        if func is aten.is_pinned.default:
            return args[0].data_ptr() in self.pinned
        if func is aten._pin_memory.default:
            out = args[0].clone()
            self.pinned.add(out.data_ptr())
            return out
        dst = kwargs.get("device") or next((a for a in args[1:] if isinstance(a, torch.device)), None)
        if func.overloadpacket in (aten._to_copy, aten.to) and dst is not None:
            src, dst = args[0].device, torch.device(dst)
            if src.type == "cpu" and dst.type != "cpu":
                self.copies.append((bool(kwargs.get("non_blocking")), args[0].data_ptr() in self.pinned))
            if src.type == "meta" and dst.type == "cpu":  # "copy back": the values are not what is tested
                return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
            return func(*args, **kwargs)
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        devices = {t.device for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
        if len(devices) > 1:
            raise AssertionError(f"{func} mixes devices {sorted(map(str, devices))}")
        return func(*args, **kwargs)


def _on_meta(model) -> BaseTagger:
    return _tagger(model, device="meta", pin_memory=True)  # what CUDA does: pinned, non-blocking


@pytest.mark.parametrize("name", ["ram_test", "ram_plus_test", "cnn_tagger_tiny"])
def test_every_stage_call_keeps_tensors_on_the_models_device(name):
    """The model on ``meta`` (a device that holds no data, like a GPU seen from the host): a batch, a
    class index, a cached query or a threshold left on the host makes an op mix devices and fails."""
    model = create_model(name, **({"num_classes": 12, "widths": [8, 8, 8, 8]} if name.startswith("cnn")
                                  else {**RAM_ARGS, **({"descriptions_per_class": 3} if "plus" in name else {})}))
    if hasattr(model, "for_inference"):
        model = model.eval().for_inference()
    tagger = _on_meta(model)
    assert next(tagger.model.parameters()).device.type == "meta"
    images = _images(3)
    guard = DeviceGuard()
    with guard:
        s, maps = tagger.scores(images, attention=True)
        tagger.scores_for(images, [[0, 3], [5], [1]], attention=True)
        tagger.crop_scores(images, [0, 3, 5])
        feats = tagger.embed(images)
        if tagger.fully_convolutional:
            tagger.crop_scores([im.resize((24, 16)) for im in images], [0, 1, 2], native=True)
        # evidence.v1's shared forwards, from decode workers' uint8 pixels
        pixels = [tagger.prepare(im) for im in images]
        fused = tagger.scores_then_maps(pixels, lambda i, s: [0, 3] if i else [5])
        f2, own = tagger.embed_and_score(pixels, [0, 3, 5])
    assert s.shape == (3, 14) and maps.shape[:2] == (3, 14) and feats.shape == (3, tagger.model.cfg.label_dim)
    assert [c for _, c, _ in fused] == [[5], [0, 3], [0, 3]] and [m.shape[0] for _, _, m in fused] == [1, 2, 2]
    assert f2.shape == feats.shape and own.shape == (3,)
    assert guard.copies and all(c == (True, True) for c in guard.copies)  # pinned, non-blocking, every batch


def test_an_input_batch_left_on_the_host_is_caught():
    tagger = _on_meta(_model("ram_test"))
    tagger.engine.to_device = lambda x: x  # the mistake: the batch never goes to the model's device
    with pytest.raises((AssertionError, RuntimeError), match="device"), DeviceGuard():
        tagger.scores(_images(2))
