"""Karpathy-style caption JSON (RSICD, UCM-Captions, Sydney-Captions, RSITMD releases): an image folder plus
`{"images": [{"filename", "split", "sentences": [{"raw", "tokens", ...}]}, ...]}`.

The JSON is an index of file names and sentences (a few MiB even for RSICD), so it is read whole; the images it
names are read one row at a time.
"""

from pathlib import Path

from diffusion_model.sources.base import (REASON_BAD_ENTRY, Source, SourceOptions, check_sidecars, images_root,
                                          index_rows,
                                          open_image_folder, pick_split, split_failed)


def is_karpathy(doc) -> bool:
    """True for a document shaped like Karpathy's: an `images` list."""
    return isinstance(doc, dict) and isinstance(doc.get("images"), list)


def sentence_text(sentence) -> object:
    """A sentence's raw text, else its tokens joined (some releases carry only tokens)."""
    if not isinstance(sentence, dict):
        return None
    raw = sentence.get("raw")
    if isinstance(raw, str):
        return raw
    tokens = sentence.get("tokens")
    return " ".join(t for t in tokens if isinstance(t, str)) if isinstance(tokens, list) else None


def karpathy_entry(position: int, item) -> dict:
    """One image entry (images[position]) as an index entry: its name, optional filepath, captions, or a failure."""
    where = f"images[{position}]"
    if not isinstance(item, dict):
        return {"name": where, "failure": (REASON_BAD_ENTRY, f"{where} is a {type(item).__name__}, not an object")}
    filename, filepath = item.get("filename"), item.get("filepath")
    if not isinstance(filename, str) or not filename.strip():
        return {"name": where, "failure": (REASON_BAD_ENTRY, f"{where} has no filename")}
    sentences = item.get("sentences")
    captions = [sentence_text(s) for s in sentences] if isinstance(sentences, list) else []
    filepath = filepath if isinstance(filepath, str) and filepath.strip() else None
    name = f"{filepath}/{filename}" if filepath else filename
    return {"name": name, "filename": filename, "filepath": filepath, "captions": captions}


PATTERNS = (lambda e: e.get("filepath") and f"{e['filepath']}/{e['filename']}", lambda e: e.get("filename"))


def open_karpathy(path: Path, doc: dict, options: SourceOptions) -> Source:
    """Select the split's entries and locate the image folder; rows stream from the entries."""
    items = doc["images"]
    positions, split, names, others = pick_split(items, options, path)
    entries = [split_failed(karpathy_entry(n, items[n]), items[n], split) for n in positions]
    folder = open_image_folder(images_root(options, path), entries, PATTERNS)
    check_sidecars(folder, entries, options)
    details = {"images_dir": str(folder.base), "splits_not_read": others}
    return Source("karpathy", [path], len(entries), lambda limit: index_rows(entries, folder, limit, options), split,
                  names, details)
