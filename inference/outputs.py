"""generate.py's output folder: NNNNNN.png with a NNNNNN.json sidecar of its settings, and grid.png, all atomic."""

import io
import math
from pathlib import Path
from typing import Sequence

from utils.atomic import write_bytes_atomic, write_json_atomic
from utils.cli import UsageError

INDEX_DIGITS = 6
GRID_FILENAME = "grid.png"
IMAGE_SUFFIX = ".png"
SIDECAR_SUFFIX = ".json"


def image_path(output_dir: Path, index: int) -> Path:
    """Where image number index (0-based) goes."""
    return Path(output_dir) / f"{index:0{INDEX_DIGITS}d}{IMAGE_SUFFIX}"


def previous_outputs(output_dir: Path) -> list:
    """Images, sidecars and the grid a previous generate.py run left in output_dir."""
    names = [p for p in Path(output_dir).iterdir() if p.suffix in (IMAGE_SUFFIX, SIDECAR_SUFFIX)
             and len(p.stem) == INDEX_DIGITS and p.stem.isdigit()]
    return names + [p for p in [Path(output_dir) / GRID_FILENAME] if p.exists()]


def prepare_output_dir(output_dir: str, overwrite: bool) -> Path:
    """Create the folder; refuse to mix with a previous run's images unless overwrite, which removes them."""
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--output_dir '{output_dir}' is a file.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--output_dir '{output_dir}' cannot be created: {err.strerror}.") from None
    old = previous_outputs(folder)
    if old and not overwrite:
        raise UsageError(f"--output_dir '{output_dir}' already holds generated images ({old[0].name}, ...): "
                         "pass --overwrite to replace them, or choose another folder.")
    for path in old:
        path.unlink()
    return folder


def png_bytes(image) -> bytes:
    """A PIL image encoded as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_image(output_dir: Path, index: int, image, settings: dict) -> Path:
    """Write NNNNNN.png, then its NNNNNN.json sidecar (settings + file name + size), both atomically."""
    path = image_path(output_dir, index)
    write_bytes_atomic(path, png_bytes(image))
    sidecar = {"file_name": path.name, "index": index, **settings, "width": image.width, "height": image.height}
    write_json_atomic(path.with_suffix(SIDECAR_SUFFIX), sidecar)
    return path


def grid_columns(count: int, images_per_prompt: int) -> int:
    """One row per prompt when each has several images; otherwise a near-square sheet."""
    if images_per_prompt > 1:
        return images_per_prompt
    return max(1, math.ceil(math.sqrt(count)))


def save_grid(output_dir: Path, images: Sequence, columns: int) -> Path:
    """All images in one PNG, row by row, the last row padded with black."""
    from diffusers.utils import make_image_grid
    from PIL import Image

    rows = math.ceil(len(images) / columns)
    padding = [Image.new("RGB", images[0].size) for _ in range(rows * columns - len(images))]
    path = Path(output_dir) / GRID_FILENAME
    write_bytes_atomic(path, png_bytes(make_image_grid(list(images) + padding, rows=rows, cols=columns)))
    return path
