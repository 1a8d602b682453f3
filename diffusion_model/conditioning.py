"""The pure core of ControlNet conditioning: geometry shared with the target image, mask palettes and class checks,
and per-band statistics for multi-band conditioning (accumulated per row, merged, turned into normalisation).

Nothing here touches the disk. conditioning_io.py decodes a row's conditioning bytes and calls these; create_job.py
writes the results.
"""

import argparse
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import numpy as np
from PIL import Image

CONDITIONING_TYPES = ("image", "mask", "bands")
NORM_MODES = ("minmax", "percentile", "zscore", "none")
DEFAULT_NORM = "percentile"
# An image and its conditioning may differ in pixel size (a mask at half resolution) but not in shape.
ASPECT_TOLERANCE = 0.01
MAX_MASK_CLASSES = 256
# Values each row gives, per band, to the sample the percentiles come from; the merged sample is capped.
SAMPLE_PER_ROW = 32
SAMPLE_CAP = 65536
REPORTED_PERCENTILES = (1.0, 2.0, 5.0, 50.0, 95.0, 98.0, 99.0)
NORM_PERCENTILES = (2.0, 98.0)

REASON_ASPECT = "conditioning_aspect_ratio"
REASON_CLASS_RANGE = "conditioning_class_out_of_range"
REASON_UNKNOWN_COLOUR = "conditioning_unknown_colour"
REASON_NOT_SINGLE_CHANNEL = "conditioning_not_single_channel"


@dataclass(frozen=True)
class ConditioningSettings:
    """What decides a conditioning file's bytes (stored beside the images to guard resumes)."""

    type: str = "image"
    bands: Optional[Sequence[int]] = None
    palette: Optional[dict] = None  # {"index": [r, g, b]} as JSON keeps it
    num_classes: Optional[int] = None

    def __post_init__(self):
        """Hold lists, as the settings read back from JSON do (see MultibandSettings)."""
        if self.bands is not None:
            object.__setattr__(self, "bands", [int(band) for band in self.bands])


class Geometry(NamedTuple):
    """How a source becomes the square output: the source box read, the size it is resized to, where it is pasted
    on the resolution x resolution canvas (pad), and the canvas side."""

    box: tuple
    size: tuple
    offset: tuple
    side: int


def plan_geometry(width: int, height: int, resolution: int, mode: str) -> Geometry:
    """The crop/resize/pad that imaging.resize applies to a width x height image (Pillow's fit and pad, centred)."""
    full = (0.0, 0.0, float(width), float(height))
    if mode == "stretch":
        return Geometry(full, (resolution, resolution), (0, 0), resolution)
    if mode == "center_crop":
        ratio = width / height
        crop_w, crop_h = (float(height), float(height)) if ratio >= 1 else (float(width), float(width))
        left, top = (width - crop_w) * 0.5, (height - crop_h) * 0.5
        return Geometry((left, top, left + crop_w, top + crop_h), (resolution, resolution), (0, 0), resolution)
    if mode == "pad":
        size = (resolution, resolution)
        if width > height:
            size = (resolution, round(height / width * resolution))
        elif height > width:
            size = (round(width / height * resolution), resolution)
        offset = (round((resolution - size[0]) * 0.5), round((resolution - size[1]) * 0.5))
        return Geometry(full, size, offset, resolution)
    raise ValueError(f"unknown resize mode {mode!r}")


def scale_geometry(geometry: Geometry, source: tuple, target: tuple) -> Geometry:
    """The same geometry for a conditioning of pixel size target whose image is of pixel size source."""
    sx, sy = target[0] / source[0], target[1] / source[1]
    left, top, right, bottom = geometry.box
    return geometry._replace(box=(left * sx, top * sy, right * sx, bottom * sy))


def apply_geometry(image: Image.Image, geometry: Geometry, resample, fill=0) -> Image.Image:
    """Crop, resize and (pad) place one image by the geometry, with the given filter."""
    resized = image.resize(geometry.size, resample, box=geometry.box)
    if resized.size == (geometry.side, geometry.side):
        return resized
    canvas = Image.new(image.mode, (geometry.side, geometry.side), fill)
    canvas.paste(resized, geometry.offset)
    return canvas


def aspect_mismatch(image_size: tuple, conditioning_size: tuple) -> Optional[str]:
    """Why a conditioning's shape does not fit its image's (relative aspect difference over ASPECT_TOLERANCE)."""
    image_ratio = image_size[0] / image_size[1]
    ratio = conditioning_size[0] / conditioning_size[1]
    if abs(ratio - image_ratio) / image_ratio <= ASPECT_TOLERANCE:
        return None
    return (f"conditioning {conditioning_size[0]}x{conditioning_size[1]}, image {image_size[0]}x{image_size[1]}: "
            f"aspect ratios differ by more than {ASPECT_TOLERANCE:.0%}")


def parse_palette(document) -> dict:
    """A --mask_palette document (a list of [r, g, b] by class, or {class: [r, g, b]}) -> {(r, g, b): class}."""
    items = list(enumerate(document)) if isinstance(document, list) else None
    if isinstance(document, dict):
        try:
            items = [(int(key), colour) for key, colour in document.items()]
        except ValueError:
            raise ValueError("its keys must be class numbers") from None
    if not items:
        raise ValueError("expected a non-empty list of [r, g, b] or an object {class: [r, g, b]}")
    palette = {}
    for index, colour in items:
        if not (isinstance(colour, list) and len(colour) == 3 and all(isinstance(v, int) and 0 <= v <= 255
                                                                      for v in colour)):
            raise ValueError(f"class {index}: {colour!r} is not [r, g, b] with integers 0-255")
        if not 0 <= index < MAX_MASK_CLASSES:
            raise ValueError(f"class {index} is outside 0-{MAX_MASK_CLASSES - 1}")
        if tuple(colour) in palette:
            raise ValueError(f"colour {colour} is given to classes {palette[tuple(colour)]} and {index}")
        palette[tuple(colour)] = index
    return palette


def palette_record(palette: dict) -> dict:
    """The palette as JSON keeps it: {"class": [r, g, b]}, by class."""
    return {str(index): list(colour) for colour, index in sorted(palette.items(), key=lambda item: item[1])}


def palette_from_record(record: dict) -> dict:
    """palette_record's inverse."""
    return {tuple(colour): int(index) for index, colour in record.items()}


def map_palette(rgb: np.ndarray, palette: dict) -> tuple:
    """(height, width, 3) colours -> ((height, width) uint8 classes, None) or (None, why: the first unknown colour)."""
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    keys = np.array([(r << 16) | (g << 8) | b for r, g, b in palette], dtype=np.int64)
    values = np.array(list(palette.values()), dtype=np.uint8)
    order = np.argsort(keys)
    keys, values = keys[order], values[order]
    where = np.clip(np.searchsorted(keys, codes), 0, len(keys) - 1)
    known = keys[where] == codes
    if not known.all():
        code = int(codes[~known][0])
        colour = [(code >> 16) & 255, (code >> 8) & 255, code & 255]
        return None, f"colour {colour} on {int((~known).sum())} pixels is not in --mask_palette"
    return values[where], None


def class_problem(classes: np.ndarray, num_classes: Optional[int]) -> Optional[str]:
    """Why a class map cannot be kept: a class at or above --num_classes (or above what an 8-bit PNG holds)."""
    limit = num_classes or MAX_MASK_CLASSES
    top = int(classes.max()) if classes.size else 0
    if int(classes.min()) < 0 if classes.size else False:
        return f"class {int(classes.min())} is negative"
    if top >= limit:
        flag = f"--num_classes {num_classes}" if num_classes else f"{MAX_MASK_CLASSES} (an 8-bit mask)"
        return f"class {top} is not below {flag}"
    return None


def single_channel(pixels: np.ndarray) -> Optional[np.ndarray]:
    """A mask's class map from its pixels: one channel as it is, or RGB whose channels are all equal; else None."""
    if pixels.ndim == 2:
        return pixels
    if pixels.ndim == 3 and (pixels == pixels[..., :1]).all():
        return pixels[..., 0]
    return None


def class_counts(classes: np.ndarray) -> list:
    """Pixels per class, classes 0..max."""
    return np.bincount(classes.ravel().astype(np.int64)).tolist() if classes.size else []


def row_band_stats(bands: np.ndarray, seed: int) -> dict:
    """One row's per-band statistics from its (bands, height, width) float32 values: count, sum, sum of squares,
    min, max, and SAMPLE_PER_ROW values picked by a seeded draw (so a rerun picks the same)."""
    flat = bands.reshape(bands.shape[0], -1).astype(np.float64)
    picks = np.random.default_rng(seed).integers(0, flat.shape[1], min(SAMPLE_PER_ROW, flat.shape[1]))
    return {"count": int(flat.shape[1]), "sum": flat.sum(1).tolist(), "sumsq": (flat * flat).sum(1).tolist(),
            "min": flat.min(1).tolist(), "max": flat.max(1).tolist(), "sample": flat[:, picks].tolist()}


class BandStats:
    """Per-band statistics merged over rows, with a sample capped at SAMPLE_CAP values per band (a seeded reservoir,
    so the same rows in the same order give the same percentiles)."""

    def __init__(self, seed: int = 0):
        """Empty statistics."""
        self.rows, self.count, self.sums, self.sumsq, self.low, self.high = 0, 0, None, None, None, None
        self.sample, self.seen, self.rng = None, 0, np.random.default_rng(seed)

    def add(self, stats: dict) -> None:
        """Merge one row's row_band_stats."""
        if self.sums is None:
            bands = len(stats["sum"])
            self.sums, self.sumsq = np.zeros(bands), np.zeros(bands)
            self.low, self.high = np.full(bands, np.inf), np.full(bands, -np.inf)
            self.sample = [[] for _ in range(bands)]
        if len(stats["sum"]) != len(self.sums):
            raise ValueError(f"a row has {len(stats['sum'])} bands, earlier rows {len(self.sums)}")
        self.rows += 1
        self.count += stats["count"]
        self.sums += stats["sum"]
        self.sumsq += stats["sumsq"]
        self.low, self.high = np.minimum(self.low, stats["min"]), np.maximum(self.high, stats["max"])
        for values in zip(*stats["sample"]):
            self.keep(values)

    def keep(self, values: tuple) -> None:
        """Reservoir step for one sampled pixel (all bands together, so the bands' samples stay paired)."""
        self.seen += 1
        if self.seen <= SAMPLE_CAP:
            for band, value in enumerate(values):
                self.sample[band].append(value)
            return
        slot = int(self.rng.integers(0, self.seen))
        if slot < SAMPLE_CAP:
            for band, value in enumerate(values):
                self.sample[band][slot] = value

    def result(self) -> dict:
        """Per-band figures for conditioning.json: rows, count, mean, std, min, max, sampled percentiles."""
        if self.sums is None:
            return {"rows": 0, "bands": []}
        mean = self.sums / self.count
        std = np.sqrt(np.maximum(self.sumsq / self.count - mean * mean, 0.0))
        bands = []
        for b in range(len(self.sums)):
            found = np.percentile(np.asarray(self.sample[b]), REPORTED_PERCENTILES)
            bands.append({"count": self.count, "mean": float(mean[b]), "std": float(std[b]),
                          "min": float(self.low[b]), "max": float(self.high[b]),
                          "percentiles": {f"{p:g}": float(v) for p, v in zip(REPORTED_PERCENTILES, found)}})
        return {"rows": self.rows, "sample_size": min(self.seen, SAMPLE_CAP), "bands": bands}


def norm_limits(stats: dict, mode: str) -> list:
    """Per band (offset, scale) so that (value - offset) / scale is the normalised value: minmax and percentile map
    to 0..1 (the ControlNet conditioning range), zscore to mean 0 std 1, none leaves values as they are."""
    limits = []
    for band in stats["bands"]:
        if mode == "minmax":
            low, high = band["min"], band["max"]
        elif mode == "percentile":
            low, high = (band["percentiles"][f"{p:g}"] for p in NORM_PERCENTILES)
        elif mode == "zscore":
            low, high = band["mean"], band["mean"] + band["std"]
        else:
            low, high = 0.0, 1.0
        scale = high - low
        limits.append((float(low), float(scale) if scale > 0 and math.isfinite(scale) else 1.0))
    return limits


def normalise(bands: np.ndarray, limits: Sequence[tuple], clip: bool) -> np.ndarray:
    """(bands, height, width) values normalised by norm_limits; clip to 0..1 for minmax and percentile."""
    offsets = np.array([o for o, _ in limits], dtype=np.float32)[:, None, None]
    scales = np.array([s for _, s in limits], dtype=np.float32)[:, None, None]
    out = (bands.astype(np.float32) - offsets) / scales
    return np.clip(out, 0.0, 1.0) if clip else out


def parse_band_list(text: str) -> tuple:
    """argparse type for --conditioning_bands: comma-separated 1-based band numbers, any count, e.g. 1,2 or 2,3,4,8."""
    try:
        bands = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of band numbers like 1,2") from None
    if min(bands) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: band numbers start at 1")
    return bands
