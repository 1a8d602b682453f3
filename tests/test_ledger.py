"""diffusion_model.ledger: where each source's rows go, re-runs finding their own place, refusals."""

import json

import pytest

from diffusion_model.ledger import other_failures, place
from utils.cli import UsageError

IMAGE = {"resolution": 32, "resize_mode": "center_crop", "jpeg_quality": 95, "max_pixels": 100}


def record(name, form="csv", split=None):
    """A source record as Source.record() gives it."""
    return {"format": form, "inputs": [f"/data/{name}"], "split": split, "split_names": [], "columns": {}}


def placed(path, name, rows, append, **kwargs):
    """Place a source and store the settings document as prepare_output would."""
    spot = place(path, IMAGE, record(name, **kwargs), None, rows, append, False)
    path.write_text(json.dumps(spot.document))
    return spot


def test_appended_sources_follow_each_other_and_reruns_keep_their_place(tmp_path):
    path = tmp_path / "create_settings.json"
    assert (placed(path, "a", 10, False).first_row, placed(path, "b", 5, True).first_row) == (1, 11)
    third = placed(path, "c", 7, True, form="karpathy", split="train")
    assert (third.first_row, third.last_row, third.offset) == (16, 22, 15)
    assert placed(path, "b", 5, True).first_row == 11, "the same append again resumes, not a fourth source"
    assert placed(path, "c", 7, True, form="karpathy", split="test").first_row == 23, "another split is another source"
    assert placed(path, "a", 10, False).document["sources"][1]["first_row"] == 11, "the first command keeps the rest"
    assert [s["first_row"] for s in json.loads(path.read_text())["sources"]] == [1, 11, 16, 23]


def test_a_grown_source_may_not_run_into_the_next(tmp_path):
    path = tmp_path / "create_settings.json"
    placed(path, "a", 10, False)
    placed(path, "b", 5, True)
    with pytest.raises(UsageError, match="now has 11 rows"):
        placed(path, "a", 11, False)
    assert placed(path, "b", 50, True).last_row == 60, "the last source may grow"
    assert place(path, IMAGE, record("z"), None, 99, False, False).guarded["inputs"] == ["/data/z"], (
        "another first source is left to the settings guard, which names what differs")
    spot = place(path, IMAGE, record("a"), None, 11, False, True)
    assert [s["inputs"] for s in spot.document["sources"]] == [["/data/a"]], "--overwrite drops the appended"


def test_append_needs_a_recorded_first_source(tmp_path):
    path = tmp_path / "create_settings.json"
    assert place(path, IMAGE, record("a"), None, 3, True, False).first_row == 1, "nothing there yet: it is the first"
    path.write_text(json.dumps({**IMAGE, "inputs": ["/old.parquet"], "image_column": "image"}))
    with pytest.raises(UsageError, match="older create.py"):
        place(path, IMAGE, record("b"), None, 3, True, False)


def test_other_failures_leave_out_this_runs_rows(tmp_path):
    report = {"failures": [{"row": 2}, {"row": 12}], "other_sources_failures": [{"row": 30}]}
    (tmp_path / "r.json").write_text(json.dumps(report))
    assert other_failures(tmp_path, ("missing.json", "r.json"), range(11, 20)) == [{"row": 2}, {"row": 30}]
    assert other_failures(tmp_path, ("missing.json",), range(1, 5)) == []
