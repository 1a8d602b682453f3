"""Parquet streaming: shard resolution and order, column detection and overrides, numbering, limit."""

import pyarrow as pa
import pytest

import odd_images as odd
from diffusion_model.parquet_source import detect_columns, inspect_sources, iter_rows, resolve_parquet_paths
from parquet_cases import PLAIN_SCHEMA, rsicd_row, write_rows
from utils.cli import UsageError


def rsicd_file(path, count, start=0):
    """An RSICD-schema file whose rows are named n{start}..n{start+count-1}."""
    rows = [rsicd_row(f"n{start + i}", odd.grayscale_jpeg(), [f"caption {start + i}"]) for i in range(count)]
    return write_rows(path, rows, row_group_size=3)


def test_folder_of_shards_is_sorted_and_numbered_across_files(tmp_path):
    rsicd_file(tmp_path / "b.parquet", 4, start=5)
    rsicd_file(tmp_path / "a.parquet", 5, start=0)
    (tmp_path / "notes.txt").write_text("not a shard")
    paths = resolve_parquet_paths([str(tmp_path)])
    assert [p.name for p in paths] == ["a.parquet", "b.parquet"]
    columns, total = inspect_sources(paths)
    rows = list(iter_rows(paths, columns, batch_size=2))
    assert total == 9
    assert [r.number for r in rows] == list(range(1, 10))
    assert [r.filename for r in rows] == [f"n{i}" for i in range(9)]
    assert rows[6].captions == ["caption 6"]


def test_several_files_sorted_whatever_the_argument_order(tmp_path):
    second, first = rsicd_file(tmp_path / "z.parquet", 2, start=2), rsicd_file(tmp_path / "y.parquet", 2)
    paths = resolve_parquet_paths([str(second), str(first), str(first)])
    assert paths == [first.resolve(), second.resolve()]


def test_limit_stops_across_files(tmp_path):
    paths = [rsicd_file(tmp_path / "a.parquet", 3), rsicd_file(tmp_path / "b.parquet", 3, start=3)]
    columns, _ = inspect_sources(paths)
    assert [r.filename for r in iter_rows(paths, columns, batch_size=64, limit=4)] == ["n0", "n1", "n2", "n3"]


def test_null_image_struct_yields_none(tmp_path):
    path = write_rows(tmp_path / "a.parquet", [rsicd_row("x", None, ["a road ."], image_is_null=True)])
    columns, _ = inspect_sources([path])
    assert next(iter_rows([path], columns, batch_size=8)).image is None


def test_plain_image_text_schema(tmp_path):
    data = odd.portrait_jpeg()
    path = write_rows(tmp_path / "p.parquet", [{"image": data, "text": "a tall picture"}], schema=PLAIN_SCHEMA)
    columns, _ = inspect_sources([path])
    assert (columns.image, columns.caption, columns.filename, columns.image_is_struct) == ("image", "text", None, False)
    row = next(iter_rows([path], columns, batch_size=8))
    assert (row.number, row.filename, row.image, row.captions) == (1, None, data, "a tall picture")


def test_overrides_pick_other_columns():
    schema = pa.schema([("pixels", pa.large_binary()), ("label", pa.large_string()), ("image", pa.int64())])
    columns = detect_columns(schema, "f", image_column="pixels", caption_column="label")
    assert (columns.image, columns.caption) == ("pixels", "label")


@pytest.mark.parametrize(
    "schema, overrides, named",
    [
        (pa.schema([("image", pa.binary())]), {}, "--caption_column"),
        (pa.schema([("text", pa.string())]), {}, "--image_column"),
        (PLAIN_SCHEMA, {"caption_column": "sentence"}, "'sentence'"),
        (pa.schema([("image", pa.int64()), ("text", pa.string())]), {}, "int64"),
        (pa.schema([("image", pa.binary()), ("text", pa.int32())]), {}, "int32"),
    ],
)
def test_bad_columns_are_usage_errors(schema, overrides, named):
    with pytest.raises(UsageError, match=named):
        detect_columns(schema, "f.parquet", **overrides)


def test_every_shard_needs_the_columns(tmp_path):
    good = rsicd_file(tmp_path / "a.parquet", 1)
    bad = write_rows(tmp_path / "b.parquet", [{"image": b"x"}], schema=pa.schema([("image", pa.binary())]))
    with pytest.raises(UsageError, match="b.parquet"):
        inspect_sources([good, bad])


def test_missing_path_and_empty_folder_and_junk_file(tmp_path):
    with pytest.raises(UsageError, match="nowhere.parquet"):
        resolve_parquet_paths([str(tmp_path / "nowhere.parquet")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="empty"):
        resolve_parquet_paths([str(tmp_path / "empty")])
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(UsageError, match="junk.parquet"):
        inspect_sources([junk])


def test_metadata_columns_are_read_beside_the_image(tmp_path):
    from diffusion_model.parquet_source import check_metadata_columns

    schema = pa.schema([("image", pa.binary()), ("text", pa.string()), ("res", pa.float64()),
                        ("when", pa.timestamp("s"))])
    table = pa.table({"image": [b"a", b"b"], "text": ["x", "y"], "res": [0.3, None],
                      "when": pa.array([1600000000, None], pa.timestamp("s"))}, schema=schema)
    import pyarrow.parquet as pq
    pq.write_table(table, tmp_path / "m.parquet")
    paths = [tmp_path / "m.parquet"]
    columns, _ = inspect_sources(paths)
    rows = list(iter_rows(paths, columns, batch_size=8, metadata_columns={"gsd": "res", "date": "when"}))
    assert rows[0].metadata["gsd"] == 0.3 and rows[0].metadata["date"].year == 2020
    assert rows[1].metadata == {"gsd": None, "date": None}
    assert next(iter_rows(paths, columns, batch_size=8)).metadata is None
    with pytest.raises(UsageError, match=r"--metadata_columns lat=latitude: 'latitude' is not a column of .*m.parquet"):
        check_metadata_columns(paths, {"lat": "latitude"})
