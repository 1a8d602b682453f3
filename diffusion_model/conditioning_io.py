"""A row's conditioning bytes -> the file written under conditioning_images/, aligned with its target image.

image: RGB PNG, resized like the target (same box, same Lanczos filter). mask: class indices (one channel, or RGB
through --mask_palette) as an 8-bit PNG (mode L), resized with nearest neighbour. bands: the chosen bands of a
(Geo)TIFF or any image, as float32 .npy shaped (bands, height, width), resized bilinearly, no 8-bit step.
A conditioning that cannot be kept raises ImageRejected with a `conditioning_...` reason.
"""

import io
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from diffusion_model import conditioning as core
from diffusion_model.conditioning import ConditioningSettings
from diffusion_model.geotiff import MultibandSettings, read_tiff, valid_pixels
from utils.image_errors import ImageRejected
from diffusion_model.imaging import RESAMPLE, decode, decode_rgb, is_tiff, orient
from utils.constants import ALPHA_BACKGROUND

PREFIX = "conditioning_"
SUFFIXES = {"image": ".png", "mask": ".png", "bands": ".npy"}
REASON_TOO_FEW_BANDS = "conditioning_too_few_bands"
# Pillow modes whose pixels are class numbers as they stand (P: the palette indices).
INDEX_MODES = ("1", "L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N")


def renamed(err: ImageRejected) -> ImageRejected:
    """The same rejection, its reason marked as the conditioning's (so the report tells image from conditioning)."""
    reason = err.reason if err.reason.startswith(PREFIX) else PREFIX + err.reason
    return ImageRejected(reason, err.detail)


def check_aspect(image_size: tuple, size: tuple) -> None:
    """Refuse a conditioning whose shape is not its image's."""
    problem = core.aspect_mismatch(image_size, size)
    if problem:
        raise ImageRejected(core.REASON_ASPECT, problem)


def png_bytes(image: Image.Image) -> bytes:
    """Lossless PNG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    """.npy bytes of an array."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def mask_classes(image: Image.Image, palette: Optional[dict]) -> np.ndarray:
    """A decoded mask's (height, width) class numbers: through the palette, or its one channel."""
    if palette is not None:
        classes, problem = core.map_palette(np.asarray(image.convert("RGB")), palette)
        if problem:
            raise ImageRejected(core.REASON_UNKNOWN_COLOUR, problem)
        return classes
    pixels = np.asarray(image) if image.mode in INDEX_MODES else np.asarray(image.convert("RGB"))
    classes = core.single_channel(pixels)
    if classes is None:
        raise ImageRejected(core.REASON_NOT_SINGLE_CHANNEL,
                            f"a {image.mode} mask with differing channels; give --mask_palette to map its colours")
    return classes.astype(np.int64)


def prepare_mask(data: bytes, geometry, image_size: tuple, settings: ConditioningSettings, max_pixels: int) -> tuple:
    """(PNG bytes, {"class_counts"}) of a mask, resized with nearest neighbour so no new class appears."""
    image = orient(decode(data, max_pixels))
    check_aspect(image_size, image.size)
    palette = core.palette_from_record(settings.palette) if settings.palette else None
    classes = mask_classes(image, palette)
    problem = core.class_problem(classes, settings.num_classes)
    if problem:
        raise ImageRejected(core.REASON_CLASS_RANGE, problem)
    source = Image.fromarray(classes.astype(np.uint8), mode="L")
    placed = core.apply_geometry(source, core.scale_geometry(geometry, image_size, image.size),
                                 Image.Resampling.NEAREST, 0)
    return png_bytes(placed), {"class_counts": core.class_counts(np.asarray(placed))}


def band_pixels(data: bytes, max_pixels: int) -> np.ndarray:
    """(height, width, bands) float32 of a TIFF (every band, nodata and NaN as 0) or of any other image."""
    tiff = read_tiff(data, max_pixels) if is_tiff(data) else None
    if tiff is None:
        image = orient(decode(data, max_pixels))
        pixels = np.asarray(image if image.mode in INDEX_MODES + ("F", "RGB") else image.convert("RGB"))
        return (pixels[..., None] if pixels.ndim == 2 else pixels).astype(np.float32)
    valid = np.stack([valid_pixels(tiff.pixels[..., b:b + 1], tiff.nodata) for b in range(tiff.pixels.shape[-1])], -1)
    return np.where(valid, tiff.pixels, 0).astype(np.float32)


def prepare_bands(data: bytes, geometry, image_size: tuple, settings: ConditioningSettings, max_pixels: int,
                  seed: int) -> tuple:
    """(.npy bytes, {"band_stats"}) of the chosen bands, each resized bilinearly as float32."""
    pixels = band_pixels(data, max_pixels)
    height, width, count = pixels.shape
    bands = settings.bands or list(range(1, count + 1))
    if max(bands) > count:
        raise ImageRejected(REASON_TOO_FEW_BANDS, f"band {max(bands)} requested, the conditioning has {count}")
    check_aspect(image_size, (width, height))
    placed = core.scale_geometry(geometry, image_size, (width, height))
    out = np.stack([np.asarray(core.apply_geometry(Image.fromarray(pixels[..., b - 1], mode="F"), placed,
                                                   Image.Resampling.BILINEAR, 0.0)) for b in bands])
    out = out.astype(np.float32)
    return npy_bytes(out), {"band_stats": core.row_band_stats(out, seed)}


def prepare_image(data: bytes, geometry, image_size: tuple, max_pixels: int) -> tuple:
    """(PNG bytes, None) of an RGB conditioning, resized exactly like the target image."""
    image = decode_rgb(data, max_pixels, MultibandSettings())
    check_aspect(image_size, image.size)
    placed = core.apply_geometry(image, core.scale_geometry(geometry, image_size, image.size), RESAMPLE,
                                 ALPHA_BACKGROUND)
    return png_bytes(placed), None


def prepare_conditioning(data: Optional[bytes], image_size: tuple, settings: ConditioningSettings, resolution: int,
                         resize_mode: str, max_pixels: int, seed: int) -> tuple:
    """(file bytes, summary for the sidecar or None) of a row's conditioning, given its image's source size."""
    geometry = core.plan_geometry(image_size[0], image_size[1], resolution, resize_mode)
    try:
        if settings.type == "mask":
            return prepare_mask(data, geometry, image_size, settings, max_pixels)
        if settings.type == "bands":
            return prepare_bands(data, geometry, image_size, settings, max_pixels, seed)
        return prepare_image(data, geometry, image_size, max_pixels)
    except ImageRejected as err:
        raise renamed(err) from None


def summary_of_file(path: Path, kind: str, seed: int) -> Optional[dict]:
    """The sidecar summary of a conditioning file written by an earlier run (a resumed row)."""
    if kind == "mask":
        with Image.open(path) as image:
            return {"class_counts": core.class_counts(np.asarray(image))}
    if kind == "bands":
        return {"band_stats": core.row_band_stats(np.load(path, allow_pickle=False), seed)}
    return None
