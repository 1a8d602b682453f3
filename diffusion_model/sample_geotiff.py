"""NAIP-like and Sentinel-2-like GeoTIFFs drawn from the sample scenes, for tests and benchmarks of the TIFF path.

NAIP: 4-band RGBN uint8, photometric RGB with the near-infrared band as an extra sample. Sentinel-2: 12-band
uint16 surface reflectance (B1..B12 as named in GDAL_METADATA, offset 1000 as in L2A since 2022), a nodata wedge
in one corner (GDAL_NODATA 0, like a tile at the edge of a swath) and a few bright glints (specular water, cloud
cores) that a min-max stretch would let wash the picture out. Both carry a GeoTIFF georeference: NAIP on NAD83 UTM
zone 10N (EPSG 26910, as NAIP ships) centred on San Francisco, Sentinel-2 on WGS84 UTM zone 33N; create.py reads
their GSD and centre from it.
"""

import io
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tifffile
from PIL import Image

from diffusion_model.sample_data import RSICD_SCHEMA, make_sample_row
from utils.constants import TMP_SUFFIX

SENTINEL2_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12")
SENTINEL2_TRUE_COLOUR = (4, 3, 2)
REFLECTANCE_OFFSET = 1000
REFLECTANCE_PER_LEVEL = 12
GLINT_VALUE = 20000
GLINT_SHARE = 0.004
NODATA = 0
PIXEL_METRES = {"naip": 0.6, "sentinel2": 10.0}
UTM_ZONE_EPSG = {"naip": 26910, "sentinel2": 32633}
# Easting, northing of each kind's tile centre (UTM 10N 551000 E, 4180000 N is about 37.766 N, 122.421 W).
TILE_CENTRE = {"naip": (551000.0, 4180000.0), "sentinel2": (501120.0, 3998880.0)}
# GeoTIFF tags and keys (GeoTIFF 1.1): model type projected, raster type pixel-is-area, projected CRS by EPSG code.
MODEL_PIXEL_SCALE, MODEL_TIEPOINT, GEO_KEY_DIRECTORY = 33550, 33922, 34735
GDAL_METADATA, GDAL_NODATA = 42112, 42113
GT_MODEL_TYPE, GT_RASTER_TYPE, PROJECTED_CRS = 1024, 1025, 3072


def scene_pixels(index: int, seed: int) -> tuple:
    """Sample row `index` as an RGB uint8 array, with its filename and captions."""
    row = make_sample_row(index, seed)
    with Image.open(io.BytesIO(row["image"]["bytes"])) as image:
        rgb = np.asarray(image.convert("RGB"))
    return rgb, row["filename"], row["captions"]


def synthetic_nir(rgb: np.ndarray) -> np.ndarray:
    """A near-infrared band: bright where green dominates (vegetation), dark over water."""
    red, green, blue = (rgb[..., i].astype(np.float64) for i in range(3))
    return np.clip(2.0 * green - 1.2 * blue + 0.1 * red, 0, 255).astype(np.uint8)


def naip_like(rgb: np.ndarray) -> np.ndarray:
    """(height, width, 4) uint8 red, green, blue, near-infrared."""
    return np.concatenate([rgb, synthetic_nir(rgb)[..., None]], axis=-1)


def sentinel2_like(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(height, width, 12) uint16 reflectance: B4/B3/B2 follow the scene's red/green/blue; nodata wedge; glints."""
    red, green, blue = (rgb[..., i].astype(np.float64) for i in range(3))
    nir = synthetic_nir(rgb).astype(np.float64)
    levels = [blue * 0.9, blue, green, red, (red + nir) / 2, nir * 0.8, nir * 0.9, nir, nir, nir * 0.3,
              (red + green) / 2, red * 0.7]
    bands = np.stack([REFLECTANCE_OFFSET + REFLECTANCE_PER_LEVEL * level for level in levels], axis=-1)
    height, width = rgb.shape[:2]
    glints = rng.random((height, width)) < GLINT_SHARE
    bands[glints] = GLINT_VALUE
    rows, cols = np.mgrid[0:height, 0:width]
    bands[rows + cols < min(height, width) // 3] = NODATA
    return np.rint(bands).astype(np.uint16)


def gdal_metadata(names: Sequence[str]) -> str:
    """GDAL_METADATA XML naming each band, as GDAL writes band descriptions."""
    items = "".join(f'<Item name="DESCRIPTION" sample="{i}" role="description">{name}</Item>'
                    for i, name in enumerate(names))
    return f"<GDALMetadata>{items}</GDALMetadata>"


def geo_tags(kind: str, nodata, names: Optional[Sequence[str]], shape: tuple = (224, 224)) -> list:
    """tifffile extratags: pixel scale, tie point (the tile's top-left corner, so that a (height, width) tile is
    centred on TILE_CENTRE), geo keys (UTM by EPSG), and GDAL nodata and band names."""
    scale = PIXEL_METRES[kind]
    east, north = TILE_CENTRE[kind]
    corner = (east - shape[1] / 2 * scale, north + shape[0] / 2 * scale)
    keys = (1, 1, 0, 3, GT_MODEL_TYPE, 0, 1, 1, GT_RASTER_TYPE, 0, 1, 1, PROJECTED_CRS, 0, 1, UTM_ZONE_EPSG[kind])
    tags = [(MODEL_PIXEL_SCALE, "d", 3, (scale, scale, 0.0), True),
            (MODEL_TIEPOINT, "d", 6, (0.0, 0.0, 0.0, *corner, 0.0), True),
            (GEO_KEY_DIRECTORY, "H", len(keys), keys, True)]
    if nodata is not None:
        tags.append((GDAL_NODATA, "s", 0, str(nodata), True))
    if names:
        tags.append((GDAL_METADATA, "s", 0, gdal_metadata(names), True))
    return tags


def encode_geotiff(pixels: np.ndarray, kind: str, nodata=None, names: Optional[Sequence[str]] = None,
                   compression: Optional[str] = "zlib", planar: bool = False) -> bytes:
    """(height, width, bands) pixels as GeoTIFF bytes: NAIP as photometric RGB + extra band, others as plain bands."""
    rgb = kind == "naip" and pixels.shape[-1] >= 3
    options = {"photometric": "rgb" if rgb else "minisblack", "compression": compression,
               "extratags": geo_tags(kind, nodata, names, pixels.shape[:2])}
    if rgb and pixels.shape[-1] > 3:
        options["extrasamples"] = ["unspecified"] * (pixels.shape[-1] - 3)
    if pixels.shape[-1] == 1:
        data = pixels[..., 0]
    else:
        data = np.moveaxis(pixels, -1, 0) if planar else pixels
        options["planarconfig"] = "separate" if planar else "contig"
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, data, **options)
    return buffer.getvalue()


def geotiff_row(index: int, seed: int, kind: str) -> dict:
    """One RSICD-schema row whose image is a NAIP-like or Sentinel-2-like GeoTIFF of sample scene `index`."""
    rgb, filename, captions = scene_pixels(index, seed)
    if kind == "naip":
        data = encode_geotiff(naip_like(rgb), kind)
    else:
        bands = sentinel2_like(rgb, np.random.default_rng([seed, index, 2]))
        data = encode_geotiff(bands, kind, nodata=NODATA, names=SENTINEL2_BANDS)
    return {"filename": str(Path(filename).with_suffix(".tif")), "captions": captions,
            "image": {"bytes": data, "path": None}}


def make_geotiff_parquet(path, num_rows: int, kind: str, seed: int = 0, row_group_size: int = 32) -> Path:
    """Write num_rows GeoTIFF rows of kind naip or sentinel2 to path (atomically) in the RSICD schema."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(path.name + TMP_SUFFIX)
    with pq.ParquetWriter(tmp_path, RSICD_SCHEMA) as writer:
        for start in range(0, num_rows, row_group_size):
            rows = [geotiff_row(i, seed, kind) for i in range(start, min(start + row_group_size, num_rows))]
            writer.write_table(pa.Table.from_pylist(rows, schema=RSICD_SCHEMA), row_group_size=row_group_size)
    tmp_path.replace(path)
    return path
