"""The sample GeoTIFF writer: NAIP-like and Sentinel-2-like bands from the sample scenes, with real GeoTIFF tags."""

import io

import numpy as np
import pyarrow.parquet as pq
import tifffile

from diffusion_model import sample_geotiff as sg


def open_page(data: bytes):
    """(first page's tags by code, GeoTIFF metadata, pixels) of TIFF bytes."""
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages.first
        return {tag.code: tag.value for tag in page.tags}, tif.geotiff_metadata, page.asarray()


def test_naip_like_is_rgbn_uint8_over_the_scene():
    rgb, _, _ = sg.scene_pixels(3, 0)
    tags, geo, pixels = open_page(sg.geotiff_row(3, 0, "naip")["image"]["bytes"])
    assert pixels.shape == (224, 224, 4) and pixels.dtype == np.uint8
    assert np.array_equal(pixels[..., :3], rgb)
    assert tags[262] == tifffile.PHOTOMETRIC.RGB and 42113 not in tags
    assert geo["ProjectedCSTypeGeoKey"] == 26910 and geo["ModelPixelScale"][:2] == [0.6, 0.6], "NAD83 UTM 10N"
    # The top-left corner lies half the tile (224 px x 0.6 m) west and north of the centre, 551000 E 4180000 N.
    assert geo["ModelTiepoint"] == [0.0, 0.0, 0.0, 551000 - 67.2, 4180000 + 67.2, 0.0]


def test_nir_is_bright_over_vegetation_and_dark_over_water():
    nir = sg.synthetic_nir(np.array([[[74, 120, 52], [40, 70, 95]]], np.uint8))
    assert nir[0, 0] > 150 and nir[0, 1] < 60


def test_sentinel2_like_is_twelve_band_reflectance_with_nodata_and_glints():
    rgb, _, _ = sg.scene_pixels(1, 0)
    row = sg.geotiff_row(1, 0, "sentinel2")
    tags, geo, pixels = open_page(row["image"]["bytes"])
    assert pixels.shape == (224, 224, 12) and pixels.dtype == np.uint16
    assert tags[42113] == "0" and all(f">{name}<" in tags[42112] for name in sg.SENTINEL2_BANDS)
    assert geo["ProjectedCSTypeGeoKey"] == 32633 and geo["ModelPixelScale"][:2] == [10.0, 10.0]
    assert np.all(pixels[0, 0] == 0) and np.all(pixels[:70, :3] == 0), "nodata wedge in the top-left corner"
    data = pixels[150:, 150:]
    glints = np.all(data == sg.GLINT_VALUE, axis=-1)
    assert 0 < glints.mean() < 0.02
    bulk = data[~glints]
    assert 1000 <= bulk.min() and bulk.max() <= 1000 + 12 * 255
    for band, channel in zip(sg.SENTINEL2_TRUE_COLOUR, range(3)):
        kept = ~glints.ravel()
        source = rgb[150:, 150:, channel].ravel()[kept].astype(float)
        assert np.corrcoef(data[..., band - 1].ravel()[kept], source)[0, 1] > 0.99


def test_planar_and_compression_options_keep_the_pixels():
    bands = np.random.default_rng(0).integers(0, 5000, (8, 8, 5)).astype(np.uint16)
    for compression in (None, "lzw"):
        _, _, pixels = open_page(sg.encode_geotiff(bands, "sentinel2", compression=compression, planar=True))
        assert np.array_equal(np.moveaxis(pixels, 0, -1), bands)


def test_parquet_holds_tif_rows_in_the_rsicd_schema(tmp_path):
    path = sg.make_geotiff_parquet(tmp_path / "s2.parquet", 3, "sentinel2", seed=4)
    table = pq.read_table(path)
    assert table.num_rows == 3 and table.column_names == ["filename", "captions", "image"]
    first = table.slice(0, 1).to_pylist()[0]
    assert first["filename"].endswith(".tif") and len(first["captions"]) == 5
    assert first["image"]["bytes"][:4] == b"II*\x00"
    assert not list(tmp_path.glob("*.tmp*")), "written under a temporary name, then renamed"
