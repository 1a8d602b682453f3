"""A row's conditioning bytes -> the file create.py writes: RGB like the target, masks as lossless class indices,
bands as float32 without an 8-bit step; and the reasons a conditioning fails its row."""

import io

import numpy as np
import pytest
import tifffile
from PIL import Image

from diffusion_model.conditioning import ConditioningSettings, palette_record
from diffusion_model.conditioning_io import prepare_conditioning, summary_of_file
from utils.image_errors import ImageRejected
from diffusion_model.imaging import resize

BIG = 10**8


def png(array: np.ndarray) -> bytes:
    """PNG bytes of an array."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def tiff(bands: np.ndarray, nodata=None) -> bytes:
    """A (height, width, bands) multi-band TIFF, optionally with GDAL_NODATA."""
    buffer = io.BytesIO()
    extratags = [(42113, "s", 0, str(nodata), True)] if nodata is not None else []
    layout = {"planarconfig": "contig"} if bands.shape[-1] > 1 else {}
    tifffile.imwrite(buffer, bands if bands.shape[-1] > 1 else bands[..., 0], photometric="minisblack",
                     extratags=extratags, **layout)
    return buffer.getvalue()


def prepare(data, size, settings, resolution=8, mode="stretch"):
    """prepare_conditioning with a generous pixel limit and row seed 1."""
    return prepare_conditioning(data, size, settings, resolution, mode, BIG, 1)


def test_image_conditioning_is_the_target_resize_of_the_same_picture():
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    made, summary = prepare(png(picture), (50, 30), ConditioningSettings("image"), 16, "center_crop")
    expected = resize(Image.fromarray(picture), 16, "center_crop")
    assert summary is None and np.array_equal(np.asarray(Image.open(io.BytesIO(made))), np.asarray(expected))


def test_a_palette_mask_becomes_class_indices_in_an_8bit_png():
    colours = [[0, 0, 0], [255, 0, 0], [0, 0, 255]]
    classes = np.array([[0, 1, 1, 2]] * 4)
    rgb = np.array(colours, np.uint8)[classes]
    settings = ConditioningSettings("mask", palette=palette_record({tuple(c): i for i, c in enumerate(colours)}))
    made, summary = prepare(png(rgb), (4, 4), settings, resolution=4)
    out = Image.open(io.BytesIO(made))
    assert (out.format, out.mode) == ("PNG", "L")
    assert np.array_equal(np.asarray(out), classes) and summary == {"class_counts": [4, 8, 4]}


def test_a_grey_mask_keeps_its_values_and_a_resized_one_gains_none():
    mask = np.random.default_rng(1).choice(np.array([0, 4, 9], np.uint8), (21, 35))
    made, _ = prepare(png(mask), (70, 42), ConditioningSettings("mask", num_classes=10), resolution=8,
                      mode="center_crop")
    assert set(np.unique(np.asarray(Image.open(io.BytesIO(made))))) <= {0, 4, 9}


@pytest.mark.parametrize("data, settings, reason", [
    (b"junk", ConditioningSettings("mask"), "conditioning_undecodable"),
    (None, ConditioningSettings("image"), "conditioning_null_image"),
    (png(np.full((4, 4), 7, np.uint8)), ConditioningSettings("mask", num_classes=7), "conditioning_class_out_of_range"),
    (png(np.zeros((4, 6), np.uint8)), ConditioningSettings("mask"), "conditioning_aspect_ratio"),
    (png(np.dstack([np.zeros((4, 4), np.uint8), np.ones((4, 4), np.uint8), np.zeros((4, 4), np.uint8)])),
     ConditioningSettings("mask"), "conditioning_not_single_channel"),
    (png(np.full((4, 4, 3), 9, np.uint8)), ConditioningSettings("mask", palette={"0": [0, 0, 0]}),
     "conditioning_unknown_colour"),
    (tiff(np.zeros((4, 4, 2), np.float32)), ConditioningSettings("bands", bands=[3]), "conditioning_too_few_bands"),
])
def test_conditioning_failures_carry_their_reason(data, settings, reason):
    with pytest.raises(ImageRejected) as caught:
        prepare(data, (4, 4), settings)
    assert caught.value.reason == reason and (caught.value.detail or reason == "conditioning_null_image")


def test_bands_are_kept_as_float32_without_an_8bit_step_in_the_order_asked():
    values = np.random.default_rng(2).uniform(-30, 4000, (8, 8, 3)).astype(np.float32)
    made, summary = prepare(tiff(values), (8, 8), ConditioningSettings("bands", bands=[3, 1]))
    out = np.load(io.BytesIO(made))
    assert out.dtype == np.float32 and out.shape == (2, 8, 8)
    assert np.array_equal(out[0], values[..., 2]) and np.array_equal(out[1], values[..., 0])
    assert summary["band_stats"]["count"] == 64
    assert summary["band_stats"]["max"][0] == pytest.approx(values[..., 2].max())


def test_bands_nodata_becomes_zero_and_a_resize_stays_in_range():
    values = np.full((16, 16, 1), 500.0, np.float32)
    values[0, 0] = -9999
    made, _ = prepare(tiff(values, nodata=-9999), (16, 16), ConditioningSettings("bands"), resolution=16)
    out = np.load(io.BytesIO(made))
    assert out[0, 0, 0] == 0 and (out[0].ravel()[1:] == 500).all()
    made, _ = prepare(tiff(values, nodata=-9999), (16, 16), ConditioningSettings("bands"), resolution=4)
    out = np.load(io.BytesIO(made))
    assert out.shape == (1, 4, 4) and 0 <= out.min() and out.max() == pytest.approx(500)


def test_a_resumed_row_gets_the_same_summary_from_its_file(tmp_path):
    values = np.random.default_rng(3).normal(0, 5, (8, 8, 2)).astype(np.float32)
    made, summary = prepare(tiff(values), (8, 8), ConditioningSettings("bands"))
    (tmp_path / "c.npy").write_bytes(made)
    assert summary_of_file(tmp_path / "c.npy", "bands", 1) == summary
    mask_made, mask_summary = prepare(png(np.eye(4, dtype=np.uint8)), (4, 4), ConditioningSettings("mask"),
                                      resolution=4)
    (tmp_path / "m.png").write_bytes(mask_made)
    assert summary_of_file(tmp_path / "m.png", "mask", 1) == mask_summary
