"""trainer/controlnet_data.py in-process: the conditioning spec from conditioning.json and flags, aligned views of
image and conditioning (flips on both or neither), one-hot masks without new classes, bands, the cached wrapper."""

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from trainer import controlnet_data
from trainer.bad_rows import BadRowsReport
from trainer.controlnet_args import parse_args
from utils.cli import UsageError
from utils.control_input import spec_from_document

# An asymmetric layout: class k's colour; a flip of one side only cannot match it.
COLOURS = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
MASK_DOCUMENT = {"type": "mask", "classes": 4, "channels": 1, "palette": None, "class_pixels": [1, 2, 3, 4]}


def layout(seed: int, size: int = 64) -> np.ndarray:
    """A random class layout of rectangles, with class 1 always in the left third (so it is not mirror-symmetric)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((size, size), np.uint8)
    mask[:, : size // 3] = 1
    for cls in (2, 3):
        top, left = rng.integers(0, size - 16, 2)
        mask[top:top + 16, left:left + 24] = cls
    return mask


@pytest.fixture(scope="module")
def mask_folder(tmp_path_factory):
    """A data folder as create.py + format.py lay it out: PNG images coloured by their masks, conditioning.json."""
    folder = tmp_path_factory.mktemp("aligned")
    (folder / "images").mkdir()
    (folder / "conditioning_images").mkdir()
    lines = []
    for index in range(4):
        mask = layout(index)
        Image.fromarray(COLOURS[mask]).save(folder / "images" / f"{index}.png")
        Image.fromarray(mask, mode="L").save(folder / "conditioning_images" / f"{index}.png")
        lines.append(json.dumps({"file_name": f"images/{index}.png", "text": f"scene {index}",
                                 "conditioning_image": f"conditioning_images/{index}.png"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "conditioning.json").write_text(json.dumps(MASK_DOCUMENT))
    return folder


def cli(folder, *extra):
    """The parsed command line of a run on folder."""
    return parse_args(["--pretrained_model_name_or_path", "base", "--train_data_dir", str(folder), *map(str, extra)])


def test_spec_from_the_folder_and_the_saved_document(mask_folder):
    """The type and classes come from conditioning.json; channels = classes; base and absolute folder recorded."""
    spec, document = controlnet_data.conditioning_spec(cli(mask_folder), mask_folder)
    assert (spec.type, spec.num_classes, spec.channels) == ("mask", 4, 4)
    assert document["channels"] == 4 and document["type"] == "mask" and document["classes"] == 4
    assert document["base_model"] == "base" and document["train_data_dir"] == str(mask_folder)
    assert document["class_pixels"] == [1, 2, 3, 4]  # the folder's own record is kept


def test_num_classes_flag_widens_the_one_hot(mask_folder):
    """--num_classes K > the folder's classes: K one-hot channels."""
    spec, document = controlnet_data.conditioning_spec(cli(mask_folder, "--num_classes", 6), mask_folder)
    assert spec.channels == 6 and document["channels"] == 6


@pytest.mark.parametrize("extra, fragment", [
    (["--num_classes", 3], "below the 4 classes"),
    (["--conditioning_channels", 3], "--conditioning_channels 3 does not match"),
])
def test_flags_that_contradict_the_data_are_usage_errors(mask_folder, extra, fragment):
    """A one-line UsageError naming the bad value."""
    with pytest.raises(UsageError, match=fragment):
        controlnet_data.conditioning_spec(cli(mask_folder, *extra), mask_folder)


def test_mask_type_without_classes_is_a_usage_error(tmp_path):
    """--conditioning_type mask on a folder without conditioning.json needs --num_classes."""
    with pytest.raises(UsageError, match="--num_classes"):
        controlnet_data.conditioning_spec(cli(tmp_path, "--conditioning_type", "mask"), tmp_path)
    spec, _ = controlnet_data.conditioning_spec(cli(tmp_path), tmp_path)
    assert spec.type == "image" and spec.channels == 3


def test_bands_spec_and_view_keep_four_normalised_channels(tmp_path):
    """A 4-band folder: 4 channels, each band normalised with its own offset/scale, resized and cropped."""
    document = {"type": "bands", "bands": [1, 2, 3, 4], "channels": 4,
                "normalisation": {"mode": "minmax", "offset": [0, 10, 100, 1000], "scale": [1, 10, 100, 1000],
                                  "clip": True}}
    (tmp_path / "conditioning.json").write_text(json.dumps(document))
    spec, saved = controlnet_data.conditioning_spec(cli(tmp_path), tmp_path)
    assert spec.channels == 4 and saved["channels"] == 4
    raw = np.stack([np.full((40, 48), v, np.float32) for v in (0.5, 15.0, 150.0, 1500.0)])
    view = controlnet_data.conditioning_view(raw, spec, 32, flip=False)
    assert view.shape == (4, 32, 32)
    assert torch.allclose(view, torch.full_like(view, 0.5))


def test_mask_view_is_nearest_one_hot_and_crops_like_the_image():
    """Resizing a mask invents no class; the centre crop takes the box trainer.data.crop_square takes."""
    spec = spec_from_document(MASK_DOCUMENT)
    raw = np.repeat(np.arange(4), 24)[None, :].repeat(48, axis=0)  # 48 x 96: four vertical stripes
    view = controlnet_data.conditioning_view(raw, spec, 32, flip=False)
    assert view.shape == (4, 32, 32)
    assert torch.equal(view.sum(0), torch.ones(32, 32))  # one-hot everywhere: no blended class
    classes = view.argmax(0)
    from trainer.data import crop_square

    expected = crop_square(Image.fromarray(raw.astype(np.uint8)).resize((64, 32), Image.NEAREST), 32, True)
    assert torch.equal(classes, torch.from_numpy(np.asarray(expected).astype(np.int64)))


def test_a_wide_validation_image_is_cropped_as_training_crops_it(tmp_path):
    """--validation_image 96 x 48 (four stripes): the validation input is the training view (shorter side, centre
    crop), not the whole image squeezed into a square."""
    spec = spec_from_document(MASK_DOCUMENT)
    raw = np.repeat(np.arange(4), 24)[None, :].repeat(48, axis=0)
    Image.fromarray(raw.astype(np.uint8), mode="L").save(tmp_path / "wide.png")
    (validation,) = controlnet_data.validation_arrays([str(tmp_path / "wide.png")], spec, 32)
    training = controlnet_data.conditioning_view(raw, spec, 32, flip=False).numpy()
    assert np.array_equal(validation, training) and set(np.unique(validation.argmax(0))) == {1, 2}


def decoded(item) -> tuple:
    """(image as uint8 HWC, classes HW) of a dataset item."""
    image = ((item["pixel_values"] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    return image, item["conditioning_pixel_values"].argmax(0).numpy()


def test_image_and_mask_stay_aligned_through_resize_and_flips(mask_folder):
    """Over several epochs every item's image is its mask's colouring, flipped or not: a flip of one side only, or
    another resize of either, fails; and flips do happen."""
    from stand_in.tiny_model import build_tokenizer

    args = cli(mask_folder, "--random_flip", "--resolution", 32, "--image_interpolation_mode", "nearest")
    spec, _ = controlnet_data.conditioning_spec(args, mask_folder)
    dataset = controlnet_data.build_train_dataset(args, build_tokenizer(), 0, spec, mask_folder)
    flipped = 0
    for epoch in range(4):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            image, classes = decoded(dataset[index])
            assert np.array_equal(image, COLOURS[classes]), f"epoch {epoch} row {index} misaligned"
            scene = Image.fromarray(layout(int(dataset.table[index]["text"].split()[-1])))
            original = np.asarray(scene.resize((32, 32), Image.NEAREST))
            flipped += int(np.array_equal(classes, original[:, ::-1]))
    assert 0 < flipped < 16


def test_the_flip_is_drawn_where_the_image_transform_draws_it(mask_folder):
    """The same (seed, epoch, row) flips as trainer.data's own transform would: cached and uncached runs agree."""
    from stand_in.tiny_model import build_tokenizer
    from trainer.data import make_image_transform, pick_caption

    args = cli(mask_folder, "--random_flip", "--resolution", 64)
    spec, _ = controlnet_data.conditioning_spec(args, mask_folder)
    dataset = controlnet_data.build_train_dataset(args, build_tokenizer(), 7, spec, mask_folder)
    plain = make_image_transform(64, True, True, "bilinear")
    dataset.set_epoch(3)
    for index in range(len(dataset)):
        rng = random.Random(f"7:3:{index}")
        row = dataset.table[index]
        pick_caption(row["text"], "text", rng)
        assert torch.equal(dataset[index]["pixel_values"], plain(row["image"], rng))


@pytest.mark.parametrize("proportion", ["0", "1"])
def test_proportion_empty_prompts_gives_the_empty_prompt(mask_folder, proportion):
    """--proportion_empty_prompts 1: every ControlNet row's caption is the empty prompt (its conditioning stays);
    the default 0: none."""
    from stand_in.tiny_model import build_tokenizer
    from trainer.data import tokenize

    args = cli(mask_folder, "--resolution", 16, "--proportion_empty_prompts", proportion)
    spec, _ = controlnet_data.conditioning_spec(args, mask_folder)
    tokenizer = build_tokenizer()
    dataset = controlnet_data.build_train_dataset(args, tokenizer, 0, spec, mask_folder)
    empty = tokenize(tokenizer, [""])[0]
    items = [dataset[i] for i in range(len(dataset))]
    assert {torch.equal(item["input_ids"], empty) for item in items} == {proportion == "1"}
    assert all(item["conditioning_pixel_values"].shape == (4, 16, 16) for item in items)


class CacheRows:
    """What CachedWithConditioning reads of a latent cache: row(index) -> (item, view), an epoch and a length."""

    def __init__(self, views):
        """views: the view each row draws (1: the flipped image)."""
        self.views, self.epoch = views, None

    def __len__(self):
        """Rows."""
        return len(self.views)

    def set_epoch(self, epoch):
        """Record the epoch passed on."""
        self.epoch = epoch

    def row(self, index):
        """A latent-like item and the row's view."""
        return {"latent_mean": torch.zeros(4, 2, 2)}, self.views[index]


def test_cached_rows_get_their_conditioning_in_the_cached_view(mask_folder):
    """With cached latents the conditioning follows the cache's view: flipped exactly for view 1."""
    from trainer.data import load_raw_dataset

    spec, _ = controlnet_data.conditioning_spec(cli(mask_folder), mask_folder)
    table = load_raw_dataset(None, None, str(mask_folder), None)
    reader = controlnet_data.ConditioningReader(spec, mask_folder, 64)
    wrapped = controlnet_data.CachedWithConditioning(CacheRows([0, 1, 0, 1]), table, "conditioning_image", reader)
    wrapped.set_epoch(5)
    assert wrapped.cached.epoch == 5 and len(wrapped) == 4
    for index in range(4):
        item = wrapped[index]
        unflipped = reader.view(table[index]["conditioning_image"], False)
        expected = unflipped.flip(-1) if index % 2 else unflipped
        assert torch.equal(item["conditioning_pixel_values"], expected) and "latent_mean" in item


def test_conditioning_cells_as_bytes_and_paths(mask_folder):
    """A dataset's {bytes, path} cell reads like the file itself; a cell that is neither fails with its value."""
    spec, _ = controlnet_data.conditioning_spec(cli(mask_folder), mask_folder)
    reader = controlnet_data.ConditioningReader(spec, mask_folder, 64)
    path = "conditioning_images/1.png"
    from_bytes = reader.view({"bytes": (mask_folder / path).read_bytes(), "path": None}, False)
    assert torch.equal(from_bytes, reader.view(path, False))
    with pytest.raises(ValueError, match="neither"):
        reader.view(None, False)


def test_missing_conditioning_file_is_one_line(mask_folder, tmp_path):
    """check_conditioning_files names the line and the missing file."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "t",
                                                       "conditioning_image": "c/missing.png"}) + "\n")
    with pytest.raises(UsageError, match="metadata.jsonl:1 names conditioning 'c/missing.png'"):
        controlnet_data.check_conditioning_files(cli(broken))
    controlnet_data.check_conditioning_files(cli(mask_folder))


@pytest.mark.parametrize("value", ["../outside.png", "/etc/hostname"])
def test_conditioning_paths_out_of_the_folder_are_refused(tmp_path, value):
    """An absolute path or one climbing out of the data folder: one line naming it."""
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "t",
                                                         "conditioning_image": value}) + "\n")
    with pytest.raises(UsageError, match=f"conditioning path '{value}' leaves the data folder"):
        controlnet_data.check_conditioning_files(cli(tmp_path))


@pytest.fixture()
def folder_with_bad_rows(mask_folder, tmp_path):
    """mask_folder with row 1's conditioning file corrupt (not a PNG), row 2's holding a class beyond the 4 and row
    3's image (not its conditioning) truncated."""
    import shutil

    folder = tmp_path / "bad"
    shutil.copytree(mask_folder, folder)
    (folder / "conditioning_images" / "1.png").write_bytes(b"not a png at all")
    image = (folder / "images" / "3.png").read_bytes()
    (folder / "images" / "3.png").write_bytes(image[:len(image) // 2])
    Image.fromarray(np.full((64, 64), 9, np.uint8), mode="L").save(folder / "conditioning_images" / "2.png")
    return folder


def test_bad_conditioning_rows_are_recorded_and_replaced_by_the_next_readable_row(folder_with_bad_rows):
    """No crash, no silent skip: through a DataLoader worker, a row whose conditioning is corrupt or holds a class
    out of range, or whose image is truncated, yields the next readable row's item, and all three bad rows reach
    the main process's one record."""
    from stand_in.tiny_model import build_tokenizer

    args = cli(folder_with_bad_rows, "--resolution", 32)
    spec, _ = controlnet_data.conditioning_spec(args, folder_with_bad_rows)
    dataset = controlnet_data.build_train_dataset(args, build_tokenizer(), 0, spec, folder_with_bad_rows)
    files = [dataset.cell(row) for row in range(4)]
    bad = sorted(files.index(f"conditioning_images/{n}.png") for n in (1, 2, 3))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1, collate_fn=controlnet_data.collate)
    batch = next(iter(loader))
    assert dataset.bad_rows.flagged() == bad
    for row in bad:
        stand_in = next(r for r in range(row + 1, row + 5) if r % 4 not in bad) % 4
        assert torch.equal(batch["conditioning_pixel_values"][row], batch["conditioning_pixel_values"][stand_in])
        assert torch.equal(batch["pixel_values"][row], batch["pixel_values"][stand_in])


def test_bad_rows_report_names_each_row_file_and_reason(folder_with_bad_rows, tmp_path):
    """bad_rows.json: the count, each bad row with its file (the image's when the image is what failed) and the
    reader's complaint; a resumed run keeps the rows recorded before it, a fresh one starts empty."""
    from accelerate import Accelerator

    from stand_in.tiny_model import build_tokenizer

    args = cli(folder_with_bad_rows, "--resolution", 32)
    spec, _ = controlnet_data.conditioning_spec(args, folder_with_bad_rows)
    dataset = controlnet_data.build_train_dataset(args, build_tokenizer(), 0, spec, folder_with_bad_rows)
    for index in range(len(dataset)):
        dataset[index]
    report = BadRowsReport(dataset, tmp_path / "out", 2)
    report.write(Accelerator(cpu=True), final=True)
    written = json.loads((tmp_path / "out" / "bad_rows.json").read_text())
    assert written["count"] == 3 and written["by_reason"] == {"bad_conditioning_image": 2, "truncated": 1}
    details = {entry["file"]: entry["detail"] for entry in written["rows"]}
    assert "cannot read conditioning file" in details["conditioning_images/1.png"]
    assert "class 9 is outside 0..3" in details["conditioning_images/2.png"]
    assert "image file is truncated" in details["images/3.png"]
    again = controlnet_data.build_train_dataset(args, build_tokenizer(), 0, spec, folder_with_bad_rows)
    met_by_the_probe = again.bad_rows.flagged()
    BadRowsReport(again, tmp_path / "out", 2).restore(resumed=False)
    assert again.bad_rows.flagged() == met_by_the_probe
    BadRowsReport(again, tmp_path / "out", 2).restore(resumed=True)
    assert again.bad_rows.flagged() == dataset.bad_rows.flagged()
