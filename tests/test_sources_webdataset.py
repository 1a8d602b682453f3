"""diffusion_model.sources.webdataset: sample keys, member grouping, captions from .caption/.txt/.json, counts."""

import io
import tarfile

import pytest

import source_cases as cases
from diffusion_model.sources.webdataset import json_caption, open_webdataset, sample_key, sample_row
from utils.cli import UsageError


def test_sample_key_runs_to_the_first_dot():
    assert sample_key("a/b/000012.seg.PNG") == ("a/b/000012", "seg.png")
    assert sample_key("x.img_content") == ("x", "img_content")


def test_caption_priority_and_reasons():
    assert sample_row(1, "k", {"jpg": b"i", "caption": b"cap", "txt": b"txt"}).captions == "cap"
    assert sample_row(1, "k", {"jpg": b"i", "json": b'{"caption": "from json"}'}).captions == "from json"
    assert sample_row(1, "k", {"jpg": b"i", "json": b"{broken"}).failure[0] == "no_caption"
    assert sample_row(1, "k", {"txt": b"t"}).failure[0] == "missing_image"
    assert sample_row(1, "k", {"img_content": b"i", "txt": b"t"}).image == b"i"
    assert json_caption(b'["a list"]') is None


def test_members_are_known_by_the_last_part_of_their_extension(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in (("k.seg.PNG", b"img"), ("k.caption.txt", b"a text"), ("k.cls", b"7")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "s.tar").write_bytes(buffer.getvalue())
    assert [(r.image, r.captions) for r in open_webdataset([tmp_path / "s.tar"]).rows()] == [(b"img", "a text")]


def test_count_matches_the_rows_and_numbers_cross_shards(tmp_path):
    expected = cases.write_webdataset(tmp_path)
    source = open_webdataset(sorted(tmp_path.glob("*.tar")))
    rows = list(source.rows())
    assert source.rows_total == len(rows) == len(expected)
    assert [r.number for r in rows] == list(range(1, len(expected) + 1))
    assert rows[len(expected) // 2].filename.startswith("shard-0001.tar:")


def test_a_truncated_shard_is_a_usage_error_naming_it(tmp_path):
    cases.write_webdataset(tmp_path)
    shard = tmp_path / "shard-0000.tar"
    shard.write_bytes(shard.read_bytes()[:700])
    with pytest.raises(UsageError, match="shard-0000.tar"):
        list(open_webdataset([shard]).rows())
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        folder = tarfile.TarInfo("empty_dir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    (tmp_path / "e.tar").write_bytes(buffer.getvalue())
    assert open_webdataset([tmp_path / "e.tar"]).rows_total == 0


def test_gzipped_shards_in_a_folder_are_found_and_streamed(tmp_path):
    from diffusion_model.sources import SourceOptions, open_source

    with tarfile.open(tmp_path / "part-0.tar.gz", "w:gz") as tar:
        for name, data in (("k1.png", b"img"), ("k1.txt", b"a gzipped caption")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    source = open_source([str(tmp_path)], SourceOptions())
    assert source.form == "webdataset" and [(r.image, r.captions) for r in source.rows()] == [
        (b"img", "a gzipped caption")]


def shard_of(path, samples):
    """A tar shard of (member name, bytes) pairs."""
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_metadata_comes_from_the_json_member_s_mapped_keys(tmp_path):
    shard = shard_of(tmp_path / "s.tar", [
        ("a.jpg", b"i"), ("a.json", b'{"caption": "c", "ground_sample_distance": 0.5, "ts": "2020"}'),
        ("b.jpg", b"i"), ("b.txt", b"t"), ("c.jpg", b"i"), ("c.json", b'{"caption": "d"}')])
    mapping = {"gsd": "ground_sample_distance", "date": "ts"}
    rows = list(open_webdataset([shard], metadata_columns=mapping).rows())
    assert [r.metadata for r in rows] == [{"gsd": 0.5, "date": "2020"}, None, {"gsd": None, "date": None}]
    assert all(r.metadata is None for r in open_webdataset([shard]).rows())
    with pytest.raises(UsageError, match="--metadata_columns lat=latitude: the samples' .json has no key 'latitude'"):
        open_webdataset([shard], metadata_columns={"lat": "latitude"})
    bare = shard_of(tmp_path / "t.tar", [("a.jpg", b"i"), ("a.txt", b"t")])
    with pytest.raises(UsageError, match="none of the first 32 samples of .*t.tar has a .json member"):
        open_webdataset([bare], metadata_columns=mapping)
