"""GeoTIFFs and other multi-band TIFFs -> 8-bit RGB: pick the bands, mask nodata, stretch to 0..255.

multiband_to_rgb is the pure transform on a (height, width, bands) array; tiff_to_rgb is the I/O edge that reads
the bytes with tifffile (Pillow reads neither 12-band nor 16-bit multi-band TIFFs) along with the GeoTIFF tags
that matter here: GDAL_NODATA and the band names in GDAL_METADATA.
"""

import argparse
import io
import logging
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence
from xml.etree import ElementTree

import numpy as np
import tifffile
from PIL import Image

from utils.image_errors import REASON_TOO_LARGE, REASON_TRUNCATED, REASON_UNDECODABLE, ImageRejected

STRETCH_MODES = ("auto", "percentile", "minmax", "none")
DEFAULT_PERCENTILES = (2.0, 98.0)
REASON_TOO_FEW_BANDS = "too_few_bands"
REASON_ALL_NODATA = "all_nodata"
GDAL_METADATA_TAG = 42112
GDAL_NODATA_TAG = 42113
MAX_8BIT = 255
# A band with no spread (every valid pixel equal) has no contrast to stretch; it becomes mid-grey.
FLAT_BAND_VALUE = 128
# Band names that say which colour a band holds: GDAL colour interpretations or descriptions, Sentinel-2 band ids.
COLOUR_NAMES = {
    "red": ("red", "b4", "b04"),
    "green": ("green", "b3", "b03"),
    "blue": ("blue", "b2", "b02"),
}
# Photometric interpretations whose samples are plain bands; the others (palette, CMYK, YCbCr, Lab) go to Pillow.
BAND_PHOTOMETRICS = (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.RGB)

# tifffile (and Pillow's TIFF plugin, which reads the kinds left to it) log each odd or broken file they meet; the
# row's outcome is ours to report, in create_report.json.
for _name in ("tifffile", "PIL.TiffImagePlugin"):
    logging.getLogger(_name).setLevel(logging.CRITICAL)


@dataclass(frozen=True)
class MultibandSettings:
    """How a TIFF becomes RGB: 1-based bands (None: from its tags), stretch mode and percentiles."""

    bands: Optional[Sequence[int]] = None
    stretch: str = "auto"
    percentiles: Sequence[float] = DEFAULT_PERCENTILES

    def __post_init__(self):
        """Hold lists: the settings are stored as JSON beside the images, and a resume compares them with what it
        reads back, where a tuple would never equal its own list."""
        if self.bands is not None:
            object.__setattr__(self, "bands", [int(band) for band in self.bands])
        object.__setattr__(self, "percentiles", [float(value) for value in self.percentiles])


class TiffBands(NamedTuple):
    """What the reader hands the transform: (height, width, bands) pixels, nodata value, band names, RGB flag,
    and the 0-based index of an alpha band (GDAL's mask band when it writes one), whose zeros are nodata too."""

    pixels: np.ndarray
    nodata: Optional[float]
    names: tuple
    photometric_rgb: bool
    alpha: Optional[int] = None


def parse_bands(text: str) -> tuple:
    """argparse type for --bands: 1 or 3 comma-separated 1-based band numbers, e.g. 4,3,2."""
    try:
        bands = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of band numbers like 4,3,2") from None
    if len(bands) not in (1, 3):
        raise argparse.ArgumentTypeError(f"{text!r} names {len(bands)} bands; give 3 (red,green,blue) or 1 (grey)")
    if min(bands) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: band numbers start at 1")
    return bands


def parse_percentiles(text: str) -> tuple:
    """argparse type for --stretch_percentiles: LOW,HIGH with 0 <= LOW < HIGH <= 100."""
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not two numbers LOW,HIGH like 2,98") from None
    if not (math.isfinite(low) and math.isfinite(high) and 0 <= low < high <= 100):
        raise argparse.ArgumentTypeError(f"{text!r} must satisfy 0 <= LOW < HIGH <= 100")
    return low, high


def default_bands(count: int, names: Sequence[Optional[str]], photometric_rgb: bool) -> tuple:
    """The bands to show when --bands is not given: the named red, green, blue; else the first three (or band 1)."""
    lowered = [(name or "").strip().lower() for name in names]
    found = [next((i + 1 for i, name in enumerate(lowered) if name in COLOUR_NAMES[colour]), None)
             for colour in ("red", "green", "blue")]
    if None not in found:
        return tuple(found)
    if photometric_rgb or count >= 3:
        return 1, 2, 3
    return (1,)


def valid_pixels(pixels: np.ndarray, nodata: Optional[float]) -> np.ndarray:
    """(height, width) mask: True where no band holds the nodata value (or NaN, which is never data)."""
    invalid = np.zeros(pixels.shape[:2], dtype=bool)
    if pixels.dtype.kind == "f":
        invalid |= np.isnan(pixels).any(axis=-1)
    if nodata is not None and not math.isnan(nodata):
        invalid |= (pixels == nodata).any(axis=-1)
    return ~invalid


def stretch_mode_for(stretch: str, dtype: np.dtype) -> str:
    """Resolve auto: 8-bit samples are display values already (no stretch); wider or float ones get percentile."""
    if stretch != "auto":
        return stretch
    return "none" if dtype.itemsize == 1 else "percentile"


def stretch_band(band: np.ndarray, valid: np.ndarray, mode: str, percentiles: tuple) -> np.ndarray:
    """One band to 0..255 by the mode; the limits come from valid pixels only, and invalid ones become 0."""
    values = band.astype(np.float32)  # ample for 8-bit output, and half the memory of float64 on large tiles
    if mode == "none":
        scaled = values
    else:
        kept = values[valid]
        low, high = (np.percentile(kept, percentiles) if mode == "percentile" else (kept.min(), kept.max()))
        if high > low:
            scaled = (values - low) * (MAX_8BIT / (high - low))
        else:
            scaled = np.full_like(values, FLAT_BAND_VALUE)
    return np.rint(np.clip(np.where(valid, scaled, 0), 0, MAX_8BIT)).astype(np.uint8)


def multiband_to_rgb(tiff: TiffBands, settings: MultibandSettings) -> np.ndarray:
    """Pick and order the bands, mask nodata, stretch each band; return (height, width, 3) uint8 RGB."""
    count = tiff.pixels.shape[-1]
    bands = settings.bands or default_bands(count, tiff.names, tiff.photometric_rgb)
    if max(bands) > count:
        raise ImageRejected(REASON_TOO_FEW_BANDS, f"band {max(bands)} requested, the image has {count}")
    chosen = tiff.pixels[..., [band - 1 for band in bands]]
    valid = valid_pixels(chosen, tiff.nodata)
    if tiff.alpha is not None:
        valid &= tiff.pixels[..., tiff.alpha] != 0
    if not valid.any():
        raise ImageRejected(REASON_ALL_NODATA, f"every pixel is nodata ({tiff.nodata})")
    mode = stretch_mode_for(settings.stretch, chosen.dtype)
    rgb = np.stack([stretch_band(chosen[..., i], valid, mode, settings.percentiles) for i in range(len(bands))], -1)
    return np.repeat(rgb, 3, axis=-1) if len(bands) == 1 else rgb


def band_names(xml: Optional[str], count: int) -> tuple:
    """Per-band names from GDAL_METADATA: the colour interpretation where given, else the description."""
    names = [None] * count
    if not xml:
        return tuple(names)
    try:
        items = ElementTree.fromstring(xml).iter("Item")
    except ElementTree.ParseError:
        return tuple(names)
    for item in items:
        sample, role = item.get("sample"), (item.get("role") or item.get("name") or "").lower()
        if sample is None or not sample.isdigit() or int(sample) >= count or role not in ("colorinterp", "description"):
            continue
        if role == "colorinterp" or names[int(sample)] is None:
            names[int(sample)] = item.text
    return tuple(names)


def parse_nodata(text) -> Optional[float]:
    """GDAL_NODATA is ASCII ("0", "-9999", "nan"); an unreadable one is as good as absent."""
    try:
        return float(str(text).strip().replace(",", "."))
    except ValueError:
        return None


def alpha_band(page, count: int) -> Optional[int]:
    """0-based index of the first alpha sample among the page's extra samples, or None (also for a broken tag)."""
    base = page.samplesperpixel - len(page.extrasamples)
    alphas = (tifffile.EXTRASAMPLE.ASSOCALPHA, tifffile.EXTRASAMPLE.UNASSALPHA)
    found = next((base + i for i, kind in enumerate(page.extrasamples) if kind in alphas), None)
    return found if found is not None and 0 <= found < count else None


def check_complete(page, size: int) -> None:
    """Refuse a page whose strips or tiles reach past the end of the bytes (a cut-off download)."""
    ends = [offset + count for offset, count in zip(page.dataoffsets, page.databytecounts) if count]
    if ends and max(ends) > size:
        raise ImageRejected(REASON_TRUNCATED, f"image data ends at byte {max(ends)}, the file has {size}")


def read_bands(page, size: int) -> np.ndarray:
    """Decode the page into (height, width, bands), whether its samples are interleaved or planar."""
    check_complete(page, size)
    pixels = page.asarray()
    if page.samplesperpixel > 1 and page.planarconfig == tifffile.PLANARCONFIG.SEPARATE:
        pixels = np.moveaxis(pixels, 0, -1)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3:
        raise ImageRejected(REASON_UNDECODABLE, f"unsupported TIFF layout {page.axes} {page.shape}")
    if pixels.dtype.kind not in "uif":  # complex SAR samples have no brightness to stretch
        raise ImageRejected(REASON_UNDECODABLE, f"unsupported sample type {pixels.dtype}")
    return pixels


def read_tiff(data: bytes, max_pixels: int) -> Optional[TiffBands]:
    """Read the first image of a TIFF with its tags; None when Pillow should read it (palette, CMYK, bilevel...)."""
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages.first
            if page.photometric not in BAND_PHOTOMETRICS or page.bitspersample < 8:
                return None
            if page.imagewidth * page.imagelength > max_pixels:
                raise ImageRejected(REASON_TOO_LARGE,
                                    f"{page.imagewidth}x{page.imagelength} exceeds {max_pixels} pixels")
            pixels = read_bands(page, len(data))
            nodata = parse_nodata(page.tags.valueof(GDAL_NODATA_TAG))
            names = band_names(page.tags.valueof(GDAL_METADATA_TAG), pixels.shape[-1])
            return TiffBands(pixels, nodata, names, page.photometric == tifffile.PHOTOMETRIC.RGB,
                             alpha_band(page, pixels.shape[-1]))
    except ImageRejected:
        raise
    except Exception as err:  # tifffile and its codecs raise many types for broken files; all mean the same to us
        raise ImageRejected(REASON_UNDECODABLE, f"{type(err).__name__}: {err}") from None


def tiff_to_rgb(data: bytes, max_pixels: int, settings: MultibandSettings) -> Optional[Image.Image]:
    """A TIFF's bytes as an RGB image by settings; None when it is a kind Pillow reads better."""
    tiff = read_tiff(data, max_pixels)
    if tiff is None:
        return None
    return Image.fromarray(multiband_to_rgb(tiff, settings))
