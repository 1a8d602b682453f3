"""Why a row's bytes cannot become an image: ImageRejected, the reasons create_report.json and bad_rows.json count,
pillow_failure, the one rule that turns what Pillow raised into such a reason, and pillow_pixel_limit, which sets
Pillow's decompression-bomb limit for one block only.

Its own module so that every reader (Pillow's in diffusion_model.imaging, the multi-band one in geotiff, the
trainer's through datasets) raises the same error while imaging, which picks the reader for a row's bytes, imports
geotiff and not the other way round; in utils/ because the trainer shares it and must not import data preparation.
"""

from contextlib import contextmanager
from typing import Iterator, Optional

from PIL import Image

REASON_NULL = "null_image"
REASON_EMPTY = "empty_image"
REASON_UNDECODABLE = "undecodable"
REASON_TRUNCATED = "truncated"
REASON_TOO_LARGE = "too_large"
# The file itself could not be read (gone, no permission: an OSError with an errno); create.py's folder sources too.
REASON_UNREADABLE = "unreadable_image"

# What Pillow raises for an image it cannot open or decode: UnidentifiedImageError and truncated data are OSErrors, as
# are a file gone or unreadable; a decompression bomb has its own type. Anything else is a bug and stops the run.
PILLOW_ERRORS = (OSError, Image.DecompressionBombError)


class ImageRejected(Exception):
    """A row's bytes cannot become a training image; .reason is the report's category."""

    def __init__(self, reason: str, detail: str = ""):
        """Keep the reason (report category) and a human-readable detail."""
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def pillow_failure(err: Exception, header_only: bool = False) -> ImageRejected:
    """Pillow's error on opening or decoding an image as a rejection: too large, truncated, unreadable or else
    undecodable (Pillow's own decoding errors carry no errno; the operating system's do).

    header_only: the error came from opening in-memory bytes, before any pixel was decoded; bytes whose header
    Pillow cannot parse (even a "Truncated File Read" of it) are undecodable, as create.py has always counted them.
    """
    if isinstance(err, Image.DecompressionBombError):
        reason = REASON_TOO_LARGE
    elif header_only:
        reason = REASON_UNDECODABLE
    elif "truncated" in str(err).lower():
        reason = REASON_TRUNCATED
    elif getattr(err, "errno", None) is not None:
        reason = REASON_UNREADABLE
    else:
        reason = REASON_UNDECODABLE
    return ImageRejected(reason, f"{type(err).__name__}: {err}")


@contextmanager
def pillow_pixel_limit(limit: Optional[int]) -> Iterator[None]:
    """Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS; None: no limit) set to limit inside the block and
    put back as it was afterwards, even on error.

    Pillow keeps the limit in a module global, so it holds for the whole process (not thread-safe): only a
    single-threaded worker should change it, and only around its own reads.
    """
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous
