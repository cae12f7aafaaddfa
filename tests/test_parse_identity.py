"""Our batched parse equals stock sng_parser (one sentence at a time, pronoun filter applied)."""
import json

import pytest


def _real_captions(shared, n_cc3m: int = 1200, n_flickr: int = 1000) -> list[str]:
    caps = []
    with open(shared / "data" / "captions" / "cc3m_val.tsv", encoding="utf-8") as f:
        for line in f:
            caps.append(line.split("\t")[0])
            if len(caps) >= n_cc3m:
                break
    data = json.loads((shared / "data" / "captions" / "flickr30k_karpathy_test.json").read_text())
    caps += [c for item in data for c in item["captions"]][:n_flickr]
    return caps


@pytest.mark.shared
@pytest.mark.slow
def test_batched_parse_equals_stock_sng_parser_on_real_captions(shared, sng):
    from tagset.sng import DEFAULT_MODEL, drop_pronouns, stock_backend_class

    captions = _real_captions(shared)
    assert len(captions) >= 2000
    stock = stock_backend_class()(model=DEFAULT_MODEL)  # loads its own full pipeline (NER on)
    mismatches = []
    ours = list(sng.parse(captions))
    for text, (graph, _) in zip(captions, ours):
        ref, doc = stock.parse(text, return_doc=True)
        ref = drop_pronouns(ref, doc)
        if ref != graph:
            mismatches.append(text)
    assert not mismatches, f"{len(mismatches)} captions differ, e.g. {mismatches[:3]}"
