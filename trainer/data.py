"""Training data: load image/caption pairs with `datasets`, transform them with Pillow + torch, batch them."""

import random
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from utils.cli import UsageError

# Pillow has no separate "nearest_exact": its NEAREST already samples pixel centres, which is what
# torchvision's nearest_exact fixes about its own nearest.
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "nearest_exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


def is_saved_dataset(path: Path) -> bool:
    """True when path is a folder written by Dataset.save_to_disk or DatasetDict.save_to_disk."""
    return path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists())


def load_raw_dataset(dataset_name: Optional[str], dataset_config_name: Optional[str],
                     train_data_dir: Optional[str], cache_dir: Optional[str]):
    """The training split: a saved dataset folder, a hub/local dataset, or an imagefolder with metadata.jsonl."""
    import datasets

    if dataset_name is not None and is_saved_dataset(Path(dataset_name)):
        loaded = datasets.load_from_disk(dataset_name)
    elif dataset_name is not None:
        loaded = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
    else:
        loaded = datasets.load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir)
    return loaded["train"] if isinstance(loaded, datasets.DatasetDict) else loaded


def check_column(flag: str, value: str, column_names: Sequence[str]) -> str:
    """Return value if it names a column; otherwise the reference's message as a UsageError."""
    if value not in column_names:
        raise UsageError(f"{flag}' value '{value}' needs to be one of: {', '.join(column_names)}")
    return value


def subsample(dataset, max_train_samples: Optional[int], seed: Optional[int]):
    """Shuffle with the seed and keep the first max_train_samples rows (the whole set when None)."""
    if max_train_samples is None:
        return dataset
    return dataset.shuffle(seed=seed).select(range(min(max_train_samples, len(dataset))))


def pick_caption(caption, column: str, rng: random.Random = random) -> str:
    """A caption string; from a list of captions, a random one (a fresh draw every time the row is seen)."""
    if isinstance(caption, str):
        return caption
    if isinstance(caption, (list, tuple, np.ndarray)) and len(caption) > 0:
        return str(rng.choice(list(caption)))
    raise UsageError(f"Caption column `{column}` should contain either strings or lists of strings.")


def resize_shorter_side(image: Image.Image, size: int, resample: int) -> Image.Image:
    """Scale so that the shorter side equals size, keeping the aspect ratio."""
    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    return image if new_size == image.size else image.resize(new_size, resample=resample)


def crop_square(image: Image.Image, size: int, center: bool, rng: random.Random = random) -> Image.Image:
    """A size×size crop: centred, or at a uniformly random offset."""
    width, height = image.size
    if center:
        left, top = (width - size) // 2, (height - size) // 2
    else:
        left, top = rng.randint(0, width - size), rng.randint(0, height - size)
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image → float CHW tensor in [-1, 1], the range the VAE was trained on."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0).contiguous()


def make_image_transform(resolution: int, center_crop: bool, random_flip: bool,
                         interpolation: str) -> Callable[[Image.Image], torch.Tensor]:
    """The training transform: shorter side to resolution, square crop, optional flip, to [-1, 1]."""
    resample = INTERPOLATIONS[interpolation]

    def transform(image: Image.Image) -> torch.Tensor:
        """One training view of image."""
        image = crop_square(resize_shorter_side(image.convert("RGB"), resolution, resample), resolution, center_crop)
        if random_flip and random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_tensor(image)

    return transform


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """Token ids padded/truncated to the text encoder's context length."""
    return tokenizer(list(captions), max_length=tokenizer.model_max_length, padding="max_length",
                     truncation=True, return_tensors="pt").input_ids


def make_preprocess(tokenizer, image_transform, image_column: str, caption_column: str):
    """A datasets on-the-fly transform: rows → pixel_values and input_ids (random crop/flip/caption each time)."""

    def preprocess(examples: dict) -> dict:
        """Transform a batch of rows."""
        captions = [pick_caption(c, caption_column) for c in examples[caption_column]]
        return {
            "pixel_values": [image_transform(image) for image in examples[image_column]],
            "input_ids": list(tokenize(tokenizer, captions)),
        }

    return preprocess


def collate(examples: Sequence[dict]) -> dict:
    """Stack transformed rows into a batch."""
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous(memory_format=torch.contiguous_format),
        "input_ids": torch.stack([e["input_ids"] for e in examples]),
    }


def build_train_dataset(args, tokenizer):
    """Load, check, subsample and attach the transform: the dataset the DataLoader reads."""
    raw = load_raw_dataset(args.dataset_name, args.dataset_config_name, args.train_data_dir, args.cache_dir)
    image_column = check_column("--image_column", args.image_column, raw.column_names)
    caption_column = check_column("--caption_column", args.caption_column, raw.column_names)
    transform = make_image_transform(args.resolution, args.center_crop, args.random_flip,
                                     args.image_interpolation_mode)
    subset = subsample(raw, args.max_train_samples, args.seed)
    return subset.with_transform(make_preprocess(tokenizer, transform, image_column, caption_column))


def build_dataloader(dataset, batch_size: int, num_workers: int) -> torch.utils.data.DataLoader:
    """A shuffling DataLoader over the transformed dataset."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate,
                                       num_workers=num_workers, persistent_workers=num_workers > 0)
