"""Writers of test Parquet files: RSICD-schema rows, plain image+text rows, and the full odd-case table."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

import odd_images as odd
from diffusion_model.sample_data import RSICD_SCHEMA

PLAIN_SCHEMA = pa.schema([("image", pa.binary()), ("text", pa.string())])
GOOD = ["a green field next to a road ."]


def rsicd_row(filename, image_bytes, captions, image_is_null: bool = False) -> dict:
    """One row in the RSICD schema (image struct<bytes, path>)."""
    image = None if image_is_null else {"bytes": image_bytes, "path": None}
    return {"filename": filename, "captions": captions, "image": image}


def write_rows(path: Path, rows: list, schema: pa.Schema = RSICD_SCHEMA, row_group_size: int = 4) -> Path:
    """Write rows to a Parquet file with small row groups, so batching across groups is exercised."""
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=row_group_size)
    return path


# (filename, image bytes, captions, expected failure reason or None); row numbers are 1-based list positions.
ODD_CASES = [
    ("rsicd_images/gray.jpg", odd.grayscale_jpeg(), GOOD, None),
    ("rsicd_images/rgba.png", odd.rgba_png(), ["a red roof .", "A red roof"], None),
    ("rsicd_images/palette.png", odd.palette_png(transparent=True), ["a blue pond ."], None),
    ("rsicd_images/cmyk.jpg", odd.cmyk_jpeg(), ["a cyan lake ."], None),
    ("rsicd_images/gray16.png", odd.gray16_png(), ["a grey ramp ."], None),
    ("rsicd_images/rotated.jpg", odd.exif_rotated_jpeg(), ["a rotated\tfield\nwith a road ."], None),
    ("rsicd_images/portrait.jpg", odd.portrait_jpeg(), ["a tall image ."], None),
    ("rsicd_images/truncated.jpg", odd.truncated_jpeg(), GOOD, "truncated"),
    ("rsicd_images/null.jpg", None, GOOD, "null_image"),
    ("rsicd_images/empty.jpg", b"", GOOD, "empty_image"),
    ("rsicd_images/junk.jpg", odd.junk_bytes(), GOOD, "undecodable"),
    ("rsicd_images/nocaption.jpg", odd.grayscale_jpeg(), [" .", "", "  "], "no_caption"),
    ("rsicd_images/unicode.jpg", odd.portrait_jpeg(), ["  河流 und Flußufer — été ", " .", "second caption ."], None),
    ("../../escape/evil.jpg", odd.grayscale_jpeg(), ["a harmless field ."], None),
    ("rsicd_images/bomb.png", odd.png_claiming_size(50000, 50000), GOOD, "too_large"),
    ("rsicd_images/bomb.jpg", odd.jpeg_claiming_size(20000, 20000), GOOD, "too_large"),
    ("rsicd_images/la.png", odd.la_png(), ["a grey half ."], None),
]


def write_odd_shards(folder: Path, shard_rows: int = 6) -> list:
    """Write ODD_CASES as several shards (plus a null-struct row) into folder; return their paths, sorted."""
    rows = [rsicd_row(name, data, captions) for name, data, captions, _ in ODD_CASES]
    rows.append(rsicd_row("rsicd_images/nullstruct.jpg", None, GOOD, image_is_null=True))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, start in enumerate(range(0, len(rows), shard_rows)):
        paths.append(write_rows(folder / f"train-{index:05d}.parquet", rows[start : start + shard_rows], row_group_size=4))
    return paths


def expected_failures() -> dict:
    """Row number -> reason for the odd-case shards written by write_odd_shards."""
    failures = {i + 1: reason for i, (_, _, _, reason) in enumerate(ODD_CASES) if reason}
    failures[len(ODD_CASES) + 1] = "null_image"
    return failures
