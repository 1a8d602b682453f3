"""captions.txt -> metadata.jsonl for datasets' "imagefolder" loader.

The folder holding --output_file is DATA_DIR: `datasets.load_dataset("imagefolder", data_dir=DATA_DIR)` then
yields `image` and `text` columns, one row per image. Each JSON line is {"file_name": ..., "text": ...} with
file_name relative to DATA_DIR; text is a list in every row when any image has several captions. When create.py's
source_files.jsonl lies beside --caption_file, each line also gets "source_file": the image's file name in the
source create.py read (null for an image it does not name), from which evaluate.py reads the scene class; when
create.py's metadata_values.jsonl lies there too, an image with metadata gets "metadata": {"gsd": 0.6, "lat": ...}
(only the fields it has; no key at all for an image without any); when create.py's conditioning_files.jsonl lies
there (a ControlNet folder), every line gets "conditioning_image": "conditioning_images/image_NNNNNN.png" (or .npy),
relative to DATA_DIR like file_name, and an image whose conditioning file is missing is a bad line.
A bad line (no tab, empty name or caption, unsafe name, missing image) makes the run exit 1 and write nothing,
unless --skip_invalid drops it. A format_report.json is written beside the output.

Run: python diffusion_model/format.py --caption_file O/captions.txt --output_file O/metadata.jsonl
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import json
from dataclasses import asdict
from typing import Optional, Sequence

from utils.atomic import open_text_atomic, write_json_atomic
from diffusion_model.metadata import (build_records, drop_missing, drop_missing_conditioning, group_lines,
                                      read_conditioning_files, read_metadata_values, read_source_files,
                                      unlisted_images)
from utils.cli import ArgumentParser, UsageError, run_main
from utils.constants import (CONDITIONING_FILES_FILENAME, CONDITIONING_KEY, FORMAT_REPORT_FILENAME, METADATA_FILENAME,
                             METADATA_KEY, METADATA_VALUES_FILENAME, SOURCE_FILE_KEY, SOURCE_FILES_FILENAME)
from utils.logger import get_logger, setup_logging

MAX_PROBLEMS_SHOWN = 20


def parse_args(argv: Optional[Sequence[str]]):
    """Command line."""
    parser = ArgumentParser(description="Turn captions.txt into metadata.jsonl for the imagefolder loader.")
    parser.add_argument("--caption_file", required=True, help="captions.txt made by create.py (name<TAB>caption lines).")
    parser.add_argument("--output_file", required=True,
                        help=f"Output JSON Lines file; its folder is DATA_DIR and must contain the images ({METADATA_FILENAME}).")
    parser.add_argument("--skip_invalid", action="store_true", help="Drop bad lines (and report them) instead of failing.")
    return parser.parse_args(argv)


def resolve_paths(args) -> tuple:
    """Check the caption file exists and the output folder contains it; return (caption_file, output_file)."""
    caption_file, output_file = Path(args.caption_file).resolve(), Path(args.output_file).resolve()
    if not caption_file.is_file():
        raise UsageError(f"--caption_file {args.caption_file} does not exist")
    if output_file.parent not in (caption_file.parent, *caption_file.parent.parents):
        raise UsageError(f"--output_file {args.output_file} must be in the folder of --caption_file or above it")
    if output_file.parent.exists() and not output_file.parent.is_dir():
        raise UsageError(f"--output_file {args.output_file}: {output_file.parent} is not a folder")
    return caption_file, output_file


def log_problems(problems: list) -> None:
    """One stderr line per bad line (the first few), naming its line number and reason."""
    logger = get_logger()
    for problem in problems[:MAX_PROBLEMS_SHOWN]:
        logger.error("line %d: %s: %r", problem.line, problem.reason, problem.text)
    if len(problems) > MAX_PROBLEMS_SHOWN:
        logger.error("... and %d more bad lines", len(problems) - MAX_PROBLEMS_SHOWN)


def load_sidecar(caption_dir: Path, filename: str, read, expected: str, absent=None) -> tuple:
    """A create.py sidecar beside the captions, read with read(lines) ((absent, []) when the file is not there), and
    its unreadable line numbers, each logged with what a line should be and what its image then lacks."""
    path = caption_dir / filename
    if not path.is_file():
        return absent, []
    with open(path, encoding="utf-8", errors="replace") as handle:
        values, bad = read(handle)
    for number in bad[:MAX_PROBLEMS_SHOWN]:
        get_logger().warning("%s line %d is not %s", filename, number, expected)
    return values, bad


def load_source_files(caption_dir: Path) -> tuple:
    """create.py's image -> source file names beside the captions ({} when absent) and its unreadable line numbers."""
    return load_sidecar(caption_dir, SOURCE_FILES_FILENAME, read_source_files,
                        "a {file_name, source_file} object; its image gets no source_file", {})


def load_metadata_values(caption_dir: Path) -> tuple:
    """create.py's image -> metadata beside the captions ({} when absent) and its unreadable line numbers."""
    return load_sidecar(caption_dir, METADATA_VALUES_FILENAME, read_metadata_values,
                        "a {file_name, metadata} object; its image gets no metadata", {})


def load_conditioning_files(caption_dir: Path) -> tuple:
    """create.py's image -> conditioning file names beside the captions (None when absent: no conditioning) and its
    unreadable line numbers."""
    return load_sidecar(caption_dir, CONDITIONING_FILES_FILENAME, read_conditioning_files,
                        "a {file_name, conditioning_image} object with a safe name")


def format_report(caption_file: Path, output_file: Path, groups: dict, problems: list, unlisted: list,
                  records: list, bad_source_lines: list, bad_metadata_lines: tuple = ()) -> dict:
    """The format_report.json document."""
    return {"caption_file": str(caption_file), "output_file": str(output_file), "data_dir": str(output_file.parent),
            "images": len(groups), "captions": sum(len(c) for c in groups.values()),
            "text_is_list": any(len(c) > 1 for c in groups.values()), "skipped_lines": [asdict(p) for p in problems],
            "unlisted_images": unlisted, "source_files": sum(bool(r.get(SOURCE_FILE_KEY)) for r in records),
            "source_files_bad_lines": bad_source_lines,
            "images_with_metadata": sum(METADATA_KEY in r for r in records),
            "metadata_values_bad_lines": list(bad_metadata_lines),
            "images_with_conditioning": sum(CONDITIONING_KEY in r for r in records)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Convert captions.txt to metadata.jsonl; exit 1 without writing on bad lines unless --skip_invalid."""
    setup_logging()
    args = parse_args(argv)
    caption_file, output_file = resolve_paths(args)
    caption_dir, data_dir = caption_file.parent, output_file.parent
    with open(caption_file, "rb") as handle:
        groups, line_numbers, problems = group_lines(line.rstrip(b"\n") for line in handle)
    if not groups and not problems:
        raise UsageError(f"--caption_file {args.caption_file} is empty (no caption lines)")
    problems = problems + drop_missing(groups, line_numbers, caption_dir)
    conditioning, bad_conditioning_lines = load_conditioning_files(caption_dir)
    if conditioning is not None:
        problems += drop_missing_conditioning(groups, line_numbers, caption_dir, conditioning)
    problems = sorted(problems, key=lambda p: p.line)
    log_problems(problems)
    if problems and not args.skip_invalid:
        print(f"format: {len(problems)} bad line(s) in {caption_file}; nothing written (use --skip_invalid to drop them)")
        return 1
    if not groups:
        print(f"format: no usable captions in {caption_file}; nothing written")
        return 1

    sources, bad_source_lines = load_source_files(caption_dir)
    metadata, bad_metadata_lines = load_metadata_values(caption_dir)
    records = build_records(groups, caption_dir, data_dir, sources, metadata, conditioning)
    listed = [caption_dir / name for name in groups] + [caption_dir / conditioning[n] for n in groups if conditioning]
    unlisted = unlisted_images(data_dir, listed)
    for name in unlisted:
        get_logger().warning("image without caption (the loader will leave it out): %s", name)
    with open_text_atomic(output_file) as out:
        out.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    report = format_report(caption_file, output_file, groups, problems, unlisted, records, bad_source_lines,
                           bad_metadata_lines)
    report["conditioning_files_bad_lines"] = bad_conditioning_lines
    write_json_atomic(data_dir / FORMAT_REPORT_FILENAME, report)
    print(f"format: {len(records)} images, {report['captions']} captions -> {output_file}; "
          f"{len(problems)} bad line(s) skipped, {len(unlisted)} image(s) without caption; DATA_DIR={data_dir}")
    return 0


if __name__ == "__main__":
    run_main(main)
