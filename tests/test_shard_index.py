"""utils/shard_index.py: when a shard counts as finished, the merge's refusals, reading a member by offset."""

import io
import json

import pyarrow as pa
import pytest

from utils.shard_index import (INDEX_SCHEMA, finished_stats, is_shards_dir, merge, read_member,
                                         shard_files, write_parquet_atomic)
from utils.cli import UsageError


def finished_shard(folder, shard: int, data: bytes = b"x" * 1024) -> None:
    """A shard's three files as create.py leaves a finished one (an empty index part)."""
    tar, part, stats = shard_files(folder, shard)
    tar.parent.mkdir(parents=True, exist_ok=True)
    tar.write_bytes(data)
    write_parquet_atomic(part, pa.Table.from_pylist([], schema=INDEX_SCHEMA))
    stats.write_text(json.dumps({"shard": shard, "tar_bytes": len(data), "rows": 0, "samples": 0, "captions": 0,
                                 "metadata_rows": 0, "failures": [], "metadata_problems": []}))


def test_a_shard_is_finished_only_with_stats_part_and_a_tar_of_the_recorded_size(tmp_path):
    """Stats alone do not finish a shard: a missing part or a tar of another size (replaced, truncated) does not."""
    finished_shard(tmp_path, 0)
    assert finished_stats(tmp_path, 0)["shard"] == 0
    tar, part, _ = shard_files(tmp_path, 0)
    tar.write_bytes(b"x" * 512)
    assert finished_stats(tmp_path, 0) is None
    tar.write_bytes(b"x" * 1024)
    part.unlink()
    assert finished_stats(tmp_path, 0) is None
    assert finished_stats(tmp_path, 1) is None


def test_merge_writes_index_and_stats_only_when_every_shard_is_finished(tmp_path):
    """Two of three shards finished: a usage error naming the missing one, no index; all three: index and stats."""
    (tmp_path / "create_settings.json").write_text(json.dumps({"output_format": "webdataset", "shards": 3,
                                                               "shard_size": 4}))
    finished_shard(tmp_path, 0)
    finished_shard(tmp_path, 2)
    with pytest.raises(UsageError, match=r"1 of 3 shards are not finished \(shard 1\)"):
        merge(tmp_path)
    assert not is_shards_dir(tmp_path)
    finished_shard(tmp_path, 1)
    assert merge(tmp_path)["shards"] == 3
    assert is_shards_dir(tmp_path) and (tmp_path / "shards_stats.json").is_file()


def test_read_member_reads_exactly_and_refuses_a_short_read():
    """The bytes at an offset; a truncated shard is an error rather than a short image."""
    handle = io.BytesIO(b"0123456789")
    assert read_member(handle, 3, 4) == b"3456"
    with pytest.raises(OSError, match="truncated"):
        read_member(handle, 8, 4)
