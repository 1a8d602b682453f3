"""trainer/data.py: transforms, caption choice, column checks, subsampling, and the real imagefolder load."""

import random

import pytest
import torch
from PIL import Image

from trainer import data
from utils.cli import UsageError


def gradient_image(width: int, height: int) -> Image.Image:
    """An RGB image whose red channel encodes x and green encodes y, so crops and flips are traceable."""
    image = Image.new("RGB", (width, height))
    image.putdata([(x * 255 // (width - 1), y * 255 // (height - 1), 0) for y in range(height) for x in range(width)])
    return image


def test_resize_shorter_side_keeps_aspect_ratio():
    """The shorter side becomes the resolution, the other scales with it."""
    resized = data.resize_shorter_side(gradient_image(80, 40), 20, Image.Resampling.BILINEAR)
    assert resized.size == (40, 20)
    portrait = data.resize_shorter_side(gradient_image(30, 90), 60, Image.Resampling.LANCZOS)
    assert portrait.size == (60, 180)


def test_center_crop_takes_the_middle():
    """A centred crop of a wide image keeps the middle columns."""
    crop = data.crop_square(gradient_image(40, 20), 20, center=True)
    assert crop.size == (20, 20)
    assert crop.getpixel((0, 0))[0] == gradient_image(40, 20).getpixel((10, 0))[0]


def test_random_crop_stays_inside_and_varies():
    """Random crops are square, inside the image, and not always at the same offset."""
    image = gradient_image(60, 20)
    lefts = {data.crop_square(image, 20, center=False, rng=random.Random(seed)).getpixel((0, 0))[0]
             for seed in range(20)}
    assert len(lefts) > 1


def test_transform_range_shape_and_flip():
    """Output is CHW in [-1, 1]; with random_flip some draws mirror the image left-right."""
    transform = data.make_image_transform(16, center_crop=True, random_flip=False, interpolation="bilinear")
    tensor = transform(gradient_image(32, 16), random.Random(0))
    assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.float32
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0
    assert tensor[0, 0, 0] < tensor[0, 0, -1], "red should grow left to right"
    flipping = data.make_image_transform(16, center_crop=True, random_flip=True, interpolation="nearest")
    rng = random.Random(0)
    firsts = {float(flipping(gradient_image(16, 16), rng)[0, 0, 0]) for _ in range(20)}
    assert firsts == {-1.0, 1.0}


def test_training_dataset_is_reproducible_per_epoch_and_row(tiny_model_dir):
    """Same (seed, epoch, row) → same sample whatever was drawn before; a new epoch draws new captions."""
    import datasets
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir, subfolder="tokenizer")
    table = datasets.Dataset.from_dict({"image": [gradient_image(24, 16)] * 2,
                                        "text": [[f"caption {i}" for i in range(10)]] * 2})
    transform = data.make_image_transform(16, center_crop=False, random_flip=True, interpolation="bilinear")
    dataset = data.TrainingDataset(table, tokenizer, transform, "image", "text", seed=3)
    first = dataset[1]
    random.random()
    dataset[0]
    again = dataset[1]
    assert torch.equal(first["pixel_values"], again["pixel_values"])
    assert torch.equal(first["input_ids"], again["input_ids"])
    captions = set()
    for epoch in range(8):
        dataset.set_epoch(epoch)
        captions.add(tuple(dataset[1]["input_ids"].tolist()))
    assert len(captions) > 1, "caption lists must give a random caption each time a row is seen"


def test_every_interpolation_mode_is_mapped():
    """All of the reference's --image_interpolation_mode choices resolve to a Pillow filter."""
    from trainer.args import INTERPOLATION_MODES

    assert set(INTERPOLATION_MODES) == set(data.INTERPOLATIONS)


def test_pick_caption_string_list_and_bad():
    """A string is kept; a list gives a random member; anything else is the reference's error."""
    assert data.pick_caption("a farm", "text") == "a farm"
    rng = random.Random(0)
    picks = {data.pick_caption(["a", "b", "c"], "text", rng) for _ in range(30)}
    assert picks == {"a", "b", "c"}
    with pytest.raises(UsageError, match="strings or lists of strings"):
        data.pick_caption(3, "text")


def test_check_column_message():
    """An unknown column gives the reference's message listing the real ones."""
    assert data.check_column("--image_column", "image", ["image", "text"]) == "image"
    with pytest.raises(UsageError, match="--caption_column' value 'caption' needs to be one of: image, text"):
        data.check_column("--caption_column", "caption", ["image", "text"])


def test_subsample_is_seeded_shuffle_then_take():
    """max_train_samples keeps N rows chosen by a seeded shuffle; None keeps all."""
    import datasets

    table = datasets.Dataset.from_dict({"n": list(range(20))})
    first = data.subsample(table, 5, seed=1)["n"]
    assert len(first) == 5 and first == data.subsample(table, 5, seed=1)["n"]
    assert first != list(range(5))
    assert len(data.subsample(table, None, seed=1)) == 20


def test_imagefolder_from_create_and_format_batches(tiny_data_dir, tiny_model_dir):
    """DATA_DIR from create.py + format.py loads as an imagefolder and batches to pixels and token ids."""
    from transformers import CLIPTokenizer

    from trainer.args import parse_args

    args = parse_args(["--pretrained_model_name_or_path", str(tiny_model_dir), "--train_data_dir",
                       str(tiny_data_dir), "--resolution", "32", "--max_train_samples", "3", "--seed", "0"])
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir, subfolder="tokenizer")
    dataset = data.build_train_dataset(args, tokenizer, seed=0)
    assert len(dataset) == 3
    batch = next(iter(data.build_dataloader(dataset, batch_size=2, num_workers=0, seed=0)))
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["input_ids"].shape == (2, tokenizer.model_max_length)


def test_unreadable_images_are_recorded_and_the_next_readable_row_stands_in(broken_images_dir, tmp_path):
    """Through a DataLoader worker: a truncated JPEG's row and a non-image's row each yield row 3's item and reach the
    main process's record; a folder with no readable image stops at build with one usage line."""
    from conftest import BROKEN_ROWS

    from stand_in.tiny_model import build_tokenizer
    from trainer.args import parse_args

    def build(folder):
        """The dataset train_text_to_image.py builds for folder at 32 px."""
        args = parse_args(["--pretrained_model_name_or_path", "base", "--train_data_dir", str(folder),
                           "--resolution", "32"])
        return data.build_train_dataset(args, build_tokenizer(), seed=0)

    dataset = build(broken_images_dir)
    batch = next(iter(data.build_dataloader(dataset, batch_size=4, num_workers=1, seed=0)))
    assert dataset.bad_rows.flagged() == sorted(BROKEN_ROWS)
    # The loader shuffles: each item is told by its caption's tokens (rows 1 and 2 carry row 3's).
    ids = [tuple(row.tolist()) for row in batch["input_ids"]]
    row_3 = data.tokenize(dataset.tokenizer, ["scene 3"])[0]
    assert ids.count(tuple(row_3.tolist())) == 3
    stand_ins = [i for i, row in enumerate(ids) if row == tuple(row_3.tolist())]
    assert all(torch.equal(batch["pixel_values"][i], batch["pixel_values"][stand_ins[0]]) for i in stand_ins)
    lone = tmp_path / "lone"
    (lone / "images").mkdir(parents=True)
    (lone / "images" / "0.jpg").write_bytes(b"no image here")
    (lone / "metadata.jsonl").write_text('{"file_name": "images/0.jpg", "text": "t"}\n')
    with pytest.raises(UsageError, match="none of the 1 training rows can be read"):
        build(lone)


@pytest.mark.parametrize("proportion", ["0", "1"])
def test_proportion_empty_prompts_gives_the_empty_prompt(tiny_data_dir, tiny_model_dir, proportion):
    """--proportion_empty_prompts 1 turns every caption into the empty prompt; the default 0 none."""
    from transformers import CLIPTokenizer

    from trainer.args import parse_args

    args = parse_args(["--pretrained_model_name_or_path", str(tiny_model_dir), "--train_data_dir",
                       str(tiny_data_dir), "--resolution", "16", "--proportion_empty_prompts", proportion])
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir, subfolder="tokenizer")
    dataset = data.build_train_dataset(args, tokenizer, seed=0)
    empty = data.tokenize(tokenizer, [""])[0]
    emptied = {torch.equal(dataset[i]["input_ids"], empty) for i in range(len(dataset))}
    assert emptied == {proportion == "1"}


def test_local_imagefolder_loads_without_datasets_bars(tmp_path, capfd):
    """No "Downloading data" (datasets shows it from 16 files) or "Generating train split" bar for a local folder
    read into a fresh cache; datasets' bars are back on afterwards, huggingface_hub's were never touched."""
    import json

    import datasets
    from huggingface_hub.utils import are_progress_bars_disabled

    folder = tmp_path / "data"
    folder.mkdir()
    rows = [{"file_name": f"image_{i:02d}.jpg", "text": f"caption {i}"} for i in range(16)]
    for row in rows:
        gradient_image(8, 8).save(folder / row["file_name"])
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    hub_bars_off = are_progress_bars_disabled()
    table = data.load_raw_dataset(None, None, str(folder), str(tmp_path / "cache"))
    assert len(table) == 16 and table[3]["text"] == "caption 3"
    err = capfd.readouterr().err
    assert "Downloading data" not in err and "Generating train split" not in err, err
    assert not datasets.are_progress_bars_disabled() and are_progress_bars_disabled() == hub_bars_off

def test_imagefolder_reads_metadata_jsonl_without_globbing_the_folder(tiny_data_dir, tmp_path, monkeypatch):
    """DATA_DIR loads with the rows, columns and features of load_dataset("imagefolder", data_dir=DATA_DIR), without
    datasets' split-pattern search, which stats every file of the folder once per pattern."""
    import datasets
    import datasets.load

    def rows(table):
        return table.cast_column("image", datasets.Image(decode=False)).to_list()

    reference = datasets.load_dataset("imagefolder", data_dir=str(tiny_data_dir), cache_dir=str(tmp_path / "ref"),
                                      split="train")

    def no_glob(*args, **kwargs):
        raise AssertionError("the folder was searched for split patterns")

    monkeypatch.setattr(datasets.load, "get_data_patterns", no_glob)
    table = data.load_raw_dataset(None, None, str(tiny_data_dir), str(tmp_path / "cache"))
    assert table.features == reference.features and rows(table) == rows(reference) and len(table) == 8


def test_saved_dataset_is_detected(tmp_path):
    """A save_to_disk folder is recognised (load_from_disk), a plain folder is not."""
    import datasets

    datasets.Dataset.from_dict({"text": ["a"]}).save_to_disk(str(tmp_path / "saved"))
    assert data.is_saved_dataset(tmp_path / "saved")
    assert not data.is_saved_dataset(tmp_path)


def row_key(pixels: torch.Tensor, ids: torch.Tensor) -> tuple:
    """A hashable summary of one sample, to compare batches regardless of their shuffled order."""
    return (round(float(pixels.sum()), 3), round(float(pixels[..., 0].sum()), 3), tuple(ids.tolist()))


def test_persistent_workers_see_each_new_epoch():
    """With a persistent worker, epoch 1's batch holds epoch 1's flips and captions, not a replay of epoch 0's."""
    from stand_in.tiny_model import build_tokenizer

    table = [{"image": gradient_image(24, 16), "text": [f"caption {i}" for i in range(6)]} for _ in range(6)]
    transform = data.make_image_transform(16, center_crop=True, random_flip=True, interpolation="bilinear")
    dataset = data.TrainingDataset(table, build_tokenizer(), transform, "image", "text", seed=3)
    loader = data.build_dataloader(dataset, batch_size=len(table), num_workers=1, seed=0)
    assert loader.persistent_workers and loader.prefetch_factor > 1
    seen = []
    for epoch in range(2):
        dataset.set_epoch(epoch)
        expected = sorted(row_key(dataset[i]["pixel_values"], dataset[i]["input_ids"]) for i in range(len(table)))
        (batch,) = list(loader)
        got = sorted(row_key(p, ids) for p, ids in zip(batch["pixel_values"], batch["input_ids"]))
        assert got == expected, f"epoch {epoch}: the worker did not draw this epoch's augmentations"
        seen.append(got)
    assert seen[0] != seen[1]


@pytest.mark.parametrize("cores,processes,expected", [(2, 1, 1), (1, 1, 0), (16, 2, 7), (64, 1, 8), (8, 8, 0)])
def test_default_worker_count(cores, processes, expected):
    """A process's share of the cores minus one (for the training process), at most 8, never negative."""
    assert data.default_num_workers(cores, processes) == expected


def test_explicit_worker_count_wins():
    """--dataloader_num_workers as given (0 included); unset derives from the usable cores."""
    assert data.resolve_num_workers(0, 1) == 0 and data.resolve_num_workers(5, 4) == 5
    import os

    assert data.resolve_num_workers(None, 1) == data.default_num_workers(len(os.sched_getaffinity(0)), 1)


def test_each_process_shard_gets_every_new_epoch():
    """Under 2 processes accelerate's set_epoch stops at the sampler; set_epoch reaches each shard's dataset too.

    Each rank (its own dataset, as in its own process) draws new augmentations every epoch, from rows disjoint
    from the other rank's.
    """
    from accelerate.data_loader import prepare_data_loader

    from stand_in.tiny_model import build_tokenizer

    table = [{"image": gradient_image(24 + i, 16), "text": [f"caption {i} {j}" for j in range(6)]} for i in range(4)]
    transform = data.make_image_transform(16, center_crop=False, random_flip=True, interpolation="bilinear")
    draws = {}
    for rank in (0, 1):
        dataset = data.TrainingDataset(table, build_tokenizer(), transform, "image", "text", seed=3)
        loader = prepare_data_loader(data.build_dataloader(dataset, 1, 0, seed=0), num_processes=2,
                                     process_index=rank, use_seedable_sampler=True, data_seed=0)
        for epoch in (0, 1):
            data.set_epoch(loader, epoch)
            assert dataset.epoch.get() == epoch, f"rank {rank}: epoch {epoch} did not reach the dataset"
            draws[rank, epoch] = [row_key(b["pixel_values"][0], b["input_ids"][0]) for b in loader]
            # The same rows drawn at epoch 0 would look otherwise: the augmentations are this epoch's.
            dataset.set_epoch(0)
            replay = {row_key(dataset[i]["pixel_values"], dataset[i]["input_ids"]) for i in range(len(table))}
            assert (set(draws[rank, epoch]) <= replay) == (epoch == 0)
    for epoch in (0, 1):
        assert len(draws[0, epoch]) == len(draws[1, epoch]) == 2
        assert not set(draws[0, epoch]) & set(draws[1, epoch]), "ranks drew the same rows"


@pytest.mark.parametrize("cores,processes,workers,expected", [(2, 1, 1, 1), (2, 1, 0, 2), (16, 2, 7, 1),
                                                               (64, 1, 8, 56), (8, 8, 0, 1), (2, 1, 4, 1)])
def test_cpu_threads_leave_the_workers_their_cores(cores, processes, workers, expected):
    """A process's share of the cores less its DataLoader workers, never below one."""
    assert data.cpu_threads(cores, processes, workers) == expected


def test_cpu_threads_are_set_on_the_cpu_unless_omp_num_threads_is():
    """Set on the CPU from the usable cores; left alone on an accelerator or when OMP_NUM_THREADS is set."""
    import os

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert data.limit_cpu_threads("cuda", 1, 0, {}) is None and torch.get_num_threads() == 3
        assert data.limit_cpu_threads("cpu", 1, 0, {"OMP_NUM_THREADS": "1"}) is None and torch.get_num_threads() == 3
        expected = data.cpu_threads(len(os.sched_getaffinity(0)), 1, 0)
        assert data.limit_cpu_threads("cpu", 1, 0, {}) == expected and torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(previous)
