"""inference/outputs.py: numbered PNGs with JSON sidecars, the grid, and refusing to mix with a previous run."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from inference.outputs import (GRID_FILENAME, grid_columns, image_path, png_bytes, prepare_output_dir,
                               previous_outputs, save_grid, save_image)
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


@pytest.mark.parametrize("count, per_prompt, columns", [
    (1, 1, 1), (2, 1, 2), (4, 1, 2), (5, 1, 3), (9, 1, 3), (10, 1, 4), (6, 3, 3), (8, 2, 2), (4, 4, 4),
])
def test_grid_columns_are_images_per_prompt_or_near_square(count, per_prompt, columns):
    assert grid_columns(count, per_prompt) == columns


def test_grid_places_images_row_by_row_and_pads_with_black(tmp_path):
    images = [Image.new("RGB", (8, 6), colour) for colour in COLOURS]
    path = save_grid(tmp_path, images, columns=3)
    grid = np.asarray(Image.open(path).convert("RGB"))
    assert path == tmp_path / GRID_FILENAME and grid.shape == (2 * 6, 3 * 8, 3)
    for index, colour in enumerate(COLOURS):
        row, column = divmod(index, 3)
        assert tuple(grid[row * 6 + 3, column * 8 + 4]) == colour, index
    assert not grid[6:, 16:].any()
