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
