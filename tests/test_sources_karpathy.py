"""diffusion_model.sources.karpathy: entries, sentences (raw or tokens), filepath, splits, numbering."""

import json

import pytest

from diffusion_model.sources.base import SourceOptions
from diffusion_model.sources.karpathy import is_karpathy, karpathy_entry, open_karpathy
from utils.cli import UsageError


def test_entry_takes_raw_else_tokens_and_joins_filepath():
    entry = karpathy_entry(0, {"filename": "1.jpg", "filepath": "val2014", "sentences": [
        {"raw": "A plane."}, {"tokens": ["a", "runway"]}, "junk"]})
    assert entry["name"] == "val2014/1.jpg" and entry["captions"] == ["A plane.", "a runway", None]
    assert karpathy_entry(3, {"split": "train"})["failure"] == ("bad_entry", "images[3] has no filename")
    assert karpathy_entry(4, 7)["failure"][0] == "bad_entry"
    assert not is_karpathy({"images": {}}) and is_karpathy({"images": []})


def test_rows_follow_the_file_order_within_the_split(tmp_path):
    (tmp_path / "imgs").mkdir()
    for name in ("b.jpg", "a.jpg"):
        (tmp_path / "imgs" / name).write_bytes(name.encode())
    doc = {"images": [{"filename": "b.jpg", "split": "train", "sentences": [{"raw": "bee"}]},
                      {"filename": "x.jpg", "split": "test", "sentences": [{"raw": "ex"}]},
                      {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "ay"}]}]}
    (tmp_path / "d.json").write_text(json.dumps(doc))
    source = open_karpathy(tmp_path / "d.json", doc, SourceOptions())
    rows = list(source.rows())
    assert [(r.number, r.filename, r.image, r.captions) for r in rows] == [
        (1, "b.jpg", b"b.jpg", ["bee"]), (2, "a.jpg", b"a.jpg", ["ay"])]
    assert source.details["images_dir"] == str(tmp_path / "imgs") and source.details["splits_not_read"] == {"test": 1}
    assert [r.number for r in source.rows(limit=1)] == [1]
    assert open_karpathy(tmp_path / "d.json", doc, SourceOptions(split="test")).rows_total == 1


def test_entries_without_a_split(tmp_path):
    """In a file with splits, an entry with none is a failed row of the split read; a file without any is read whole."""
    doc = {"images": [{"filename": "a.jpg", "split": "train", "sentences": []},
                      {"filename": "b.jpg", "sentences": []}, {"filename": "c.jpg", "split": "test", "sentences": []}]}
    source = open_karpathy(tmp_path / "d.json", doc, SourceOptions())
    assert [(r.filename, r.failure and r.failure[0]) for r in source.rows()][1] == ("b.jpg", "bad_entry")
    assert source.rows_total == 2
    plain = {"images": [{"filename": "a.jpg", "sentences": []}, {"filename": "b.jpg", "sentences": []}]}
    source = open_karpathy(tmp_path / "d.json", plain, SourceOptions())
    assert (source.rows_total, source.split, source.label()) == (2, None, "karpathy")
    with pytest.raises(UsageError, match="carry no split"):
        open_karpathy(tmp_path / "d.json", plain, SourceOptions(split="test"))


def test_a_split_with_no_entries_is_a_usage_error_saying_what_is_there(tmp_path):
    doc = {"images": [{"filename": "a.jpg", "split": "train", "sentences": []},
                      {"filename": "b.jpg", "split": "restval", "sentences": []}, "junk"]}
    with pytest.raises(UsageError, match=r"--split test: .* has no test entries \(it has 1 'train', 1 'restval'\)"):
        open_karpathy(tmp_path / "d.json", doc, SourceOptions(split="test"))


def test_sidecars_give_karpathy_rows_their_metadata(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(b"a")
    (tmp_path / "imgs" / "a.json").write_text(json.dumps({"gsd": 0.3, "sensor_platform_name": "QUICKBIRD02"}))
    doc = {"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"raw": "a field ."}]}]}
    rows = list(open_karpathy(tmp_path / "d.json", doc, SourceOptions(metadata_sidecars=True)).rows())
    assert rows[0].metadata == {"gsd": 0.3, "sensor": "QUICKBIRD02"}
    assert next(iter(open_karpathy(tmp_path / "d.json", doc, SourceOptions()).rows())).metadata is None
