"""captions.txt -> metadata.jsonl records: parse and check lines and sidecar lines, check and find images, build records.

Functions of one line, one image or one record; format.py streams them through diffusion_model/metadata_store.py.
"""

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

from diffusion_model.captions import collapse_whitespace
from utils.constants import CAPTION_SEPARATOR, CONDITIONING_KEY, METADATA_KEY, SOURCE_FILE_KEY

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# "http:", "s3:", "file:" and Windows drives like "C:" all name something outside the data folder.
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


@dataclass(frozen=True)
class Problem:
    """A rejected captions.txt line: 1-based line number, why, and the line itself."""

    line: int
    reason: str
    text: str


def unsafe_name_reason(name: str) -> Optional[str]:
    """Why an image name could point outside the data folder, or None when it is a plain relative path."""
    if name.startswith(("/", "\\")):
        return "absolute path"
    if SCHEME.match(name):
        return "URL scheme or drive"
    if ".." in re.split(r"[/\\]", name):
        return "'..' in path"
    return None


def parse_line(raw: bytes) -> tuple:
    """Split one captions.txt line into (name, caption); raise ValueError with the reason if malformed."""
    try:
        line = raw.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError:
        raise ValueError("not valid UTF-8") from None
    if CAPTION_SEPARATOR not in line:
        raise ValueError("no tab between image name and caption")
    name, caption = line.split(CAPTION_SEPARATOR, 1)
    # The caption's whitespace as create.py writes it: a hand-edited line's tabs or double spaces become one space.
    name, caption = name.strip(), collapse_whitespace(caption)
    if not name:
        raise ValueError("empty image name")
    if not caption:
        raise ValueError("empty caption")
    reason = unsafe_name_reason(name)
    if reason:
        raise ValueError(f"unsafe image name ({reason})")
    return name, caption


def parse_lines(lines: Iterable[bytes], problems: list) -> Iterator[tuple]:
    """(line number, name, caption) of each good line, in order; a Problem per bad line is appended to problems.
    Blank lines are ignored."""
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            name, caption = parse_line(raw)
        except ValueError as err:
            problems.append(Problem(number, str(err), raw.decode("utf-8", "replace").rstrip("\r")))
            continue
        yield number, name, caption


# Per-line path work below uses os.path on strings: pathlib interns every path component (sys.intern), which makes
# the interpreter's table of interned strings grow and reallocate with the number of files.
def missing_reason(image: str, conditioning: Optional[str], conditioning_dir: Optional[str]) -> Optional[str]:
    """Why an image cannot be used (its file or, with conditioning_dir, its conditioning file named by create.py's
    sidecar is not there), or None when it can."""
    if not os.path.isfile(image):
        return "image not found"
    if conditioning_dir is None:
        return None
    if conditioning is None:
        return "no conditioning image"
    if os.path.isfile(os.path.join(conditioning_dir, conditioning)):
        return None
    return f"conditioning image {conditioning} not found"


def suffix(name: str) -> str:
    """A file name's suffix as Path.suffix gives it ("" for ".jpg" or "a.")."""
    dot = name.rfind(".")
    return name[dot:] if 0 < dot < len(name) - 1 else ""


def image_files(folder: str) -> Iterator[str]:
    """Paths of the image files under folder, one directory entry at a time (as Path.rglob finds them: symlinked
    folders are not entered, symlinks to files count)."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir() and not entry.is_symlink():
                yield from image_files(entry.path)
            elif suffix(entry.name).lower() in IMAGE_SUFFIXES and entry.is_file():
                yield entry.path


def relative_name(name: str, caption_dir, data_dir) -> str:
    """An image name (relative to caption_dir) rewritten relative to data_dir, with forward slashes."""
    return os.path.relpath(os.path.join(caption_dir, name), data_dir).replace(os.sep, "/")


def sidecar_entries(lines: Iterable[str], key: str, accept, bad: list) -> Iterator[tuple]:
    """A create.py sidecar's {file_name, key} lines -> (image name, value) of each readable line, in order; the
    number of each unreadable line (its name not a string, or accept(value) refuses its value) is appended to bad."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            name, value = record["file_name"], record[key]
        except (ValueError, KeyError, TypeError):
            bad.append(number)
            continue
        if not (isinstance(name, str) and accept(value)):
            bad.append(number)
            continue
        yield name, value


def accept_source_file(value) -> bool:
    """A source_files.jsonl value: the source's file name."""
    return isinstance(value, str)


def accept_metadata(value) -> bool:
    """A metadata_values.jsonl value: an object of metadata fields."""
    return isinstance(value, dict)


def accept_conditioning(value) -> bool:
    """A conditioning_files.jsonl value: a file name that stays inside the folder."""
    return isinstance(value, str) and not unsafe_name_reason(value)


def build_record(file_name: str, captions: list, as_list: bool, source=None, metadata: Optional[dict] = None,
                 conditioning: Optional[str] = None, with_sources: bool = False) -> dict:
    """One metadata.jsonl record: {"file_name", "text"}, text a list when as_list (any image has several captions).

    with_sources (create.py's source_files.jsonl named some image): "source_file" in every record, null for an image
    it does not name, so all lines have the same keys for the loader. A non-empty metadata object (create.py's
    metadata_values.jsonl) gives "metadata"; an image without one has no such key (the loader reads it as null),
    never zeros. conditioning (create.py's conditioning_files.jsonl): "conditioning_image", relative to DATA_DIR
    like file_name."""
    record = {"file_name": file_name, "text": captions if as_list else captions[0]}
    if with_sources:
        record[SOURCE_FILE_KEY] = source
    if metadata:
        record[METADATA_KEY] = metadata
    if conditioning is not None:
        record[CONDITIONING_KEY] = conditioning
    return record
