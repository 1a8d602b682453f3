"""The create job's pieces: naming, chunking, clean-up of stale files, the settings guard."""

import json

import pytest

from diffusion_model.create_job import (SETTINGS_FILENAME, chunked, clear_images, guard_settings, image_name,
                                        plan_chunk)
from diffusion_model.parquet_source import Row
from utils.cli import UsageError


def rows_of(sizes):
    """Rows numbered from 1 whose images have the given byte sizes."""
    return [Row(i + 1, None, b"x" * size, ["a road ."]) for i, size in enumerate(sizes)]


def test_image_name_is_row_number_padded():
    assert image_name(7) == "image_000007.jpg"
    assert image_name(1234567) == "image_1234567.jpg"


def test_chunked_by_rows_and_bytes():
    by_rows = [len(c) for c in chunked(rows_of([1] * 10), max_rows=4, max_bytes=100)]
    assert by_rows == [4, 4, 2]
    by_bytes = [[r.number for r in c] for c in chunked(rows_of([40, 40, 40, 200, 10]), max_rows=10, max_bytes=100)]
    assert by_bytes == [[1, 2], [3], [4], [5]], "an oversized row travels alone, never dropped"


def test_plan_chunk_sends_only_rows_with_captions():
    rows = [Row(1, "a", b"1", [" .", "a field ."]), Row(2, "b", b"2", [" ."]), Row(3, "c", None, "a road")]
    plans, work = plan_chunk(rows, "first")
    assert [captions for _, captions in plans] == [["a field ."], [], ["a road"]]
    assert work == [(1, b"1"), (3, None)]


def test_clear_images_removes_only_our_temporaries_unless_overwriting(tmp_path):
    for name in ["image_000001.jpg", "image_000002.jpg.tmp", "notes.txt", "other.jpg.tmp"]:
        (tmp_path / name).write_bytes(b"x")
    assert clear_images(tmp_path, finished_too=False) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image_000001.jpg", "notes.txt", "other.jpg.tmp"]
    assert clear_images(tmp_path, finished_too=True) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "other.jpg.tmp"]


def test_guard_settings(tmp_path):
    wanted = {"resolution": 512, "inputs": ["/a.parquet"]}
    guard_settings(tmp_path, wanted, overwrite=False)
    (tmp_path / SETTINGS_FILENAME).write_text(json.dumps(wanted))
    guard_settings(tmp_path, wanted, overwrite=False)
    changed = {**wanted, "resolution": 256}
    with pytest.raises(UsageError, match="resolution=512"):
        guard_settings(tmp_path, changed, overwrite=False)
    guard_settings(tmp_path, changed, overwrite=True)
