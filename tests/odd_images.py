"""Builders of odd image bytes for tests: every mode, orientation and corruption create.py must survive."""

import io
import struct
import zlib

import numpy as np
from PIL import Image

EXIF_ORIENTATION_TAG = 0x0112
ROTATE_90_CW = 6  # EXIF orientation: the stored pixels must be turned 90 degrees clockwise to display upright


def save(image: Image.Image, fmt: str, **params) -> bytes:
    """Encode a Pillow image to bytes in the given format."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def noisy_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    """A random RGB image (noise compresses badly, so truncating its JPEG really loses data)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def halves(width: int, height: int, first, second, vertical: bool = False) -> Image.Image:
    """An RGB image whose left (or top) half is one colour and the other half another."""
    image = Image.new("RGB", (width, height), second)
    box = (0, 0, width, height // 2) if vertical else (0, 0, width // 2, height)
    image.paste(first, box)
    return image


def grayscale_jpeg() -> bytes:
    """8-bit grayscale JPEG."""
    return save(Image.new("L", (48, 48), 100), "JPEG", quality=95)


def rgba_png() -> bytes:
    """RGBA PNG: opaque red left half, fully transparent right half."""
    image = Image.new("RGBA", (48, 48), (0, 255, 0, 0))
    image.paste((255, 0, 0, 255), (0, 0, 24, 48))
    return save(image, "PNG")


def la_png() -> bytes:
    """Grayscale + alpha PNG, half transparent."""
    image = Image.new("LA", (48, 48), (200, 0))
    image.paste((200, 255), (0, 0, 24, 48))
    return save(image, "PNG")


def palette_png(transparent: bool = False) -> bytes:
    """Palette PNG with blue and yellow entries; optionally index 0 (blue) is transparent."""
    image = Image.new("P", (48, 48), 0)
    image.putpalette([0, 0, 255, 255, 255, 0] + [0] * 762)
    image.paste(1, (24, 0, 48, 48))
    return save(image, "PNG", transparency=0) if transparent else save(image, "PNG")


def cmyk_jpeg() -> bytes:
    """CMYK JPEG of pure cyan."""
    return save(Image.new("CMYK", (48, 48), (255, 0, 0, 0)), "JPEG", quality=95)


def gray16_png() -> bytes:
    """16-bit grayscale PNG, a horizontal ramp over the full 0..65535 range."""
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (16, 1))
    return save(Image.fromarray(ramp), "PNG")


def exif_rotated_jpeg() -> bytes:
    """Landscape 64x32 pixels (red left, blue right) tagged to display rotated 90 degrees clockwise."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = ROTATE_90_CW
    return save(halves(64, 32, (255, 0, 0), (0, 0, 255)), "JPEG", quality=95, exif=exif.tobytes())


def portrait_jpeg() -> bytes:
    """Portrait 40x80: red top quarter, green middle, blue bottom quarter."""
    image = Image.new("RGB", (40, 80), (0, 255, 0))
    image.paste((255, 0, 0), (0, 0, 40, 20))
    image.paste((0, 0, 255), (0, 60, 40, 80))
    return save(image, "JPEG", quality=95)


def truncated_jpeg() -> bytes:
    """The first half of a noisy JPEG."""
    data = save(noisy_rgb(96, 96), "JPEG", quality=95)
    return data[: len(data) // 2]


def junk_bytes() -> bytes:
    """Bytes that are no image format at all."""
    return b"this is not an image, just some junk bytes" * 3


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR header declares width x height (a decompression-bomb header)."""
    data = bytearray(save(Image.new("L", (1, 1)), "PNG"))
    ihdr_start = 8 + 8  # signature, then chunk length and type
    data[ihdr_start : ihdr_start + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : ihdr_start + 13]))
    data[ihdr_start + 13 : ihdr_start + 17] = struct.pack(">I", crc)
    return bytes(data)


def jpeg_claiming_size(width: int, height: int) -> bytes:
    """A tiny JPEG whose SOF header declares width x height."""
    data = bytearray(save(Image.new("RGB", (8, 8)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)
