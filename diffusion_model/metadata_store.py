"""captions.txt's lines and create.py's sidecars in a temporary SQLite file, so that format.py groups captions per
image, joins the sidecars and checks the images with memory that does not grow with the number of lines.

The file lies beside the output (the data folder has room for it) under a hidden name ending in ".tmp", and is
deleted on close. Grouping, joins and ordering are SQLite's, which spills to disk past its small page cache.
"""

import json
import os
import sqlite3
import tempfile
from itertools import groupby
from pathlib import Path
from typing import Iterable, Iterator

from diffusion_model.metadata import Problem, missing_reason

SIDECARS = ("sources", "metadata", "conditioning")
PAGE_ROWS = 1024  # images checked per round trip
CACHE_KIB = 8192  # SQLite's page cache; beyond it, tables and sorts live in the file
SCHEMA = """
CREATE TABLE lines (line INTEGER PRIMARY KEY, name TEXT NOT NULL, caption TEXT NOT NULL);
CREATE TABLE images (name TEXT NOT NULL UNIQUE, first INTEGER NOT NULL, captions INTEGER NOT NULL, reason TEXT);
CREATE TABLE sources (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE metadata (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE conditioning (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE listed (path TEXT PRIMARY KEY) WITHOUT ROWID;
"""
# Kept images in order of their first line, each with its captions in line order and its sidecar values.
RECORDS = """
SELECT i.name, l.caption, s.value, m.value, c.value FROM images i INDEXED BY images_first
JOIN lines l INDEXED BY lines_name ON l.name = i.name
LEFT JOIN sources s ON s.name = i.name LEFT JOIN metadata m ON m.name = i.name
LEFT JOIN conditioning c ON c.name = i.name
WHERE i.reason IS NULL ORDER BY i.first, l.line
"""


def encodable(name: str) -> bool:
    """Whether a sidecar's name can be stored as text (a lone surrogate from a JSON escape cannot, and could not name
    an image of captions.txt, which is UTF-8, either)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class MetadataStore:
    """The lines, images and sidecars of one format.py run, in a temporary SQLite file in folder."""

    def __init__(self, folder: Path):
        """Create the file and its tables."""
        handle, name = tempfile.mkstemp(prefix=".format-", suffix=".sqlite.tmp", dir=folder)
        os.close(handle)
        self.path = Path(name)
        # The file is scratch: no journal, no syncs; sqlite3's implicit transactions batch the writes.
        self.db = sqlite3.connect(self.path)
        for pragma in ("journal_mode = OFF", "synchronous = OFF", f"cache_size = -{CACHE_KIB}", "temp_store = FILE"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.executescript(SCHEMA)

    def __enter__(self):
        """The store, deleted when the block ends."""
        return self

    def __exit__(self, *exc) -> None:
        """Close and delete the file."""
        self.db.close()
        self.path.unlink(missing_ok=True)

    def add_lines(self, rows: Iterable[tuple]) -> int:
        """Store (line number, name, caption) rows and group them per image; return how many rows there were."""
        self.db.executemany("INSERT INTO lines VALUES (?, ?, ?)", rows)
        self.db.executescript("""
            CREATE INDEX lines_name ON lines (name, line);
            INSERT INTO images (name, first, captions) SELECT name, MIN(line), COUNT(*) FROM lines GROUP BY name;
            CREATE INDEX images_first ON images (first);
        """)
        return self.db.execute("SELECT COUNT(*) FROM lines").fetchone()[0]

    def add_sidecar(self, table: str, entries: Iterable[tuple]) -> bool:
        """Store a sidecar's (image name, value) entries, a later line for a name replacing an earlier one; return
        whether there was any entry."""
        seen = [False]

        def rows():
            for name, value in entries:
                seen[0] = True
                if encodable(name):
                    yield name, json.dumps(value)

        if table not in SIDECARS:
            raise ValueError(f"no sidecar table {table!r}")
        self.db.executemany(f"INSERT OR REPLACE INTO {table} VALUES (?, ?)", rows())
        return seen[0]

    def pages(self) -> Iterator[list]:
        """The images with their conditioning file names (None when not named), PAGE_ROWS at a time."""
        last = 0
        while True:
            page = self.db.execute("SELECT i.rowid, i.name, c.value FROM images i LEFT JOIN conditioning c "
                                   "ON c.name = i.name WHERE i.rowid > ? ORDER BY i.rowid LIMIT ?",
                                   (last, PAGE_ROWS)).fetchall()
            if not page:
                return
            last = page[-1][0]
            yield page

    def check_images(self, caption_dir: str, conditioned: bool) -> None:
        """Mark each image whose file (or, when conditioned, conditioning file) is missing with why; record the real
        paths of the other images and their conditioning files as listed."""
        for page in self.pages():
            reasons, listed = [], []
            for rowid, name, value in page:
                conditioning = json.loads(value) if value is not None else None
                image = os.path.join(caption_dir, name)
                reason = missing_reason(image, conditioning, caption_dir if conditioned else None)
                if reason:
                    reasons.append((reason, rowid))
                    continue
                listed.append((os.path.realpath(image),))
                if conditioned:
                    listed.append((os.path.realpath(os.path.join(caption_dir, conditioning)),))
            self.db.executemany("UPDATE images SET reason = ? WHERE rowid = ?", reasons)
            self.db.executemany("INSERT OR IGNORE INTO listed VALUES (?)", listed)

    def problems(self) -> list:
        """A Problem per line of each image marked missing."""
        rows = self.db.execute("SELECT l.line, i.reason, l.name FROM images i JOIN lines l ON l.name = i.name "
                               "WHERE i.reason IS NOT NULL")
        return [Problem(line, reason, name) for line, reason, name in rows]

    def kept(self) -> tuple:
        """(images kept, whether any of them has several captions)."""
        count, several = self.db.execute("SELECT COUNT(*), COALESCE(MAX(captions), 0) > 1 FROM images "
                                          "WHERE reason IS NULL").fetchone()
        return count, bool(several)

    def records(self) -> Iterator[tuple]:
        """(name, captions, source, metadata, conditioning) of each kept image in order of its first line; a sidecar
        value is None where the sidecar does not name the image."""
        rows = self.db.execute(RECORDS)
        for name, group in groupby(rows, key=lambda row: row[0]):
            group = list(group)
            source, metadata, conditioning = (json.loads(v) if v is not None else None for v in group[0][2:])
            yield name, [row[1] for row in group], source, metadata, conditioning

    def is_listed(self, path: str) -> bool:
        """Whether path's real path is that of a kept image or of its conditioning file."""
        found = self.db.execute("SELECT 1 FROM listed WHERE path = ?", (os.path.realpath(path),)).fetchone()
        return found is not None

