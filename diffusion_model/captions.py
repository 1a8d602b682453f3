"""Caption cleaning: one line per caption, no junk, no near-duplicates."""

import re
from typing import Iterable, Optional, Union

CAPTION_MODES = ("first", "all")
MIN_LETTERS = 3
# Letters are word characters that are neither digits nor the underscore; everything else non-space is punctuation.
LETTER = re.compile(r"[^\W\d_]")
PUNCTUATION = re.compile(r"[^\w\s]|_")


def collapse_whitespace(text: str) -> str:
    """Strip and collapse all whitespace (tabs, newlines, U+2028...) to single spaces."""
    # str.split() with no argument splits on every Unicode whitespace, so no line break can survive into captions.txt.
    return " ".join(text.split())


def clean_caption(text) -> Optional[str]:
    """A caption with its whitespace collapsed (collapse_whitespace); None if not a real caption."""
    if not isinstance(text, str):
        return None
    cleaned = collapse_whitespace(text)
    if len(LETTER.findall(cleaned)) < MIN_LETTERS:
        return None
    return cleaned


def dedup_key(caption: str) -> str:
    """A caption's identity ignoring case and punctuation, so 'Lakes.' and 'lakes .' count as one."""
    return " ".join(PUNCTUATION.sub(" ", caption).casefold().split())


def as_caption_list(raw: Union[None, str, Iterable]) -> list:
    """Accept a caption cell as a list of strings, a single string, or null."""
    if raw is None:
        return []
    if isinstance(raw, str):
        return [raw]
    return list(raw)


def select_captions(raw, mode: str = "first") -> list:
    """Clean a row's captions, drop junk and near-duplicates (first seen wins); keep the first or all of them."""
    if mode not in CAPTION_MODES:
        raise ValueError(f"unknown caption mode {mode!r}; expected one of {', '.join(CAPTION_MODES)}")
    kept, seen = [], set()
    for text in as_caption_list(raw):
        caption = clean_caption(text)
        key = caption and dedup_key(caption)
        if caption is None or key in seen:
            continue
        seen.add(key)
        kept.append(caption)
        if mode == "first":
            break
    return kept
