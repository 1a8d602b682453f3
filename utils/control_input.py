"""A ControlNet's input: a conditioning file read and prepared as its conditioning.json says, as (C, H, W) float32.

One reader for training, sampling and evaluation, so that a ControlNet is given at sampling time exactly what it saw
in training:
- image: RGB scaled to 0..1 (3 channels), as diffusers' ControlNet scripts give it;
- mask: class indices, one-hot over the classes (K channels), so no class is closer to another by its number;
- bands: the raw band values of a .npy (create.py's output) or a (Geo)TIFF (a user's control image), normalised with
  the statistics of the training folder (`(v - offset) / scale`, clipped to 0..1 for minmax and percentile).
Resizing keeps classes: masks are resized with nearest neighbour, everything else bilinearly.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
from PIL import Image

from utils.constants import CONDITIONING_FILENAME

CONTROL_TYPES = ("image", "mask", "bands")
TIFF_SUFFIXES = (".tif", ".tiff")


class ControlInputError(ValueError):
    """A conditioning file that cannot be prepared as its spec says (message names the file and the problem)."""


@dataclass(frozen=True)
class ControlSpec:
    """What a ControlNet's conditioning is and how it is prepared: conditioning.json's fields that matter here."""

    type: str = "image"
    num_classes: Optional[int] = None
    bands: Optional[tuple] = None  # 1-based band numbers read from a multi-band TIFF; None: every band
    palette: Optional[dict] = None  # {"class index": [r, g, b]}, as conditioning.json keeps it
    offset: tuple = ()
    scale: tuple = ()
    clip: bool = False
    extra: dict = field(default_factory=dict, compare=False)  # the rest of the document, kept for copying it on

    @property
    def channels(self) -> int:
        """Channels of the prepared tensor: 3 for RGB, one per class for a mask, one per band."""
        if self.type == "mask":
            return int(self.num_classes)
        if self.type == "bands":
            return len(self.offset) or len(self.bands or ())
        return 3


def spec_from_document(document: dict) -> ControlSpec:
    """The ControlSpec of a conditioning.json document (create.py's, or the copy saved beside a ControlNet)."""
    kind = document.get("type", "image")
    if kind not in CONTROL_TYPES:
        raise ControlInputError(f"conditioning type {kind!r} is not one of {', '.join(CONTROL_TYPES)}")
    norm = document.get("normalisation") or {}
    classes = document.get("classes")
    if kind == "mask" and not classes:
        raise ControlInputError("a mask conditioning.json without 'classes' (the number of classes)")
    bands = document.get("bands")
    return ControlSpec(type=kind, num_classes=int(classes) if classes else None,
                       bands=tuple(int(b) for b in bands) if bands else None, palette=document.get("palette"),
                       offset=tuple(float(v) for v in norm.get("offset") or ()),
                       scale=tuple(float(v) for v in norm.get("scale") or ()), clip=bool(norm.get("clip", False)),
                       extra=dict(document))


def load_spec(folder_or_file) -> ControlSpec:
    """The ControlSpec saved in a folder's conditioning.json (or in the given JSON file)."""
    path = Path(folder_or_file)
    path = path / CONDITIONING_FILENAME if path.is_dir() else path
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ControlInputError(f"cannot read the conditioning description {path}: {err}") from None
    return spec_from_document(document)


def palette_lookup(palette: dict) -> dict:
    """(r, g, b) -> class index, from conditioning.json's palette record."""
    return {tuple(int(c) for c in colour): int(index) for index, colour in palette.items()}


def read_mask(path: Path, spec: ControlSpec) -> np.ndarray:
    """(H, W) int64 class indices of a mask file: its one channel, or its colours through the saved palette."""
    with Image.open(path) as image:
        if image.mode in ("1", "L", "P", "I", "I;16"):
            return np.asarray(image).astype(np.int64)
        rgb = np.asarray(image.convert("RGB"))
    if not spec.palette:
        if (rgb == rgb[..., :1]).all():
            return rgb[..., 0].astype(np.int64)
        raise ControlInputError(f"{path}: a colour mask, but the ControlNet's conditioning.json has no palette")
    lookup = palette_lookup(spec.palette)
    flat = [tuple(pixel) for pixel in rgb.reshape(-1, 3)]
    unknown = sorted({pixel for pixel in flat if pixel not in lookup})
    if unknown:
        raise ControlInputError(f"{path}: colour {unknown[0]} is not in the palette")
    return np.array([lookup[pixel] for pixel in flat], dtype=np.int64).reshape(rgb.shape[:2])


def read_bands(path: Path, spec: ControlSpec) -> np.ndarray:
    """(B, H, W) float32 raw band values: a .npy as create.py wrote it, or the chosen bands of a (Geo)TIFF."""
    if path.suffix.lower() == ".npy":
        array = np.load(path, allow_pickle=False)
        if array.ndim != 3 or 0 in array.shape:
            raise ControlInputError(f"{path}: an array of shape {array.shape}, not (bands, height, width)")
        return array.astype(np.float32)
    from diffusion_model.conditioning_io import band_pixels  # TIFF decoding (nodata, NaN) lives with create.py

    pixels = band_pixels(path.read_bytes(), max_pixels=1 << 40)
    chosen = spec.bands or tuple(range(1, pixels.shape[-1] + 1))
    if max(chosen) > pixels.shape[-1]:
        raise ControlInputError(f"{path}: band {max(chosen)} requested, the file has {pixels.shape[-1]}")
    return np.stack([pixels[..., b - 1] for b in chosen]).astype(np.float32)


def read_raw(path, spec: ControlSpec) -> np.ndarray:
    """A conditioning file's values before preparation: (H, W, 3) uint8, (H, W) class indices or (B, H, W) bands.

    path may also be an open binary file (a dataset's image bytes) for image and mask conditioning.
    """
    path = path if hasattr(path, "read") else Path(path)
    try:
        if spec.type == "mask":
            return read_mask(path, spec)
        if spec.type == "bands":
            return read_bands(path, spec)
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as err:
        if isinstance(err, ControlInputError):
            raise
        raise ControlInputError(f"cannot read conditioning file {path}: {err}") from None


def resize_raw(raw: np.ndarray, spec: ControlSpec, size) -> np.ndarray:
    """raw resized to size x size (or to size = (width, height)): nearest neighbour for masks (no new class),
    bilinear otherwise."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if spec.type == "mask":
        return np.asarray(Image.fromarray(raw.astype(np.int32), mode="I").resize(size, Image.NEAREST))\
            .astype(np.int64)
    if spec.type == "bands":
        return np.stack([np.asarray(Image.fromarray(band, mode="F").resize(size, Image.BILINEAR))
                         for band in raw]).astype(np.float32)
    return np.asarray(Image.fromarray(raw).resize(size, Image.BILINEAR))


def prepare(raw: np.ndarray, spec: ControlSpec, source: str = "conditioning") -> np.ndarray:
    """(C, H, W) float32 ControlNet input of raw values: RGB/255, a one-hot mask, or normalised bands."""
    if spec.type == "mask":
        if raw.min() < 0 or raw.max() >= spec.num_classes:
            raise ControlInputError(f"{source}: class {int(raw.max())} is outside 0..{spec.num_classes - 1}")
        return np.eye(spec.num_classes, dtype=np.float32)[raw].transpose(2, 0, 1).copy()
    if spec.type == "bands":
        if spec.channels and spec.channels != raw.shape[0]:
            raise ControlInputError(f"{source}: {raw.shape[0]} bands, the ControlNet was trained on "
                                    f"{spec.channels}")
        if not np.isfinite(raw).all():  # they would make the loss NaN and stop training
            raise ControlInputError(f"{source}: values that are NaN or infinite")
        if not spec.offset:
            return raw.astype(np.float32)
        offset = np.asarray(spec.offset, dtype=np.float32)[:, None, None]
        scale = np.asarray(spec.scale, dtype=np.float32)[:, None, None]
        out = (raw - offset) / scale
        return np.clip(out, 0.0, 1.0) if spec.clip else out.astype(np.float32)
    return (raw.astype(np.float32) / 255.0).transpose(2, 0, 1).copy()


def raw_size(raw: np.ndarray, spec: ControlSpec) -> Tuple[int, int]:
    """(width, height) of raw values: bands are (B, H, W), the others (H, W[, 3])."""
    height, width = raw.shape[1:3] if spec.type == "bands" else raw.shape[:2]
    return int(width), int(height)


def control_view(raw: np.ndarray, spec: ControlSpec, width: int, height: int,
                 source: str = "conditioning") -> np.ndarray:
    """(C, height, width) input: scaled to cover the size (the shorter side, for a square, as in training), then
    centre-cropped and prepared."""
    old_width, old_height = raw_size(raw, spec)
    scale = max(width / old_width, height / old_height)
    target = (max(width, round(old_width * scale)), max(height, round(old_height * scale)))
    if target != (old_width, old_height):
        raw = resize_raw(raw, spec, target)
    left, top = (target[0] - width) // 2, (target[1] - height) // 2
    window = (raw[:, top:top + height, left:left + width] if spec.type == "bands"
              else raw[top:top + height, left:left + width])
    return prepare(window, spec, source)


def control_array(path, spec: ControlSpec, size: Optional[int] = None) -> np.ndarray:
    """A conditioning file as the ControlNet's (C, H, W) float32 input; at size x size when given, scaled and
    centre-cropped as training prepares it."""
    raw = read_raw(path, spec)
    if size is None:
        return prepare(raw, spec, str(path))
    return control_view(raw, spec, size, size, str(path))


# Colours of classes without a palette: distinct, the first the dark "background" of many land-cover schemes.
CLASS_COLOURS = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                          [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
                          [0, 128, 128], [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0]], np.uint8)


def false_colour(array: np.ndarray, spec: ControlSpec) -> Image.Image:
    """An RGB picture of a prepared (C, H, W) input, to show beside images: mask colours, or bands stretched."""
    if spec.type == "mask":
        classes = array.argmax(axis=0)
        colours = CLASS_COLOURS[np.arange(spec.num_classes) % len(CLASS_COLOURS)]
        for index, colour in (spec.palette or {}).items():
            if int(index) < spec.num_classes:
                colours[int(index)] = colour
        return Image.fromarray(colours[classes])
    shown = array[:3] if array.shape[0] >= 3 else np.repeat(array[:1], 3, axis=0)
    low = shown.min(axis=(1, 2), keepdims=True)
    span = np.maximum(shown.max(axis=(1, 2), keepdims=True) - low, 1e-6)
    stretched = shown if spec.type == "image" else (shown - low) / span
    return Image.fromarray((np.clip(stretched, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0))
