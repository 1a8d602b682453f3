"""evaluation.generation: file names and seeds per row, the settings guard, resumable generation."""

import json

import pytest
from PIL import Image

from evaluation.data import EvalRow
from evaluation.generation import (SETTINGS_FILENAME, check_settings, generate_missing, image_path, missing_rows,
                                   record_settings, row_seed)
from utils.cli import UsageError

SETTINGS = {"model": "/m", "seed": 0, "num_inference_steps": 2}


def test_rows_name_their_file_and_fix_their_seed(tmp_path):
    row = EvalRow(12, "a road", None)
    assert image_path(tmp_path, row) == tmp_path / "000012.png"
    assert row_seed(100, row) == 111


def test_settings_guard_refuses_other_settings_unless_overwriting(tmp_path):
    check_settings(tmp_path, SETTINGS, overwrite=False)  # nothing recorded yet
    record_settings(tmp_path, SETTINGS, overwrite=False)
    check_settings(tmp_path, dict(SETTINGS), overwrite=False)
    with pytest.raises(UsageError, match=r"other settings \(num_inference_steps, seed\)"):
        check_settings(tmp_path, {**SETTINGS, "seed": 1, "num_inference_steps": 3}, overwrite=False)
    check_settings(tmp_path, {**SETTINGS, "seed": 1}, overwrite=True)


def test_record_with_overwrite_drops_old_images(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "000001.png")
    record_settings(tmp_path, SETTINGS, overwrite=True)
    assert not (tmp_path / "000001.png").exists()
    assert json.loads((tmp_path / SETTINGS_FILENAME).read_text()) == SETTINGS


class SeedPainter:
    """A stand-in pipeline: each image's grey level is its generator's seed, so files show which seed made them."""

    def __init__(self):
        """Remember every call's prompts."""
        self.calls = []

    def __call__(self, prompt, generator, height, width, **_):
        """Return one height x width image per prompt, painted with its generator's seed."""
        self.calls.append(list(prompt))
        images = [Image.new("RGB", (width, height), (g.initial_seed(),) * 3) for g in generator]
        return type("Output", (), {"images": images})()


def test_missing_rows_are_generated_under_their_names_with_their_seeds(tmp_path):
    rows = [EvalRow(1, "a pond", None), EvalRow(5, "a road", None), EvalRow(9, "a town", None)]
    image_path(tmp_path, rows[1]).write_bytes(b"kept")
    painter = SeedPainter()
    pending = missing_rows(rows, tmp_path)
    assert pending == [rows[0], rows[2]]
    made = generate_missing(painter, pending, tmp_path, seed=10, num_inference_steps=2, guidance_scale=7.5,
                            resolution=16, batch_size=2)
    assert made == 2 and painter.calls == [["a pond", "a town"]]
    assert Image.open(image_path(tmp_path, rows[0])).getpixel((0, 0)) == (10, 10, 10)
    assert Image.open(image_path(tmp_path, rows[2])).getpixel((0, 0)) == (18, 18, 18)
    assert Image.open(image_path(tmp_path, rows[2])).size == (16, 16)
    assert image_path(tmp_path, rows[1]).read_bytes() == b"kept"
    assert not list(tmp_path.glob("*.tmp")) and missing_rows(rows, tmp_path) == []
    assert generate_missing(painter, [], tmp_path, seed=0, num_inference_steps=1, guidance_scale=1.0,
                            resolution=16, batch_size=1) == 0


def test_shared_seed_draws_every_row_from_the_one_seed(tmp_path):
    rows = [EvalRow(1, "a pond", None), EvalRow(7, "a road", None)]
    assert [row_seed(10, row, shared=True) for row in rows] == [10, 10]
    generate_missing(SeedPainter(), rows, tmp_path, seed=10, num_inference_steps=1, guidance_scale=1.0,
                     resolution=8, batch_size=2, shared_seed=True)
    assert {Image.open(image_path(tmp_path, row)).getpixel((0, 0)) for row in rows} == {(10, 10, 10)}
