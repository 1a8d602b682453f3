"""NWPU-Captions JSON: `{"<class>": [{"filename", "split", "raw", "raw_1", ..., "raw_4"}, ...], ...}`, with the
images in one subfolder per class (`NWPU_images/<class>/<filename>`) or all in one folder.

Rows are numbered in the file's own order: class by class, entry by entry.
"""

import re
from pathlib import Path

from diffusion_model.sources.base import (REASON_BAD_ENTRY, Source, SourceOptions, check_sidecars, images_root,
                                          index_rows,
                                          open_image_folder, pick_split, split_failed)

EXTRA_RAW = re.compile(r"^raw_(\d+)$")


def is_nwpu(doc) -> bool:
    """True for a document keyed by class whose entries carry `filename` and `raw`."""
    if not isinstance(doc, dict) or not doc or "images" in doc:
        return False
    if not all(isinstance(entries, list) for entries in doc.values()):
        return False
    # The first object entry decides, so a junk entry at the top does not hide the form.
    first = next((e for entries in doc.values() for e in entries[:8] if isinstance(e, dict)), None)
    return isinstance(first, dict) and "filename" in first and "raw" in first


def raw_captions(item: dict) -> list:
    """`raw` then `raw_1`, `raw_2`, ... in number order."""
    extra = sorted((int(m.group(1)), key) for key in item if (m := EXTRA_RAW.match(key)))
    return [item.get("raw")] + [item[key] for _, key in extra]


def nwpu_entry(scene: str, position: int, item) -> dict:
    """Entry number position of a class as an index entry, or a failure."""
    where = f"{scene}[{position}]"
    if not isinstance(item, dict):
        return {"name": where, "failure": (REASON_BAD_ENTRY, f"{where} is a {type(item).__name__}, not an object")}
    filename = item.get("filename")
    if not isinstance(filename, str) or not filename.strip():
        return {"name": where, "failure": (REASON_BAD_ENTRY, f"{where} has no filename")}
    return {"name": f"{scene}/{filename}", "scene": scene, "filename": filename, "captions": raw_captions(item)}


PATTERNS = (lambda e: f"{e['scene']}/{e['filename']}", lambda e: e.get("filename"))


def open_nwpu(path: Path, doc: dict, options: SourceOptions) -> Source:
    """Select the split's entries class by class and locate the image folder (per-class subfolders or flat)."""
    pairs = [(scene, n, item) for scene, items in doc.items() for n, item in enumerate(items)]
    positions, split, names, others = pick_split([item for _, _, item in pairs], options, path)
    entries = [split_failed(nwpu_entry(*pairs[p]), pairs[p][2], split) for p in positions]
    folder = open_image_folder(images_root(options, path), entries, PATTERNS)
    check_sidecars(folder, entries, options)
    details = {"images_dir": str(folder.base), "classes": len(doc), "splits_not_read": others}
    return Source("nwpu", [path], len(entries), lambda limit: index_rows(entries, folder, limit, options), split,
                  names, details)
