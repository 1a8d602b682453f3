"""Tricky captions.txt folders for format.py, and the golden outputs the in-memory format.py wrote for them.

tests/golden/format/<case>/ holds metadata.jsonl, format_report.json and log.txt (exit code and messages), the case's
folder written as <root>, as the format.py of commit c0e8dfc, which held every line in memory, wrote them; the
streaming format.py must match them byte for byte.
"""

import json
import os
import re
from pathlib import Path

from PIL import Image

GOLDEN_DIR = Path(__file__).resolve().parent / "golden" / "format"
ROOT_MARK = "<root>"
TIME_STAMP = re.compile(r"^\d\d:\d\d:\d\d ", re.MULTILINE)

# Case "mixed": names grouped across non-adjacent lines, odd whitespace and characters, CRLF, bad UTF-8, a name
# with "./", a symlink, a missing image named twice, strays, and sidecars with broken and repeated lines.
MIXED_LINES = [
    "rsicd_images/a.jpg\tfirst caption of a".encode(),
    "rsicd_images/b.jpg\t  été 河流 \"quoted\" \\ back\tslash\u2028line  sep ".encode(),
    b"",
    "rsicd_images/a.jpg\tsecond caption of a".encode(),
    b"a line without a tab",
    "rsicd_images/missing.jpg\tnot there".encode(),
    "rsicd_images/c.jpg\tc caption\r".encode(),
    b"rsicd_images/e.jpg\t\xff\xfe not utf-8",
    "rsicd_images/missing.jpg\tnot there again".encode(),
    "./rsicd_images/d.jpg\tdot slash name".encode(),
    "rsicd_images/e.jpg\temoji 🛰️ and \x7f control \x00 null".encode(),
    "rsicd_images/link.jpg\ta symlink to c".encode(),
    "rsicd_images/c.jpg\tc second \U0001F30A".encode(),
    b"../outside.jpg\tescape",
    "rsicd_images/b.jpg\t   ".encode(),
    "  rsicd_images/f.jpg  \t  padded name  ".encode(),
    "rsicd_images//d.jpg\tdouble slash: another name for d".encode(),
]
MIXED_SOURCES = [
    {"file_name": "rsicd_images/a.jpg", "source_file": "airport_1.jpg"}, "{broken",
    {"file_name": "rsicd_images/b.jpg", "source_file": ""},
    {"file_name": "rsicd_images/c.jpg", "source_file": "first.jpg"},
    {"file_name": "rsicd_images/c.jpg", "source_file": "farmland_2.jpg"},
    {"file_name": "rsicd_images/zzz.jpg", "source_file": "unlisted.jpg"},
    {"file_name": "rsicd_images/e.jpg", "source_file": 7},
]
MIXED_METADATA = [
    {"file_name": "rsicd_images/a.jpg", "metadata": {"gsd": 0.6, "lat": 1e-07, "name": "ü", "nested": {"b": [1, None]}}},
    {"file_name": "rsicd_images/b.jpg", "metadata": {}}, {"file_name": "rsicd_images/c.jpg", "metadata": [1]},
    {"file_name": "./rsicd_images/d.jpg", "metadata": {"gsd": 0.30000000000000004, "big": 12345678901234567890}},
    {"file_name": "rsicd_images/f.jpg", "metadata": {"z": 1, "a": 2}},
]

# Case "conditioning": one caption per image once the only image with two (missing.jpg) is dropped, a
# conditioning sidecar naming a missing file, an unnamed image and an unsafe name.
CONDITIONING_LINES = [
    b"img/a.jpg\tfirst", b"img/missing.jpg\tone", b"img/b.jpg\tsecond", b"img/missing.jpg\ttwo",
    b"img/c.jpg\tthird", b"img/d.jpg\tfourth", b"img/e.jpg\tfifth",
]
CONDITIONING_SIDECAR = [
    {"file_name": "img/a.jpg", "conditioning_image": "cond/a.png", "class_counts": [3]},
    {"file_name": "img/b.jpg", "conditioning_image": "cond/b.png"},
    {"file_name": "img/c.jpg", "conditioning_image": "cond/c_missing.png"},
    {"file_name": "img/e.jpg", "conditioning_image": "../e.png"},
    {"file_name": "img/missing.jpg", "conditioning_image": "cond/a.png"},
]

CASES = {
    # name: (folder holding captions.txt, relative to the case root; output file, relative to it; flags)
    "mixed": ("part", "metadata.jsonl", ["--skip_invalid"]),
    "conditioning": (".", "metadata.jsonl", ["--skip_invalid"]),
    "strict": ("part", "metadata.jsonl", []),
}


def image(path: Path, mode: str = "RGB") -> None:
    """A tiny image at path (its folder made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (4, 4), 1).save(path)


def jsonl(path: Path, rows: list) -> None:
    """A JSON Lines file of rows (a str row is written as it is: a broken line)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")


def build_mixed(caption_dir: Path) -> None:
    """The "mixed" folder: images, a symlink, strays, captions.txt and two sidecars."""
    for letter in "abcdef":
        image(caption_dir / "rsicd_images" / f"{letter}.jpg")
    os.symlink("c.jpg", caption_dir / "rsicd_images" / "link.jpg")
    image(caption_dir / "rsicd_images" / "stray.png")
    image(caption_dir.parent / "other" / "upper.JPG")
    (caption_dir / "notes.txt").write_text("not an image")
    (caption_dir / "captions.txt").write_bytes(b"\n".join(MIXED_LINES) + b"\n")
    jsonl(caption_dir / "source_files.jsonl", MIXED_SOURCES)
    jsonl(caption_dir / "metadata_values.jsonl", MIXED_METADATA)


def build_conditioning(caption_dir: Path) -> None:
    """The "conditioning" folder: images, conditioning PNGs (c's missing), captions.txt and the sidecar."""
    for letter in "abcde":
        image(caption_dir / "img" / f"{letter}.jpg")
    for letter in "ab":
        image(caption_dir / "cond" / f"{letter}.png", "L")
    image(caption_dir / "cond" / "orphan.png", "L")
    (caption_dir / "captions.txt").write_bytes(b"\n".join(CONDITIONING_LINES) + b"\n")
    jsonl(caption_dir / "conditioning_files.jsonl", CONDITIONING_SIDECAR)


def build_case(name: str, root: Path) -> list:
    """Make case name's folder under root; return format.py's arguments for it."""
    caption_part, output, flags = CASES[name]
    caption_dir = (root / caption_part).resolve()
    caption_dir.mkdir(parents=True, exist_ok=True)
    (build_conditioning if name == "conditioning" else build_mixed)(caption_dir)
    return ["--caption_file", str(caption_dir / "captions.txt"), "--output_file", str(root.resolve() / output),
            *flags]


def outputs(root: Path, returncode: int, printed: str) -> dict:
    """What format.py left in a case root (metadata.jsonl, format_report.json) and printed (its exit code, then its
    stderr and stdout without the log's time stamps: log.txt), the root's path written as <root>."""
    found = {"log.txt": f"exit {returncode}\n{TIME_STAMP.sub('', printed)}".encode()}
    for name in ("metadata.jsonl", "format_report.json"):
        for path in (root / name, root / "part" / name):
            if path.is_file():
                found[name] = path.read_bytes()
    return {name: data.replace(str(root.resolve()).encode(), ROOT_MARK.encode()) for name, data in found.items()}


def write_golden(name: str, found: dict) -> None:
    """Save a case's outputs as its golden files (run once, by the implementation the goldens come from)."""
    folder = GOLDEN_DIR / name
    folder.mkdir(parents=True, exist_ok=True)
    for file_name, data in found.items():
        (folder / file_name).write_bytes(data)


def golden(name: str) -> dict:
    """A case's golden outputs."""
    folder = GOLDEN_DIR / name
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())} if folder.is_dir() else {}
