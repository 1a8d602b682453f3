"""evaluation/control.py's pure core: confusion matrix and mIoU on known arrays, the shuffle, PSNR/SSIM, the
segmenter on scenes whose classes are colours, where its training pairs come from, and rows' conditioning."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation import control
from evaluation.data import EvalRow
from utils.cli import UsageError
from utils.control_input import ControlSpec

COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]], np.uint8)


def test_confusion_and_miou_on_known_arrays():
    truth = np.array([[0, 0], [1, 1]])
    predicted = np.array([[0, 1], [1, 1]])
    matrix = control.confusion(predicted, truth, 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    figures = control.iou_figures(matrix)
    # class 0: 1 hit / (2 true + 1 predicted - 1); class 1: 2 / (2 + 3 - 2); class 2 absent from both: left out
    assert figures["per_class_iou"] == [0.5, pytest.approx(2 / 3), None]
    assert figures["miou"] == pytest.approx((0.5 + 2 / 3) / 2) and figures["pixel_accuracy"] == 0.75


def test_a_class_only_predicted_counts_with_iou_zero():
    figures = control.iou_figures(control.confusion(np.array([2, 2]), np.array([0, 2]), 3))
    assert figures["per_class_iou"] == [0.0, None, 0.5] and figures["miou"] == 0.25


@pytest.mark.parametrize("count", [2, 3, 7])
def test_derangement_moves_every_row_and_is_seeded(count):
    shuffled = control.derangement(count, seed=5)
    assert sorted(shuffled) == list(range(count)) and all(i != j for i, j in enumerate(shuffled))
    assert shuffled == control.derangement(count, seed=5)


def test_shuffled_views_give_each_row_another_rows_conditioning():
    rows = [EvalRow(n, "c", None) for n in (3, 5, 9)]
    views = {3: "a", 5: "b", 9: "c"}
    shuffled = control.shuffled_views(rows, views, seed=0)
    assert sorted(shuffled.values()) == ["a", "b", "c"] and all(shuffled[n] != views[n] for n in views)


def test_fidelity_psnr_and_ssim_on_known_images():
    real = [np.zeros((16, 16, 3), np.uint8), np.full((16, 16, 3), 200, np.uint8)]
    offset = [image + 51 for image in real]  # 0.2 off everywhere: MSE 0.04, PSNR 10 log10(1 / 0.04)
    assert control.fidelity(offset, real)["psnr"] == pytest.approx(10 * np.log10(25), abs=1e-3)
    assert control.fidelity(real, real)["ssim"] == pytest.approx(1.0)
    assert control.fidelity(offset, real)["ssim"] < 1.0


def layout(seed: int, size: int = 24) -> tuple:
    """(image, mask): three vertical bands of colour-coded classes with random edges, plus noise."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.integers(4, size - 4, 2))
    mask = np.zeros((size, size), np.int64)
    mask[:, cuts[0]:] = 1
    mask[:, cuts[1]:] = 2
    image = np.clip(COLOURS[mask].astype(int) + rng.integers(-20, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    return image, mask


def test_segmenter_learns_colour_classes_and_scores_a_mismatched_mask_lower():
    pairs = [layout(seed) for seed in range(4)]
    segmenter = control.fit_segmenter([p[0] for p in pairs], [p[1] for p in pairs], seed=0)
    image, mask = layout(10)
    right = control.mask_figures(segmenter, [image], [mask], 3)
    wrong = control.mask_figures(segmenter, [image], [np.fliplr(mask)], 3)
    assert right["miou"] > 0.9 and wrong["miou"] < right["miou"] - 0.3


def test_segmenter_pairs_come_from_the_flag_else_the_controlnets_training_folder(tmp_path):
    for name in ("trained_on", "flag"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metadata.jsonl").write_text("")
    spec = ControlSpec(type="mask", num_classes=3, extra={"train_data_dir": str(tmp_path / "trained_on")})
    assert control.segmenter_folder(None, spec) == tmp_path / "trained_on"
    assert control.segmenter_folder(str(tmp_path / "flag"), spec) == tmp_path / "flag"
    with pytest.raises(UsageError, match="names no train_data_dir"):
        control.segmenter_folder(None, ControlSpec(type="mask", num_classes=3))
    with pytest.raises(UsageError, match="--control_train_dir .* holds no metadata.jsonl"):
        control.segmenter_folder(str(tmp_path), spec)


def test_rows_without_a_usable_conditioning_file_become_bad_rows(tmp_path):
    spec = ControlSpec(type="mask", num_classes=3)
    Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), mode="L").save(tmp_path / "good.png")
    Image.fromarray(np.array([[0, 7], [2, 1]], np.uint8), mode="L").save(tmp_path / "class7.png")
    rows = [EvalRow(1, "a", None, conditioning=tmp_path / "good.png"), EvalRow(2, "b", None),
            EvalRow(3, "c", None, conditioning=tmp_path / "class7.png"),
            EvalRow(4, "d", None, conditioning=tmp_path / "missing.png")]
    good, bad, views = control.conditioning_views(rows, spec, 4)
    assert [row.number for row in good] == [1] and views[1].shape == (3, 4, 4)
    assert views[1].argmax(0).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 1, 1], [2, 2, 1, 1]]
    assert [(b.number, b.reason) for b in bad] == [(2, "no_conditioning_image"), (3, "bad_conditioning_image"),
                                                   (4, "bad_conditioning_image")]


def test_training_pairs_are_aligned_at_the_evaluation_resolution_and_bad_lines_skipped(tmp_path):
    spec = ControlSpec(type="mask", num_classes=3)
    image, mask = layout(0, size=16)
    Image.fromarray(image).save(tmp_path / "img.png")
    Image.fromarray(mask.astype(np.uint8), mode="L").save(tmp_path / "mask.png")
    lines = [{"file_name": "img.png", "conditioning_image": "mask.png"}, {"file_name": "img.png"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    images, masks, skipped = control.training_pairs(Path(tmp_path), spec, 8)
    assert skipped == 1 and images[0].shape == (8, 8, 3)
    assert np.array_equal(masks[0], mask[1::2, 1::2])  # nearest neighbour: the centre pixel of each 2x2 block
