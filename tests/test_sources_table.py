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


def test_metadata_columns_are_read_per_row_and_kept_out_of_the_source_identity(tmp_path):
    index = write(tmp_path / "i.csv", "file_name,text,res,when\na.jpg,a road,0.3,2020-05-01\nb.jpg,a river,,\n")
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(b"x")
    source = open_table([index], "csv", SourceOptions(metadata_columns={"gsd": "res", "date": "when"}))
    assert [r.metadata for r in source.rows()] == [{"gsd": "0.3", "date": "2020-05-01"}, {"gsd": "", "date": ""}]
    assert source.details["columns"] == open_table([index], "csv", SourceOptions()).details["columns"], \
        "a rerun with other metadata columns is the same source (it resumes, it is not appended twice)"
    with pytest.raises(UsageError, match=r"--metadata_columns lat=latitude: 'latitude' is not a column of .*i.csv"):
        open_table([index], "csv", SourceOptions(metadata_columns={"lat": "latitude"}))


def test_jsonl_metadata_keys_keep_their_json_types(tmp_path):
    lines = [{"file_name": "a.jpg", "text": "t", "gsd": 0.5, "sensor": "naip"}, {"file_name": "a.jpg", "text": "u"}]
    index = write(tmp_path / "i.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "a.jpg").write_bytes(b"x")
    rows = open_table([index], "jsonl", SourceOptions(metadata_columns={"gsd": "gsd", "sensor": "sensor"})).rows()
    assert [r.metadata for r in rows] == [{"gsd": 0.5, "sensor": "naip"}, {"gsd": None, "sensor": None}]


def test_fmow_sidecars_beside_the_images(tmp_path):
    index = write(tmp_path / "i.csv", "file_name,text\nimgs/x_rgb.jpg,a port\nimgs/y.jpg,a dam\nimgs/z.jpg,a road\n")
    for name in ("x_rgb.jpg", "y.jpg", "z.jpg"):
        write(tmp_path / "imgs" / name, "x")
    fmow = {"gsd": 0.5, "timestamp": "2015-03-02T10:00:00Z", "cloud_cover": 3, "off_nadir_angle_dbl": 20.5,
            "sensor_platform_name": "WORLDVIEW02", "raw_location": "POLYGON ((1 2, 3 2, 3 4, 1 4, 1 2))"}
    write(tmp_path / "imgs" / "x_rgb.json", json.dumps(fmow))
    write(tmp_path / "imgs" / "y_rgb.json", json.dumps({"gsd": 2}))
    rows = list(open_table([index], "csv", SourceOptions(metadata_sidecars=True)).rows())
    assert rows[0].metadata == {"gsd": 0.5, "date": "2015-03-02T10:00:00Z", "cloud": 3, "off_nadir": 20.5,
                                "sensor": "WORLDVIEW02", "lat": 3.0, "lon": 2.0}
    assert rows[1].metadata == {"gsd": 2}, "<stem>_rgb.json when there is no <stem>.json"
    assert rows[2].metadata == {"sidecar": ("z.json", "missing")} and rows[2].failure is None, "the row is kept"
    named = open_table([index], "csv", SourceOptions(metadata_sidecars=True, metadata_columns={"gsd": "gsd"}))
    assert next(iter(named.rows())).metadata == {"gsd": 0.5}
    with pytest.raises(UsageError, match="--metadata_columns date=acquired: the sidecars have no key 'acquired'"):
        open_table([index], "csv", SourceOptions(metadata_sidecars=True, metadata_columns={"date": "acquired"}))
    bare = write(tmp_path / "bare" / "i.csv", "file_name,text\na.jpg,t\n")
    write(tmp_path / "bare" / "a.jpg", "x")
    with pytest.raises(UsageError, match="--metadata_sidecars: none of the first 1 images under .* has a sidecar"):
        open_table([bare], "csv", SourceOptions(metadata_sidecars=True))


def test_a_sidecar_outside_the_folder_or_broken_is_not_read(tmp_path):
    index = write(tmp_path / "d" / "i.csv", "file_name,text\na.jpg,t\nb.jpg,u\nc.jpg,v\n")
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        write(tmp_path / "d" / name, "x")
    write(tmp_path / "d" / "c.json", json.dumps({"gsd": 1}))
    write(tmp_path / "outside.json", json.dumps({"gsd": 9}))
    (tmp_path / "d" / "a.json").symlink_to(tmp_path / "outside.json")
    write(tmp_path / "d" / "b.json", "{broken")
    write(tmp_path / "d" / "b_rgb.json", json.dumps({"gsd": 1}))
    options = SourceOptions(metadata_sidecars=True)
    rows = list(open_table([index], "csv", options).rows())
    assert rows[0].metadata == {"sidecar": ("a.json", "missing")}, "a link out of the folder is not followed"
    assert rows[1].metadata["sidecar"][0] == "b.json" and "unreadable" in rows[1].metadata["sidecar"][1]
    assert rows[2].metadata == {"gsd": 1}
