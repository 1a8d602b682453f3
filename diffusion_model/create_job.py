"""The create job: turn numbered Parquet rows into JPEGs (in worker processes) and caption lines (in order).

The main process reads rows, cleans captions and ships raw image bytes in small chunks to a pool; each worker
decodes, resizes, encodes and writes its JPEG itself, returning only a tiny status. At most a fixed number of
chunks are in flight, so memory stays flat however long the input is, and results are consumed in submission
order, so captions.txt is streamed in row order, and beside it source_files.jsonl, each image's file name in the
source (the renaming to image_NNNNNN.jpg would otherwise lose the scene class RSICD's names carry), and
metadata_values.jsonl, each image's metadata (GSD corrected for the resize; see geo_metadata.py). The workers read
each GeoTIFF's georeference and the source size of every row with metadata from the image header, reused or not.
"""

import io
import json
import multiprocessing
import os
import re
import time
from collections import Counter, deque
from itertools import zip_longest
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from PIL import Image
from tqdm import tqdm

from utils.atomic import open_text_atomic, write_bytes_atomic, write_json_atomic
from diffusion_model.captions import select_captions
from diffusion_model.conditioning import NORM_PERCENTILES, BandStats, ConditioningSettings, norm_limits
from diffusion_model.conditioning_io import SUFFIXES, prepare_conditioning, summary_of_file
from diffusion_model.geo_metadata import FIELDS, row_metadata
from diffusion_model.georef import locate, read_georef
from diffusion_model.geotiff import MultibandSettings
from utils.image_errors import ImageRejected, pillow_pixel_limit
from diffusion_model.imaging import decode_rgb, encode, is_tiff, prepare, resize
from diffusion_model.ledger import LEGACY
from utils.cli import UsageError
from utils.logger import get_logger
from utils.constants import (
    CAPTION_SEPARATOR,
    CONDITIONING_DIRNAME,
    CONDITIONING_FILES_FILENAME,
    CONDITIONING_KEY,
    CREATE_REPORT_FILENAME,
    IMAGE_EXTENSION,
    IMAGE_INDEX_DIGITS,
    IMAGE_PREFIX,
    IMAGES_DIRNAME,
    METADATA_KEY,
    METADATA_VALUES_FILENAME,
    SOURCE_FILE_KEY,
    SOURCE_FILES_FILENAME,
    TMP_SUFFIX,
)

REASON_NO_CAPTION = "no_caption"
# Kept beside the images so a resume with different image settings is refused instead of mixing outputs.
SETTINGS_FILENAME = "create_settings.json"
PREVIOUS_REPORT_FILENAME = "create_report.previous.json"
# A chunk is one task for the pool: large enough that per-task overhead is small, small enough in bytes that
# the chunks in flight stay a few MiB whatever the size of the source images.
CHUNK_ROWS = 32
CHUNK_BYTES = 4 << 20
CHUNKS_IN_FLIGHT_PER_WORKER = 3
OUR_IMAGE = re.compile(rf"^{re.escape(IMAGE_PREFIX)}\d{{{IMAGE_INDEX_DIGITS},}}{re.escape(IMAGE_EXTENSION)}$")
CONDITIONING_SUFFIXES = "|".join(sorted(map(re.escape, set(SUFFIXES.values()))))
OUR_CONDITIONING = re.compile(rf"^{re.escape(IMAGE_PREFIX)}(\d{{{IMAGE_INDEX_DIGITS},}})({CONDITIONING_SUFFIXES})$")


@dataclass(frozen=True)
class ImageSettings:
    """Everything that decides an output JPEG's bytes (stored in the output folder to guard resumes)."""

    resolution: int
    resize_mode: str
    jpeg_quality: int
    max_pixels: int
    multiband: MultibandSettings = MultibandSettings()
    conditioning: Optional[ConditioningSettings] = None


@dataclass(frozen=True)
class MetadataPlan:
    """How rows get their metadata: the source's literal values (--metadata) and the resize the GSD follows."""

    literals: dict = field(default_factory=dict)
    resolution: int = 512
    resize_mode: str = "center_crop"


@dataclass
class JobTally:
    """Counts and failures gathered while the job runs."""

    rows_processed: int = 0
    images_written: int = 0
    images_reused: int = 0
    caption_lines: int = 0
    kept_caption_lines: int = 0  # other sources' lines (--append) written back around this source's
    failures: list = field(default_factory=list)
    metadata_rows: int = 0
    metadata_fields: Counter = field(default_factory=Counter)
    metadata_problems: list = field(default_factory=list)
    unlocated: Counter = field(default_factory=Counter)  # GeoTIFF rows left without lat/lon, per EPSG code

    def fail(self, number: int, filename, reason: str, detail: str = "") -> None:
        """Record a failed row."""
        self.failures.append({"row": number, "filename": filename, "reason": reason, "detail": detail})

    def failures_by_reason(self) -> dict:
        """Failure counts per reason, most common first."""
        return dict(Counter(f["reason"] for f in self.failures).most_common())


def image_name(number: int) -> str:
    """File name of the image made from input row `number` (1-based)."""
    return f"{IMAGE_PREFIX}{number:0{IMAGE_INDEX_DIGITS}d}{IMAGE_EXTENSION}"


def image_number(name: str) -> Optional[int]:
    """The row number in one of our image names (a bare name or rsicd_images/name), or None."""
    base = name.rpartition("/")[2]
    return int(base[len(IMAGE_PREFIX): -len(IMAGE_EXTENSION)]) if OUR_IMAGE.match(base) else None


def kept_lines(path: Path, rows: range, before: bool, number_of):
    """Existing lines of other sources' rows (number_of(line) gives a line's row): those numbered before rows, or
    (before=False) after them."""
    if not path.is_file():
        return
    with open(path, encoding="utf-8", newline="\n") as handle:
        for line in handle:
            number = number_of(line)
            # A line that is not ours (hand-edited) is kept at the top rather than lost.
            if (number is None or number < rows.start) if before else (number is not None and number >= rows.stop):
                yield line if line.endswith("\n") else line + "\n"


def kept_caption_lines(caption_file: Path, rows: range, before: bool):
    """Existing captions.txt lines of other sources' rows (see kept_lines)."""
    return kept_lines(caption_file, rows, before, lambda line: image_number(line.partition(CAPTION_SEPARATOR)[0]))


def source_line_number(line: str) -> Optional[int]:
    """The row number of a source_files.jsonl line's image, or None for a line that is not one of ours."""
    try:
        name = json.loads(line).get("file_name")
    except (ValueError, AttributeError):
        return None
    return image_number(name) if isinstance(name, str) else None


def kept_source_lines(sources_file: Path, rows: range, before: bool):
    """Existing source_files.jsonl lines of other sources' rows (see kept_lines)."""
    return kept_lines(sources_file, rows, before, source_line_number)


def metadata_line(name: str, values: dict) -> str:
    """A metadata_values.jsonl line: an image's name (as in captions.txt) and its metadata."""
    return json.dumps({"file_name": name, METADATA_KEY: values}, ensure_ascii=False) + "\n"


def source_line(name: str, source_file: str) -> str:
    """A source_files.jsonl line: an image's name (as in captions.txt) and its row's file name in the source."""
    return json.dumps({"file_name": name, SOURCE_FILE_KEY: source_file}, ensure_ascii=False) + "\n"


def clear_images(images_dir: Path, finished_too: bool, rows: Optional[range] = None) -> int:
    """Remove leftover temporary images (and, for --overwrite, finished ones of rows, default all); return how many."""
    removed = 0
    for path in images_dir.iterdir():
        is_tmp = path.name.endswith(TMP_SUFFIX) and OUR_IMAGE.match(path.name[: -len(TMP_SUFFIX)])
        ours = OUR_IMAGE.match(path.name) and (rows is None or image_number(path.name) in rows)
        if is_tmp or (finished_too and ours):
            path.unlink()
            removed += 1
    return removed


# How each conditioning type is stored, for conditioning.json's readers.
CONDITIONING_FORMATS = {"image": "RGB PNG, resized like the image (Lanczos)",
                        "mask": "8-bit PNG (mode L) of class indices, resized with nearest neighbour",
                        "bands": "float32 .npy shaped (bands, height, width), raw values, resized bilinearly"}

_worker_state = {}
WRITTEN, REUSED = "written", "reused"


def conditioning_name(number: int, settings: ConditioningSettings) -> str:
    """File name of row number's conditioning: the image's stem with the type's suffix."""
    return image_name(number)[: -len(IMAGE_EXTENSION)] + SUFFIXES[settings.type]


def clear_conditioning(folder: Path, finished_too: bool, rows: Optional[range] = None) -> None:
    """Remove leftover temporary conditioning files (and, for --overwrite, finished ones of rows, default all)."""
    for path in folder.iterdir() if folder.is_dir() else ():
        base = path.name[: -len(TMP_SUFFIX)] if path.name.endswith(TMP_SUFFIX) else None
        found = OUR_CONDITIONING.match(base or path.name)
        if found and (base is not None or (finished_too and (rows is None or int(found.group(1)) in rows))):
            path.unlink()


def init_worker(images_dir: str, settings: ImageSettings, overwrite: bool) -> None:
    """Pool initializer: remember where to write and how."""
    _worker_state.update(images_dir=Path(images_dir), settings=settings, overwrite=overwrite,
                         conditioning_dir=Path(images_dir).parent / CONDITIONING_DIRNAME)


def reading_rows():
    """The block in which a worker reads its rows' images: Pillow's own bomb guard is off there, because
    --max_pixels replaces it (imaging and geotiff refuse a larger image from its header, counted as too_large) and
    may admit large GeoTIFF tiles beyond Pillow's default; restored afterwards, so nothing else in the process
    (an in-process caller, a test) loses it."""
    return pillow_pixel_limit(None)


def source_facts(data: bytes, wanted: bool) -> Optional[tuple]:
    """(width, height, Location or None) of a row's source image from its header: every GeoTIFF (its georeference
    gives GSD and place) and any image whose metadata needs its size (the GSD correction); None otherwise."""
    if is_tiff(data):
        found = read_georef(data)
        if found:
            width, height, tags = found
            return width, height, locate(tags, width, height)
    if not wanted:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size[0], image.size[1], None
    except Exception:  # an undecodable image fails its row in prepare(); it has no size to give here
        return None


def make_row(number: int, data: Optional[bytes], conditioning: Optional[bytes], settings: ImageSettings) -> tuple:
    """(JPEG bytes, conditioning file bytes or None, its sidecar summary or None) of one row; the conditioning is
    cropped and resized by the image's own source size, so the two stay aligned."""
    if settings.conditioning is None:
        return prepare(data, settings.resolution, settings.resize_mode, settings.jpeg_quality, settings.max_pixels,
                       settings.multiband), None, None
    rgb = decode_rgb(data, settings.max_pixels, settings.multiband)
    made, summary = prepare_conditioning(conditioning, rgb.size, settings.conditioning, settings.resolution,
                                         settings.resize_mode, settings.max_pixels, number)
    return encode(resize(rgb, settings.resolution, settings.resize_mode), settings.jpeg_quality), made, summary


def reused_summary(number: int, settings: ImageSettings) -> tuple:
    """(True, sidecar summary) when row number's outputs exist from an earlier run, else (False, None)."""
    if _worker_state["overwrite"] or not (_worker_state["images_dir"] / image_name(number)).exists():
        return False, None
    if settings.conditioning is None:
        return True, None
    path = _worker_state["conditioning_dir"] / conditioning_name(number, settings.conditioning)
    try:
        return True, summary_of_file(path, settings.conditioning.type, number)
    except (OSError, ValueError):  # missing or unreadable: the row is made again
        return False, None


def sidecar_record(number: int, settings: ImageSettings, summary: Optional[dict]) -> Optional[dict]:
    """What conditioning_files.jsonl says of a kept row (None without conditioning)."""
    if settings.conditioning is None:
        return None
    name = f"{CONDITIONING_DIRNAME}/{conditioning_name(number, settings.conditioning)}"
    return {CONDITIONING_KEY: name, **(summary or {})}


def process_chunk(items: list) -> list:
    """Worker: for each (row number, image bytes, metadata wanted, conditioning bytes) reuse or make and write the
    JPEG (and its conditioning, written first: an image on disk means its row is done); return (number, outcome,
    detail, source facts, conditioning sidecar record)."""
    settings, images_dir = _worker_state["settings"], _worker_state["images_dir"]
    statuses = []
    with reading_rows():
        for number, data, wanted, conditioning in items:
            facts = source_facts(data, wanted) if data else None
            # The existence check runs here rather than in the main process, so resuming costs the reader nothing.
            reused, summary = reused_summary(number, settings)
            if reused:
                statuses.append((number, REUSED, "", facts, sidecar_record(number, settings, summary)))
                continue
            try:
                jpeg, made, summary = make_row(number, data, conditioning, settings)
            except ImageRejected as err:
                statuses.append((number, err.reason, err.detail, None, None))
                continue
            if made is not None:
                write_bytes_atomic(_worker_state["conditioning_dir"] / conditioning_name(number, settings.conditioning),
                                   made)
            write_bytes_atomic(images_dir / image_name(number), jpeg)
            statuses.append((number, WRITTEN, "", facts, sidecar_record(number, settings, summary)))
    return statuses


def plan_chunk(rows: list, caption_mode: str, literals: Optional[dict] = None) -> tuple:
    """Clean each row's captions; return per-row plans and the image work (rows with a caption) to send out, each
    marked when its metadata needs the source image's size."""
    plans = [(row, select_captions(row.captions, caption_mode)) for row in rows]
    work = [(row.number, row.image, bool(literals or row.metadata), row.conditioning) for row, captions in plans
            if captions and not row.failure]
    return plans, work


def settle_metadata(row, name: str, facts: Optional[tuple], plan: MetadataPlan, tally: JobTally, out) -> None:
    """Work out a kept row's metadata, write its line (when it has any) and count its fields and bad values."""
    values = metadata_values(row, facts, plan, tally)
    if values:
        tally.metadata_rows += 1
        tally.metadata_fields.update(values.keys())
        out.write(metadata_line(name, values))


def metadata_values(row, facts: Optional[tuple], plan: MetadataPlan, tally: JobTally) -> dict:
    """A kept row's metadata values; its bad values and GeoTIFFs without location are counted in tally."""
    size, location = (facts[:2], facts[2]) if facts else (None, None)
    tags = {k: v for k, v in zip(("gsd", "lat", "lon"), location[:3]) if v is not None} if location else {}
    if location and location.unsupported is not None:
        if location.unsupported not in tally.unlocated:
            get_logger().warning("GeoTIFF CRS EPSG:%s is not UTM (WGS84/NAD83), Web Mercator or geographic, and pyproj "
                                 "is not installed or cannot convert it: its rows keep no location",
                                 location.unsupported)
        tally.unlocated[location.unsupported] += 1
    values, problems = row_metadata(row.metadata, tags, plan.literals, size, plan.resolution, plan.resize_mode)
    tally.metadata_problems += [{"row": row.number, "field": f, "value": v, "reason": r} for f, v, r in problems]
    return values


def settle_chunk(plans: list, statuses: list, tally: JobTally, captions_out, sources_out=None, metadata_out=None,
                 metadata_plan: Optional[MetadataPlan] = None, conditioning_out=None) -> None:
    """Merge a finished chunk into the tally and append its caption lines (and source-name, metadata and
    conditioning lines), in row order."""
    outcomes = {status[0]: status[1:] for status in statuses}
    for row, captions in plans:
        tally.rows_processed += 1
        outcome, detail, *facts = outcomes.get(row.number, row.failure or (REASON_NO_CAPTION, ""))
        record = facts[1] if len(facts) > 1 else None
        if outcome not in (WRITTEN, REUSED):
            tally.fail(row.number, row.filename, outcome, detail)
            continue
        tally.images_reused += outcome == REUSED
        tally.images_written += outcome == WRITTEN
        name = f"{IMAGES_DIRNAME}/{image_name(row.number)}"
        captions_out.writelines(f"{name}{CAPTION_SEPARATOR}{caption}\n" for caption in captions)
        tally.caption_lines += len(captions)
        if sources_out is not None and row.filename:
            sources_out.write(source_line(name, row.filename))
        if metadata_out is not None:
            settle_metadata(row, name, facts[0] if facts else None, metadata_plan or MetadataPlan(), tally,
                            metadata_out)
        if conditioning_out is not None and record is not None:
            conditioning_out.write(json.dumps({"file_name": name, **record}) + "\n")


def chunked(rows: Iterable, max_rows: int, max_bytes: int):
    """Group rows into lists of at most max_rows rows and (past the first row) max_bytes of image bytes."""
    chunk, size = [], 0
    for row in rows:
        row_bytes = len(row.image) if row.image else 0
        if chunk and (len(chunk) == max_rows or size + row_bytes > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(row)
        size += row_bytes
    if chunk:
        yield chunk


def run_job(rows: Iterable, total: int, output_dir: Path, caption_file: Path, settings: ImageSettings,
            caption_mode: str, num_workers: int, overwrite: bool, keep_outside: Optional[range] = None,
            metadata_plan: Optional[MetadataPlan] = None) -> tuple:
    """Process all rows with a bounded pool; write captions.txt atomically; return (tally, seconds).

    keep_outside: this run's output rows; the caption lines (and source-name and metadata lines) other sources
    wrote outside them stay, in row order.
    """
    images_dir, sources_file = output_dir / IMAGES_DIRNAME, output_dir / SOURCE_FILES_FILENAME
    metadata_file, metadata_plan = output_dir / METADATA_VALUES_FILENAME, metadata_plan or MetadataPlan()
    conditioning_file = output_dir / CONDITIONING_FILES_FILENAME
    started, tally, pending = time.monotonic(), JobTally(), deque()
    max_in_flight = num_workers * CHUNKS_IN_FLIGHT_PER_WORKER
    with multiprocessing.Pool(num_workers, init_worker, (str(images_dir), settings, overwrite)) as pool, \
            open_text_atomic(caption_file) as captions_out, open_text_atomic(sources_file) as sources_out, \
            open_text_atomic(metadata_file) as metadata_out, open_text_atomic(conditioning_file) as conditioning_out, \
            tqdm(total=total, unit="row", desc="create", disable=None) as bar:
        outs = (captions_out, sources_out, metadata_out, metadata_plan, conditioning_out)
        if keep_outside is not None:
            tally.kept_caption_lines += write_lines(captions_out, kept_caption_lines(caption_file, keep_outside, True))
            write_lines(sources_out, kept_source_lines(sources_file, keep_outside, True))
            write_lines(metadata_out, kept_source_lines(metadata_file, keep_outside, True))
            write_lines(conditioning_out, kept_source_lines(conditioning_file, keep_outside, True))
        for chunk in chunked(rows, CHUNK_ROWS, CHUNK_BYTES):
            plans, work = plan_chunk(chunk, caption_mode, metadata_plan.literals)
            pending.append((plans, pool.apply_async(process_chunk, (work,)) if work else None))
            while len(pending) >= max_in_flight:
                settle_oldest(pending, tally, outs, bar)
        while pending:
            settle_oldest(pending, tally, outs, bar)
        if keep_outside is not None:
            tally.kept_caption_lines += write_lines(captions_out, kept_caption_lines(caption_file, keep_outside, False))
            write_lines(sources_out, kept_source_lines(sources_file, keep_outside, False))
            write_lines(metadata_out, kept_source_lines(metadata_file, keep_outside, False))
            write_lines(conditioning_out, kept_source_lines(conditioning_file, keep_outside, False))
    for sidecar in (metadata_file, conditioning_file):
        if sidecar.stat().st_size == 0:  # no image in the folder has any: no file, rather than an empty one
            sidecar.unlink()
    return tally, time.monotonic() - started


def write_lines(out, lines) -> int:
    """Write lines; return how many."""
    count = 0
    for line in lines:
        out.write(line)
        count += 1
    return count


def settle_oldest(pending: deque, tally: JobTally, outs: tuple, bar) -> None:
    """Wait for the oldest chunk in flight and fold it into the results (outs: the captions, sources and metadata
    files, and the metadata plan)."""
    plans, result = pending.popleft()
    settle_chunk(plans, result.get() if result else [], tally, *outs)
    bar.update(len(plans))


def build_report(tally: JobTally, seconds: float, inputs: list, rows_total: int, settings: dict,
                 source: Optional[dict] = None) -> dict:
    """The create_report.json document."""
    return {
        "inputs": [str(p) for p in inputs],
        "source": source,
        "settings": settings,
        "rows_in_inputs": rows_total,
        "rows_processed": tally.rows_processed,
        "images_ok": tally.images_written + tally.images_reused,
        "images_written": tally.images_written,
        "images_reused": tally.images_reused,
        "caption_lines": tally.caption_lines,
        "caption_lines_in_file": tally.caption_lines + tally.kept_caption_lines,
        "rows_failed": len(tally.failures),
        "failures_by_reason": tally.failures_by_reason(),
        "elapsed_seconds": round(seconds, 3),
        "rows_per_second": round(tally.rows_processed / seconds, 2) if seconds > 0 else None,
        "failures": tally.failures,
        "metadata": metadata_summary(tally),
        "metadata_problems": tally.metadata_problems,
    }


def metadata_summary(tally: JobTally) -> dict:
    """Counts for the report: rows with metadata, rows per field, bad values per field, GeoTIFFs left unplaced."""
    return {"rows_with_metadata": tally.metadata_rows,
            "fields": {f: tally.metadata_fields[f] for f in FIELDS if tally.metadata_fields[f]},
            "bad_values": len(tally.metadata_problems),
            "bad_values_by_field": dict(Counter(p["field"] for p in tally.metadata_problems).most_common()),
            "rows_without_location_by_epsg": {str(code): n for code, n in tally.unlocated.items()}}


def metadata_note(tally: JobTally) -> str:
    """The summary line's metadata part ("" when the source gave none)."""
    if not (tally.metadata_rows or tally.metadata_problems or tally.unlocated):
        return ""
    fields = ", ".join(f"{f} {tally.metadata_fields[f]}" for f in FIELDS if tally.metadata_fields[f])
    unplaced = sum(tally.unlocated.values())
    return (f"; metadata on {tally.metadata_rows} rows ({fields or 'no fields'}), "
            f"{len(tally.metadata_problems)} bad values dropped"
            + (f", {unplaced} GeoTIFF rows without location (EPSG {', '.join(map(str, tally.unlocated))})"
               if unplaced else ""))


def summary_line(tally: JobTally, caption_file: Path, report_path: Path, seconds: float, source: str = "") -> str:
    """One line saying what happened (and, given a source label, what was read), failures included."""
    ok = tally.images_written + tally.images_reused
    reasons = ", ".join(f"{n} {r}" for r, n in tally.failures_by_reason().items())
    failed = f"{len(tally.failures)} failed ({reasons})" if tally.failures else "0 failed"
    label = f" ({source})" if source else ""
    total = tally.caption_lines + tally.kept_caption_lines
    share = (f" ({tally.caption_lines} from this source, {tally.kept_caption_lines} from the folder's other sources)"
             if tally.kept_caption_lines else "")
    return (f"create{label}: {ok}/{tally.rows_processed} rows ok ({tally.images_written} written, {tally.images_reused} reused), "
            f"{failed}; {total} caption lines in {caption_file}{share}{metadata_note(tally)}; {seconds:.1f}s; "
            f"report {report_path}")


def default_workers() -> int:
    """All cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def guard_settings(output_dir: Path, wanted: dict, overwrite: bool, hint: str = "add --overwrite") -> None:
    """Refuse to resume into a folder whose images were made with other settings, unless --overwrite."""
    path = output_dir / SETTINGS_FILENAME
    if overwrite or not path.exists():
        return
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        stored = {}
    changed = [key for key in wanted if stored.get(key, LEGACY.get(key)) != wanted[key]]
    if changed:
        before = ", ".join(f"{key}={stored.get(key, LEGACY.get(key))!r}" for key in changed)
        raise UsageError(f"{output_dir} holds images made with {before}; rerun with the same settings or {hint}")


def prepare_output(output_dir: Path, wanted: dict, overwrite: bool, document: Optional[dict] = None,
                   rows: Optional[range] = None) -> Path:
    """Create the output folders, clear stale or (with --overwrite) our images, store the settings.

    document: the settings file to write (default: wanted). rows: this run's rows when others share the folder
    (--append); then --overwrite clears only those images, and the image settings are checked even so.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output_dir {output_dir} exists and is not a folder")
    guard_settings(output_dir, wanted, overwrite and rows is None,
                   "--overwrite without --append" if rows is not None else "add --overwrite")
    images_dir = output_dir / IMAGES_DIRNAME
    try:
        images_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create --output_dir {output_dir}: {err.strerror}") from None
    clear_images(images_dir, finished_too=overwrite, rows=rows)
    if wanted.get("conditioning"):
        (output_dir / CONDITIONING_DIRNAME).mkdir(exist_ok=True)
    clear_conditioning(output_dir / CONDITIONING_DIRNAME, finished_too=overwrite, rows=rows)
    # A report from an earlier run would claim completion while this one is under way; it is set aside (not
    # deleted) because it names the failed rows of the other sources in the folder, which the new report carries.
    report = output_dir / CREATE_REPORT_FILENAME
    if report.exists():
        os.replace(report, output_dir / PREVIOUS_REPORT_FILENAME)
    write_json_atomic(output_dir / SETTINGS_FILENAME, document or wanted)
    return images_dir


def sidecar_records(path: Path):
    """conditioning_files.jsonl's records (lines that are not JSON objects are skipped)."""
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record


def conditioning_document(output_dir: Path, settings: ImageSettings, norm: Optional[str]) -> dict:
    """conditioning.json: what a trainer needs to read the folder's conditioning files and prepare them the same
    way at sampling time; statistics over every row of the folder (all its sources), from the sidecar."""
    kind = settings.conditioning
    stats, classes, rows = BandStats(), [], 0
    for record in sidecar_records(output_dir / CONDITIONING_FILES_FILENAME):
        rows += 1
        if "band_stats" in record:
            stats.add(record["band_stats"])
        counts = record.get("class_counts") or []
        classes = [a + b for a, b in zip_longest(classes, counts, fillvalue=0)]
    document = {"type": kind.type, "directory": CONDITIONING_DIRNAME, "rows": rows, "resolution": settings.resolution,
                "resize_mode": settings.resize_mode, "file_format": CONDITIONING_FORMATS[kind.type],
                "channels": 3 if kind.type == "image" else 1, "classes": None, "bands": kind.bands,
                "palette": kind.palette, "normalisation": None, "statistics": None}
    if kind.type == "mask":
        document.update(classes=kind.num_classes or len(classes), class_pixels=classes)
    if kind.type == "bands":
        found = stats.result()
        limits = norm_limits(found, norm) if found["bands"] else []
        document.update(channels=len(found["bands"]) or (len(kind.bands) if kind.bands else None), statistics=found,
                        normalisation={"mode": norm, "offset": [o for o, _ in limits],
                                       "scale": [s for _, s in limits], "clip": norm in ("minmax", "percentile"),
                                       **({"percentiles": list(NORM_PERCENTILES)} if norm == "percentile" else {})})
    return document
