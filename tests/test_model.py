"""RAM / RAM++: official key layout, golden logits, strict loading, preprocessing."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from model.preprocess import to_tensor
from model.checkpoint import CheckpointError, checkpoint_filter_fn, load_checkpoint, resize_rel_pos_table
from model.registry import create_model, list_models

GOLDEN_MODELS = [("ram", "ram_test", "tiny_ram.pth"), ("ram_plus", "ram_plus_test", "tiny_ram_plus.pth")]


def test_entrypoints_are_pinned():
    assert list_models() == ["cnn_tagger_tiny", "ram_plus_swin_l_384", "ram_plus_test", "ram_swin_l_384", "ram_test"]


@pytest.mark.parametrize("name, caption", [("ram_swin_l_384", False), ("ram_swin_l_384", True),
                                           ("ram_plus_swin_l_384", False)])
def test_full_size_state_dict_equals_official_manifest(shared, name, caption):
    with torch.device("meta"):
        model = create_model(name, **({"caption_branch": True} if caption else {}))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    manifest = json.loads((shared / "ref/ram/manifests" / f"{name}.state_dict.json").read_text())
    ref = {k: v["shape"] for k, v in manifest["state_dict"].items()
           if caption or not k.startswith(("tag_encoder.", "text_decoder."))}  # tagging-only: no caption branch
    assert list(ours) == list(ref)
    assert ours == ref
    if caption or name == "ram_plus_swin_l_384":
        assert sum(p.numel() for p in model.parameters()) == manifest["total_parameters_unique"]


def test_golden_ram_with_caption_branch_loads_every_key_with_official_ties(shared):
    g = shared / "ref/ram/golden"
    ref = json.loads((g / "tiny_ram.state_dict.json").read_text())["state_dict"]
    model = create_model("ram_test", caption_branch=True, text_layers=3, text_vocab=1024,
                         pretrained=str(g / "tiny_ram.pth")).eval()
    sd = model.state_dict()
    assert {k: list(v.shape) for k, v in sd.items()} == {k: v["shape"] for k, v in ref.items()}
    assert list(sd) == list(ref)
    tied = {k: v["tied_to"] for k, v in ref.items() if "tied_to" in v}
    assert len(tied) == 34 and all(sd[k].data_ptr() == sd[t].data_ptr() for k, t in tied.items())
    ckpt = torch.load(g / "tiny_ram.pth", weights_only=True)["model"]
    assert all(torch.equal(sd[k], ckpt[k]) for k in ckpt if k.startswith(("tag_encoder.", "text_decoder.")))
    golden = torch.load(g / "golden_outputs.pt", weights_only=True)["ram"]
    pixels = torch.load(g / "input.pt", weights_only=True)["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(model(pixels), golden["logits"], atol=1e-4, rtol=1e-4)


def test_caption_branch_is_ram_only():
    with pytest.raises(ValueError, match="RAM only"):
        create_model("ram_plus_test", caption_branch=True)


@pytest.mark.parametrize("key, name, ckpt", GOLDEN_MODELS)
def test_golden_checkpoints_reproduce_official_logits_and_tags(shared, key, name, ckpt):
    g = shared / "ref/ram/golden"
    golden = torch.load(g / "golden_outputs.pt", weights_only=True)[key]
    pixels = torch.load(g / "input.pt", weights_only=True)["pixel_values"]
    model = create_model(name, pretrained=str(g / ckpt)).eval()
    model.set_thresholds(float(x) for x in (g / "ram_tag_list_threshold.txt").read_text().split())
    with torch.no_grad():
        emb = model.image_embeds(pixels)
        logits = model(pixels)
    torch.testing.assert_close(emb, golden["image_embeds"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, golden["logits"], atol=1e-4, rtol=1e-4)
    _, tags = model.generate_tag(pixels)
    assert torch.equal(tags.float(), golden["targets"])


def test_golden_swin_intermediates(shared):
    g = shared / "ref/ram/golden"
    golden = torch.load(g / "golden_outputs.pt", weights_only=True)["ram"]
    pixels = torch.load(g / "input.pt", weights_only=True)["pixel_values"]
    model = create_model("ram_test", pretrained=str(g / "tiny_ram.pth")).eval()
    ve = model.visual_encoder
    with torch.no_grad():
        x = ve.patch_embed(pixels)
        torch.testing.assert_close(x, golden["swin_patch_embed"], atol=1e-4, rtol=1e-4)
        for i, layer in enumerate(ve.layers):
            x = layer(x)
            torch.testing.assert_close(x, golden[f"swin_layer{i}"], atol=1e-4, rtol=1e-4)


def test_preprocessing_matches_official_input(shared):
    g = shared / "ref/ram/golden"
    ref = torch.load(g / "input.pt", weights_only=True)
    cfg = create_model("ram_test").cfg
    for i, name in enumerate(ref["names"]):
        img = Image.fromarray(np.load(g / f"{name}.npy"))
        assert torch.equal(to_tensor(img, cfg), ref["pixel_values"][i])


def _tiny_state():
    model = create_model("ram_test")
    return model, {"model": {k: v.clone() for k, v in model.state_dict().items()}}


def test_filter_is_pure_and_load_is_strict():
    model, ckpt = _tiny_state()
    before = {k: v.clone() for k, v in ckpt["model"].items()}
    ckpt["model"]["tag_encoder.encoder.layer.0.x"] = torch.zeros(1)
    ckpt["model"]["text_decoder.bert.embeddings.position_ids"] = torch.zeros(1, 512, dtype=torch.long)
    del ckpt["model"]["visual_encoder.layers.0.blocks.1.attn_mask"]  # a checkpoint may lack buffers
    out = checkpoint_filter_fn(ckpt, model)
    assert "tag_encoder.encoder.layer.0.x" not in out and "visual_encoder.layers.0.blocks.1.attn_mask" in out
    assert all(torch.equal(before[k], ckpt["model"][k]) for k in ckpt["model"] if k in before)
    load_checkpoint(create_model("ram_test"), ckpt)


def test_legacy_vision_multi_name_is_renamed():
    model, ckpt = _tiny_state()
    sd = {k.replace("tagging_head.", "vision_multi."): v for k, v in ckpt["model"].items()}
    fresh = load_checkpoint(create_model("ram_test"), sd)
    assert torch.equal(fresh.tagging_head.encoder.layer[0].crossattention.self.query.weight,
                       model.tagging_head.encoder.layer[0].crossattention.self.query.weight)


def test_shape_mismatch_names_key_and_both_shapes():
    _, ckpt = _tiny_state()
    ckpt["model"]["fc.weight"] = torch.zeros(1, 32)
    with pytest.raises(CheckpointError, match=r"fc.weight: checkpoint shape \[1, 32\] != model shape \[1, 64\]"):
        load_checkpoint(create_model("ram_test"), ckpt)


def test_missing_label_embed_is_an_error_not_zeros():
    _, ckpt = _tiny_state()
    del ckpt["model"]["label_embed"]
    with pytest.raises(CheckpointError, match="label_embed"):
        load_checkpoint(create_model("ram_test"), ckpt)


def test_relative_position_tables_resize_from_window_7_to_12():
    model12 = create_model("ram_test", window_size=12, image_size=384)
    _, ckpt = _tiny_state()  # window 7 tables: [169, heads]
    out = checkpoint_filter_fn(ckpt, model12)
    t = out["visual_encoder.layers.0.blocks.0.attn.relative_position_bias_table"]
    assert t.shape == (529, 1)
    src = ckpt["model"]["visual_encoder.layers.0.blocks.0.attn.relative_position_bias_table"]
    # the corners of the grid are kept by an align_corners resize
    assert torch.allclose(t[0], src[0]) and torch.allclose(t[-1], src[-1])
    assert resize_rel_pos_table(src, 169).allclose(src)


def test_class_subset_gives_the_same_logits_as_the_full_set():
    torch.manual_seed(0)
    for name in ("ram_test", "ram_plus_test"):
        model = create_model(name).eval()
        for p in model.parameters():
            p.data.normal_(0, 0.2)
        x = torch.randn(2, 3, 224, 224)
        sub = torch.tensor([3, 17, 42])
        with torch.no_grad():
            torch.testing.assert_close(model(x, sub), model(x)[:, sub], atol=1e-5, rtol=1e-5)


def test_tagger_matches_generate_tag_and_keeps_scores(shared):
    """The stages' tagger (stages/vision/tagger.BaseTagger on model/infer.Inference, the one inference path)
    gives the official scores and tags, also with the head in chunks and for a subset of classes."""
    from stages.vision.tagger import BaseTagger

    g = shared / "ref/ram/golden"
    names = (g / "ram_tag_list.txt").read_text().splitlines()
    zh = (g / "ram_tag_list_chinese.txt").read_text(encoding="utf-8").splitlines()
    golden = torch.load(g / "golden_outputs.pt", weights_only=True)
    for key, name, ckpt in GOLDEN_MODELS:
        model = create_model(name, pretrained=str(g / ckpt))
        model.set_thresholds(float(x) for x in (g / "ram_tag_list_threshold.txt").read_text().split())
        imgs = [Image.fromarray(np.load(g / f"{n}.npy")) for n in ("chelsea", "coffee")]
        tagger = BaseTagger.from_model(model, names, batch_size=2, head_chunk=1)
        scores = tagger.scores(imgs)
        torch.testing.assert_close(torch.from_numpy(scores), golden[key]["scores"], atol=1e-4, rtol=1e-4)
        for s, t in zip(scores, golden[key]["targets"]):
            fired = np.nonzero(s > tagger.threshold_of_tag)[0].tolist()  # the official rule: strictly above
            assert [names[i] for i in fired] == [names[i] for i in torch.nonzero(t).flatten().tolist()]
            assert [zh[i] for i in fired] == [zh[i] for i in torch.nonzero(t).flatten().tolist()]
        sub = BaseTagger.from_model(model, names, [names[i] for i in (2, 11, 27)]).scores(imgs[:1])[0]
        torch.testing.assert_close(torch.from_numpy(sub), golden[key]["scores"][0, [2, 11, 27]], atol=1e-4, rtol=1e-4)


def test_fused_attention_equals_the_explicit_softmax():
    """scaled_dot_product_attention (the default) computes what the explicit softmax does: Swin windows
    with the relative position bias and the shifted-window mask, the BERT heads with padding and causal
    masks, whole RAM / RAM++ models, and the attention maps the grounding step reads."""
    from model.bert import TextDecoder
    from model.ram import set_fused_attention
    from model.swin import SwinBlock

    torch.manual_seed(0)
    block = SwinBlock(dim=16, resolution=8, heads=2, ws=4, shift=2).eval()  # shifted: the mask is in use
    torch.nn.init.normal_(block.attn.relative_position_bias_table, std=1.0)
    x = torch.randn(3, 64, 16)
    dec = TextDecoder(vocab_size=50, hidden=16, layers=2, heads=2, inter=32, kv_width=24, max_positions=16).eval()
    ids, kv = torch.randint(0, 50, (2, 7)), torch.randn(2, 5, 24)
    keep, kv_keep = torch.tensor([[1] * 7, [1] * 4 + [0] * 3]), torch.tensor([[1] * 5, [1, 1, 0, 0, 0]])
    with torch.no_grad():
        want = (set_fused_attention(block, False)(x), set_fused_attention(dec, False)(ids, keep, kv, kv_keep))
        got = (set_fused_attention(block, True)(x), set_fused_attention(dec, True)(ids, keep, kv, kv_keep))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    for name in ("ram_test", "ram_plus_test"):
        model = create_model(name).eval()
        for p in model.parameters():
            p.data.normal_(0, 0.2)
        px = torch.randn(2, 3, 224, 224)
        with torch.no_grad():
            want_logits, want_attn = set_fused_attention(model, False)(px, return_attn=True)
            got_logits, got_attn = set_fused_attention(model, True)(px, return_attn=True)
            torch.testing.assert_close(model(px), want_logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got_attn, want_attn, atol=1e-5, rtol=1e-5)
        assert got_attn.shape == (2, 2, 50, 50)  # [B, heads, classes, 1 + 7x7 tokens]
