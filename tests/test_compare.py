"""The recorded-runs registry (seglab/recorded/<chapter>.json) and the family comparisons (issue #32)."""
import json

import pytest

from seglab.cli import CHAPTERS
from seglab.records import RecordError, load_records, records_dir, save_records, upsert, validate, validate_row


def test_every_chapter_has_a_valid_records_file():
    for ch in CHAPTERS:
        doc = load_records(ch.slug)              # validated on load
        full = [r for r in doc["rows"] if r["kind"] == "seglab" and r["profile"] == "full"]
        assert full, f"{ch.slug}: no full-profile row (a GPU run nobody recorded says 'not recorded')"
        assert all(r["status"] == "recorded" or (r["value"] is None and r["hardware"] == "not recorded") for r in full)
        for r in doc["rows"]:
            if r["kind"] == "paper":
                assert r["source"].strip() and isinstance(r["unverified"], bool)


def test_unverified_paper_numbers_stay_unverified():
    "A number the chapter marks not verified / recalled / [mem] / [unverified] is never stored as verified."
    for ch in CHAPTERS:
        for r in load_records(ch.slug)["rows"]:
            if r["kind"] == "paper" and any(t in r["source"] for t in ("unverified", "[mem]", "recalled", "not verified")):
                assert r["unverified"], (ch.slug, r["method"], r["metric"], r["source"])


def good_row(**kw):
    row = dict(kind="seglab", method="HP", metric="mIoU", value=0.3, status="recorded", source="seglab tour",
               hardware="CPU, 2 cores", data="ToyWorld", profile="toy", seed=0, wall_s=4.0, commit="abc1234")
    return {**row, **kw}


@pytest.mark.parametrize("bad", [dict(value="0.3"), dict(value=float("nan")), dict(commit=None), dict(wall_s=None),
                                 dict(status="done"), dict(profile="gpu"), dict(seed=1.5), dict(kind="paper"),
                                 dict(status="not recorded"), dict(hardware=""), dict(walltime=3.0)])
def test_the_validator_fails_on_a_bad_row(bad):
    validate_row(good_row())
    with pytest.raises(RecordError):
        validate_row(good_row(**bad))


def test_a_bad_row_in_a_file_is_named_on_load(tmp_path):
    doc = upsert(load_records("hp"), good_row())
    save_records(doc, tmp_path)
    path = tmp_path / "hp.json"
    data = json.loads(path.read_text())
    i = next(i for i, r in enumerate(data["rows"]) if r["source"] == "seglab tour")
    data["rows"][i]["value"] = None                            # a recorded run without its value
    path.write_text(json.dumps(data))
    with pytest.raises(RecordError, match=f"hp.json row {i}"):
        load_records("hp", tmp_path)
    with pytest.raises(RecordError):
        validate(dict(data, schema="something else"))
    assert (records_dir() / "hp.json").is_file()


# --- the converters the saliency (95) and weak-supervision (96) comparisons share ---------------------------------

import torch

from seglab.compare import saliency_scores, scribbles_from_masks, shape_labels


def square_masks(n=3, size=32):
    m = torch.zeros(n, size, size)
    m[:, 8:24, 6:22] = 1
    return m


def test_scribbles_from_masks_stay_on_their_side_and_follow_the_seed():
    m = square_masks()
    s = scribbles_from_masks(m, seed=0)
    assert s.shape == m.shape and s.dtype == torch.int64 and set(s.unique().tolist()) <= {0, 1, 255}
    assert (m[s == 1] == 1).all() and (m[s == 0] == 0).all()          # no stroke crosses the object's border
    assert all((si == 1).any() and (si == 0).any() for si in s)         # every image gets both kinds of stroke
    assert (s == 0).sum() > (s == 1).sum()                              # two long background strokes, one short object stroke
    assert torch.equal(s, scribbles_from_masks(m, seed=0)) and not torch.equal(s, scribbles_from_masks(m, seed=1))
    with pytest.raises(ValueError, match="N,H,W"):
        scribbles_from_masks(m[0])


def test_saliency_scores_rank_the_object_against_the_distractor():
    m = square_masks()
    d = torch.zeros_like(m)
    d[:, :, 26:] = 1
    perfect = saliency_scores(m, m, d)
    assert perfect["fm"] > 0.99 and perfect["mae"] < 1e-6 and perfect["sm"] > 0.99 and perfect["distractor_auroc"] == 1.0
    assert saliency_scores(d, m, d)["distractor_auroc"] == 0.0          # a map that lights the distractor up
    both = saliency_scores(m + d, m, d)                                 # a single-image map: both objects alike
    assert both["distractor_auroc"] == 0.5 and both["fm"] < perfect["fm"]
    assert "distractor_auroc" not in saliency_scores(m, m)


def test_shape_labels_map_every_class_to_its_shape():
    from seglab.toyworld import CLASS_NAMES, NUM_STUFF, SHAPES, THING_ATTRS
    y = torch.arange(len(CLASS_NAMES))
    got = shape_labels(y)
    assert (got[:NUM_STUFF] == 0).all()
    for c in range(NUM_STUFF, len(CLASS_NAMES)):
        assert got[c] == 1 + SHAPES.index(THING_ATTRS[CLASS_NAMES[c]][0]), CLASS_NAMES[c]
    assert shape_labels(torch.tensor([[255, 4]])).tolist() == [[255, 1]]
