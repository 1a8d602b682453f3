"""webdataset tar shards (RS5M and the like): each sample is a run of consecutive members sharing a key
(`dir/key.jpg`, `dir/key.caption`, `dir/key.json`, ...).

Shards are read member by member with tarfile in streaming mode and never unpacked: only the image and caption
members of the current sample are in memory. Counting the samples first reads only the tar headers (an
uncompressed shard is seeked through). Samples are numbered across shards in sorted path order.
"""

import json
import tarfile
from pathlib import Path
from typing import Iterator, Optional, Sequence

from diffusion_model.parquet_source import Row
from diffusion_model.sources.base import REASON_MISSING_IMAGE, REASON_NO_CAPTION, Source
from diffusion_model.sources.conditioning import missing
from utils.cli import UsageError

IMAGE_EXTENSIONS = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "img_content"}
CAPTION_EXTENSIONS = ("caption", "txt")
JSON_CAPTION_KEYS = ("caption", "captions", "text")
WANTED = IMAGE_EXTENSIONS | set(CAPTION_EXTENSIONS) | {"json"}
# Where a sample's conditioning member (--conditioning_column, a whole extension like mask.png) is kept among its
# members: a name no extension can have, so it is never taken for the image.
CONDITIONING = "/conditioning"


def sample_key(member_name: str) -> tuple:
    """(key, extension) the webdataset way: the key runs to the first dot of the file name, lower-cased extension."""
    folder, _, base = member_name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def shard_error(path: Path, err: Exception) -> UsageError:
    """A usage error naming the shard, on one line (tarfile lists every compression it tried on separate lines)."""
    return UsageError(f"cannot read webdataset shard {path}: {' '.join(str(err).split()) or type(err).__name__}")


def open_tar(path: Path, mode: str) -> tarfile.TarFile:
    """Open a shard; an unreadable one is a usage error naming it."""
    try:
        return tarfile.open(path, mode)
    except (OSError, tarfile.TarError) as err:
        raise shard_error(path, err) from None


def count_samples(path: Path) -> int:
    """Samples in a shard, from its headers alone."""
    tar, count, key = open_tar(path, "r:*"), 0, None
    try:
        for info in tar:
            if info.isfile() and sample_key(info.name)[0] != key:
                key, count = sample_key(info.name)[0], count + 1
    except (OSError, tarfile.TarError, EOFError) as err:
        raise shard_error(path, err) from None
    finally:
        tar.close()
    return count


def shard_samples(path: Path, conditioning: Optional[str] = None) -> Iterator[tuple]:
    """(key, {kind: bytes}) per sample, reading only the members that matter (the first of each kind); the member
    whose whole extension is conditioning goes under CONDITIONING."""
    tar, key, members = open_tar(path, "r|*"), None, {}
    try:
        for info in tar:
            if not info.isfile():
                continue
            this_key, extension = sample_key(info.name)
            if this_key != key and key is not None:
                yield key, members
                members = {}
            key = this_key
            # Kind = the last part of the extension, so `key.seg.png` is an image and `key.caption.txt` a text.
            kind = CONDITIONING if conditioning and extension == conditioning else extension.rpartition(".")[2]
            if (kind in WANTED or kind == CONDITIONING) and kind not in members:
                members[kind] = tar.extractfile(info).read()
        if key is not None:
            yield key, members
    except (OSError, tarfile.TarError, EOFError) as err:
        raise shard_error(path, err) from None
    finally:
        tar.close()


# Samples looked at, when --metadata_columns is given, for a .json member to check the named keys against.
PROBE_SAMPLES = 32


def json_document(data: Optional[bytes]) -> Optional[dict]:
    """A sample's .json member as an object, or None when there is none or it is not a JSON object."""
    if data is None:
        return None
    try:
        document = json.loads(data.decode("utf-8"))
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def json_caption(data: Optional[bytes]) -> object:
    """The caption field of a sample's .json member, or None when there is none or it is not JSON."""
    document = json_document(data)
    if document is None:
        return None
    return next((document[k] for k in JSON_CAPTION_KEYS if document.get(k) is not None), None)


def json_metadata(data: Optional[bytes], mapping: Optional[dict]) -> Optional[dict]:
    """{field: raw value} of the mapped keys of a sample's .json member (None without a mapping or a member)."""
    document = json_document(data) if mapping else None
    return {field: document.get(key) for field, key in mapping.items()} if document is not None else None


def sample_row(number: int, name: str, members: dict, metadata_columns: Optional[dict] = None,
               conditioning: Optional[str] = None) -> Row:
    """One sample as a Row: image member, caption from .caption, .txt or .json, metadata from the .json's mapped
    keys, the conditioning member when asked for, or the reason it fails."""
    image = next((data for kind, data in members.items() if kind in IMAGE_EXTENSIONS), None)
    caption = next((members[e].decode("utf-8", "replace") for e in CAPTION_EXTENSIONS if e in members), None)
    if caption is None:
        caption = json_caption(members.get("json"))
    if image is None:
        return Row(number, name, None, caption, (REASON_MISSING_IMAGE, f"no image member ({', '.join(members) or 'none'})"))
    if caption is None:
        return Row(number, name, image, None, (REASON_NO_CAPTION, "no .caption, .txt or .json caption member"))
    row = Row(number, name, image, caption, metadata=json_metadata(members.get("json"), metadata_columns))
    if conditioning and CONDITIONING not in members:
        return row._replace(failure=missing(f"no .{conditioning} member"))
    return row._replace(conditioning=members.get(CONDITIONING))


def webdataset_rows(paths: Sequence[Path], limit: Optional[int], metadata_columns: Optional[dict] = None,
                    conditioning: Optional[str] = None) -> Iterator[Row]:
    """Samples across shards, numbered from 1."""
    number = 0
    for path in paths:
        for key, members in shard_samples(path, conditioning):
            number += 1
            if limit is not None and number > limit:
                return
            yield sample_row(number, f"{path.name}:{key}", members, metadata_columns, conditioning)


def check_conditioning_member(paths: Sequence[Path], extension: Optional[str]) -> None:
    """A usage error when none of the first samples has the --conditioning_column member."""
    if not extension or not paths:
        return
    samples = shard_samples(paths[0], extension)
    if not any(CONDITIONING in members for _, (_, members) in zip(range(PROBE_SAMPLES), samples)):
        raise UsageError(f"--conditioning_column {extension}: none of the first {PROBE_SAMPLES} samples of {paths[0]} "
                         f"has a .{extension} member")


def check_metadata_keys(paths: Sequence[Path], mapping: Optional[dict]) -> None:
    """A usage error when none of the first samples has a .json member, or the first one lacks a named key."""
    if not mapping or not paths:
        return
    documents = (json_document(members.get("json")) for _, members in shard_samples(paths[0]))
    found = next((d for n, d in enumerate(documents) if d is not None or n >= PROBE_SAMPLES), None)
    if found is None:
        raise UsageError(f"--metadata_columns: none of the first {PROBE_SAMPLES} samples of {paths[0]} has a .json "
                         "member to read metadata from")
    for field, key in mapping.items():
        if key not in found:
            raise UsageError(f"--metadata_columns {field}={key}: the samples' .json has no key {key!r} "
                             f"(keys: {', '.join(found)})")


def open_webdataset(paths: Sequence[Path], split: Optional[str] = None, metadata_columns: Optional[dict] = None,
                    conditioning: Optional[str] = None) -> Source:
    """Count every shard's samples (headers only) so the total and the numbering are known up front; conditioning
    is a member extension such as mask.png."""
    total = sum(count_samples(path) for path in paths)
    check_metadata_keys(paths, metadata_columns)
    extension = conditioning.lower().lstrip(".") if conditioning else None
    check_conditioning_member(paths, extension)
    return Source("webdataset", list(paths), total,
                  lambda limit: webdataset_rows(paths, limit, metadata_columns, extension), split)
