"""diffusion_model.sources: telling the form from the path (and a .json from its shape), folders, shard splits."""

import json
import re

import pytest

import source_cases as cases
from diffusion_model.sources import SourceOptions, open_source, resolve_inputs, shards_of_split, suffix_form
from parquet_cases import write_odd_shards
from utils.cli import UsageError


@pytest.mark.parametrize("name, form", [("a.parquet", "parquet"), ("x.TAR", "webdataset"), ("x.tar.gz", "webdataset"),
                                        ("i.csv", "csv"), ("i.jsonl", "jsonl"), ("d.json", "json"), ("x.txt", "")])
def test_suffix_form(tmp_path, name, form):
    assert suffix_form(tmp_path / name) == form


def test_json_is_told_apart_by_its_shape(tmp_path):
    cases.write_karpathy(tmp_path / "k")
    cases.write_nwpu(tmp_path / "n")
    assert open_source([str(tmp_path / "k" / "dataset_test.json")], SourceOptions()).form == "karpathy"
    assert open_source([str(tmp_path / "n" / "dataset_nwpu.json")], SourceOptions()).form == "nwpu"
    (tmp_path / "list.json").write_text(json.dumps([1, 2]))
    with pytest.raises(UsageError, match="neither a Karpathy JSON"):
        open_source([str(tmp_path / "list.json")], SourceOptions())
    with pytest.raises(UsageError, match="looks like a karpathy JSON"):
        open_source([str(tmp_path / "k" / "dataset_test.json")], SourceOptions(form="nwpu"))


def test_folders_resolve_to_their_shards_or_their_one_index(tmp_path):
    write_odd_shards(tmp_path / "pq")
    cases.write_webdataset(tmp_path / "wds")
    cases.write_csv(tmp_path / "csv")
    assert resolve_inputs([str(tmp_path / "pq")])[0] == "parquet"
    form, files = resolve_inputs([str(tmp_path / "wds")])
    assert form == "webdataset" and [p.name for p in files] == ["shard-0000.tar", "shard-0001.tar"]
    assert resolve_inputs([str(tmp_path / "csv")]) == ("csv", [(tmp_path / "csv" / "index.csv").resolve()])
    (tmp_path / "csv" / "more.jsonl").write_text("{}\n")
    with pytest.raises(UsageError, match="cannot tell which source"):
        resolve_inputs([str(tmp_path / "csv")])


def test_several_shards_are_sorted_and_deduplicated_whatever_the_order(tmp_path):
    cases.write_webdataset(tmp_path)
    second, first = str(tmp_path / "shard-0001.tar"), str(tmp_path / "shard-0000.tar")
    _, files = resolve_inputs([second, first, first])
    assert [p.name for p in files] == ["shard-0000.tar", "shard-0001.tar"]
    with pytest.raises(UsageError, match="mixes source forms"):
        resolve_inputs([first, str(cases.write_csv(tmp_path / "c") and tmp_path / "c" / "index.csv")])


def test_split_picks_shards_by_name_under_every_spelling(tmp_path):
    names = ["train-0.parquet", "valid-0.parquet", "validation_1.parquet", "test-0.parquet", "trainer.parquet"]
    paths = [tmp_path / n for n in names]
    assert [p.name for p in shards_of_split(paths, "val")] == ["valid-0.parquet", "validation_1.parquet"]
    assert [p.name for p in shards_of_split(paths, "train")] == ["train-0.parquet"]
    assert shards_of_split(paths, "all") == paths
    with pytest.raises(UsageError, match="--split test"):
        shards_of_split(paths[:1], "test")


@pytest.mark.parametrize("writer, path, options, named", [
    (cases.write_karpathy, "dataset_test.json", SourceOptions(metadata_columns={"gsd": "gsd"}),
     "--metadata_columns gsd=gsd does not apply to a json source without --metadata_sidecars"),
    (cases.write_webdataset, ".", SourceOptions(metadata_sidecars=True),
     "--metadata_sidecars does not apply to a webdataset source"),
    (write_odd_shards, ".", SourceOptions(metadata_sidecars=True), "--metadata_sidecars does not apply to a parquet"),
    (write_odd_shards, ".", SourceOptions(metadata_columns={"lat": "latitude"}),
     "--metadata_columns lat=latitude: 'latitude' is not a column of"),
])
def test_metadata_flags_a_form_cannot_use_are_refused(tmp_path, writer, path, options, named):
    writer(tmp_path / "src")
    with pytest.raises(UsageError, match=re.escape(named)):
        open_source([str(tmp_path / "src" / path)], options)
