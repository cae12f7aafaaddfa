"""RAM's caption branch: prompt-only target masking, a causal decoder, and a branch that learns."""
import torch

from model.caption import CaptionTokenizer, clean_caption
from model.registry import create_model
from model.objective import caption_batch


def test_targets_hide_the_prompt_and_padding_only():
    tok = CaptionTokenizer()
    assert len(tok) == 30524 and tok.bos_token_id == 30522 and tok.enc_token_id == 30523
    caps = ["A red ball, next to a blue box.", "Two cats!"]
    batch = tok.captions(caps)
    assert torch.equal(batch.ids[:, 0], torch.full((2,), tok.bos_token_id))
    for row, t, cap in zip(batch.ids, batch.targets, caps):
        kept = t[t != -100]
        # every word of the caption (and the closing [SEP]) is a target, nothing of the prompt is
        assert tok.tok.decode(kept[:-1]) == clean_caption(cap)
        assert int(kept[-1]) == tok.sep_token_id
        assert tok.tok.decode(row[1:tok.prompt_length]) == tok.prompt.strip()
        assert bool((t[:tok.prompt_length] == -100).all())


def test_tag_text_starts_with_enc_and_joins_tags():
    tok = CaptionTokenizer(max_length=16)
    batch = tok.tags([["dog", "grass"], []])
    assert batch.ids.shape == (2, 16) and bool((batch.ids[:, 0] == tok.enc_token_id).all())
    assert tok.tok.decode(batch.ids[0][batch.mask[0].bool()][1:-1]) == "dog | grass"


def test_clean_caption_follows_the_official_rules():
    assert clean_caption('A "big" dog; runs (fast)!') == "a big dog runs fast"
    assert len(clean_caption(" ".join(["w"] * 50)).split()) == 30


def _captioner():
    torch.manual_seed(0)
    return create_model("ram_test", caption_branch=True, num_classes=4, image_size=64, window_size=4,
                        embed_dim=8, head_hidden=32, head_intermediate=64, text_layers=2)


def test_decoder_is_causal():
    model = _captioner().eval()
    tok = CaptionTokenizer()
    caps = tok.captions(["a red ball on grass", "a red ball on snow"])
    mem = torch.randn(2, 5, 32)
    with torch.no_grad():
        logits = model.text_decoder(caps.ids, caps.mask, mem[:1].expand(2, -1, -1))
    last = caps.ids.shape[1] - 2  # the word that differs, before [SEP]
    torch.testing.assert_close(logits[0, :last], logits[1, :last])
    assert not torch.allclose(logits[0, last:], logits[1, last:])


def test_caption_branch_learns_captions_from_tags():
    """Two images, two tag sets, two captions: after training, greedy decoding writes each caption."""
    model = _captioner()
    tok = CaptionTokenizer(max_length=16)
    pixels = torch.randn(2, 3, 64, 64)
    tags = tok.tags([["ball", "grass"], ["boat", "water"]])
    caps = tok.captions(["a ball on the grass", "a boat on the water"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        loss = model.caption_loss(model.image_embeds(pixels), tags, caps, label_smoothing=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.1 * losses[0]
    model.eval()
    assert model.generate_caption(pixels, tags, tok, max_new_tokens=8) == ["a ball on the grass", "a boat on the water"]


def test_caption_batch_uses_the_chosen_captions_own_tags():
    rows = [{"caption": ["a dog", "a cat on grass"], "parse_label_id": [[0], [1, 2]], "union_label_id": [0, 1, 2]},
            {"caption": ["a boat"], "parse_label_id": [], "union_label_id": [3]}]
    names = ["dog", "cat", "grass", "boat"]
    seen = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        tags, caps = caption_batch(rows, names, g)
        assert (caps[0], tags[0]) in [("a dog", ["dog"]), ("a cat on grass", ["cat", "grass"])]
        assert (caps[1], tags[1]) == ("a boat", ["boat"])
        seen.add(caps[0])
    assert len(seen) == 2
