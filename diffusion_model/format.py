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
Memory does not grow with the number of lines: lines and sidecars go through a temporary SQLite file beside the
output (diffusion_model/metadata_store.py), and metadata.jsonl is written record by record.

Run: python diffusion_model/format.py --caption_file O/captions.txt --output_file O/metadata.jsonl
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import json
import os
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from utils.atomic import open_text_atomic, write_json_atomic
from diffusion_model.metadata import (accept_conditioning, accept_metadata, accept_source_file, build_record,
                                      image_files, parse_lines, relative_name, sidecar_entries)
from diffusion_model.metadata_store import MetadataStore
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


def load_sidecar(store: MetadataStore, caption_dir: Path, filename: str, table: str, accept, expected: str) -> tuple:
    """A create.py sidecar beside the captions into the store's table; return (whether the file is there, whether it
    named any image, its unreadable line numbers), each logged with what a line should be and what its image lacks."""
    path = caption_dir / filename
    if not path.is_file():
        return False, False, []
    bad = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        named = store.add_sidecar(table, sidecar_entries(handle, table_key(table), accept, bad))
    for number in bad[:MAX_PROBLEMS_SHOWN]:
        get_logger().warning("%s line %d is not %s", filename, number, expected)
    return True, named, bad


def table_key(table: str) -> str:
    """The JSON key of a sidecar table's values."""
    return {"sources": SOURCE_FILE_KEY, "metadata": METADATA_KEY, "conditioning": CONDITIONING_KEY}[table]


def load_source_files(store: MetadataStore, caption_dir: Path) -> tuple:
    """create.py's image -> source file names beside the captions: (named any, unreadable line numbers)."""
    return load_sidecar(store, caption_dir, SOURCE_FILES_FILENAME, "sources", accept_source_file,
                        "a {file_name, source_file} object; its image gets no source_file")[1:]


def load_metadata_values(store: MetadataStore, caption_dir: Path) -> tuple:
    """create.py's image -> metadata beside the captions: (named any, unreadable line numbers)."""
    return load_sidecar(store, caption_dir, METADATA_VALUES_FILENAME, "metadata", accept_metadata,
                        "a {file_name, metadata} object; its image gets no metadata")[1:]


def load_conditioning_files(store: MetadataStore, caption_dir: Path) -> tuple:
    """create.py's image -> conditioning file names beside the captions: (there, named any, unreadable lines); when
    the file is there, every image needs a conditioning file."""
    return load_sidecar(store, caption_dir, CONDITIONING_FILES_FILENAME, "conditioning", accept_conditioning,
                        "a {file_name, conditioning_image} object with a safe name")


def read_captions(store: MetadataStore, caption_file: Path, caption_arg: str) -> list:
    """captions.txt's good lines into the store, line by line; return the bad lines' Problems. An empty file (no
    line at all, or only blank ones) is a usage error."""
    problems = []
    with open(caption_file, "rb") as handle:
        good = store.add_lines(parse_lines((line.rstrip(b"\n") for line in handle), problems))
    if not good and not problems:
        raise UsageError(f"--caption_file {caption_arg} is empty (no caption lines)")
    return problems


def find_unlisted(store: MetadataStore, data_dir: Path) -> list:
    """Image files under data_dir that no kept line names (the loader would silently leave them out), each logged."""
    unlisted = sorted(os.path.relpath(path, data_dir).replace(os.sep, "/") for path in image_files(str(data_dir))
                      if not store.is_listed(path))
    for name in unlisted:
        get_logger().warning("image without caption (the loader will leave it out): %s", name)
    return unlisted


@dataclass
class Written:
    """What write_metadata wrote: images, captions, and images with a source file, metadata, conditioning."""

    images: int = 0
    captions: int = 0
    source_files: int = 0
    with_metadata: int = 0
    with_conditioning: int = 0


def write_metadata(store: MetadataStore, output_file: Path, caption_dir: Path, as_list: bool, with_sources: bool,
                   conditioned: bool) -> Written:
    """metadata.jsonl, one record per kept image, written atomically as the store yields them."""
    written, data_dir = Written(), output_file.parent
    with open_text_atomic(output_file) as out:
        for name, captions, source, metadata, conditioning in store.records():
            conditioning = relative_name(conditioning, caption_dir, data_dir) if conditioned else None
            record = build_record(relative_name(name, caption_dir, data_dir), captions, as_list, source, metadata,
                                  conditioning, with_sources)
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            written.images, written.captions = written.images + 1, written.captions + len(captions)
            written.source_files += bool(record.get(SOURCE_FILE_KEY))
            written.with_metadata += METADATA_KEY in record
            written.with_conditioning += CONDITIONING_KEY in record
    return written


def format_report(caption_file: Path, output_file: Path, written: Written, as_list: bool, problems: list,
                  unlisted: list, bad_lines: dict) -> dict:
    """The format_report.json document; bad_lines: each sidecar's unreadable line numbers."""
    return {"caption_file": str(caption_file), "output_file": str(output_file), "data_dir": str(output_file.parent),
            "images": written.images, "captions": written.captions, "text_is_list": as_list,
            "skipped_lines": [asdict(p) for p in problems], "unlisted_images": unlisted,
            "source_files": written.source_files, "source_files_bad_lines": bad_lines["sources"],
            "images_with_metadata": written.with_metadata, "metadata_values_bad_lines": bad_lines["metadata"],
            "images_with_conditioning": written.with_conditioning,
            "conditioning_files_bad_lines": bad_lines["conditioning"]}


def check_lines(store: MetadataStore, args, caption_file: Path) -> tuple:
    """Read captions.txt and the conditioning sidecar, check every image; return (all bad lines' Problems in line
    order, whether conditioning is on, the conditioning sidecar's unreadable line numbers)."""
    caption_dir = caption_file.parent
    problems = read_captions(store, caption_file, args.caption_file)
    conditioned, conditioning_named, bad_conditioning = load_conditioning_files(store, caption_dir)
    store.check_images(str(caption_dir), conditioned)
    problems = sorted(problems + store.problems(), key=lambda p: p.line)
    log_problems(problems)
    return problems, (conditioned, conditioning_named), bad_conditioning


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Convert captions.txt to metadata.jsonl; exit 1 without writing on bad lines unless --skip_invalid."""
    setup_logging()
    args = parse_args(argv)
    caption_file, output_file = resolve_paths(args)
    caption_dir, data_dir = caption_file.parent, output_file.parent
    with MetadataStore(data_dir) as store:
        problems, (conditioned, conditioning_named), bad_conditioning = check_lines(store, args, caption_file)
        if problems and not args.skip_invalid:
            print(f"format: {len(problems)} bad line(s) in {caption_file}; nothing written (use --skip_invalid to drop them)")
            return 1
        images, as_list = store.kept()
        if not images:
            print(f"format: no usable captions in {caption_file}; nothing written")
            return 1
        with_sources, bad_source_lines = load_source_files(store, caption_dir)
        _, bad_metadata_lines = load_metadata_values(store, caption_dir)
        unlisted = find_unlisted(store, data_dir)
        written = write_metadata(store, output_file, caption_dir, as_list, with_sources,
                                 conditioned and conditioning_named)
    bad_lines = {"sources": bad_source_lines, "metadata": bad_metadata_lines, "conditioning": bad_conditioning}
    report = format_report(caption_file, output_file, written, as_list, problems, unlisted, bad_lines)
    write_json_atomic(data_dir / FORMAT_REPORT_FILENAME, report)
    print(f"format: {written.images} images, {written.captions} captions -> {output_file}; "
          f"{len(problems)} bad line(s) skipped, {len(unlisted)} image(s) without caption; DATA_DIR={data_dir}")
    return 0


if __name__ == "__main__":
    run_main(main)
