"""evaluation.data: held-out rows from metadata.jsonl and Parquet, caption choice, bad rows, real image decoding."""

import csv
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffusion_model.captions import select_captions
from utils.image_errors import ImageRejected
from evaluation.data import EvalRow, load_rows, real_image
from utils.cli import UsageError


def png(size=(40, 30), color=(200, 10, 10)) -> bytes:
    """PNG bytes of a solid image."""
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def data_dir(tmp_path):
    """A DATA_DIR with list captions, a junk first caption, a broken line, an unsafe name and a missing image."""
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "img" / name).write_bytes(png())
    lines = [json.dumps({"file_name": "img/a.png", "text": ["fields and a road", "a river"]}),
             json.dumps({"file_name": "img/b.png", "text": [" .", "ponds near houses", "Ponds near houses!"]}),
             "{not json",
             json.dumps({"file_name": "../outside.png", "text": "escape"}),
             json.dumps({"file_name": "img/missing.png", "text": "a town"})]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_metadata_rows_keep_their_numbers_and_the_chosen_caption(data_dir):
    rows, bad, read = load_rows(str(data_dir), None, 0, None)
    assert read == 5
    assert [(r.number, r.caption) for r in rows] == [(1, "fields and a road"), (2, "ponds near houses"),
                                                    (5, "a town")]
    assert rows[0].image == data_dir / "img" / "a.png"
    assert [(b.number, b.reason) for b in bad] == [(3, "bad_metadata_line"), (4, "bad_metadata_line")]
    assert "'..' in path" in bad[1].detail


def test_caption_index_counts_clean_distinct_captions(data_dir):
    """Row 2's junk " ." and its near-duplicate do not count: it has one caption, so index 1 makes it a bad row."""
    rows, bad, _ = load_rows(str(data_dir), None, 1, None)
    assert [(r.number, r.caption) for r in rows] == [(1, "a river")]
    assert {(b.number, b.reason) for b in bad} >= {(2, "no_caption_at_index"), (5, "no_caption_at_index")}


def test_num_samples_reads_only_the_first_rows(data_dir):
    rows, bad, read = load_rows(str(data_dir), None, 0, 2)
    assert read == 2 and [r.number for r in rows] == [1, 2] and not bad


def test_caption_index_beyond_every_row_is_a_usage_error(data_dir):
    with pytest.raises(UsageError, match="--caption_index 3 is out of range: rows have at most 2 caption"):
        load_rows(str(data_dir), None, 3, None)


def test_missing_folder_or_metadata_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="is not a folder"):
        load_rows(str(tmp_path / "nope"), None, 0, None)
    with pytest.raises(UsageError, match="has no metadata.jsonl"):
        load_rows(str(tmp_path), None, 0, None)
    with pytest.raises(UsageError, match="does not exist"):
        load_rows(None, str(tmp_path / "nope.parquet"), 0, None)


def test_rsicd_parquet_rows_use_the_first_clean_caption(sample_parquet):
    rows, bad, read = load_rows(None, str(sample_parquet), 0, 5)
    table = pq.read_table(sample_parquet).slice(0, 5).to_pylist()
    assert read == 5 and [r.number for r in rows] + [b.number for b in bad] == sorted(range(1, 6))
    for row in rows:
        source = table[row.number - 1]
        assert row.caption == select_captions(source["captions"])[0]
        assert row.image == source["image"]["bytes"]


def test_real_image_is_centre_cropped_to_the_resolution(tmp_path):
    wide = Image.new("RGB", (60, 20), (0, 0, 255))
    wide.paste((255, 0, 0), (0, 0, 20, 20))  # the left third is cut away by a centre crop
    buffer = io.BytesIO()
    wide.save(buffer, format="PNG")
    image = real_image(EvalRow(1, "x", buffer.getvalue()), 16)
    assert image.size == (16, 16) and image.mode == "RGB"
    red, _, blue = image.getpixel((1, 8))
    assert red < 30 and blue > 225  # Lanczos may pull a little red across the crop edge, never the red third


def test_real_image_rejects_junk_and_missing_files(tmp_path):
    with pytest.raises(ImageRejected) as caught:
        real_image(EvalRow(1, "x", b"junk"), 16)
    assert caught.value.reason == "undecodable"
    with pytest.raises(ImageRejected) as caught:
        real_image(EvalRow(2, "x", tmp_path / "gone.png"), 16)
    assert caught.value.reason == "missing_image"


def test_real_image_reads_a_multiband_geotiff_as_create_does(tmp_path):
    import numpy as np

    from diffusion_model.imaging import prepare
    from diffusion_model.sample_geotiff import geotiff_row

    tile = geotiff_row(0, 0, "sentinel2")["image"]["bytes"]
    (tmp_path / "tile.tif").write_bytes(tile)
    image = real_image(EvalRow(1, "x", tmp_path / "tile.tif"), 32)
    made = Image.open(io.BytesIO(prepare(tile, 32, "center_crop", 100, 10**8)))
    assert (image.mode, image.size) == ("RGB", (32, 32))
    assert np.abs(np.asarray(image, dtype=int) - np.asarray(made, dtype=int)).mean() < 6, "JPEG noise only"


def test_karpathy_test_split_rows_and_reader_failures(tmp_path):
    """--input dataset.json reads the test split by default: its rows numbered from 1, the entry with no split
    (not an object) a bad row, the train/val rows not read."""
    import source_cases as cases
    from diffusion_model.sources import SourceOptions

    expected = cases.write_karpathy(tmp_path)["test"]
    rows, bad, read = load_rows(None, None, 0, None, str(tmp_path / "dataset_test.json"),
                                SourceOptions(default_split="test"))
    assert read == len(expected) == 4
    assert [(r.number, r.caption) for r in rows] == [(i + 1, c) for i, (reason, c) in enumerate(expected) if not reason]
    assert [(b.number, b.reason) for b in bad] == [(4, "bad_entry")]
    assert Image.open(io.BytesIO(rows[0].image)).format == "TIFF"
    val_rows, _, _ = load_rows(None, None, 0, None, str(tmp_path / "dataset_test.json"), SourceOptions(split="val"))
    assert len(val_rows) == 4


def test_csv_folder_rows_and_missing_or_escaping_images(tmp_path):
    """A folder holding index.csv and images/: good rows keep their captions, the rest are bad rows with reasons."""
    import source_cases as cases
    from diffusion_model.sources import SourceOptions

    folder = tmp_path / "held_out"
    expected = cases.write_csv(folder)
    rows, bad, read = load_rows(None, None, 0, None, str(folder), SourceOptions(default_split="test"))
    assert read == len(expected)
    assert [(r.number, r.caption) for r in rows] == [(i + 1, c) for i, (reason, c) in enumerate(expected) if not reason]
    evaluator_reason = {"no_caption": "no_caption_at_index"}
    assert {(b.number, b.reason) for b in bad} == {(i + 1, evaluator_reason.get(r, r)) for i, (r, _) in enumerate(expected) if r}
    assert real_image(rows[0], 16).size == (16, 16)


SHARED_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "naip_rsicd_sample.parquet"
# Held-out rows whose names carry a class (or not, the numeric one), with a class column beside them.
CLASSED = [("pond_1.png", "a pond near a road .", "Lake"), ("river_2009_00.png", "a winding river .", ""),
           ("00003.png", "some bare land .", "forest")]
SCENES = ["pond", "river", None]
LABELS = ["Lake", None, "forest"]


def write_classed(root: Path, form: str) -> tuple:
    """The CLASSED rows in one source form under root: load_rows's (data_dir, parquet_path, source, options)."""
    from diffusion_model.sources import SourceOptions

    (root / "imgs").mkdir(parents=True)
    for name, _, _ in CLASSED:
        (root / "imgs" / name).write_bytes(png())
    records = [{"file_name": f"imgs/{name}", "text": text, "label": label} for name, text, label in CLASSED]
    held_out = SourceOptions(default_split="test")
    if form == "data_dir":
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return str(root), None, None, None
    if form in ("parquet", "parquet_path"):
        import pyarrow as pa

        pq.write_table(pa.table({"filename": [f"rsicd_images/{n}" for n, _, _ in CLASSED],
                                 "captions": [[text] for _, text, _ in CLASSED], "image": [png() for _ in CLASSED],
                                 "label": [label for _, _, label in CLASSED]}), root / "test.parquet")
        path = str(root / "test.parquet")
        return (None, path, None, None) if form == "parquet_path" else (None, None, path, held_out)
    if form == "karpathy":
        images = [{"filename": name, "filepath": "imgs", "split": "test", "sentences": [{"raw": text}]}
                  for name, text, _ in CLASSED]
        (root / "dataset.json").write_text(json.dumps({"images": images}))
        return None, None, str(root / "dataset.json"), held_out
    if form == "csv":
        with open(root / "index.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, ["file_name", "text", "label"])
            writer.writeheader()
            writer.writerows(records)
        return None, None, str(root / "index.csv"), held_out
    (root / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return None, None, str(root / "index.jsonl"), held_out


def load_classed(where: tuple, class_column=None):
    """load_rows on a write_classed source: every row, caption 0."""
    data_dir, parquet_path, source, options = where
    return load_rows(data_dir, parquet_path, 0, None, source, options, class_column=class_column)


@pytest.mark.parametrize("form", ["data_dir", "parquet_path", "parquet", "karpathy", "csv", "jsonl"])
def test_each_row_carries_its_scene_class_from_every_source_form(tmp_path, form):
    """The class travels with the row from the reader: the file name's prefix, or the --class_column cell."""
    where = write_classed(tmp_path / form, form)
    rows, bad, read = load_classed(where)
    assert read == 3 and not bad
    assert [row.scene for row in rows] == SCENES
    assert [row.caption for row in rows] == [text for _, text, _ in CLASSED]
    if form != "karpathy":
        rows, _, _ = load_classed(where, class_column="label")
        assert [row.scene for row in rows] == LABELS


@pytest.mark.parametrize("form, words", [
    ("data_dir", "--class_column 'scene' is a key of no line"),
    ("parquet_path", "--class_column 'scene' is not a column of"),
    ("parquet", "--class_column 'scene' is not a column of"),
    ("csv", "--class_column 'scene' is not a column of"),
    ("jsonl", "--class_column 'scene' is not a column of"),
    ("karpathy", "--class_column scene does not apply to a json source"),
])
def test_a_class_column_the_source_lacks_is_a_usage_error(tmp_path, form, words):
    with pytest.raises(UsageError, match=words):
        load_classed(write_classed(tmp_path / form, form), class_column="scene")


@pytest.mark.skipif(not SHARED_SAMPLE.is_file(), reason="the shared NAIP sample is not on this machine")
def test_the_naip_sample_rows_are_farmland_but_its_numeric_names():
    """The user's command: --input the NAIP sample (farmland_2009_00.jpg ...; 10 RSICD-style numeric names)."""
    from collections import Counter

    from diffusion_model.sources import SourceOptions

    rows, bad, read = load_rows(None, None, 0, None, str(SHARED_SAMPLE), SourceOptions(default_split="test"))
    assert read == 120 and not bad
    assert Counter(row.scene for row in rows) == {"farmland": 110, None: 10}


def test_a_create_folder_s_rows_take_their_class_from_source_file(tmp_path):
    """format.py's source_file (create.py's source name) gives the class; create.py's own image_NNNNNN names give
    none, and say why; so does a null source_file (the source had no names)."""
    (tmp_path / "rsicd_images").mkdir()
    names = [f"rsicd_images/image_{n:06d}.jpg" for n in (1, 2, 3)]
    for name in names:
        (tmp_path / name).write_bytes(png())
    sources = ["rsicd_images/farmland_2009_00.jpg", None, "airport_1.jpg"]
    lines = [{"file_name": n, "text": "a field", "source_file": s} for n, s in zip(names, sources)]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    rows, _, _ = load_rows(str(tmp_path), None, 0, None)
    assert [(r.scene, r.no_class) for r in rows] == [("farmland", None), (None, "no_name"), ("airport", None)]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": "a field"}) + "\n"
                                                     for n in names))
    rows, _, _ = load_rows(str(tmp_path), None, 0, None)
    assert [(r.scene, r.no_class) for r in rows] == [(None, "create_name")] * 3


def test_rows_without_a_class_say_why(tmp_path):
    """No <class>_<digits> prefix, or an empty --class_column cell."""
    rows, _, _ = load_classed(write_classed(tmp_path / "csv", "csv"))
    assert [r.no_class for r in rows] == [None, None, "no_prefix"]
    rows, _, _ = load_classed(write_classed(tmp_path / "jsonl", "jsonl"), class_column="label")
    assert [r.no_class for r in rows] == [None, "empty_cell", None]


def test_a_sharded_folder_is_read_through_its_index(sample_parquet, tmp_path, monkeypatch):
    """A create.py --output_format webdataset folder as --data_dir: source row numbers, first clean caption, the
    image's bytes from its tar, the class from the source file name; --num_samples stops early; a --class_column
    the index lacks is a usage error; each row's metadata come from the index (GSD corrected for the resize)."""
    from diffusion_model import create

    for name in ("SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    folder = tmp_path / "shards"
    assert create.main(["--input", str(sample_parquet), "--output_dir", str(folder), "--output_format", "webdataset",
                        "--shard_size", "2", "--resolution", "16", "--num_workers", "1", "--caption_mode", "all",
                        "--limit", "7", "--metadata", "gsd=1.0,sensor=naip"]) == 0
    rows, bad, read = load_rows(str(folder), None, 0, 5)
    table = pq.read_table(sample_parquet).slice(0, 5).to_pylist()
    assert read == 5 and not bad and [r.number for r in rows] == [1, 2, 3, 4, 5]
    for row in rows:
        source = table[row.number - 1]
        assert row.caption == select_captions(source["captions"])[0]
        assert Image.open(io.BytesIO(row.image)).size == (16, 16)
        assert row.scene == Path(source["filename"]).name.split("_")[0]
        side = min(Image.open(io.BytesIO(source["image"]["bytes"])).size)
        assert row.metadata == {"gsd": pytest.approx(side / 16), "sensor": "naip"}
    assert len(load_rows(str(folder), None, 0, None)[0]) == 7
    with pytest.raises(UsageError, match="--class_column 'label' is not a column of"):
        load_rows(str(folder), None, 0, None, class_column="label")
