"""trainer/imagefolder.py: datasets' first load of an image folder runs in a child process; this one maps the cache."""

import json

import pytest
from PIL import Image

from trainer import imagefolder
from trainer.data import load_raw_dataset
from utils.cli import UsageError

ROWS = 6
PAD = "x" * (imagefolder.CHILD_MIN_BYTES // 2)  # long captions: two make a metadata.jsonl large enough for the child


def write_folder(folder, captions) -> None:
    """An image folder as format.py writes it: tiny JPEGs and one metadata.jsonl line per image."""
    folder.mkdir()
    lines = []
    for i, caption in enumerate(captions):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / f"image_{i}.jpg")
        lines.append(json.dumps({"file_name": f"image_{i}.jpg", "text": caption}) + "\n")
    (folder / "metadata.jsonl").write_text("".join(lines))


@pytest.fixture
def no_conversion_here(monkeypatch):
    """Make datasets' conversion into its Arrow cache fail if this process runs it (a child is a new interpreter)."""
    import datasets.builder

    def converts_here(self, *args, **kwargs):
        raise AssertionError("datasets converted metadata.jsonl into its Arrow cache in the parent process")

    monkeypatch.setattr(datasets.builder.DatasetBuilder, "_download_and_prepare", converts_here)


@pytest.mark.parametrize("cache_flag", [True, False], ids=["cache_dir", "HF_DATASETS_CACHE"])
def test_first_load_converts_in_a_child_then_maps_the_cache(cache_flag, tmp_path, monkeypatch, no_conversion_here):
    """A fresh cache is written by another process (into --cache_dir, or HF_DATASETS_CACHE without it); this one
    gets every row and column from it, and loads it again without converting."""
    import datasets

    folder, cache = tmp_path / "data", tmp_path / "hf_datasets"
    captions = [f"caption {i} {PAD}" for i in range(ROWS)]
    write_folder(folder, captions)
    if not cache_flag:  # the child reads the variable, this process the config datasets made of it at import
        monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    cache_dir = str(cache) if cache_flag else None
    files = imagefolder.data_files(folder)
    assert not imagefolder.arrow_cache_ready(files, cache_dir)
    table = load_raw_dataset(None, None, str(folder), cache_dir)
    assert imagefolder.arrow_cache_ready(files, cache_dir) and list(cache.rglob("*.arrow"))
    assert table.column_names == ["image", "text"] and len(table) == ROWS
    assert [row["text"] for row in table] == captions
    assert table[3]["image"].getpixel((0, 0))[0] == pytest.approx(120, abs=8)
    assert load_raw_dataset(None, None, str(folder), cache_dir)["text"] == table["text"]


def test_a_table_datasets_cannot_read_is_one_usage_line(tmp_path, no_conversion_here):
    """A caption that is a string on one line and a list on the next passes the preflight's line checks but not
    datasets: the child's error comes back as a UsageError naming the file and the column."""
    folder = tmp_path / "data"
    write_folder(folder, [f"a farm {PAD}", [f"a river {PAD}"], f"a road {PAD}"])
    with pytest.raises(UsageError) as raised:
        load_raw_dataset(None, None, str(folder), str(tmp_path / "hf_datasets"))
    message = str(raised.value)
    assert str(folder / "metadata.jsonl") in message and "text" in message and "\n" not in message
