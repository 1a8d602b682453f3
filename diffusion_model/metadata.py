"""captions.txt -> metadata.jsonl records: parse and check lines, group captions per image, locate the images.

Pure functions over lines and paths; format.py does the reading and writing.
"""

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

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


def group_lines(lines: Iterable[bytes]) -> tuple:
    """Group captions by image name in first-seen order; collect problems. Blank lines are ignored."""
    groups, line_numbers, problems = {}, {}, []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            name, caption = parse_line(raw)
        except ValueError as err:
            problems.append(Problem(number, str(err), raw.decode("utf-8", "replace").rstrip("\r")))
            continue
        groups.setdefault(name, []).append(caption)
        line_numbers.setdefault(name, []).append(number)
    return groups, line_numbers, problems


def drop_missing(groups: dict, line_numbers: dict, caption_dir: Path) -> list:
    """Remove images that do not exist under caption_dir from groups; return a Problem per line naming them."""
    problems = []
    for name in [n for n in groups if not (caption_dir / n).is_file()]:
        problems += [Problem(line, "image not found", f"{name}") for line in line_numbers[name]]
        del groups[name]
    return sorted(problems, key=lambda p: p.line)


def unlisted_images(data_dir: Path, listed: Iterable[Path]) -> list:
    """Image files under data_dir that no line names (the loader would silently leave them out)."""
    known = {p.resolve() for p in listed}
    found = (p for p in data_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return sorted(p.relative_to(data_dir).as_posix() for p in found if p.resolve() not in known)


def relative_name(name: str, caption_dir: Path, data_dir: Path) -> str:
    """An image name (relative to caption_dir) rewritten relative to data_dir, with forward slashes."""
    return Path(os.path.relpath(caption_dir / name, data_dir)).as_posix()


def read_sidecar(lines: Iterable[str], key: str, accept) -> tuple:
    """A create.py sidecar's {file_name, key} lines -> ({image name: value}, numbers of unreadable lines); a line
    whose name is not a string or whose value accept(value) refuses is unreadable."""
    values, bad = {}, []
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
        values[name] = value
    return values, bad


def read_source_files(lines: Iterable[str]) -> tuple:
    """create.py's source_files.jsonl lines -> ({image name: source file name}, numbers of unreadable lines)."""
    return read_sidecar(lines, SOURCE_FILE_KEY, lambda value: isinstance(value, str))


def read_metadata_values(lines: Iterable[str]) -> tuple:
    """create.py's metadata_values.jsonl lines -> ({image name: metadata object}, numbers of unreadable lines)."""
    return read_sidecar(lines, METADATA_KEY, lambda value: isinstance(value, dict))


def read_conditioning_files(lines: Iterable[str]) -> tuple:
    """create.py's conditioning_files.jsonl lines -> ({image name: conditioning file name}, numbers of unreadable
    lines); a conditioning name that could leave the folder is unreadable."""
    return read_sidecar(lines, CONDITIONING_KEY, lambda value: isinstance(value, str) and not unsafe_name_reason(value))


def drop_missing_conditioning(groups: dict, line_numbers: dict, caption_dir: Path, conditioning: dict) -> list:
    """With conditioning (from create.py's sidecar), remove images whose conditioning file is not under caption_dir
    (or is not named at all) from groups; return a Problem per line naming them."""
    problems = []
    for name in [n for n in groups if not (n in conditioning and (caption_dir / conditioning[n]).is_file())]:
        reason = f"conditioning image {conditioning[name]} not found" if name in conditioning \
            else "no conditioning image"
        problems += [Problem(line, reason, name) for line in line_numbers[name]]
        del groups[name]
    return sorted(problems, key=lambda p: p.line)


def build_records(groups: dict, caption_dir: Path, data_dir: Path, sources: Optional[dict] = None,
                  metadata: Optional[dict] = None, conditioning: Optional[dict] = None) -> list:
    """One {"file_name", "text"} record per image; text is a list for all rows when any image has several.

    With sources (image name -> source file name, create.py's source_files.jsonl), every record also gets
    "source_file", null for an image it does not name, so all lines have the same keys for the loader.
    With metadata (image name -> {field: value}, create.py's metadata_values.jsonl), an image that has some gets
    "metadata"; one without has no such key (the loader reads it as null), never zeros.
    With conditioning (image name -> conditioning file name, create.py's conditioning_files.jsonl), every record gets
    "conditioning_image", relative to data_dir like file_name."""
    as_list = any(len(captions) > 1 for captions in groups.values())
    metadata = metadata or {}
    return [
        {"file_name": relative_name(name, caption_dir, data_dir), "text": captions if as_list else captions[0],
         **({SOURCE_FILE_KEY: sources.get(name)} if sources else {}),
         **({METADATA_KEY: metadata[name]} if metadata.get(name) else {}),
         **({CONDITIONING_KEY: relative_name(conditioning[name], caption_dir, data_dir)} if conditioning else {})}
        for name, captions in groups.items()
    ]
