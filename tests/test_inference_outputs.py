"""inference/outputs.py: numbered PNGs with JSON sidecars, the grid, and refusing to mix with a previous run."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from inference.outputs import (GRID_FILENAME, image_path, png_bytes, prepare_output_dir, previous_outputs, row_label,
                               save_grid, save_image)
from utils import grids
from utils.cli import UsageError

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]


def touch_all(folder, names):
    for name in names:
        (folder / name).write_bytes(b"x")


def test_image_path_is_six_digit_index(tmp_path):
    assert image_path(tmp_path, 0) == tmp_path / "000000.png"
    assert image_path(tmp_path, 1234) == tmp_path / "001234.png"


def test_previous_outputs_are_numbered_pngs_sidecars_and_the_grid_only(tmp_path):
    touch_all(tmp_path, ["000000.png", "000000.json", "000017.png", GRID_FILENAME,
                         "notes.txt", "12.png", "abcdef.png", "0000001.png", "000003.jpg", "settings.json"])
    assert sorted(p.name for p in previous_outputs(tmp_path)) == ["000000.json", "000000.png", "000017.png",
                                                                  GRID_FILENAME]


def test_prepare_creates_missing_parents(tmp_path):
    folder = prepare_output_dir(str(tmp_path / "a" / "b"), overwrite=False)
    assert folder.is_dir() and folder == tmp_path / "a" / "b"


def test_prepare_accepts_a_folder_without_previous_images(tmp_path):
    touch_all(tmp_path, ["notes.txt"])
    prepare_output_dir(str(tmp_path), overwrite=False)
    assert (tmp_path / "notes.txt").exists()


def test_prepare_refuses_previous_images_without_overwrite_and_touches_nothing(tmp_path):
    touch_all(tmp_path, ["000000.png", "000000.json"])
    with pytest.raises(UsageError) as caught:
        prepare_output_dir(str(tmp_path), overwrite=False)
    assert f"'{tmp_path}'" in str(caught.value) and "--overwrite" in str(caught.value)
    assert (tmp_path / "000000.png").exists() and (tmp_path / "000000.json").exists()


def test_overwrite_removes_previous_images_but_not_other_files(tmp_path):
    touch_all(tmp_path, ["000000.png", "000000.json", "000001.png", GRID_FILENAME, "notes.txt"])
    prepare_output_dir(str(tmp_path), overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "out"
    path.write_text("not a folder")
    with pytest.raises(UsageError, match="is a file"):
        prepare_output_dir(str(path), overwrite=True)


def test_output_dir_under_a_file_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="cannot be created"):
        prepare_output_dir(str(tmp_path / "file" / "out"), overwrite=False)


def test_save_image_writes_the_pixels_and_a_sidecar_of_settings_and_size(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8))
    path = save_image(tmp_path, 3, image, {"prompt": "a field", "seed": 9, "guidance_scale": 7.5})
    assert path == tmp_path / "000003.png"
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image))
    sidecar = json.loads((tmp_path / "000003.json").read_text())
    assert sidecar == {"file_name": "000003.png", "index": 3, "prompt": "a field", "seed": 9, "guidance_scale": 7.5,
                       "width": 24, "height": 16}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000003.json", "000003.png"]


def test_png_bytes_is_a_lossless_png():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (3, 5, 3), dtype=np.uint8))
    decoded = Image.open(io.BytesIO(png_bytes(image)))
    assert decoded.format == "PNG" and np.array_equal(np.asarray(decoded), np.asarray(image))


def test_row_label_is_the_prompt_and_its_seeds():
    assert row_label([("a field", 7)]) == "a field (seed 7)"
    assert row_label([("a river", 7), ("a river", 8), ("a river", 9)]) == "a river (seeds 7-9)"


def test_grid_is_a_labelled_row_per_prompt_with_images_enlarged(tmp_path):
    """6 images of 8x6 px, 3 per prompt: 2 rows x 3 columns, each enlarged 22x (short side 132 px) in its cell."""
    images = [Image.new("RGB", (8, 6), colour) for colour in COLOURS + [(9, 9, 9)]]
    plan = [(prompt, 5 + i) for i, prompt in enumerate(["a field"] * 3 + ["a river"] * 3)]
    path = save_grid(tmp_path, images, plan, 3)
    font = grids.label_font()
    layout = grids.grid_layout((8 * 22, 6 * 22), 2, 3, grids.row_label_width(
        ["a field (seeds 5-7)", "a river (seeds 8-10)"], font), grids.line_height(font))
    grid = Image.open(path)
    assert path == tmp_path / GRID_FILENAME and grid.size == layout.size
    for index, image in enumerate(images):
        x, y = layout.origin(*divmod(index, 3))
        assert grid.getpixel((x, y)) == grid.getpixel((x + 8 * 22 - 1, y + 6 * 22 - 1)) == image.getpixel((0, 0))
    assert not list(tmp_path.glob("*.tmp"))
