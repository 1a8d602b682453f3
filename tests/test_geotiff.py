"""The multi-band core: band choice, nodata masking, stretches (pure numpy); the tifffile reader's tags and failures."""

import argparse
import dataclasses
import io
import json
import logging

import numpy as np
import pytest
import tifffile

from diffusion_model import geotiff
from diffusion_model.geotiff import (MultibandSettings, TiffBands, default_bands, multiband_to_rgb, parse_bands,
                                     parse_percentiles, read_tiff, tiff_to_rgb)
from utils.image_errors import ImageRejected
from diffusion_model.sample_geotiff import SENTINEL2_BANDS, encode_geotiff, gdal_metadata

BIG = 10**8
S2_NAMES = SENTINEL2_BANDS


def bands_of(pixels, nodata=None, names=None, rgb=False) -> TiffBands:
    """A TiffBands as the reader would hand it over."""
    return TiffBands(np.asarray(pixels), nodata, tuple(names or (None,) * np.asarray(pixels).shape[-1]), rgb)


def constant_bands(count: int, dtype=np.uint8, size: int = 4) -> np.ndarray:
    """(size, size, count) where band i (1-based) holds 10 * i everywhere."""
    return np.stack([np.full((size, size), 10 * i, dtype=dtype) for i in range(1, count + 1)], axis=-1)


def reflectance_with_glints(seed: int = 0) -> np.ndarray:
    """(64, 64, 3) uint16: a bulk of reflectance 1000..3000 plus 1% glints at 20000."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(1000, 3001, (64, 64, 3)).astype(np.uint16)
    pixels[rng.random((64, 64)) < 0.01] = 20000
    return pixels


def bulk_span(band: np.ndarray, source: np.ndarray) -> float:
    """How many of 0..255 the source's 2-98 percentile pixels cover in the output band."""
    low, high = np.percentile(source, (2, 98))
    bulk = band[(source >= low) & (source <= high)]
    return float(bulk.max()) - float(bulk.min())


# --- flags


@pytest.mark.parametrize("text, bands", [("4,3,2", (4, 3, 2)), ("1,2,3", (1, 2, 3)), ("8", (8,)), ("1,1,1", (1, 1, 1))])
def test_parse_bands(text, bands):
    assert parse_bands(text) == bands


@pytest.mark.parametrize("text, named", [("4,3", "2 bands"), ("0,1,2", "start at 1"), ("a,b,c", "'a,b,c'"),
                                         ("1,2,3,4", "4 bands"), ("", "''"), ("-1,2,3", "start at 1")])
def test_parse_bands_refuses(text, named):
    with pytest.raises(argparse.ArgumentTypeError, match=named):
        parse_bands(text)


def test_parse_percentiles():
    assert parse_percentiles("2,98") == (2.0, 98.0) and parse_percentiles("0,100") == (0.0, 100.0)


@pytest.mark.parametrize("text", ["98,2", "5,5", "-1,50", "2,101", "2", "2,50,98", "nan,98", "x,y"])
def test_parse_percentiles_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError, match=repr(text)):
        parse_percentiles(text)


# --- default bands


@pytest.mark.parametrize(
    "count, names, rgb, expected",
    [
        (12, S2_NAMES, False, (4, 3, 2)),
        (4, ("Blue", "Green", "Red", "NIR"), False, (3, 2, 1)),
        (3, ("B02", "B03", "B04"), False, (3, 2, 1)),
        (4, (None,) * 4, True, (1, 2, 3)),
        (12, (None,) * 12, False, (1, 2, 3)),
        (5, ("red", None, None, None, None), False, (1, 2, 3)),
        (2, (None, None), False, (1,)),
        (1, (None,), False, (1,)),
    ],
)
def test_default_bands(count, names, rgb, expected):
    assert default_bands(count, names, rgb) == expected


# --- the transform


def test_bands_are_picked_and_ordered():
    rgb = multiband_to_rgb(bands_of(constant_bands(5)), MultibandSettings(bands=(5, 1, 3), stretch="none"))
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 4, 3)
    assert rgb[0, 0].tolist() == [50, 10, 30]


def test_default_bands_come_from_names():
    rgb = multiband_to_rgb(bands_of(constant_bands(12), names=S2_NAMES), MultibandSettings(stretch="none"))
    assert rgb[0, 0].tolist() == [40, 30, 20]


def test_fewer_bands_than_requested_is_rejected():
    with pytest.raises(ImageRejected) as caught:
        multiband_to_rgb(bands_of(constant_bands(4)), MultibandSettings(bands=(8, 4, 3)))
    assert caught.value.reason == "too_few_bands"
    assert "band 8" in caught.value.detail and "has 4" in caught.value.detail


@pytest.mark.parametrize("dtype, nodata", [(np.uint16, 0), (np.int16, -9999), (np.float32, float("nan"))])
def test_all_nodata_is_rejected(dtype, nodata):
    with pytest.raises(ImageRejected) as caught:
        multiband_to_rgb(bands_of(np.full((8, 8, 3), nodata, dtype=dtype), nodata=nodata), MultibandSettings())
    assert caught.value.reason == "all_nodata"


def test_nodata_is_masked_before_the_stretch():
    ramp = np.linspace(1000, 2000, 64 * 32).reshape(32, 64)
    band = np.concatenate([ramp, np.zeros((32, 64))]).astype(np.uint16)
    rgb = multiband_to_rgb(bands_of(band[..., None], nodata=0), MultibandSettings())
    valid, masked = rgb[:32, :, 0], rgb[32:]
    assert masked.max() == 0, "nodata pixels are written as black"
    assert valid.min() == 0 and valid.max() == 255
    assert bulk_span(valid, ramp) >= 250, "the nodata zeros must not take part in the percentiles"


def test_a_band_at_nodata_masks_the_pixel():
    pixels = np.full((4, 4, 3), 500, dtype=np.uint16)
    pixels[..., 0] = np.arange(16).reshape(4, 4) + 1000
    pixels[0, 0, 2] = 7
    rgb = multiband_to_rgb(bands_of(pixels, nodata=7), MultibandSettings(stretch="minmax"))
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[3, 3, 0] == 255 and rgb[0, 1, 0] == 0


def test_nan_is_never_data():
    pixels = np.linspace(0.0, 1.0, 48, dtype=np.float32).reshape(4, 4, 3)
    pixels[1, 1, 1] = np.nan
    rgb = multiband_to_rgb(bands_of(pixels), MultibandSettings(stretch="minmax"))
    assert rgb[1, 1].tolist() == [0, 0, 0] and rgb.max() == 255


def test_percentile_stretch_keeps_the_bulk_where_minmax_loses_it():
    source = reflectance_with_glints()
    percentile = multiband_to_rgb(bands_of(source), MultibandSettings(stretch="percentile"))
    minmax = multiband_to_rgb(bands_of(source), MultibandSettings(stretch="minmax"))
    for band in range(3):
        assert bulk_span(percentile[..., band], source[..., band]) >= 240
        assert bulk_span(minmax[..., band], source[..., band]) < 40, "glints squash a min-max stretch"
    assert len(np.unique(percentile[..., 0])) > 200


def test_stretch_percentiles_set_the_limits():
    ramp = np.arange(1000, dtype=np.uint16).reshape(25, 40)[..., None]
    rgb = multiband_to_rgb(bands_of(ramp), MultibandSettings(stretch="percentile", percentiles=(10.0, 60.0)))
    grey = rgb[..., 0].ravel()
    assert grey[:95].max() == 0 and grey[605:].min() == 255
    assert 120 <= grey[350] <= 135, "the middle of 10..60 percent maps to mid-grey"


def test_each_band_is_stretched_on_its_own():
    pixels = np.stack([np.linspace(0, 100, 64), np.linspace(5000, 9000, 64), np.linspace(0.2, 0.3, 64)], -1)
    rgb = multiband_to_rgb(bands_of(pixels.reshape(8, 8, 3)), MultibandSettings(stretch="minmax"))
    assert rgb.reshape(64, 3)[0].tolist() == [0, 0, 0] and rgb.reshape(64, 3)[-1].tolist() == [255, 255, 255]


def test_float_reflectance_becomes_8bit():
    reflectance = np.random.default_rng(1).uniform(0.02, 0.4, (32, 32, 3)).astype(np.float32)
    rgb = multiband_to_rgb(bands_of(reflectance), MultibandSettings())
    assert rgb.dtype == np.uint8 and bulk_span(rgb[..., 1], reflectance[..., 1]) >= 240


def test_auto_keeps_8bit_values_and_stretches_16bit():
    eight = np.random.default_rng(2).integers(60, 120, (16, 16, 3)).astype(np.uint8)
    assert np.array_equal(multiband_to_rgb(bands_of(eight), MultibandSettings()), eight)
    assert np.array_equal(multiband_to_rgb(bands_of(eight), MultibandSettings(stretch="none")), eight)
    sixteen = eight.astype(np.uint16) * 20
    assert multiband_to_rgb(bands_of(sixteen), MultibandSettings()).max() == 255


def test_none_clips_values_past_8bit():
    pixels = np.array([[[-5.0], [100.4], [300.0]]])
    assert multiband_to_rgb(bands_of(pixels), MultibandSettings(stretch="none"))[0, :, 0].tolist() == [0, 100, 255]


def test_flat_band_becomes_mid_grey():
    rgb = multiband_to_rgb(bands_of(np.full((4, 4, 3), 1234, dtype=np.uint16)), MultibandSettings())
    assert np.all(rgb == 128)


def test_single_band_is_grey():
    band = np.arange(64, dtype=np.uint16).reshape(8, 8, 1) * 300
    rgb = multiband_to_rgb(bands_of(band), MultibandSettings())
    assert rgb.shape == (8, 8, 3)
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
    one_of_many = multiband_to_rgb(bands_of(constant_bands(4)), MultibandSettings(bands=(2,), stretch="none"))
    assert one_of_many[0, 0].tolist() == [20, 20, 20]


# --- the reader


def twelve_bands() -> np.ndarray:
    """(24, 32, 12) uint16 with distinct values per band and pixel."""
    return (np.arange(24 * 32 * 12, dtype=np.uint16).reshape(24, 32, 12) % 4000) + 1000


@pytest.mark.parametrize("compression", [None, "zlib", "lzw", "packbits"])
@pytest.mark.parametrize("planar", [False, True])
def test_reader_gives_height_width_bands(compression, planar):
    pixels = twelve_bands()
    tiff = read_tiff(encode_geotiff(pixels, "sentinel2", nodata=0, names=S2_NAMES, compression=compression,
                                    planar=planar), BIG)
    assert np.array_equal(tiff.pixels, pixels)
    assert tiff.nodata == 0 and tiff.names == S2_NAMES and not tiff.photometric_rgb


def test_reader_naip_layout_is_photometric_rgb_with_four_bands():
    pixels = np.random.default_rng(3).integers(0, 256, (16, 16, 4)).astype(np.uint8)
    tiff = read_tiff(encode_geotiff(pixels, "naip"), BIG)
    assert np.array_equal(tiff.pixels, pixels) and tiff.photometric_rgb and tiff.nodata is None


@pytest.mark.parametrize("nodata, expected", [("-9999", -9999.0), ("nan", None), ("1,5", 1.5), ("junk", None)])
def test_reader_parses_gdal_nodata(nodata, expected):
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.ones((4, 4), np.float32), extratags=[(42113, "s", 0, nodata, True)])
    found = read_tiff(buffer.getvalue(), BIG).nodata
    assert found == expected or (expected is None and (found is None or np.isnan(found)))


def test_colour_interpretation_wins_over_description():
    xml = gdal_metadata(["first", "second", "third"]).replace(
        "<GDALMetadata>", '<GDALMetadata><Item name="COLORINTERP" sample="2" role="colorinterp">Red</Item>'
                          '<Item name="COLORINTERP" sample="0" role="colorinterp">Blue</Item>'
                          '<Item name="COLORINTERP" sample="1" role="colorinterp">Green</Item>')
    assert geotiff.band_names(xml, 3) == ("Blue", "Green", "Red")
    assert geotiff.band_names("<not xml", 3) == (None, None, None)
    assert geotiff.band_names(gdal_metadata(["a", "b", "c"]), 2) == ("a", "b")


def test_reader_refuses_a_cut_off_file():
    data = encode_geotiff(twelve_bands(), "sentinel2", compression=None)
    with pytest.raises(ImageRejected) as caught:
        read_tiff(data[: len(data) * 2 // 3], BIG)
    assert caught.value.reason == "truncated"


def test_reader_refuses_corrupt_data_as_undecodable():
    data = bytearray(encode_geotiff(twelve_bands(), "sentinel2", compression="zlib"))
    data[-400:] = b"\xff" * 400
    with pytest.raises(ImageRejected) as caught:
        read_tiff(bytes(data), BIG)
    assert caught.value.reason == "undecodable"
    with pytest.raises(ImageRejected, match="undecodable"):
        read_tiff(b"II*\x00" + b"\x00" * 12, BIG)


def test_reader_checks_size_before_decoding(monkeypatch):
    decoded = []
    monkeypatch.setattr(tifffile.TiffPage, "asarray", lambda self, *a, **k: decoded.append(self))
    with pytest.raises(ImageRejected) as caught:
        read_tiff(encode_geotiff(twelve_bands(), "sentinel2"), 24 * 32 - 1)
    assert caught.value.reason == "too_large" and decoded == []


def test_palette_tiff_is_left_to_pillow():
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.zeros((4, 4), np.uint8), photometric="palette",
                     colormap=np.zeros((3, 256), np.uint16))
    assert read_tiff(buffer.getvalue(), BIG) is None
    assert tiff_to_rgb(buffer.getvalue(), BIG, MultibandSettings()) is None


def test_tiff_to_rgb_is_an_rgb_image():
    image = tiff_to_rgb(encode_geotiff(twelve_bands(), "sentinel2", names=S2_NAMES), BIG, MultibandSettings())
    assert (image.mode, image.size) == ("RGB", (32, 24))


def test_settings_survive_the_json_round_trip_of_the_resume_guard():
    settings = MultibandSettings(bands=(4, 3, 2), stretch="percentile", percentiles=(1, 99))
    stored = dataclasses.asdict(settings)
    assert json.loads(json.dumps(stored)) == stored == {"bands": [4, 3, 2], "stretch": "percentile",
                                                        "percentiles": [1.0, 99.0]}
    assert settings == MultibandSettings(bands=[4, 3, 2], stretch="percentile", percentiles=[1.0, 99.0])


def test_alpha_zero_is_nodata():
    pixels = np.zeros((4, 8, 4), np.uint16)
    pixels[..., :3] = np.arange(32).reshape(4, 8, 1) * 100
    pixels[:, 4:, 3] = 65535
    rgb = multiband_to_rgb(TiffBands(pixels, None, (None,) * 4, True, alpha=3), MultibandSettings(stretch="minmax"))
    assert rgb[:, :4].max() == 0, "transparent pixels are black"
    assert rgb[0, 4].tolist() == [0, 0, 0] and rgb[3, 7].tolist() == [255, 255, 255], "limits from opaque pixels"


@pytest.mark.parametrize("mode, alpha", [("RGBA", 3), ("LA", 1), ("RGB", None)])
def test_reader_finds_the_alpha_band(mode, alpha):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, (4, 4)).save(buffer, format="TIFF")
    assert read_tiff(buffer.getvalue(), BIG).alpha == alpha


def test_complex_samples_are_undecodable():
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.ones((4, 4), np.complex64))
    with pytest.raises(ImageRejected, match="undecodable: unsupported sample type complex64"):
        read_tiff(buffer.getvalue(), BIG)


def test_a_broken_extra_samples_tag_is_no_alpha():
    from types import SimpleNamespace

    alpha = tifffile.EXTRASAMPLE.UNASSALPHA
    assert geotiff.alpha_band(SimpleNamespace(samplesperpixel=4, extrasamples=(alpha,)), 4) == 3
    assert geotiff.alpha_band(SimpleNamespace(samplesperpixel=1, extrasamples=(alpha, alpha)), 1) is None
    assert geotiff.alpha_band(SimpleNamespace(samplesperpixel=4, extrasamples=(alpha,)), 1) is None


def test_broken_tags_leave_no_log_lines(caplog):
    data = bytearray(encode_geotiff(twelve_bands(), "sentinel2", compression=None))
    data[12] = 0x99  # ImageWidth's field type
    with caplog.at_level(logging.DEBUG):
        try:
            read_tiff(bytes(data), BIG)
        except ImageRejected:
            pass
    assert [record.getMessage() for record in caplog.records] == []


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow notes the broken tags it skips
def test_corrupted_tiles_only_ever_fail_as_rows():
    from diffusion_model.imaging import prepare
    from diffusion_model.sample_geotiff import naip_like

    rng = np.random.default_rng(7)
    scene = rng.integers(0, 256, (24, 24, 3)).astype(np.uint8)
    sources = [encode_geotiff(twelve_bands()[:24, :24], "sentinel2", nodata=0, names=S2_NAMES, compression=None),
               encode_geotiff(twelve_bands()[:24, :24], "sentinel2", compression="lzw", planar=True),
               encode_geotiff(naip_like(scene), "naip", compression="zlib")]
    outcomes = set()
    for case in range(300):
        data = bytearray(sources[case % len(sources)])
        for position in rng.integers(4, 300, rng.integers(1, 4)):
            data[position] = rng.integers(0, 256)
        try:
            prepare(bytes(data), 16, "center_crop", 80, 10**6)
            outcomes.add("ok")
        except ImageRejected as err:
            outcomes.add(err.reason)
    assert {"ok", "undecodable"} <= outcomes


@pytest.mark.parametrize("options", [{"bigtiff": True}, {"byteorder": ">"}, {"tile": (16, 16), "compression": "zlib"},
                                     {"tile": (16, 16), "planarconfig": "separate", "compression": "lzw"}])
def test_reader_handles_bigtiff_big_endian_and_tiled_files(options):
    pixels = twelve_bands()
    data = np.moveaxis(pixels, -1, 0) if options.get("planarconfig") == "separate" else pixels
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, data, photometric="minisblack", extratags=[(42113, "s", 0, "0", True)],
                     **{"planarconfig": "contig", **options})
    tiff = read_tiff(buffer.getvalue(), BIG)
    assert np.array_equal(tiff.pixels, pixels) and tiff.nodata == 0
