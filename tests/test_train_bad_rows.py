"""trainer/bad_rows.py: a bad row is recorded once and replaced by the next readable row; bad_rows.json names each
row's file and reason, gathered at each write and carried across a resume."""

import json
import logging

import pytest
from conftest import BROKEN_ROWS

from trainer.bad_rows import READ_AGAIN_REASON, BadRows, BadRowsReport
from utils.cli import UsageError


def loader_of(values: list):
    """load(row) over values: a ValueError stands for a bad row, any other exception for a bug."""
    def load(row: int):
        """values[row], or what it holds raised."""
        if isinstance(values[row], Exception):
            raise values[row]
        return values[row]

    return load


def test_each_bad_row_gets_the_next_readable_one_and_is_recorded_once(caplog):
    """Rows 1 and 3 bad: 1 gets 2, 3 wraps round to 0; each warns once however often it is met (a cache build may
    record it again); a row recorded without being read (a resume, the cache's mark) is not read; an error outside
    the given types stops; with no readable row, one usage line."""
    caplog.set_level(logging.WARNING, logger="rsdiff")
    bad_rows = BadRows(4, (ValueError,))
    load = loader_of(["a", ValueError("row 1 is junk"), "c", ValueError("row 3 is junk")])
    assert [bad_rows.first_good(row, load) for row in (0, 1, 2, 3, 1, 3)] == ["a", "c", "c", "a", "c", "a"]
    bad_rows.record(3, ValueError("met again"))
    assert bad_rows.flagged() == [1, 3]
    assert caplog.text.count("cannot be read, so the next readable row stands in") == 2
    assert "row 1 is junk" in caplog.text and "row 3 is junk" in caplog.text and "met again" not in caplog.text
    bad_rows.record(2, ValueError("marked unreadable by the latent cache"))
    assert bad_rows.first_good(1, load) == "a"
    with pytest.raises(KeyError):
        BadRows(2, (ValueError,)).first_good(0, loader_of([KeyError("a bug"), "b"]))
    with pytest.raises(UsageError, match="none of the 2 training rows can be read"):
        BadRows(2, (ValueError,)).first_good(1, loader_of([ValueError("x"), ValueError("y")]))


def broken_dataset(folder):
    """The training dataset of the broken images folder, as train_text_to_image.py builds it (32 px)."""
    from stand_in.tiny_model import build_tokenizer
    from trainer import data
    from trainer.args import parse_args

    args = parse_args(["--pretrained_model_name_or_path", "base", "--train_data_dir", str(folder),
                       "--resolution", "32"])
    return data.build_train_dataset(args, build_tokenizer(), seed=0)


def test_report_names_each_unreadable_image_with_its_reason_and_resume_keeps_them(broken_images_dir, tmp_path):
    """bad_rows.json: count, reasons, each row's image named as metadata.jsonl names it, Pillow's complaint; a
    flagged row that reads again says so; a resumed run keeps the rows of the same files, a fresh one does not."""
    from accelerate import Accelerator

    dataset = broken_dataset(broken_images_dir)
    for row in range(len(dataset)):
        dataset[row]
    dataset.bad_rows.flags[3] = 1  # as if a passing I/O error had hit row 3
    BadRowsReport(dataset, tmp_path, 2).write(Accelerator(cpu=True), final=True)
    written = json.loads((tmp_path / "bad_rows.json").read_text())
    assert written["count"] == 3
    assert written["by_reason"] == {"truncated": 1, "undecodable": 1, READ_AGAIN_REASON: 1}
    entries = {entry["row"]: entry for entry in written["rows"]}
    for row, reason in BROKEN_ROWS.items():
        assert (entries[row]["reason"], entries[row]["file"]) == (reason, f"images/{row}.jpg")
    assert "image file is truncated" in entries[1]["detail"] and "cannot identify image file" in entries[2]["detail"]
    assert entries[3]["file"] == "images/3.jpg"

    written["rows"][0]["file"] = "images/another.jpg"  # row 1's entry no longer matches its file
    (tmp_path / "bad_rows.json").write_text(json.dumps(written))
    dataset.bad_rows.flags.zero_()  # a new run's record
    BadRowsReport(dataset, tmp_path, 2).restore(resumed=False)
    assert dataset.bad_rows.flagged() == []
    BadRowsReport(dataset, tmp_path, 2).restore(resumed=True)
    assert dataset.bad_rows.flagged() == [2, 3]
