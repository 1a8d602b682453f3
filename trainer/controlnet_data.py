"""ControlNet training data: the conditioning of each row, prepared as utils/control_input does and kept pixel-aligned
with the target image (same resize, centre crop and flip; masks resized with nearest neighbour).

The conditioning comes from the data folder's `conditioning.json` (create.py + format.py) or from a dataset's
`conditioning_image` column; it is read every step, also when the target latents come from the latent cache.
"""

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from utils.image_errors import ImageRejected
from trainer.bad_rows import BadRows
from trainer.data import TrainingDataset, cell_name, undecoded
from utils.cli import UsageError
from utils.constants import BAD_CONDITIONING_REASON, CONDITIONING_FILENAME, METADATA_FILENAME
from utils.control_input import ControlInputError, ControlSpec, prepare, read_raw, resize_raw, spec_from_document


def data_folder(args) -> Optional[Path]:
    """The local folder the rows (and their relative conditioning paths) come from, or None for a Hub dataset."""
    if args.dataset_name is not None:
        path = Path(args.dataset_name).expanduser()
        return path.absolute() if path.is_dir() else None
    return Path(args.train_data_dir).expanduser().absolute()


def read_document(folder: Optional[Path]) -> dict:
    """The folder's conditioning.json as a dict ({} when there is none)."""
    path = folder / CONDITIONING_FILENAME if folder is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read {path}: {err}") from None
    if not isinstance(document, dict):
        raise UsageError(f"{path} is not a JSON object.")
    return document


def resolve_document(args, document: dict) -> dict:
    """The conditioning description this run trains on: the folder's, with --conditioning_type and --num_classes
    applied; a folder of another type is described by the flags alone."""
    kind = args.conditioning_type or document.get("type") or "image"
    resolved = dict(document) if document.get("type", "image") == kind else {}
    resolved["type"] = kind
    if kind == "mask":
        classes = args.num_classes or resolved.get("classes")
        if not classes:
            raise UsageError("a mask conditioning needs --num_classes K (the data folder's conditioning.json gives "
                             "no 'classes').")
        if args.num_classes and resolved.get("classes") and args.num_classes < int(resolved["classes"]):
            raise UsageError(f"--num_classes {args.num_classes} is below the {resolved['classes']} classes of the "
                             "data folder's masks.")
        resolved["classes"] = int(classes)
    return resolved


def conditioning_spec(args, folder: Optional[Path]) -> tuple:
    """(ControlSpec, output document) of the run: the spec the data is prepared with, and conditioning.json as
    saved beside the trained ControlNet (channels = the prepared input's, base model, absolute training folder)."""
    document = resolve_document(args, read_document(folder))
    try:
        spec = spec_from_document(document)
    except ControlInputError as err:
        raise UsageError(f"conditioning: {err}") from None
    if args.conditioning_channels is not None and args.conditioning_channels != spec.channels:
        raise UsageError(f"--conditioning_channels {args.conditioning_channels} does not match the conditioning: "
                         f"{spec.type} gives {spec.channels} channels.")
    output = {**document, "channels": spec.channels, "base_model": args.pretrained_model_name_or_path,
              "train_data_dir": str(folder) if folder is not None else None}
    return spec, output


def shorter_side_size(width: int, height: int, size: int) -> tuple:
    """(width, height) after scaling the shorter side to size, as trainer.data.resize_shorter_side computes it."""
    scale = size / min(width, height)
    return max(size, round(width * scale)), max(size, round(height * scale))


def raw_height_width(raw: np.ndarray, spec: ControlSpec) -> tuple:
    """(height, width) of a raw conditioning array (bands are (B, H, W), the others (H, W[, 3]))."""
    return tuple(raw.shape[1:3]) if spec.type == "bands" else tuple(raw.shape[:2])


def centre_crop_raw(raw: np.ndarray, spec: ControlSpec, size: int) -> np.ndarray:
    """The centred size x size window of a raw array, the box trainer.data.crop_square takes for the image."""
    height, width = raw_height_width(raw, spec)
    top, left = (height - size) // 2, (width - size) // 2
    if spec.type == "bands":
        return raw[:, top:top + size, left:left + size]
    return raw[top:top + size, left:left + size]


def conditioning_view(raw: np.ndarray, spec: ControlSpec, resolution: int, flip: bool,
                      source: str = "conditioning") -> torch.Tensor:
    """(C, resolution, resolution) float32 input: shorter side to resolution, centre crop, prepared, flipped."""
    height, width = raw_height_width(raw, spec)
    target = shorter_side_size(width, height, resolution)
    if (width, height) != target:
        raw = resize_raw(raw, spec, target)
    array = prepare(centre_crop_raw(raw, spec, resolution), spec, source)
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.flip(-1).contiguous() if flip else tensor


@dataclass(frozen=True)
class ConditioningReader:
    """Reads one row's conditioning cell (a path relative to the data folder, or {bytes, path}) as a view."""

    spec: ControlSpec
    folder: Optional[Path]
    resolution: int

    def open(self, cell):
        """A path or binary file for read_raw."""
        if isinstance(cell, dict):
            if cell.get("bytes") is not None:
                return io.BytesIO(cell["bytes"])
            cell = cell.get("path")
        if not isinstance(cell, str) or not cell:
            raise ControlInputError(f"conditioning cell {cell!r} is neither image bytes nor a path")
        path = Path(cell)
        return path if path.is_absolute() or self.folder is None else self.folder / path

    def view(self, cell, flip: bool) -> torch.Tensor:
        """The cell's prepared (C, H, W) input at the training resolution, flipped when the image was."""
        source = self.open(cell)
        return conditioning_view(read_raw(source, self.spec), self.spec, self.resolution, flip, str(source))


class ControlTrainingDataset:
    """Mixin for trainer.data.TrainingDataset: each item also holds "conditioning_pixel_values", flipped with the
    image. The flip is drawn from the row's RNG at the place the image transform draws it, so the data matches an
    uncached text-to-image run's and the cached run's views. A row whose conditioning cannot be read is recorded in
    bad_rows (the one that records unreadable images) and the next readable row stands in for it."""

    row_errors = (ImageRejected, ControlInputError)

    def setup_conditioning(self, reader: ConditioningReader, column: str, random_flip: bool) -> None:
        """The reader, the conditioning column (its cells kept undecoded) and whether views may be flipped."""
        self.reader, self.conditioning_column, self.random_flip = reader, column, random_flip
        self.cells = self.table.select_columns([column])

    def cell(self, row: int):
        """The row's conditioning cell (a path, or {bytes, path}), without reading the image."""
        return self.cells[int(row)][self.conditioning_column]

    def pixels(self, row: dict, rng: random.Random) -> dict:
        """The image (transformed without flip, then flipped as drawn) and its conditioning, aligned."""
        pixel_values = self.image_transform(row[self.image_column], rng)
        flip = self.random_flip and rng.random() < 0.5
        conditioning = self.reader.view(row[self.conditioning_column], flip)
        return {"pixel_values": pixel_values.flip(-1) if flip else pixel_values,
                "conditioning_pixel_values": conditioning}

    def row_files(self, row: int) -> tuple:
        """The row's image file and its conditioning file."""
        return (*super().row_files(row), cell_name(self.cell(row)))

    def row_problem(self, row: int) -> Optional[dict]:
        """Why the row cannot be read now: its image's problem, else its conditioning's; None when both read."""
        problem = super().row_problem(row)
        if problem is not None:
            return problem
        try:
            self.reader.view(self.cell(row), False)
        except ControlInputError as err:
            return {"reason": BAD_CONDITIONING_REASON, "file": cell_name(self.cell(row)), "detail": str(err)}
        return None


class ControlledTrainingDataset(ControlTrainingDataset, TrainingDataset):
    """trainer.data.TrainingDataset whose rows also hold their conditioning."""


def build_train_dataset(args, tokenizer, seed: int, spec: ControlSpec, folder: Optional[Path]):
    """trainer.data's training dataset, each row with its conditioning."""
    from trainer import data

    base = data.make_train_dataset(args, tokenizer, seed)
    column = data.check_column("--conditioning_image_column", args.conditioning_image_column,
                               base.table.column_names)
    transform = data.make_image_transform(args.resolution, True, False, args.image_interpolation_mode)
    dataset = ControlledTrainingDataset(undecoded(base.table, column), tokenizer, transform, base.image_column,
                            base.caption_column, seed, base.metadata, base.dropout, base.folder)
    reader = ConditioningReader(spec, folder, args.resolution)
    dataset.setup_conditioning(reader, column, args.random_flip)
    dataset.check_readable()
    return dataset


class CachedWithConditioning(torch.utils.data.Dataset):
    """A latent-cache dataset whose rows also hold their conditioning, read every step and flipped when the cached
    view drawn is the flipped image; a row whose conditioning cannot be read is replaced as in the uncached data."""

    def __init__(self, cached, table, column: str, reader: ConditioningReader, bad_rows: Optional[BadRows] = None):
        """cached: trainer.latent_cache.CachedDataset over table's rows, row for row; bad_rows: the uncached
        dataset's record, carried on (a new one when None)."""
        self.cached, self.reader = cached, reader
        self.cells = undecoded(table.select_columns([column]), column)
        self.column = column
        self.bad_rows = bad_rows or BadRows(len(self.cells), ControlTrainingDataset.row_errors)

    def __len__(self) -> int:
        """Number of rows."""
        return len(self.cached)

    @property
    def served_models(self) -> tuple:
        """The frozen models the cache replaces."""
        return self.cached.served_models

    def set_epoch(self, epoch: int) -> None:
        """Pass the epoch on to the cache's rows."""
        self.cached.set_epoch(epoch)

    def cell(self, row: int):
        """The row's conditioning cell."""
        return self.cells[int(row)][self.column]

    def load(self, row: int) -> dict:
        """The cached row and its conditioning in the same view."""
        item, view = self.cached.row(row)
        return {**item, "conditioning_pixel_values": self.reader.view(self.cell(row), view == 1)}

    def __getitem__(self, index: int) -> dict:
        """The row, or the next readable row when its conditioning cannot be read."""
        return self.bad_rows.first_good(int(index), self.load)


def collate(examples) -> dict:
    """trainer.data.collate's batch plus the stacked conditioning."""
    from trainer.data import collate as collate_images

    batch = collate_images(examples)
    batch["conditioning_pixel_values"] = torch.stack([e["conditioning_pixel_values"] for e in examples])
    return batch


def validation_arrays(paths, spec: ControlSpec, resolution: int) -> list:
    """Each --validation_image as the ControlNet's (C, H, W) input at the resolution (a bad file: one line)."""
    from utils.control_input import control_array

    arrays = []
    for path in paths or ():
        try:
            arrays.append(control_array(path, spec, resolution))
        except ControlInputError as err:
            raise UsageError(f"--validation_image: {err}") from None
    return arrays


def check_conditioning_files(args) -> None:
    """Every metadata.jsonl line of --train_data_dir names an existing conditioning file (one line if not)."""
    if args.dataset_name is not None:
        return
    metadata = Path(args.train_data_dir).expanduser() / METADATA_FILENAME
    column = args.conditioning_image_column
    with metadata.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            value = json.loads(line).get(column)
            if not isinstance(value, str):
                raise UsageError(f"{metadata}:{number} has no '{column}' path (--conditioning_image_column); "
                                 "run create.py with --conditioning_column or --conditioning_dir, then format.py.")
            if Path(value).is_absolute() or ".." in Path(value).parts:
                raise UsageError(f"{metadata}:{number}: conditioning path '{value}' leaves the data folder.")
            if not (metadata.parent / value).is_file():
                raise UsageError(f"{metadata}:{number} names conditioning '{value}', which does not exist.")
