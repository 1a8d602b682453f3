"""generate.py's output folder: NNNNNN.png with a NNNNNN.json sidecar of its settings, and grid.png, all atomic."""

import io
from pathlib import Path
from typing import Optional, Sequence, Tuple

from utils.atomic import write_bytes_atomic, write_json_atomic, write_png_atomic
from utils.cli import UsageError
from utils.grids import labelled_grid

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


def row_label(pairs: Sequence[Tuple[str, int]]) -> str:
    """A grid row's label: its prompt, then the seeds of its images."""
    seeds = [seed for _, seed in pairs]
    return f"{pairs[0][0]} (seed {seeds[0]})" if len(seeds) == 1 else f"{pairs[0][0]} (seeds {seeds[0]}-{seeds[-1]})"


def save_grid(output_dir: Path, images: Sequence, plan: Sequence[Tuple[str, int]], images_per_prompt: int,
              controls: Optional[Sequence] = None) -> Path:
    """grid.png: one row per prompt (labelled with it and its seeds), one column per image of that prompt, small
    images enlarged so they can be seen; with controls (one picture per row), a first "control" column."""
    starts = range(0, len(images), images_per_prompt)
    rows = [list(images[i:i + images_per_prompt]) for i in starts]
    columns = [f"image {column + 1}" for column in range(images_per_prompt)]
    if controls is not None:
        rows, columns = [[control, *row] for control, row in zip(controls, rows)], ["control", *columns]
    grid = labelled_grid(rows, [row_label(plan[i:i + images_per_prompt]) for i in starts], columns)
    path = Path(output_dir) / GRID_FILENAME
    write_png_atomic(path, grid)
    return path
