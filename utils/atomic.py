"""Atomic file writes: write to a temporary name beside the target, then rename over it.

A reader (or a resumed run) therefore sees either the old file or the complete new one, never a partial one.
"""

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from utils.constants import TMP_SUFFIX

# A folder being replaced waits under ".<name>.old" until its successor is in place (checkpoints skip dot-names).
TRASH_SUFFIX = ".old"


def tmp_path_for(path: Path) -> Path:
    """The temporary name a file is written under before it is renamed into place."""
    return path.with_name(path.name + TMP_SUFFIX)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write bytes to path atomically."""
    tmp = tmp_path_for(path)
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def write_png_atomic(path: Path, image) -> None:
    """Save a PIL image to path as PNG atomically."""
    tmp = tmp_path_for(path)
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


@contextmanager
def open_text_atomic(path: Path):
    """Open path for UTF-8 text writing; it appears only if the block finishes without error."""
    tmp = tmp_path_for(path)
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
            yield handle
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: Path, payload) -> None:
    """Write a JSON document (UTF-8, indented) atomically."""
    with open_text_atomic(path) as handle:
        json.dump(payload, handle, ensure_ascii=False, indent=2)
        handle.write("\n")


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename folder tmp to final; an existing final is moved aside first so no moment lacks a complete one."""
    trash = final.with_name(f".{final.name}{TRASH_SUFFIX}")
    if final.exists():
        shutil.rmtree(trash, ignore_errors=True)
        final.rename(trash)
    tmp.rename(final)
    shutil.rmtree(trash, ignore_errors=True)
