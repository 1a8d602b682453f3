"""Parquet (RSICD or image+text schema) -> OUTPUT_DIR/rsicd_images/image_NNNNNN.jpg + OUTPUT_DIR/captions.txt.

NNNNNN is the 1-based input row number across all files in sorted order. captions.txt holds one
`rsicd_images/image_NNNNNN.jpg<TAB>caption` line per caption, the name relative to the folder holding it.
Failed rows leave a gap that OUTPUT_DIR/create_report.json explains. Re-running resumes; --overwrite redoes all.

Run: python diffusion_model/create.py --parquet_path P --output_dir O [--caption_file captions.txt]
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from typing import Optional, Sequence

from diffusion_model.atomic import write_json_atomic
from diffusion_model.captions import CAPTION_MODES
from diffusion_model.create_job import (ImageSettings, build_report, default_workers, prepare_output, run_job,
                                        settings_dict, summary_line)
from diffusion_model.geotiff import (DEFAULT_PERCENTILES, STRETCH_MODES, MultibandSettings, parse_bands,
                                     parse_percentiles)
from diffusion_model.imaging import RESIZE_MODES
from diffusion_model.parquet_source import inspect_sources, iter_rows, resolve_parquet_paths
from utils.cli import ArgumentParser, UsageError, run_main
from utils.constants import CAPTIONS_FILENAME, CREATE_REPORT_FILENAME, DEFAULT_JPEG_QUALITY, DEFAULT_RESOLUTION
from utils.logger import get_logger, setup_logging

DEFAULT_MAX_PIXELS = 8192 * 8192
BATCH_ROWS = 64


def parse_args(argv: Optional[Sequence[str]]):
    """Command line, with every tunable's default and meaning."""
    parser = ArgumentParser(description="Turn a Parquet of images and captions into JPEGs plus captions.txt.")
    parser.add_argument("--parquet_path", nargs="+", required=True, help="Parquet file(s) or folder(s) of shards.")
    parser.add_argument("--output_dir", required=True, help="Folder for rsicd_images/, captions.txt and the report.")
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
    parser.add_argument("--image_column", help="Image column (default: auto-detect, e.g. 'image').")
    parser.add_argument("--caption_column", help="Caption column (default: auto-detect 'captions' or 'text').")
    parser.add_argument("--num_workers", type=int, default=default_workers(), help="Worker processes (default: all cores).")
    parser.add_argument("--limit", type=int, help="Process only the first N rows.")
    parser.add_argument("--strict", action="store_true", help="Exit 1 if any row failed.")
    parser.add_argument("--overwrite", action="store_true", help="Redo every image instead of resuming.")
    return parser.parse_args(argv)


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


def resolve_caption_file(value: str, output_dir: Path) -> Path:
    """A bare name goes inside output_dir; any path must land directly in output_dir (names are relative to it)."""
    given = Path(value)
    path = (output_dir / given if given.parent == Path(".") else given).resolve()
    if path.parent != output_dir:
        raise UsageError(f"--caption_file {value} must lie directly in --output_dir {output_dir}")
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Create images and captions from Parquet; exit 1 under --strict if any row failed."""
    setup_logging()
    args = parse_args(argv)
    check_numbers(args)
    output_dir = Path(args.output_dir).resolve()
    caption_file = resolve_caption_file(args.caption_file, output_dir)
    inputs = resolve_parquet_paths(args.parquet_path)
    columns, rows_total = inspect_sources(inputs, args.image_column, args.caption_column)

    multiband = MultibandSettings(args.bands, args.stretch, args.stretch_percentiles)
    settings = ImageSettings(args.resolution, args.resize_mode, args.jpeg_quality, args.max_pixels, multiband)
    prepare_output(output_dir, settings_dict(settings, inputs, columns.image), args.overwrite)
    get_logger().info("%d rows in %d file(s); columns %s", rows_total, len(inputs), columns)
    rows = iter_rows(inputs, columns, BATCH_ROWS, args.limit)
    total = min(rows_total, args.limit or rows_total)
    tally, seconds = run_job(rows, total, output_dir, caption_file, settings, args.caption_mode,
                             args.num_workers, args.overwrite)

    report_path = output_dir / CREATE_REPORT_FILENAME
    used = {**vars(args), "parquet_path": [str(p) for p in inputs], "output_dir": str(output_dir),
            "caption_file": str(caption_file), "columns": vars(columns)}
    write_json_atomic(report_path, build_report(tally, seconds, inputs, rows_total, used))
    print(summary_line(tally, caption_file, report_path, seconds))
    return 1 if args.strict and tally.failures else 0


if __name__ == "__main__":
    run_main(main)
