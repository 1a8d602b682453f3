"""Why a row's bytes cannot become an image: ImageRejected and the reasons create_report.json counts.

Its own module so that every reader (Pillow's in imaging, the multi-band one in geotiff) raises the same error
while imaging, which picks the reader for a row's bytes, imports geotiff and not the other way round.
"""

REASON_NULL = "null_image"
REASON_EMPTY = "empty_image"
REASON_UNDECODABLE = "undecodable"
REASON_TRUNCATED = "truncated"
REASON_TOO_LARGE = "too_large"
# The file itself could not be read (gone, no permission: an OSError with an errno); create.py's folder sources too.
REASON_UNREADABLE = "unreadable_image"


class ImageRejected(Exception):
    """A row's bytes cannot become a training image; .reason is the report's category."""

    def __init__(self, reason: str, detail: str = ""):
        """Keep the reason (report category) and a human-readable detail."""
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def load_failure(err: Exception) -> ImageRejected:
    """Pillow's error on opening or decoding an image as a rejection: too large, truncated, unreadable or else
    undecodable (Pillow's own decoding errors carry no errno; the operating system's do)."""
    from PIL import Image

    if isinstance(err, Image.DecompressionBombError):
        reason = REASON_TOO_LARGE
    elif "truncated" in str(err).lower():
        reason = REASON_TRUNCATED
    elif getattr(err, "errno", None) is not None:
        reason = REASON_UNREADABLE
    else:
        reason = REASON_UNDECODABLE
    return ImageRejected(reason, f"{type(err).__name__}: {err}")
