"""diffusion_model.sources.table: CSV/JSONL columns, caption cells, split column, numbering across files."""

import json

import pytest

from diffusion_model.sources.base import SourceOptions
from diffusion_model.sources.table import caption_cell, open_table
from utils.cli import UsageError


def write(path, text):
    """Write a text file, making its folder; return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_caption_cell_json_list_or_plain():
    assert caption_cell('["a road", "a river"]') == ["a road", "a river"]
    assert caption_cell("[not json") == "[not json" and caption_cell("plain") == "plain" and caption_cell(None) is None


def test_columns_default_and_override(tmp_path):
    index = write(tmp_path / "i.csv", "image,caption,label\na.jpg,a road,x\n")
    source = open_table([index], "csv", SourceOptions())
    assert source.details["columns"] == {"image": "image", "caption": "caption", "split": None}
    assert open_table([index], "csv", SourceOptions(caption_column="label")).details["columns"]["caption"] == "label"
    with pytest.raises(UsageError, match="no caption column found"):
        open_table([write(tmp_path / "j.csv", "image,words\na.jpg,x\n")], "csv", SourceOptions())


def test_split_column_is_filtered_and_rows_numbered_across_files(tmp_path):
    first = write(tmp_path / "a" / "i.csv", "file_name,text,split\n1.jpg,one,train\n2.jpg,two,valid\n3.jpg,three,train\n")
    second = write(tmp_path / "b" / "i.jsonl",
                   "\n".join(json.dumps(r) for r in [{"file_name": "4.jpg", "text": "four", "split": "train"}]) + "\n")
    (tmp_path / "a" / "1.jpg").write_bytes(b"1")
    (tmp_path / "b" / "4.jpg").write_bytes(b"4")
    source = open_table([first], "csv", SourceOptions())
    assert source.rows_total == 2 and [r.captions for r in source.rows()] == ["one", "three"]
    val = open_table([first], "csv", SourceOptions(split="val"))
    assert [r.captions for r in val.rows()] == ["two"] and val.label() == "csv, split val (as 'valid' in the file)"
    rows = list(open_table([second], "jsonl", SourceOptions()).rows())
    assert [(r.number, r.image) for r in rows] == [(1, b"4")], "a JSONL resolves against its own folder"
    with pytest.raises(UsageError, match=r"--split test: .* has no test rows \(it has 2 'train', 1 'valid'\)"):
        open_table([first], "csv", SourceOptions(split="test"))
    with pytest.raises(UsageError, match="no 'split' column"):
        open_table([write(tmp_path / "c.csv", "file_name,text\nx.jpg,y\n")], "csv", SourceOptions(split="test"))


def test_a_row_of_bad_bytes_fails_alone(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"A")
    index = tmp_path / "i.csv"
    index.write_bytes(b"file_name,text\na.jpg,a road\n\xff\xfe.jpg,bad bytes\n")
    rows = list(open_table([index], "csv", SourceOptions()).rows())
    assert [(r.image, r.failure and r.failure[0]) for r in rows] == [(b"A", None), (None, "missing_image")]
