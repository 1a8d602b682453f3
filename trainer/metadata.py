"""Metadata conditioning: a row's metadata dict (gsd, lat, lon, date, cloud, off_nadir, sensor) as a fixed-length
float vector, the spec that rebuilds the encoder at sampling time, and the guidance dropout drawn per row.

Pure: numpy (torch only to build a vector), no model; trainer/args.py imports it.
Layout of the vector, group by group in FIELDS order (selected ones only):
  gsd        log2(gsd) / 5, with its Fourier features
  location   (lat, lon) on the unit sphere: x, y, z, each with its Fourier features; needs both lat and lon
  date       day of year as sin/cos (both 0 for a year-only date), (year - 2000) / 50 with its Fourier features
  cloud      cloud % / 100, with its Fourier features
  off_nadir  degrees / 90, with its Fourier features
  sensor     one-hot over the training rows' sensors plus an "other" slot
then one present bit per group. An absent group has all its features 0 and its present bit 0, so the vector of a
row with nothing known (and the guidance's null) is all zeros.
"""

import datetime as dt
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

FIELDS = ("gsd", "lat", "lon", "date", "cloud", "off_nadir", "sensor")
GROUPS = ("gsd", "location", "date", "cloud", "off_nadir", "sensor")
GROUP_FIELDS = {"gsd": ("gsd",), "location": ("lat", "lon"), "date": ("date",), "cloud": ("cloud",),
                "off_nadir": ("off_nadir",), "sensor": ("sensor",)}
# Raw per-row values kept for the whole data set (NaN = absent); the sensor is kept apart as an index.
RAW = ("log2_gsd", "lat", "lon", "year", "day_of_year", "cloud", "off_nadir")
SPEC_FILENAME = "metadata_spec.json"
SPEC_VERSION = 1
DEFAULT_NUM_FREQUENCIES = 4
OTHER_SENSOR = -2  # a sensor outside the vocabulary (sampling only); -1 is "absent"
NO_SENSOR = -1
YEAR_CENTRE, YEAR_SPAN = 2000.0, 50.0
GSD_OCTAVES = 5.0
DAYS_PER_YEAR = 365.25


def parse_fields(value: Optional[str]) -> Tuple[str, ...]:
    """--metadata_fields as field names in FIELDS order; ValueError naming an unknown or lone lat/lon field."""
    if not value:
        return ()
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in FIELDS]
    if unknown:
        raise ValueError(f"unknown metadata field '{unknown[0]}' (known: {', '.join(FIELDS)})")
    if ("lat" in names) != ("lon" in names):
        raise ValueError("lat and lon go together (the location is encoded on the unit sphere): give both")
    return tuple(name for name in FIELDS if name in names)


def groups_of(fields: Sequence[str]) -> Tuple[str, ...]:
    """The encoding groups the selected fields make up, in GROUPS order."""
    return tuple(g for g in GROUPS if all(f in fields for f in GROUP_FIELDS[g]))


def _number(value, low: float, high: float, strict_low: bool = False) -> float:
    """value as a finite float in [low, high] (low excluded when strict_low); ValueError otherwise."""
    if isinstance(value, bool) or value is None:
        raise ValueError("not a number")
    number = float(value)
    if not math.isfinite(number) or number > high or number < low or (strict_low and number == low):
        raise ValueError("out of range")
    return number


def parse_date(value) -> Tuple[float, float]:
    """(year, day of year or NaN for a year-only date) of a date string, datetime, date or year number."""
    if isinstance(value, (dt.datetime, dt.date)):
        day = value if isinstance(value, dt.date) else value.date()
        return float(day.year), float(day.timetuple().tm_yday)
    if isinstance(value, np.datetime64):
        return parse_date(str(value.astype("datetime64[D]")))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _number(value, 1900, 2100), math.nan
    text = str(value).strip()
    if len(text) == 4 and text.isdigit():
        return _number(int(text), 1900, 2100), math.nan
    if len(text) == 8 and text.isdigit():
        text = f"{text[:4]}-{text[4:6]}-{text[6:]}"
    parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return _number(parsed.year, 1900, 2100), float(parsed.timetuple().tm_yday)


def parse_scalar(name: str, value) -> Tuple[float, ...]:
    """The raw values a field contributes (RAW order for it); ValueError for a bad value."""
    if name == "gsd":
        return (math.log2(_number(value, 0.0, math.inf, strict_low=True)),)
    if name == "lat":
        return (_number(value, -90.0, 90.0),)
    if name == "lon":
        return (_number(value, -180.0, 180.0),)
    if name == "date":
        return parse_date(value)
    if name == "cloud":
        return (_number(value, 0.0, 100.0),)
    return (_number(value, 0.0, 90.0),)  # off_nadir


RAW_SLOTS = {"gsd": (0,), "lat": (1,), "lon": (2,), "date": (3, 4), "cloud": (5,), "off_nadir": (6,)}


def _sensor_name(value) -> str:
    """A sensor value as its vocabulary key (trimmed, lower case); ValueError when empty or not text."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("not a sensor name")
    return value.strip().lower()


@dataclass
class BadValues:
    """Bad metadata values met while reading rows: counted per field, the first one kept to show."""

    by_field: Counter = field(default_factory=Counter)
    first: Optional[str] = None

    def add(self, row: int, name: str, value) -> None:
        """Count one bad value."""
        self.by_field[name] += 1
        if self.first is None:
            self.first = f"row {row} {name}={value!r}"

    @property
    def total(self) -> int:
        """How many bad values."""
        return sum(self.by_field.values())


def read_row(row: int, metadata, fields: Sequence[str], bad: BadValues) -> Tuple[np.ndarray, Optional[str]]:
    """(RAW values with NaN where absent, sensor key or None) of one row's metadata dict; bad values count as
    absent."""
    raw = np.full(len(RAW), np.nan)
    sensor = None
    metadata = metadata if isinstance(metadata, dict) else {}
    for name in fields:
        value = metadata.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        try:
            if name == "sensor":
                sensor = _sensor_name(value)
            else:
                raw[list(RAW_SLOTS[name])] = parse_scalar(name, value)
        except (ValueError, TypeError, OverflowError):
            bad.add(row, name, value)
    return raw, sensor


@dataclass(frozen=True)
class MetadataEncoder:
    """The encoding: selected fields, Fourier frequencies (multiples of pi) and the sensor vocabulary."""

    fields: Tuple[str, ...]
    num_frequencies: int = DEFAULT_NUM_FREQUENCIES
    sensors: Tuple[str, ...] = ()

    @property
    def groups(self) -> Tuple[str, ...]:
        """The groups encoded, in vector order."""
        return groups_of(self.fields)

    @property
    def frequencies(self) -> List[float]:
        """Angular frequencies of the Fourier features: pi * 2^k."""
        return [math.pi * 2.0 ** k for k in range(self.num_frequencies)]

    def scalar_width(self) -> int:
        """Features per Fourier-encoded scalar: the value, then a sin and a cos per frequency."""
        return 1 + 2 * self.num_frequencies

    def group_width(self, group: str) -> int:
        """Features of one group (present bit not included)."""
        scalars = {"gsd": 1, "location": 3, "date": 1, "cloud": 1, "off_nadir": 1}
        if group == "sensor":
            return len(self.sensors) + 1
        return scalars[group] * self.scalar_width() + (2 if group == "date" else 0)

    def layout(self) -> Dict[str, Tuple[int, int]]:
        """[start, end) of each group's features in the vector."""
        spans, start = {}, 0
        for group in self.groups:
            spans[group] = (start, start + self.group_width(group))
            start = spans[group][1]
        return spans

    @property
    def dim(self) -> int:
        """Length of the vector: every group's features plus one present bit per group."""
        return sum(self.group_width(g) for g in self.groups) + len(self.groups)

    def fourier(self, value: float) -> List[float]:
        """A scalar and its sin/cos features."""
        return [value] + [f(w * value) for w in self.frequencies for f in (math.sin, math.cos)]

    def group_features(self, group: str, raw: np.ndarray, sensor: int) -> Optional[List[float]]:
        """One group's features from a row's RAW values and sensor index; None when the group is absent."""
        if group == "sensor":
            if sensor == NO_SENSOR:
                return None
            one_hot = [0.0] * (len(self.sensors) + 1)
            one_hot[len(self.sensors) if sensor == OTHER_SENSOR else sensor] = 1.0
            return one_hot
        if group == "location":
            if np.isnan(raw[1]) or np.isnan(raw[2]):
                return None
            lat, lon = math.radians(raw[1]), math.radians(raw[2])
            xyz = (math.cos(lat) * math.cos(lon), math.cos(lat) * math.sin(lon), math.sin(lat))
            return [f for v in xyz for f in self.fourier(v)]
        if group == "date":
            if np.isnan(raw[3]):
                return None
            season = [0.0, 0.0] if np.isnan(raw[4]) else [math.sin(2 * math.pi * raw[4] / DAYS_PER_YEAR),
                                                          math.cos(2 * math.pi * raw[4] / DAYS_PER_YEAR)]
            return season + self.fourier((raw[3] - YEAR_CENTRE) / YEAR_SPAN)
        value = {"gsd": raw[0] / GSD_OCTAVES, "cloud": raw[5] / 100.0, "off_nadir": raw[6] / 90.0}[group]
        return None if np.isnan(value) else self.fourier(float(value))

    def encode(self, raw: np.ndarray, sensor: int, keep: Optional[Sequence[bool]] = None):
        """The float32 tensor of a row; keep[i] False drops group i (features and present bit 0)."""
        import torch

        vector = torch.zeros(self.dim, dtype=torch.float32)
        bits = vector.shape[0] - len(self.groups)
        for i, (group, (start, end)) in enumerate(self.layout().items()):
            features = self.group_features(group, raw, sensor)
            if features is None or (keep is not None and not keep[i]):
                continue
            vector[start:end] = torch.tensor(features, dtype=torch.float32)
            vector[bits + i] = 1.0
        return vector

    def sensor_index(self, name: Optional[str]) -> int:
        """A sensor key's slot: its vocabulary index, OTHER_SENSOR, or NO_SENSOR when None."""
        if name is None:
            return NO_SENSOR
        return self.sensors.index(name) if name in self.sensors else OTHER_SENSOR

    def encode_dict(self, metadata: Optional[dict]):
        """The vector of a metadata dict as a user gives it (bad values dropped like in training)."""
        raw, sensor = read_row(0, metadata or {}, self.fields, BadValues())
        return self.encode(raw, self.sensor_index(sensor))

    def to_spec(self) -> dict:
        """What metadata_spec.json records: enough to rebuild this encoder, plus the layout for readers."""
        return {"version": SPEC_VERSION, "fields": list(self.fields), "num_frequencies": self.num_frequencies,
                "frequencies": self.frequencies, "sensors": list(self.sensors), "dim": self.dim,
                "groups": {g: list(span) for g, span in self.layout().items()},
                "present_bits": self.dim - len(self.groups),
                "scaling": {"gsd": "log2(m) / 5", "location": "unit sphere x, y, z", "date":
                            "day of year sin, cos; (year - 2000) / 50", "cloud": "percent / 100",
                            "off_nadir": "degrees / 90"}}

    @classmethod
    def from_spec(cls, spec: dict) -> "MetadataEncoder":
        """The encoder a metadata_spec.json describes."""
        if spec.get("version") != SPEC_VERSION:
            raise ValueError(f"metadata spec version {spec.get('version')} is not {SPEC_VERSION}")
        return cls(tuple(spec["fields"]), int(spec["num_frequencies"]), tuple(spec["sensors"]))


def write_spec(encoder: MetadataEncoder, folder: Path) -> Path:
    """FOLDER/metadata_spec.json, written atomically."""
    from utils.atomic import write_json_atomic

    path = Path(folder) / SPEC_FILENAME
    Path(folder).mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, encoder.to_spec())
    return path


def read_spec(folder: Path) -> Optional[MetadataEncoder]:
    """The encoder of FOLDER/metadata_spec.json, or None when there is none."""
    path = Path(folder) / SPEC_FILENAME
    return MetadataEncoder.from_spec(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None


@dataclass(frozen=True)
class GuidanceDropout:
    """Classifier-free guidance dropout: per group, of the whole vector, and of the caption."""

    field: float = 0.0
    all: float = 0.0
    caption: float = 0.0

    def keep(self, rng, num_groups: int) -> List[bool]:
        """Which groups a row keeps this time; always the same draws in the same order (exact resume)."""
        drop_all = rng.random() < self.all
        per_group = [rng.random() >= self.field for _ in range(num_groups)]
        return [keep and not drop_all for keep in per_group]

    def drop_caption(self, rng) -> bool:
        """True when this row's caption becomes the empty prompt."""
        return rng.random() < self.caption


def conditioning_rng(seed: int, epoch: int, index: int):
    """The per-(seed, epoch, row) RNG of the guidance dropout, apart from the crop/flip/caption one so those draws
    stay what they were before metadata existed."""
    import random

    return random.Random(f"{seed}:{epoch}:{index}:guidance")


@dataclass
class RowMetadata:
    """Every row's raw metadata (parsed once) and the encoder; vectors are built per draw."""

    encoder: MetadataEncoder
    raw: np.ndarray  # (rows, len(RAW)), NaN = absent
    sensors: np.ndarray  # (rows,) int: vocabulary index or NO_SENSOR
    bad: BadValues = field(default_factory=BadValues)

    def vector(self, index: int, keep: Optional[Sequence[bool]] = None):
        """Row index's vector with the given groups kept."""
        return self.encoder.encode(self.raw[index], int(self.sensors[index]), keep)


def read_rows(cells: Sequence, fields: Tuple[str, ...], num_frequencies: int = DEFAULT_NUM_FREQUENCIES) -> RowMetadata:
    """Parse a metadata column (dicts or None per row); the sensor vocabulary is every sensor seen, sorted."""
    bad = BadValues()
    parsed = [read_row(i, cell, fields, bad) for i, cell in enumerate(cells)]
    vocabulary = tuple(sorted({s for _, s in parsed if s is not None})) if "sensor" in fields else ()
    encoder = MetadataEncoder(fields, num_frequencies, vocabulary)
    raw = np.stack([r for r, _ in parsed]) if parsed else np.zeros((0, len(RAW)))
    sensors = np.array([encoder.sensor_index(s) for _, s in parsed], dtype=np.int64)
    return RowMetadata(encoder, raw, sensors, bad)


def describe(rows: RowMetadata) -> str:
    """One line: rows with each group known, and the bad values treated as absent."""
    known = []
    for group in rows.encoder.groups:
        if group == "sensor":
            count = int((rows.sensors != NO_SENSOR).sum())
        else:
            slots = [s for f in GROUP_FIELDS[group] for s in RAW_SLOTS[f][:1]]
            count = int((~np.isnan(rows.raw[:, slots])).all(axis=1).sum())
        known.append(f"{group} {count}")
    line = f"metadata conditioning: {rows.encoder.dim} features; rows with {', '.join(known)} of {len(rows.raw)}"
    if rows.bad.total:
        by_field = ", ".join(f"{k} {v}" for k, v in sorted(rows.bad.by_field.items()))
        line += f"; {rows.bad.total} bad value(s) treated as absent ({by_field}), first: {rows.bad.first}"
    return line


def row_conditioning(rows: Optional[RowMetadata], dropout: GuidanceDropout, seed: int, epoch: int,
                     index: int) -> tuple:
    """(caption dropped?, metadata vector or None) of a row this epoch: the same draws cached or not."""
    rng = conditioning_rng(seed, epoch, index)
    empty_caption = dropout.drop_caption(rng)
    if rows is None:
        return empty_caption, None
    return empty_caption, rows.vector(index, dropout.keep(rng, len(rows.encoder.groups)))


def read_column(table, column: str, fields: Tuple[str, ...], num_frequencies: int) -> RowMetadata:
    """The RowMetadata of a datasets table's metadata column (struct or JSON-like cells), read through Arrow."""
    cells = table.with_format("arrow")[column]
    return read_rows(cells.to_pylist() if hasattr(cells, "to_pylist") else list(cells), fields, num_frequencies)
