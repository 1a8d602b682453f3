"""Per-image metadata (ground sample distance, place, date, cloud, off-nadir angle, sensor): parse the flags that
name them, validate and normalise each value, correct the GSD for create.py's resize, and merge the sources.

Pure functions only; the readers (diffusion_model/sources, parquet_source.py) and the GeoTIFF tags
(diffusion_model/georef.py) supply raw values, the create job writes the result beside captions.txt.
A bad value drops that field only; an absent field stays absent (never 0, which is a real longitude).
"""

import argparse
import datetime as dt
import math
import re
from typing import Optional

FIELDS = ("gsd", "lat", "lon", "date", "cloud", "off_nadir", "sensor")
# fMoW's per-image JSON keys (its *_rgb.json sidecars), read when --metadata_sidecars names no keys itself.
FMOW_KEYS = {"gsd": "gsd", "date": "timestamp", "cloud": "cloud_cover", "off_nadir": "off_nadir_angle_dbl",
             "sensor": "sensor_platform_name"}
FMOW_LOCATION_KEY = "raw_location"
# Where a reader notes, among a row's raw fields, a sidecar it could not read: (file looked for, why).
SIDECAR_PROBLEM = "sidecar"
# Dates outside these years are typos (a day number in the year, a 2-digit year), not acquisitions.
YEAR_RANGE = (1900, 2100)
RANGES = {"lat": (-90.0, 90.0), "lon": (-180.0, 180.0), "cloud": (0.0, 100.0), "off_nadir": (0.0, 90.0)}
GSD_DIGITS = 6
DEGREE_DIGITS = 7  # about 1 cm: far below any tile's size
YEAR_ONLY = re.compile(r"^\d{4}$")
WKT_NUMBER_PAIR = re.compile(r"(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)\s+(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)")


def parse_pairs(text: str, what: str) -> dict:
    """'field=value,field=value' -> {field: value}; unknown or repeated fields are an ArgumentTypeError."""
    pairs = {}
    for part in text.split(","):
        field, sep, value = part.partition("=")
        field, value = field.strip(), value.strip()
        if not sep or not field or not value:
            raise argparse.ArgumentTypeError(f"{text!r}: each item must be FIELD={what}, got {part!r}")
        if field not in FIELDS:
            raise argparse.ArgumentTypeError(f"{text!r}: unknown field {field!r} (known: {', '.join(FIELDS)})")
        if field in pairs:
            raise argparse.ArgumentTypeError(f"{text!r}: field {field!r} given twice")
        pairs[field] = value
    return pairs


def parse_columns(text: str) -> dict:
    """argparse type for --metadata_columns: FIELD=COLUMN pairs, e.g. gsd=ground_sample_distance,date=timestamp."""
    return parse_pairs(text, "COLUMN")


def parse_literals(text: str) -> dict:
    """argparse type for --metadata: FIELD=VALUE pairs, each value valid for its field, e.g. gsd=1.0,sensor=naip."""
    pairs = parse_pairs(text, "VALUE")
    for field, raw in pairs.items():
        value, reason = check_value(field, raw)
        if reason:
            raise argparse.ArgumentTypeError(f"{field}={raw}: {reason}")
        pairs[field] = value
    return pairs


def as_number(raw) -> float:
    """A number from a cell (int, float or numeric text); ValueError otherwise (booleans are not numbers)."""
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise ValueError(f"not a number ({type(raw).__name__})")
    try:
        return float(raw)
    except ValueError:
        raise ValueError("not a number") from None


def check_number(field: str, raw) -> float:
    """A finite number in the field's range (GSD: above 0); ValueError naming the rule otherwise."""
    value = as_number(raw)
    if not math.isfinite(value):
        raise ValueError("not finite")
    if field == "gsd":
        if value <= 0:
            raise ValueError("must be above 0")
        return value
    low, high = RANGES[field]
    if not low <= value <= high:
        raise ValueError(f"outside [{low:g}, {high:g}]")
    return value


def check_year(year: int) -> None:
    """ValueError for a year no acquisition date has."""
    if not YEAR_RANGE[0] <= year <= YEAR_RANGE[1]:
        raise ValueError(f"year outside {YEAR_RANGE[0]}-{YEAR_RANGE[1]}")


def check_date(raw) -> str:
    """An ISO 8601 date or date-time, or a year alone -> 'YYYY', 'YYYY-MM-DD' or a full ISO timestamp (a year alone
    stays a year: inventing 1 January would invent a season)."""
    if isinstance(raw, dt.datetime):  # Parquet timestamp cells
        check_year(raw.year)
        return raw.isoformat()
    if isinstance(raw, dt.date):  # Parquet date cells
        check_year(raw.year)
        return raw.isoformat()
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = str(raw)
    if not isinstance(raw, str):
        raise ValueError(f"not a date ({type(raw).__name__})")
    text = raw.strip()
    if YEAR_ONLY.match(text):
        check_year(int(text))
        return text
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError("not an ISO 8601 date, date-time or year") from None
    check_year(parsed.year)
    # fromisoformat reads "2021-07-01" and "20210701" as midnight; only a text longer than a date has a time.
    return parsed.isoformat() if len(text) > len("YYYY-MM-DD") else parsed.date().isoformat()


def check_sensor(raw) -> str:
    """A non-empty name, kept as written (spaces around it trimmed)."""
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError("not a non-empty name")
    return raw.strip()


def is_absent(raw) -> bool:
    """None, an empty cell and NaN (how pandas writes a missing float) mean the source has no value."""
    return raw is None or (isinstance(raw, str) and not raw.strip()) or (isinstance(raw, float) and math.isnan(raw))


def check_value(field: str, raw) -> tuple:
    """(normalised value, None) or (None, reason) for one raw value of a field."""
    try:
        if field == "date":
            return check_date(raw), None
        if field == "sensor":
            return check_sensor(raw), None
        value = check_number(field, raw)
    except ValueError as err:
        return None, str(err)
    digits = GSD_DIGITS if field == "gsd" else DEGREE_DIGITS if field in ("lat", "lon") else None
    return (float(f"{value:.{digits}g}") if field == "gsd" else round(value, digits) if digits else value), None


def json_safe(raw):
    """A raw value as the report can hold it: JSON scalars as they are, anything else as text."""
    return raw if raw is None or isinstance(raw, (str, int, float, bool)) else str(raw)


def clean(raw: dict) -> tuple:
    """{field: raw} -> ({field: value} of the valid ones, [(field, raw value, reason)] of the bad ones)."""
    values, problems = {}, []
    if raw.get(SIDECAR_PROBLEM):
        problems.append((SIDECAR_PROBLEM, *raw[SIDECAR_PROBLEM]))
    for field in FIELDS:
        if field not in raw or is_absent(raw[field]):
            continue
        value, reason = check_value(field, raw[field])
        if reason:
            problems.append((field, json_safe(raw[field]), reason))
        else:
            values[field] = value
    return values, problems


def gsd_scale(width: int, height: int, resolution: int, mode: str) -> float:
    """Source pixels per output pixel along the kept extent: center_crop keeps the shorter side, pad fits the
    longer one, stretch scales each axis apart and the GSD takes their geometric mean (the pixel's area)."""
    if width <= 0 or height <= 0 or resolution <= 0:
        raise ValueError(f"no pixels: {width}x{height} -> {resolution}")
    if mode == "center_crop":
        return min(width, height) / resolution
    if mode == "pad":
        return max(width, height) / resolution
    if mode == "stretch":
        return math.sqrt(width * height) / resolution
    raise ValueError(f"unknown resize mode {mode!r}")


def corrected_gsd(gsd: float, width: int, height: int, resolution: int, mode: str) -> float:
    """The output image's GSD: the source's times source pixels per output pixel (1024 px at 0.3 m -> 512 px: 0.6)."""
    return float(f"{gsd * gsd_scale(width, height, resolution, mode):.{GSD_DIGITS}g}")


def merge(*layers: dict) -> dict:
    """Fields from the first layer that has each (most specific first: row columns, GeoTIFF tags, --metadata)."""
    merged = {}
    for layer in reversed(layers):
        merged.update(layer or {})
    return {field: merged[field] for field in FIELDS if field in merged}


def wkt_centre(text) -> Optional[tuple]:
    """(lat, lon) at the mean of a WKT polygon's or point's vertices (lon lat order, closing vertex once), or None."""
    if not isinstance(text, str):
        return None
    points = [(float(x), float(y)) for x, y in WKT_NUMBER_PAIR.findall(text)]
    if len(points) > 1 and points[0] == points[-1]:
        points = points[:-1]
    if not points:
        return None
    return sum(p[1] for p in points) / len(points), sum(p[0] for p in points) / len(points)


def sidecar_raw(document: dict, columns: Optional[dict]) -> dict:
    """Raw fields from an fMoW-style JSON sidecar: the named keys, else fMoW's keys and its raw_location centre."""
    keys = columns or FMOW_KEYS
    raw = {field: document.get(key) for field, key in keys.items() if key in document}
    centre = None if columns else wkt_centre(document.get(FMOW_LOCATION_KEY))
    if centre:
        raw.setdefault("lat", centre[0])
        raw.setdefault("lon", centre[1])
    return raw


def row_metadata(raw: Optional[dict], tags: Optional[dict], literals: Optional[dict], size: Optional[tuple],
                 resolution: int, mode: str) -> tuple:
    """A row's output metadata and its bad values: the row's own fields over its GeoTIFF's (gsd, lat, lon from
    tags) over the source's literals, each validated, and the GSD corrected for the resize to resolution."""
    own, problems = clean(raw or {})
    geo, geo_problems = clean(tags or {})
    values = merge(own, geo, literals)
    if "gsd" in values:
        if size:
            values["gsd"] = corrected_gsd(values["gsd"], size[0], size[1], resolution, mode)
        else:
            problems.append(("gsd", values.pop("gsd"), "image size unknown, so the output GSD is too"))
    return values, problems + [p for p in geo_problems if p[0] not in own]
