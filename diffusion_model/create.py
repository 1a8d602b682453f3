"""Captioned images -> OUTPUT_DIR/rsicd_images/image_NNNNNN.jpg + OUTPUT_DIR/captions.txt.

Sources: Parquet (RSICD or image+text schema), Karpathy JSON, NWPU-Captions JSON, CSV, JSONL, webdataset shards
(diffusion_model/sources). NNNNNN is the 1-based input row number across all files in sorted order; --append
adds another source to the folder, numbered after the rows already there. captions.txt holds one
`rsicd_images/image_NNNNNN.jpg<TAB>caption` line per caption, the name relative to the folder holding it;
OUTPUT_DIR/source_files.jsonl names each image's file in the source ({"file_name", "source_file"} per line; rows
whose source has no names get none), which format.py carries into metadata.jsonl; OUTPUT_DIR/metadata_values.jsonl
holds each image's metadata ({"file_name", "metadata": {"gsd", "lat", ...}}; only images that have some) from
--metadata_columns, --metadata_sidecars, --metadata and GeoTIFF georeferencing, the GSD corrected for the resize.
Failed rows leave a gap that OUTPUT_DIR/create_report.json explains. Re-running resumes; --overwrite redoes all.
--output_format webdataset writes tar shards and a Parquet index instead (diffusion_model/shards.py), optionally
split over array tasks (--num_shards, --shard_index) and then merged (--merge OUTPUT_DIR).

Run: python diffusion_model/create.py --input P [P ...] --output_dir O [--format auto] [--split train] [--append]
"""

import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataclasses import asdict
from typing import Optional, Sequence

from utils.atomic import write_json_atomic
from diffusion_model.captions import CAPTION_MODES
from diffusion_model.conditioning import (CONDITIONING_TYPES, DEFAULT_NORM, MAX_MASK_CLASSES, NORM_MODES,
                                          ConditioningSettings, palette_record, parse_band_list, parse_palette)
from diffusion_model.create_job import (PREVIOUS_REPORT_FILENAME, SETTINGS_FILENAME, ImageSettings, MetadataPlan,
                                        build_report, conditioning_document, default_workers, prepare_output, run_job,
                                        summary_line)
from diffusion_model.geo_metadata import FIELDS, parse_columns, parse_literals
from diffusion_model.geotiff import (DEFAULT_PERCENTILES, STRETCH_MODES, MultibandSettings, parse_bands,
                                     parse_percentiles)
from diffusion_model.imaging import RESIZE_MODES
from diffusion_model.ledger import other_failures, place
from utils.shard_index import merge
from diffusion_model.shards import create_shards
from diffusion_model.sources import FORMATS, SPLITS, SourceOptions, open_source
from utils.cli import ArgumentParser, UsageError, run_main
from utils.constants import (CAPTIONS_FILENAME, CONDITIONING_FILENAME, CREATE_REPORT_FILENAME, DEFAULT_JPEG_QUALITY,
                             DEFAULT_RESOLUTION, DEFAULT_SHARD_SIZE, SHARDS_INDEX_FILENAME)
from utils.logger import get_logger, setup_logging

DEFAULT_MAX_PIXELS = 8192 * 8192


def parse_args(argv: Optional[Sequence[str]]):
    """Command line, with every tunable's default and meaning."""
    parser = ArgumentParser(description="Turn captioned images (Parquet, Karpathy or NWPU JSON, CSV, JSONL, "
                                        "webdataset) into JPEGs plus captions.txt.")
    add_source_flags(parser)
    add_metadata_flags(parser)
    add_conditioning_flags(parser)
    parser.add_argument("--output_dir", help="Folder for rsicd_images/, captions.txt and the report (required).")
    parser.add_argument("--caption_file", default=CAPTIONS_FILENAME,
                        help="Captions file; a bare name is placed in --output_dir, and it must lie directly in it.")
    parser.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION, help="Output side in pixels.")
    parser.add_argument("--jpeg_quality", type=int, default=DEFAULT_JPEG_QUALITY, help="JPEG quality, 1-100.")
    parser.add_argument("--caption_mode", choices=CAPTION_MODES, default="first",
                        help="first: keep the first clean caption; all: every distinct clean caption.")
    parser.add_argument("--resize_mode", choices=RESIZE_MODES, default="center_crop",
                        help="center_crop (shorter side to resolution, then crop), stretch, or pad.")
    parser.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="Refuse images whose header declares more pixels than this (decompression bombs).")
    parser.add_argument("--bands", type=parse_bands,
                        help="TIFF bands to show as R,G,B (1-based), e.g. 4,3,2 for Sentinel-2 or 1,2,3 for NAIP; "
                             "one number gives grey (default: the bands tagged red/green/blue, else the first "
                             "three).")
    parser.add_argument("--stretch", choices=STRETCH_MODES, default="auto",
                        help="TIFF bands to 0..255: percentile (per band, see --stretch_percentiles), minmax, none "
                             "(values taken as 8-bit), or auto: none for 8-bit bands, percentile for wider or float.")
    parser.add_argument("--stretch_percentiles", type=parse_percentiles, default=DEFAULT_PERCENTILES,
                        metavar="LOW,HIGH",
                        help="Percentiles of the valid pixels that map to 0 and 255 (default: 2,98).")
    parser.add_argument("--image_column", help="Image column (default: auto-detect: Parquet 'image'; CSV/JSONL the "
                                               "first of file_name, filename, image).")
    parser.add_argument("--caption_column", help="Caption column (default: auto-detect: Parquet 'captions' or 'text'; "
                                                 "CSV/JSONL the first of text, caption, captions).")
    parser.add_argument("--num_workers", type=int, default=default_workers(), help="Worker processes (default: all cores).")
    parser.add_argument("--limit", type=int, help="Process only the first N rows.")
    parser.add_argument("--strict", action="store_true", help="Exit 1 if any row failed.")
    parser.add_argument("--overwrite", action="store_true", help="Redo every image instead of resuming.")
    add_shard_flags(parser)
    args = parser.parse_args(argv)
    if args.merge is None and (args.input is None or args.output_dir is None):
        parser.error("the following arguments are required: --input, --output_dir (or --merge OUTPUT_DIR)")
    return args


def add_shard_flags(parser: ArgumentParser) -> None:
    """Webdataset output: tar shards, the split over array tasks, and the merge that writes the global index."""
    parser.add_argument("--output_format", choices=("imagefolder", "webdataset"), default="imagefolder",
                        help="imagefolder: rsicd_images/ + captions.txt (then format.py); webdataset: tar shards "
                             "under OUTPUT_DIR/shards/ with a Parquet index, which the trainer and evaluate.py read "
                             "as they are.")
    parser.add_argument("--shard_size", type=int, default=DEFAULT_SHARD_SIZE,
                        help="With --output_format webdataset: source rows per shard.")
    parser.add_argument("--num_shards", type=int,
                        help="With --output_format webdataset: split the shards over this many tasks (default: "
                             "SLURM_ARRAY_TASK_COUNT, else 1); each writes only its own; then run --merge.")
    parser.add_argument("--shard_index", type=int,
                        help="This task's number, 0 to --num_shards - 1 (default: SLURM_ARRAY_TASK_ID, counted "
                             "from SLURM_ARRAY_TASK_MIN, else 0).")
    parser.add_argument("--merge", metavar="OUTPUT_DIR",
                        help="Only merge: once every task's shards are finished, write OUTPUT_DIR's global index, "
                             "report and stats (a single-task run merges by itself).")


def add_source_flags(parser: ArgumentParser) -> None:
    """Where the rows come from: files, form, split, image folder, and --append for a further source."""
    parser.add_argument("--input", "--parquet_path", dest="input", nargs="+", metavar="PATH",
                        help="(Required.) Source file(s) or folder: Parquet file(s)/folder of shards, a Karpathy or "
                             "NWPU-Captions .json, a .csv or .jsonl index, or webdataset .tar shards (--parquet_path "
                             "is an alias).")
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="Source form; auto tells it from the name (and a .json from its structure).")
    parser.add_argument("--split", choices=SPLITS,
                        help="Split to read (val also reads 'valid'/'validation'). Default: train for JSON "
                             "indexes and CSV/JSONL with a split column; Parquet and tar shards: all files, else "
                             "the shards whose names start with the split.")
    parser.add_argument("--images_dir", help="Folder an index's image names resolve in (default: the index's own "
                                             "folder, or the one subfolder of it that holds the images).")
    parser.add_argument("--append", action="store_true",
                        help="Add this source to an existing output folder, numbered after the rows already there; "
                             "rerunning the same command resumes it.")


def add_metadata_flags(parser: ArgumentParser) -> None:
    """Where each image's metadata (GSD, place, date, cloud, off-nadir angle, sensor) comes from."""
    known = ", ".join(FIELDS)
    parser.add_argument("--metadata_columns", type=parse_columns, metavar="FIELD=COLUMN,...",
                        help=f"Per-row metadata: our field names ({known}) = the source's columns (Parquet, CSV, "
                             "JSONL), a webdataset sample's .json keys, or with --metadata_sidecars the sidecars' "
                             "keys; e.g. gsd=ground_sample_distance,lat=latitude,lon=longitude,date=timestamp.")
    parser.add_argument("--metadata_sidecars", action="store_true",
                        help="Read each image's metadata from the JSON file beside it (<image stem>.json or "
                             "<image stem>_rgb.json, as fMoW ships); its keys default to fMoW's (gsd, timestamp, "
                             "cloud_cover, off_nadir_angle_dbl, sensor_platform_name, raw_location's centre).")
    parser.add_argument("--metadata", type=parse_literals, metavar="FIELD=VALUE,...",
                        help="Values for every image of this source, e.g. gsd=1.0,sensor=naip (a row's own values "
                             "and a GeoTIFF's georeferencing come first; the GSD is the source images').")


def add_conditioning_flags(parser: ArgumentParser) -> None:
    """Where each image's ControlNet conditioning comes from and what kind it is."""
    parser.add_argument("--conditioning_column",
                        help="Each row's conditioning image: a Parquet column (bytes, {bytes, path} struct, or a path "
                             "beside the Parquet file), a CSV/JSONL column of paths (resolved like the images), or a "
                             "webdataset member extension such as mask.png.")
    parser.add_argument("--conditioning_dir",
                        help="Folder of conditioning files matched to the images by file stem (.png, .jpg, .jpeg, "
                             ".tif, .tiff), e.g. LoveDA's masks_png/ beside images_png/.")
    parser.add_argument("--conditioning_type", choices=CONDITIONING_TYPES, default="image",
                        help="image: RGB, resized like the image; mask: class indices, resized with nearest "
                             "neighbour, 8-bit PNG; bands: a multi-band (Geo)TIFF kept as float32 .npy.")
    parser.add_argument("--mask_palette", metavar="FILE.json",
                        help="With --conditioning_type mask: the RGB colour of each class, as a JSON list of [r, g, b] "
                             "(class = position) or {class: [r, g, b]}; a colour not in it fails the row.")
    parser.add_argument("--num_classes", type=int,
                        help=f"With --conditioning_type mask: classes 0..K-1; a mask with a class >= K fails its row "
                             f"(default: any class up to {MAX_MASK_CLASSES - 1}).")
    parser.add_argument("--conditioning_bands", type=parse_band_list, metavar="B1,B2,...",
                        help="With --conditioning_type bands: the bands to keep (1-based), e.g. 1,2 for Sentinel-1 "
                             "VV,VH (default: every band).")
    parser.add_argument("--conditioning_norm", choices=NORM_MODES,
                        help="With --conditioning_type bands: the normalisation training applies, from per-band "
                             "statistics over the folder's rows saved in conditioning.json (minmax, percentile: 2-98 "
                             f"to 0..1, zscore, none; default: {DEFAULT_NORM}).")


def source_options(args) -> SourceOptions:
    """The reader options from the command line."""
    return SourceOptions(args.format, args.split, args.images_dir, args.image_column, args.caption_column,
                         metadata_columns=args.metadata_columns, metadata_sidecars=args.metadata_sidecars,
                         conditioning_column=args.conditioning_column, conditioning_dir=args.conditioning_dir)


def load_palette(path: str) -> dict:
    """--mask_palette as {"class": [r, g, b]}; an unreadable or malformed file is a usage error naming it."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
        return palette_record(parse_palette(document))
    except OSError as err:
        raise UsageError(f"--mask_palette {path}: {err.strerror or err}") from None
    except ValueError as err:
        raise UsageError(f"--mask_palette {path}: {' '.join(str(err).split())}") from None


# Flags that only one conditioning type reads: given with another they would be silently ignored.
TYPE_FLAGS = {"mask_palette": "mask", "num_classes": "mask", "conditioning_bands": "bands",
              "conditioning_norm": "bands"}


def conditioning_settings(args) -> Optional[ConditioningSettings]:
    """The conditioning asked for (None without --conditioning_column or _dir); usage errors for flags that clash."""
    if args.conditioning_column is not None and args.conditioning_dir is not None:
        raise UsageError("give --conditioning_column or --conditioning_dir, not both")
    given = args.conditioning_column is not None or args.conditioning_dir is not None
    for flag, kind in TYPE_FLAGS.items():
        if getattr(args, flag) is not None and args.conditioning_type != kind:
            raise UsageError(f"--{flag} {getattr(args, flag)} needs --conditioning_type {kind} "
                             f"(got {args.conditioning_type})")
    if not given:
        if args.conditioning_type != "image":
            raise UsageError(f"--conditioning_type {args.conditioning_type} needs --conditioning_column or "
                             "--conditioning_dir")
        return None
    check_range("--num_classes", args.num_classes, 1, MAX_MASK_CLASSES)
    palette = load_palette(args.mask_palette) if args.mask_palette else None
    if palette and args.num_classes and max(map(int, palette)) >= args.num_classes:
        raise UsageError(f"--mask_palette {args.mask_palette} has class {max(map(int, palette))}, not below "
                         f"--num_classes {args.num_classes}")
    return ConditioningSettings(args.conditioning_type, args.conditioning_bands, palette, args.num_classes)


def renumbered(rows, offset: int):
    """Rows moved to their output numbers (after the sources already in the folder)."""
    return rows if offset == 0 else (row._replace(number=row.number + offset) for row in rows)


def check_range(flag: str, value: Optional[int], low: int, high: Optional[int] = None) -> None:
    """A usage error naming the flag when value lies outside [low, high]."""
    if value is None or (low <= value and (high is None or value <= high)):
        return
    allowed = f"between {low} and {high}" if high is not None else f"at least {low}"
    raise UsageError(f"{flag} must be {allowed}, got {value}")


def check_numbers(args) -> None:
    """Range checks the parser cannot express."""
    check_range("--resolution", args.resolution, 8, 16384)
    check_range("--jpeg_quality", args.jpeg_quality, 1, 100)
    check_range("--max_pixels", args.max_pixels, 1)
    check_range("--num_workers", args.num_workers, 1, 1024)
    check_range("--limit", args.limit, 1)
    check_range("--shard_size", args.shard_size, 1)


def check_shard_flags(args, conditioning) -> None:
    """Flags that only the webdataset output reads, and what it cannot do yet."""
    if args.output_format == "webdataset":
        for given, flag in ((args.append, "--append"), (conditioning is not None, "--conditioning_column/_dir")):
            if given:
                raise UsageError(f"{flag} is not supported with --output_format webdataset")
        return
    for flag in ("num_shards", "shard_index"):
        if getattr(args, flag) is not None:
            raise UsageError(f"--{flag} {getattr(args, flag)} needs --output_format webdataset")


def resolve_caption_file(value: str, output_dir: Path) -> Path:
    """A bare name goes inside output_dir; any path must land directly in output_dir (names are relative to it)."""
    given = Path(value)
    path = (output_dir / given if given.parent == Path(".") else given).resolve()
    if path.parent != output_dir:
        raise UsageError(f"--caption_file {value} must lie directly in --output_dir {output_dir}")
    return path


def merge_only(folder: Path) -> int:
    """create.py --merge: the global index, report and stats of a sharded folder whose tasks have all finished."""
    if not folder.is_dir():
        raise UsageError(f"--merge {folder} is not a folder")
    merged = merge(folder)
    print(f"create --merge: {merged['samples']} samples ({merged['rows']} rows) in {merged['shards']} shards, "
          f"{merged['bytes']} bytes; index {folder / SHARDS_INDEX_FILENAME}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Create images and captions from one source; exit 1 under --strict if any row failed."""
    setup_logging()
    args = parse_args(argv)
    if args.merge is not None:
        return merge_only(Path(args.merge).resolve())
    check_numbers(args)
    conditioning = conditioning_settings(args)
    check_shard_flags(args, conditioning)
    output_dir = Path(args.output_dir).resolve()
    caption_file = resolve_caption_file(args.caption_file, output_dir)
    source = open_source(args.input, source_options(args))

    multiband = MultibandSettings(args.bands, args.stretch, args.stretch_percentiles)
    settings = ImageSettings(args.resolution, args.resize_mode, args.jpeg_quality, args.max_pixels, multiband,
                             conditioning)
    if args.output_format == "webdataset":
        metadata = MetadataPlan(args.metadata or {}, args.resolution, args.resize_mode)
        return create_shards(args, source, settings, metadata, output_dir)
    # Where this source's rows go among the folder's sources; a rerun finds its own place again.
    columns = source.details.get("columns", {})
    spot = place(output_dir / SETTINGS_FILENAME, asdict(settings), source.record(), columns.get("image"),
                 source.rows_total, args.append, args.overwrite)
    own_rows = range(spot.first_row, spot.last_row + 1)
    prepare_output(output_dir, spot.guarded, args.overwrite, spot.document, own_rows if spot.appended else None)
    get_logger().info("%s: %d rows in %d file(s) -> rows %d-%d; %s", source.label(), source.rows_total,
                      len(source.inputs), spot.first_row, spot.last_row, source.details)
    rows = renumbered(source.rows(args.limit), spot.offset)
    total = min(source.rows_total, args.limit or source.rows_total)
    keep = None if args.overwrite and not spot.appended else own_rows
    metadata = MetadataPlan(args.metadata or {}, args.resolution, args.resize_mode)
    tally, seconds = run_job(rows, total, output_dir, caption_file, settings, args.caption_mode,
                             args.num_workers, args.overwrite, keep, metadata)

    report_path = output_dir / CREATE_REPORT_FILENAME
    used = {**vars(args), "input": [str(p) for p in source.inputs], "output_dir": str(output_dir),
            "caption_file": str(caption_file), "columns": columns}
    report = build_report(tally, seconds, source.inputs, source.rows_total, used,
                          {**source.record(), "first_row": spot.first_row, "rows": source.rows_total})
    report.update(sources=spot.document["sources"], other_sources_failures=other_failures(
        output_dir, (PREVIOUS_REPORT_FILENAME,), own_rows) if keep else [])
    if not conditioning:  # a folder rebuilt (--overwrite) without conditioning keeps no description of one
        (output_dir / CONDITIONING_FILENAME).unlink(missing_ok=True)
    if conditioning:
        norm = args.conditioning_norm or (DEFAULT_NORM if conditioning.type == "bands" else None)
        document = conditioning_document(output_dir, settings, norm)
        write_json_atomic(output_dir / CONDITIONING_FILENAME, document)
        report["conditioning"] = {"type": conditioning.type, "rows": document["rows"],
                                  "file": str(output_dir / CONDITIONING_FILENAME)}
    write_json_atomic(report_path, report)
    (output_dir / PREVIOUS_REPORT_FILENAME).unlink(missing_ok=True)
    print(summary_line(tally, caption_file, report_path, seconds, source.label()))
    return 1 if args.strict and tally.failures else 0


if __name__ == "__main__":
    run_main(main)
