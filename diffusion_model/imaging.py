"""Pure image transforms for data preparation: bytes -> checked, oriented 8-bit RGB -> resized -> JPEG bytes.

Nothing here touches the disk, so every step is testable on in-memory images. A row that cannot become an
image raises ImageRejected with a short machine-readable reason, which the report counts.
"""

import io
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

from diffusion_model.geotiff import MultibandSettings, tiff_to_rgb
from utils.image_errors import (REASON_EMPTY, REASON_NULL, REASON_TOO_LARGE, REASON_UNDECODABLE, ImageRejected,
                                pillow_failure)
from utils.constants import ALPHA_BACKGROUND

RESIZE_MODES = ("center_crop", "stretch", "pad")
RESAMPLE = Image.Resampling.LANCZOS
MAX_8BIT = 255
MAX_16BIT = 65535
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# Little- and big-endian TIFF, classic and BigTIFF: such bytes go to the multi-band reader whatever the source.
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def open_checked(data: Optional[bytes], max_pixels: int) -> Image.Image:
    """Open image bytes reading only the header, refusing null, empty or oversized images before decoding."""
    if data is None:
        raise ImageRejected(REASON_NULL)
    if len(data) == 0:
        raise ImageRejected(REASON_EMPTY)
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as err:  # Pillow raises many types for junk headers; all mean the same to us.
        raise pillow_failure(err, header_only=True) from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejected(REASON_TOO_LARGE, f"{width}x{height} exceeds {max_pixels} pixels")
    return image


def decode(data: Optional[bytes], max_pixels: int) -> Image.Image:
    """Decode image bytes fully, classifying failures as truncated or undecodable."""
    image = open_checked(data, max_pixels)
    try:
        image.load()
    except Exception as err:
        raise pillow_failure(err) from None
    return image


def orient(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag so the pixels stand the way the camera meant."""
    # In place: the usual untagged image would otherwise be copied for nothing, on every row.
    ImageOps.exif_transpose(image, in_place=True)
    return image


def scale_to_8bit(pixels: np.ndarray) -> np.ndarray:
    """Map integer/float samples to 0..255 by scaling, never clipping: 16-bit ranges are divided, not saturated."""
    values = np.clip(pixels.astype(np.float64), 0, None)
    peak = float(values.max()) if values.size else 0.0
    if peak <= MAX_8BIT:
        full_scale = MAX_8BIT
    elif peak <= MAX_16BIT:
        full_scale = MAX_16BIT
    else:
        full_scale = peak
    return np.rint(values * (MAX_8BIT / full_scale)).astype(np.uint8)


def composite_alpha(image: Image.Image) -> Image.Image:
    """Flatten a transparent image onto ALPHA_BACKGROUND."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode (L, P, CMYK, I;16, I, F, RGBA, LA, ...) to 8-bit RGB without saturating."""
    if image.mode == "RGB":
        return image
    if image.mode in SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        return Image.fromarray(scale_to_8bit(np.asarray(image)), mode="L").convert("RGB")
    if image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        return composite_alpha(image)
    return image.convert("RGB")


def resize(image: Image.Image, resolution: int, mode: str = "center_crop") -> Image.Image:
    """Make a square resolution x resolution image: crop the centre, stretch, or pad with the background."""
    size = (resolution, resolution)
    if mode == "center_crop":
        return ImageOps.fit(image, size, method=RESAMPLE)
    if mode == "stretch":
        return image.resize(size, RESAMPLE)
    if mode == "pad":
        return ImageOps.pad(image, size, method=RESAMPLE, color=ALPHA_BACKGROUND)
    raise ValueError(f"unknown resize mode {mode!r}; expected one of {', '.join(RESIZE_MODES)}")


def encode(image: Image.Image, quality: int) -> bytes:
    """Encode an RGB image as baseline JPEG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def is_tiff(data: Optional[bytes]) -> bool:
    """True when the bytes start with a TIFF header (GeoTIFFs included)."""
    return bool(data) and data[:4] in TIFF_MAGIC


def decode_rgb(data: Optional[bytes], max_pixels: int, multiband=None) -> Image.Image:
    """Any row's bytes as 8-bit RGB: TIFFs by bands, nodata and stretch (multiband settings), the rest by Pillow."""
    if is_tiff(data):
        rgb = tiff_to_rgb(data, max_pixels, multiband or MultibandSettings())
        if rgb is not None:
            return rgb
    image = decode(data, max_pixels)
    try:
        return to_rgb(orient(image))
    except Exception as err:  # a loaded image with corrupt EXIF or an exotic mode still must not stop the run
        raise ImageRejected(REASON_UNDECODABLE, f"{type(err).__name__}: {err}") from None


def prepare(data: Optional[bytes], resolution: int, resize_mode: str, quality: int, max_pixels: int,
            multiband=None) -> bytes:
    """The whole chain for one row: decode (TIFF bands or Pillow), orient, convert, resize, encode."""
    return encode(resize(decode_rgb(data, max_pixels, multiband), resolution, resize_mode), quality)
