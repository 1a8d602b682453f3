"""The conditioning core: geometry shared with the target image, nearest-neighbour masks, palettes, class checks,
per-band statistics and normalisation."""

import numpy as np
import pytest
from PIL import Image

from diffusion_model import conditioning as core
from diffusion_model.imaging import RESAMPLE, RESIZE_MODES, resize

SIZES = [(60, 40), (40, 60), (33, 33), (97, 31), (31, 97)]


def ramp(width: int, height: int) -> Image.Image:
    """An RGB image whose every pixel says where it is (x in red, y in green, both in blue)."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1).astype(np.uint8))


@pytest.mark.parametrize("mode", RESIZE_MODES)
@pytest.mark.parametrize("size", SIZES)
def test_geometry_reproduces_the_target_image_resize_pixel_for_pixel(size, mode):
    """The conditioning's crop/resize/pad is the target's: same filter, same pixels."""
    image = ramp(*size)
    geometry = core.plan_geometry(*size, 16, mode)
    assert np.array_equal(np.asarray(core.apply_geometry(image, geometry, RESAMPLE, (0, 0, 0))),
                          np.asarray(resize(image, 16, mode)))


@pytest.mark.parametrize("mode", RESIZE_MODES)
@pytest.mark.parametrize("size", [(60, 40), (40, 62), (34, 34)])
def test_a_half_size_mask_lands_where_the_full_size_one_does(size, mode):
    """A mask at half the image's pixel size, scaled into the image's geometry, gives exactly the classes the
    full-size mask does: boundaries stay where the image's are."""
    rng = np.random.default_rng(0)
    half = rng.integers(0, 6, (size[1] // 2, size[0] // 2)).astype(np.uint8)
    full = np.kron(half, np.ones((2, 2), np.uint8))
    geometry = core.plan_geometry(size[0], size[1], 12, mode)
    nearest = Image.Resampling.NEAREST
    from_full = core.apply_geometry(Image.fromarray(full), geometry, nearest)
    from_half = core.apply_geometry(Image.fromarray(half), core.scale_geometry(geometry, size, half.shape[::-1]),
                                    nearest)
    assert np.array_equal(np.asarray(from_full), np.asarray(from_half))


def test_scale_geometry_scales_each_axis_on_its_own():
    geometry = core.Geometry((10.0, 20.0, 30.0, 40.0), (8, 8), (0, 0), 8)
    assert core.scale_geometry(geometry, (100, 200), (50, 50)).box == (5.0, 5.0, 15.0, 10.0)


def test_center_crop_puts_a_boundary_exactly_where_it_belongs():
    """80x40, class 1 left of x=40 and 2 right of it; the centre crop (x 20..60) to 8 px splits at column 4."""
    mask = np.ones((40, 80), np.uint8)
    mask[:, 40:] = 2
    out = np.asarray(core.apply_geometry(Image.fromarray(mask), core.plan_geometry(80, 40, 8, "center_crop"),
                                         Image.Resampling.NEAREST))
    assert (out[:, :4] == 1).all() and (out[:, 4:] == 2).all()


def test_pad_fills_with_class_zero_around_the_mask():
    mask = np.full((20, 40), 5, np.uint8)
    out = np.asarray(core.apply_geometry(Image.fromarray(mask), core.plan_geometry(40, 20, 8, "pad"),
                                         Image.Resampling.NEAREST))
    assert (out[:2] == 0).all() and (out[6:] == 0).all() and (out[2:6] == 5).all()


def test_nearest_resize_invents_no_class():
    rng = np.random.default_rng(1)
    mask = rng.choice(np.array([0, 3, 7], np.uint8), (53, 71))
    out = core.apply_geometry(Image.fromarray(mask), core.plan_geometry(71, 53, 17, "center_crop"),
                              Image.Resampling.NEAREST)
    assert set(np.unique(np.asarray(out))) <= {0, 3, 7}


@pytest.mark.parametrize("image, conditioning, fits", [
    ((1000, 500), (999, 500), True), ((1000, 500), (500, 250), True), ((100, 50), (100, 40), False),
    ((128, 128), (128, 129), True), ((64, 64), (64, 66), False)])
def test_aspect_tolerance_is_one_percent(image, conditioning, fits):
    assert (core.aspect_mismatch(image, conditioning) is None) == fits


def test_palette_list_and_object_forms():
    assert core.parse_palette([[0, 0, 0], [255, 0, 0]]) == {(0, 0, 0): 0, (255, 0, 0): 1}
    assert core.parse_palette({"3": [0, 255, 0], "1": [1, 2, 3]}) == {(0, 255, 0): 3, (1, 2, 3): 1}
    assert core.palette_from_record(core.palette_record({(9, 9, 9): 4})) == {(9, 9, 9): 4}


@pytest.mark.parametrize("document, message", [
    ([], "non-empty"), ({"a": [0, 0, 0]}, "class numbers"), ([[0, 0]], "is not [r, g, b]"),
    ([[0, 0, 256]], "is not [r, g, b]"), ([[1, 2, 3], [1, 2, 3]], "classes 0 and 1"), ({"300": [0, 0, 0]}, "outside"),
    ("red", "expected")])
def test_bad_palettes_say_why(document, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        core.parse_palette(document)


def test_palette_maps_colours_to_classes_and_names_an_unknown_colour():
    palette = {(255, 255, 255): 1, (255, 0, 0): 2, (0, 0, 0): 0}
    rgb = np.array([[[255, 0, 0], [0, 0, 0]], [[255, 255, 255], [255, 0, 0]]], np.uint8)
    classes, problem = core.map_palette(rgb, palette)
    assert problem is None and classes.tolist() == [[2, 0], [1, 2]]
    rgb[0, 1] = [0, 0, 1]
    classes, problem = core.map_palette(rgb, palette)
    assert classes is None and "[0, 0, 1] on 1 pixels" in problem


def test_class_checks():
    mask = np.array([[0, 1], [5, 2]])
    assert core.class_problem(mask, 6) is None
    assert "class 5 is not below --num_classes 5" in core.class_problem(mask, 5)
    assert core.class_problem(np.array([[300]]), None) and core.class_problem(np.array([[255]]), None) is None


def test_single_channel_accepts_grey_rgb_only():
    grey = np.repeat(np.arange(6).reshape(2, 3, 1), 3, -1)
    assert core.single_channel(grey).tolist() == [[0, 1, 2], [3, 4, 5]]
    grey[0, 0, 1] = 9
    assert core.single_channel(grey) is None


def rows_of_bands(count: int, seed: int = 0) -> list:
    """(2, 4, 5) float32 arrays of two bands on different scales (a SAR-like dB band and a reflectance band)."""
    rng = np.random.default_rng(seed)
    return [np.stack([rng.normal(-12, 4, (4, 5)), rng.uniform(0, 3000, (4, 5))]).astype(np.float32)
            for _ in range(count)]


def test_band_stats_merged_over_rows_equal_the_stats_of_all_values():
    rows = rows_of_bands(6)
    stats = core.BandStats()
    for number, bands in enumerate(rows):
        stats.add(core.row_band_stats(bands, number))
    found = stats.result()
    everything = np.concatenate([r.reshape(2, -1) for r in rows], axis=1).astype(np.float64)
    assert found["rows"] == 6 and len(found["bands"]) == 2
    for band, values in zip(found["bands"], everything):
        assert band["count"] == values.size
        assert band["mean"] == pytest.approx(values.mean()) and band["std"] == pytest.approx(values.std())
        assert (band["min"], band["max"]) == (pytest.approx(values.min()), pytest.approx(values.max()))
        assert values.min() <= band["percentiles"]["2"] <= band["percentiles"]["98"] <= values.max()


def test_band_stats_sample_is_capped_and_repeatable(monkeypatch):
    monkeypatch.setattr(core, "SAMPLE_CAP", 50)
    results = []
    for _ in range(2):
        stats = core.BandStats()
        for number, bands in enumerate(rows_of_bands(10)):
            stats.add(core.row_band_stats(bands, number))
        results.append(stats.result())
        assert len(stats.sample[0]) == 50 and stats.seen == 10 * min(core.SAMPLE_PER_ROW, 20)
    assert results[0] == results[1]


def test_a_row_with_another_band_count_is_refused():
    stats = core.BandStats()
    stats.add(core.row_band_stats(np.zeros((2, 3, 3), np.float32), 0))
    with pytest.raises(ValueError, match="3 bands"):
        stats.add(core.row_band_stats(np.zeros((3, 3, 3), np.float32), 1))


@pytest.mark.parametrize("mode", ["minmax", "percentile", "zscore", "none"])
def test_normalisation_from_saved_stats(mode):
    rows = rows_of_bands(8, seed=2)
    stats = core.BandStats()
    for number, bands in enumerate(rows):
        stats.add(core.row_band_stats(bands, number))
    limits = core.norm_limits(stats.result(), mode)
    out = np.stack([core.normalise(r, limits, mode in ("minmax", "percentile")) for r in rows])
    if mode == "minmax":
        assert out.min() == pytest.approx(0) and out.max() == pytest.approx(1)
    if mode == "percentile":
        assert 0 <= out.min() and out.max() <= 1 and (out == 1).any() and (out == 0).any()
    if mode == "zscore":
        flat = out.transpose(1, 0, 2, 3).reshape(2, -1)
        assert flat.mean(1) == pytest.approx([0, 0], abs=1e-5) and flat.std(1) == pytest.approx([1, 1], abs=1e-4)
    if mode == "none":
        assert np.array_equal(out, np.stack(rows))


def test_a_flat_band_keeps_a_unit_scale():
    stats = core.BandStats()
    stats.add(core.row_band_stats(np.full((1, 2, 2), 7.0, np.float32), 0))
    assert core.norm_limits(stats.result(), "minmax") == [(7.0, 1.0)]


def test_band_list_flag():
    assert core.parse_band_list("2,3,4,8") == (2, 3, 4, 8)
    for bad in ("0,1", "a", ""):
        with pytest.raises(Exception):
            core.parse_band_list(bad)
