"""GeoTIFF rows end to end: a Parquet of NAIP-like and Sentinel-2-like GeoTIFFs (and odd tiles) -> create.py
(subprocess) -> format.py -> datasets' imagefolder; --bands, --stretch and their usage errors; the resume guard;
the shared NAIP sample re-written as RGBN GeoTIFFs."""

import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffusion_model.georef import utm_to_latlon
from diffusion_model.imaging import RESAMPLE
from diffusion_model.sample_data import RSICD_SCHEMA, make_sample_row
from diffusion_model.sample_geotiff import (NODATA, SENTINEL2_BANDS, encode_geotiff, geotiff_row, naip_like,
                                            scene_pixels, sentinel2_like)

CREATE, FORMAT = "diffusion_model/create.py", "diffusion_model/format.py"
SHARED_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "naip_rsicd_sample.parquet"
RESOLUTION = 64
# Row numbers (1-based) of the mixed Parquet written by write_mixed.
S2_ROWS, NAIP_ROWS, S2_LZW_PLANAR, ALL_NODATA, GREY_FLOAT, JPEG_ROW, CUT_OFF, PLAIN_RGB_TIFF, JUNK_NODATA = (
    (1, 2, 3), (4, 5), 6, 7, 8, 9, 10, 11, 12)


def row(filename: str, data: bytes, caption: str = "a tile of fields and roads .") -> dict:
    """One RSICD-schema row."""
    return {"filename": filename, "captions": [caption], "image": {"bytes": data, "path": None}}


def pillow_tiff(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB TIFF as Pillow writes it (UCM-Captions' kind)."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="TIFF")
    return buffer.getvalue()


def write_mixed(path: Path) -> Path:
    """Sentinel-2 and NAIP GeoTIFFs, an LZW planar one, an all-nodata tile, a float grey band, a JPEG, a cut-off
    GeoTIFF, a plain RGB TIFF and one whose GDAL_NODATA is junk, in that order (see the row-number constants)."""
    rows = [geotiff_row(i, 0, "sentinel2") for i in range(3)] + [geotiff_row(i, 0, "naip") for i in (3, 4)]
    rgb5, _, _ = scene_pixels(5, 0)
    rows.append(row("lzw.tif", encode_geotiff(sentinel2_like(rgb5, np.random.default_rng(5)), "sentinel2",
                                              nodata=NODATA, names=SENTINEL2_BANDS, compression="lzw", planar=True)))
    rows.append(row("empty.tif", encode_geotiff(np.zeros((32, 32, 12), np.uint16), "sentinel2", nodata=NODATA)))
    rgb6, _, _ = scene_pixels(6, 0)
    rows.append(row("grey.tif", encode_geotiff((rgb6[..., 1:2] / 255 * 0.4).astype(np.float32), "sentinel2")))
    rows.append(row("scene.jpg", make_sample_row(7, 0)["image"]["bytes"]))
    cut = encode_geotiff(sentinel2_like(rgb5, np.random.default_rng(8)), "sentinel2", compression=None)
    rows.append(row("cut.tif", cut[: len(cut) // 2]))
    rows.append(row("plain.tif", pillow_tiff(scene_pixels(9, 0)[0])))
    rows.append(row("junk_nodata.tif", encode_geotiff(naip_like(rgb6), "naip", nodata="n/a")))
    pq.write_table(pa.Table.from_pylist(rows, schema=RSICD_SCHEMA), path, row_group_size=4)
    return path


def read_report(output_dir: Path) -> dict:
    """create_report.json."""
    return json.loads((output_dir / "create_report.json").read_text(encoding="utf-8"))


def failures(output_dir: Path) -> dict:
    """Row number -> failure reason."""
    return {f["row"]: f["reason"] for f in read_report(output_dir)["failures"]}


def output_pixels(output_dir: Path, number: int) -> np.ndarray:
    """Row number's output image as an int array."""
    return np.asarray(Image.open(output_dir / "rsicd_images" / f"image_{number:06d}.jpg")).astype(int)


def resized(rgb: np.ndarray, size: int = RESOLUTION) -> np.ndarray:
    """A square scene resized as create.py resizes it, as an int array."""
    return np.asarray(Image.fromarray(rgb).resize((size, size), RESAMPLE)).astype(int)


def assert_usage_error(result, named: str) -> None:
    """Exit 2, one stderr line naming the bad value, no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert named in result.stderr


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """The mixed Parquet."""
    return write_mixed(tmp_path_factory.mktemp("geotiff") / "tiles.parquet")


@pytest.fixture(scope="module")
def default_run(mixed, run_script):
    """create.py with default band and stretch settings, then format.py."""
    output_dir = mixed.parent / "default"
    created = run_script(CREATE, ["--parquet_path", mixed, "--output_dir", output_dir, "--resolution", RESOLUTION,
                                  "--num_workers", 2])
    formatted = run_script(FORMAT, ["--caption_file", output_dir / "captions.txt",
                                    "--output_file", output_dir / "metadata.jsonl"])
    return output_dir, created, formatted


def test_default_run_keeps_every_good_row_and_names_the_bad(default_run):
    output_dir, created, formatted = default_run
    assert created.returncode == 0, created.stderr
    assert formatted.returncode == 0, formatted.stderr
    assert "10/12 rows ok" in created.stdout and "2 failed (1 all_nodata, 1 truncated)" in created.stdout
    assert failures(output_dir) == {ALL_NODATA: "all_nodata", CUT_OFF: "truncated"}
    assert read_report(output_dir)["settings"]["stretch"] == "auto"
    noise = [line for line in created.stderr.splitlines() if not re.match(r"\d\d:\d\d:\d\d INFO ", line)]
    assert noise == [], "only our own log lines: tifffile's notices about odd tags are not the user's business"


def test_outputs_load_as_an_imagefolder(default_run):
    from datasets import load_dataset

    output_dir, _, _ = default_run
    dataset = load_dataset("imagefolder", data_dir=str(output_dir), split="train")
    assert dataset.num_rows == 10 and dataset.column_names == ["image", "text", "source_file", "metadata"]
    assert {(image.mode, image.size) for image in dataset["image"]} == {("RGB", (RESOLUTION, RESOLUTION))}
    metadata = dataset["metadata"]
    assert metadata[3]["gsd"] == 2.1 and metadata[7] is None, "NAIP row 4 has its GSD, the JPEG row 9 nothing"


def test_geotiff_rows_carry_gsd_and_centre_from_their_georeference(default_run):
    """No flag needed: each GeoTIFF's pixel scale, tie point and EPSG code give its output GSD (source metres per
    pixel x 224 source px / 64 output px) and centre; a JPEG or a plain TIFF gets no metadata at all."""
    output_dir, created, _ = default_run
    lines = (output_dir / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    metadata = {int(r["file_name"][-10:-4]): r.get("metadata") for r in map(json.loads, lines)}
    naip = {"gsd": 0.6 * 224 / RESOLUTION, "lat": 37.7659046, "lon": -122.420955}  # UTM 10N 551000 E 4180000 N
    s2_lat, s2_lon = utm_to_latlon(501120, 3998880, 33, False)
    for number in (*NAIP_ROWS, JUNK_NODATA):
        assert metadata[number] == pytest.approx(naip, abs=1e-6), number
    for number in (*S2_ROWS, S2_LZW_PLANAR, GREY_FLOAT):
        assert metadata[number] == pytest.approx({"gsd": 35.0, "lat": s2_lat, "lon": s2_lon}, abs=1e-6), number
    assert metadata[JPEG_ROW] is None and metadata[PLAIN_RGB_TIFF] is None
    report = read_report(output_dir)
    assert report["metadata"]["rows_with_metadata"] == 8 and report["metadata_problems"] == []
    assert "metadata on 8 rows (gsd 8, lat 8, lon 8), 0 bad values dropped" in created.stdout


def test_sentinel2_default_is_true_colour_stretched_with_nodata_black(default_run):
    output_dir, _, _ = default_run
    rows, cols = np.mgrid[0:RESOLUTION, 0:RESOLUTION]
    valid = rows + cols >= RESOLUTION * 3 // 8  # clear of the nodata wedge (a third of the side, plus resampling)
    for number, scene in ((1, 0), (2, 1), (3, 2), (S2_LZW_PLANAR, 5)):
        source, output = resized(scene_pixels(scene, 0)[0])[valid], output_pixels(output_dir, number)
        assert output[:6, :6].max() < 25, "the nodata wedge is black"
        output = output[valid]
        assert np.corrcoef(output.sum(-1), source.sum(-1))[0, 1] > 0.9, "bands 4,3,2 show the scene"
        for channel in range(3):
            spread = [np.percentile(v[:, channel], 98) - np.percentile(v[:, channel], 2) for v in (output, source)]
            assert spread[0] > 1.8 * spread[1], "the stretch widens the bulk of the histogram"
        assert np.isin(output, (0, 255)).mean() < 0.05, "and does not clip it"


def test_naip_and_plain_tiffs_keep_their_8bit_pixels(default_run):
    output_dir, _, _ = default_run
    for number, scene in ((NAIP_ROWS[0], 3), (NAIP_ROWS[1], 4), (PLAIN_RGB_TIFF, 9), (JUNK_NODATA, 6)):
        difference = np.abs(output_pixels(output_dir, number) - resized(scene_pixels(scene, 0)[0]))
        # JPEG and resampling on the textured class scenes cost a few levels; any stretch costs tens.
        assert difference.mean() < 5, (number, difference.mean())


def test_single_band_is_grey_and_jpeg_rows_unaffected(default_run):
    output_dir, _, _ = default_run
    grey = output_pixels(output_dir, GREY_FLOAT)
    assert np.abs(grey[..., 0] - grey[..., 2]).max() <= 4 and grey.max() - grey.min() > 150
    jpeg = np.abs(output_pixels(output_dir, JPEG_ROW) - resized(scene_pixels(7, 0)[0]))
    assert jpeg.mean() < 2.5


def test_bands_beyond_an_image_fail_its_row(mixed, run_script):
    output_dir = mixed.parent / "false_colour"
    result = run_script(CREATE, ["--parquet_path", mixed, "--output_dir", output_dir, "--resolution", 32,
                                 "--bands", "8,4,3", "--num_workers", 1])
    assert result.returncode == 0, result.stderr
    too_few = {number: "too_few_bands" for number in (*NAIP_ROWS, GREY_FLOAT, PLAIN_RGB_TIFF, JUNK_NODATA)}
    assert failures(output_dir) == {**too_few, ALL_NODATA: "all_nodata", CUT_OFF: "truncated"}
    detail = next(f["detail"] for f in read_report(output_dir)["failures"] if f["row"] == GREY_FLOAT)
    assert detail == "band 8 requested, the image has 1"
    source = resized(scene_pixels(0, 0)[0], 32)  # row S2_ROWS[0] draws scene 0
    green = (source[..., 1] > source[..., 0] + 10) & (source[..., 1] > source[..., 2] + 10)  # vegetation
    assert green.sum() > 20, "the scene has vegetation to look at"
    false_colour = output_pixels(output_dir, S2_ROWS[0])
    assert (false_colour[..., 0] > false_colour[..., 1])[green].mean() > 0.5, "band 8 (near-infrared) shows in red"


def test_resume_refuses_other_band_settings(default_run, mixed, run_script):
    output_dir, created, _ = default_run
    assert created.returncode == 0
    for flags, named in ((["--stretch", "minmax"], "'stretch': 'auto'"), (["--bands", "4,3,2"], "'bands': None")):
        result = run_script(CREATE, ["--parquet_path", mixed, "--output_dir", output_dir, "--resolution", RESOLUTION,
                                     *flags])
        assert_usage_error(result, named)
    metadata = (output_dir / "metadata_values.jsonl").read_text(encoding="utf-8")
    again = run_script(CREATE, ["--parquet_path", mixed, "--output_dir", output_dir, "--resolution", RESOLUTION,
                                "--stretch", "auto", "--stretch_percentiles", "2,98", "--num_workers", 1])
    assert again.returncode == 0, again.stderr
    assert read_report(output_dir)["images_reused"] == 10
    assert (output_dir / "metadata_values.jsonl").read_text(encoding="utf-8") == metadata, \
        "reused images get the same metadata: their georeference is read from the header again"


@pytest.mark.parametrize("flags, named", [
    (["--bands", "4,3"], "--bands: '4,3'"),
    (["--stretch_percentiles", "98,2"], "--stretch_percentiles: '98,2'"),
    (["--stretch", "gamma"], "--stretch: invalid choice: 'gamma'"),
])
def test_bad_band_flags_are_usage_errors(flags, named, tmp_path, run_script):
    result = run_script(CREATE, ["--parquet_path", tmp_path / "absent.parquet", "--output_dir", tmp_path / "o", *flags])
    assert_usage_error(result, named)
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not SHARED_SAMPLE.exists(), reason="shared NAIP sample not present")
def test_shared_naip_tiles_as_rgbn_geotiffs_match_their_jpegs(tmp_path, run_script):
    table = pq.ParquetFile(SHARED_SAMPLE).read_row_group(0).slice(0, 12)
    jpeg_rows = table.to_pylist()
    tiff_rows = []
    for source in jpeg_rows:
        rgb = np.asarray(Image.open(io.BytesIO(source["image"]["bytes"])).convert("RGB"))
        tiff_rows.append({**source, "filename": str(Path(source["filename"]).with_suffix(".tif")),
                          "image": {"bytes": encode_geotiff(naip_like(rgb), "naip"), "path": None}})
    pq.write_table(pa.Table.from_pylist(jpeg_rows, schema=table.schema), tmp_path / "jpeg.parquet")
    pq.write_table(pa.Table.from_pylist(tiff_rows, schema=table.schema), tmp_path / "rgbn.parquet")
    for name, extra in (("jpeg", []), ("rgbn", ["--bands", "1,2,3"])):
        result = run_script(CREATE, ["--parquet_path", tmp_path / f"{name}.parquet", "--output_dir", tmp_path / name,
                                     "--resolution", 96, "--num_workers", 2, *extra])
        assert result.returncode == 0 and "12/12 rows ok" in result.stdout, result.stdout + result.stderr
    assert (tmp_path / "jpeg" / "captions.txt").read_text() == (tmp_path / "rgbn" / "captions.txt").read_text()
    for number in range(1, 13):
        difference = np.abs(output_pixels(tmp_path / "rgbn", number) - output_pixels(tmp_path / "jpeg", number))
        assert difference.mean() < 1.0, (number, difference.mean())
