"""The sample generator: exact RSICD schema, real JPEGs, captions with RSICD's quirks, deterministic."""

import io

import pyarrow.parquet as pq
from PIL import Image

from conftest import SAMPLE_ROWS
from diffusion_model.sample_data import JUNK_CAPTION, RSICD_SCHEMA, SAMPLE_SIZE, make_sample_parquet, make_sample_row


def test_schema_rows_and_row_groups(sample_parquet):
    parquet = pq.ParquetFile(sample_parquet)
    assert parquet.schema_arrow.equals(RSICD_SCHEMA)
    assert parquet.metadata.num_rows == SAMPLE_ROWS
    assert parquet.metadata.num_row_groups == SAMPLE_ROWS // 8


def test_rows_look_like_rsicd(sample_parquet):
    rows = pq.read_table(sample_parquet).to_pylist()
    for row in rows:
        assert row["filename"].startswith("rsicd_images/") and row["filename"].endswith(".jpg")
        assert len(row["captions"]) == 5
        assert row["captions"].count(JUNK_CAPTION) == 1
        lowered = {c.lower().replace(" .", ".") for c in row["captions"] if c != JUNK_CAPTION}
        assert len(lowered) == 3, "one caption must repeat another up to case and punctuation"
        image = Image.open(io.BytesIO(row["image"]["bytes"]))
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (SAMPLE_SIZE, SAMPLE_SIZE))
    assert len({row["filename"] for row in rows}) == len(rows)


def test_captions_say_what_is_drawn():
    row = next(make_sample_row(i, seed=3) for i in range(50) if "river" in make_sample_row(i, seed=3)["filename"])
    assert any("river" in caption for caption in row["captions"])
    pixels = Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB").getdata()
    bluish = sum(1 for r, g, b in pixels if b > r + 25 and b > g)
    assert bluish > 500, "a river scene must contain water-coloured pixels"


def test_deterministic_from_seed(tmp_path):
    first = make_sample_parquet(tmp_path / "a.parquet", 6, seed=7, row_group_size=4)
    second = make_sample_parquet(tmp_path / "b.parquet", 6, seed=7, row_group_size=4)
    other = make_sample_parquet(tmp_path / "c.parquet", 6, seed=8, row_group_size=4)
    assert pq.read_table(first).equals(pq.read_table(second))
    assert not pq.read_table(first).equals(pq.read_table(other))


def test_cli_from_another_directory(run_script, tmp_path):
    output = tmp_path / "nested" / "s.parquet"
    result = run_script("diffusion_model/sample_data.py", ["--output", output, "--num_rows", 3], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert pq.ParquetFile(output).metadata.num_rows == 3


def test_cli_rejects_bad_row_count(run_script, tmp_path):
    result = run_script("diffusion_model/sample_data.py", ["--output", tmp_path / "s.parquet", "--num_rows", 0])
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--num_rows" in result.stderr
    assert "Traceback" not in result.stderr


def test_layout_scenes_carry_masks_that_match_what_is_drawn(tmp_path):
    """--masks: each scene's `mask` is the class layout its pixels were painted from, its captions name the classes."""
    import numpy as np

    from diffusion_model.sample_data import LAYOUT_CLASSES, MASK_SCHEMA

    path = make_sample_parquet(tmp_path / "m.parquet", 6, seed=2, row_group_size=4, masks=True)
    assert pq.ParquetFile(path).schema_arrow.equals(MASK_SCHEMA)
    colours = np.array([colour for _, colour in LAYOUT_CLASSES], int)
    layouts = set()
    for row in pq.read_table(path).to_pylist():
        mask = Image.open(io.BytesIO(row["mask"]["bytes"]))
        assert (mask.format, mask.mode, mask.size) == ("PNG", "L", (SAMPLE_SIZE, SAMPLE_SIZE))
        classes = np.asarray(mask)
        assert classes.max() < len(LAYOUT_CLASSES) and len(np.unique(classes)) >= 2
        pixels = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")).astype(int)
        nearest = np.abs(pixels[:, :, None] - colours[None, None]).sum(-1).argmin(-1)
        assert (nearest == classes).mean() > 0.9, "the image is painted from its mask"
        named = {name for index, (name, _) in enumerate(LAYOUT_CLASSES) if (classes == index).any()}
        assert all(any(name in caption for caption in row["captions"]) for name in named)
        layouts.add(classes.tobytes())
    assert len(layouts) == 6, "every scene has its own layout"
    again = make_sample_parquet(tmp_path / "again.parquet", 6, seed=2, row_group_size=4, masks=True)
    assert pq.read_table(again).equals(pq.read_table(path))


def test_gsd_levels_draw_each_class_at_each_gsd_and_leave_the_default_alone(tmp_path):
    """--gsd_levels 3: class i mod 5 at SAMPLE_GSD x 2^((i div 5) mod 3), in a gsd column; a coarser GSD shows the
    scene smaller among dark woods (its centre is still the scene); without the flag the file is what it was."""
    import numpy as np

    from diffusion_model.sample_data import GSD_SCHEMA, SAMPLE_GSD, SCENES, WOODS_COLOUR, make_sample_row

    path = make_sample_parquet(tmp_path / "g.parquet", 15, seed=0, row_group_size=8, gsd_levels=3)
    assert pq.ParquetFile(path).schema_arrow.equals(GSD_SCHEMA)
    rows = pq.read_table(path).to_pylist()
    assert [row["gsd"] for row in rows] == [SAMPLE_GSD * 2 ** (i // 5) for i in range(15)]
    assert [row["filename"].split("/")[1].split("_")[0] for row in rows] == list(SCENES) * 3
    woods = []
    for row in rows:
        pixels = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")).astype(int)
        near_woods = (np.abs(pixels - np.array(WOODS_COLOUR)).sum(-1) < 40).mean()
        woods.append(near_woods)
        assert np.abs(pixels[100:124, 100:124] - np.array(WOODS_COLOUR)).sum(-1).mean() > 40, "the centre is the scene"
    assert max(woods[:5]) < 0.05 and all(0.6 < w < 0.8 for w in woods[5:10]) and min(woods[10:]) > 0.9
    assert make_sample_row(3, 0) == make_sample_row(3, 0, gsd_levels=1)
    assert "gsd" not in make_sample_row(3, 0) and pq.read_table(make_sample_parquet(
        tmp_path / "plain.parquet", 5, seed=0)).schema.equals(RSICD_SCHEMA)


def test_cli_rejects_bad_gsd_levels(run_script, tmp_path):
    for extra, words in ((["--gsd_levels", "0"], "--gsd_levels must be between 1 and"),
                         (["--gsd_levels", "2", "--masks"], "--gsd_levels and --masks")):
        result = run_script("diffusion_model/sample_data.py", ["--output", tmp_path / "s.parquet", *extra])
        assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr
