"""Scene accuracy: classes from file names (the rows carry them, see test_evaluation_data), known answers of the
classifier, left-out rows reported."""

import numpy as np
import pytest
import torch

from evaluation.metrics import FeatureVectors, make_fid
from evaluation.data import EvalRow
from evaluation.scene import (FeatureRecorder, chance_accuracy, class_from_filename, cross_validated_accuracy,
                              fit_and_score, scene_figures, scene_report, scene_summary)

CLASSES = ("airport", "beach", "forest", "pond", "river")


def separable(per_class: int, seed: int, dims: int = 16, spread: float = 0.1) -> tuple:
    """Features clustered tightly around one far-apart centre per class, and their labels."""
    rng = np.random.default_rng(seed)
    centres = np.eye(len(CLASSES), dims) * 10
    labels = np.repeat(CLASSES, per_class)
    features = centres[np.repeat(np.arange(len(CLASSES)), per_class)] + rng.normal(0, spread, (len(labels), dims))
    return features, labels


@pytest.mark.parametrize("name,expected", [
    ("rsicd_images/airport_1.jpg", "airport"),
    ("denseresidential_120.jpg", "denseresidential"),
    ("rsicd_images/storagetanks_7.png", "storagetanks"),
    ("Pond_3.JPG", "pond"),
    ("rsicd_images\\bridge_2.jpg", "bridge"),
    # the class is the prefix before the first "_" followed by digits, whatever follows (the NAIP sample's names)
    ("rsicd_images/farmland_2009_00.jpg", "farmland"),
    ("farmland_2009_00.jpg", "farmland"),
    ("airport_1_b.jpg", "airport"),
    ("storage_tank_001.jpg", "storage_tank"),  # NWPU-RESISC45's names: an underscore inside the class
    ("00123.jpg", None),
    ("2009_00.jpg", None),
    ("airport_x.jpg", None),
    ("rsicd_images/00012.jpg", None),
    ("rsicd_images/12.jpg", None),
    ("rsicd_images/airport.jpg", None),
    ("_5.jpg", None),
    ("", None),
    (None, None),
])
def test_class_from_rsicd_file_names(name, expected):
    assert class_from_filename(name) == expected


def test_separable_features_give_one_in_every_direction():
    real, labels = separable(6, seed=0)
    generated, _ = separable(6, seed=1)
    figures = scene_figures(real, generated, labels)
    assert figures["scene_accuracy"] == 1.0
    assert figures["scene_accuracy_real_trained"] == 1.0
    assert figures["scene_accuracy_real"] == 1.0
    assert figures["chance"] == pytest.approx(1 / len(CLASSES))
    assert figures["num_classes"] == len(CLASSES)
    assert figures["class_counts"] == {name: 6 for name in CLASSES}


def test_shuffled_labels_give_about_chance():
    real, labels = separable(40, seed=0)
    generated, _ = separable(40, seed=1)
    shuffled = np.random.default_rng(2).permutation(labels)
    # Generated images that do not show their caption's class: trained on them, the classifier learns nothing real.
    accuracy = fit_and_score(generated, shuffled, real, labels)
    assert abs(accuracy - 0.2) < 0.08
    ceiling, folds = cross_validated_accuracy(real, shuffled)
    assert abs(ceiling - 0.2) < 0.08 and folds == 5


def test_generated_images_of_one_look_score_chance():
    real, labels = separable(8, seed=0)
    noise = np.random.default_rng(3).normal(0, 1, real.shape)  # an untrained model: noise whatever the caption
    figures = scene_figures(real, noise, labels)
    assert figures["scene_accuracy_real_trained"] <= 0.4
    assert figures["scene_accuracy_real"] == 1.0


def test_one_image_for_every_caption_scores_chance_exactly_despite_float_noise():
    """A caption-blind model drawing every caption from one seed (evaluate.py --shared_seed) gives one image; the
    Inception pass adds ~1e-6 of rounding noise that depends on the batch. Standardised on those features alone,
    the noise became the signal and the demo's base scored 0.3; on the real scale with ties, exactly chance."""
    real, labels = separable(8, seed=0, dims=64)
    image = np.random.default_rng(4).normal(5, 3, (1, real.shape[1]))
    rounding = np.random.default_rng(5).normal(0, 1e-6, real.shape) * np.abs(image)
    figures = scene_figures(real, image + rounding, labels)
    assert figures["scene_accuracy"] == figures["chance"] == 0.2
    assert figures["scene_accuracy_real_trained"] == 0.2  # every generated image judged as the same one class


def test_chance_is_the_most_frequent_class():
    assert chance_accuracy(["a", "a", "a", "b"]) == 0.75
    assert chance_accuracy(["a", "b", "c", "d"]) == 0.25


def rows_of(scenes, why=None) -> list:
    """EvalRows numbered from 1 with these classes; a row without one gets the reason why (default no_prefix)."""
    return [EvalRow(n, "a caption", None, scene, None if scene else (why or "no_prefix"))
            for n, scene in enumerate(scenes, start=1)]


def test_rows_without_a_class_are_left_out_counted_and_listed():
    real, labels = separable(4, seed=0)
    real = np.vstack([real, np.zeros((2, real.shape[1]))])
    rows = rows_of([str(label) for label in labels] + [None, None])
    section = scene_report(rows, real, real, "file names")
    assert section["num_samples"] == len(labels)
    assert section["left_out"] == {"count": 2, "reason": "no_class", "rows": [len(labels) + 1, len(labels) + 2],
                                   "why": {"no_prefix": 2}}
    assert section["scene_accuracy"] == 1.0 and section["num_classes"] == len(CLASSES)


def test_a_class_with_one_row_is_reported():
    real, labels = separable(3, seed=0)
    real, labels = np.vstack([real, real[:1] + 50]), np.append(labels, "lonely")
    figures = scene_figures(real, real, labels)
    assert figures["classes_with_one_row"] == ["lonely"]
    assert figures["num_classes"] == len(CLASSES) + 1
    assert figures["scene_accuracy_real"] < 1.0  # the lonely row is never in its own training fold


def test_fewer_than_two_classes_is_skipped_with_a_reason():
    features = np.zeros((3, 4))
    section = scene_report(rows_of(["pond", None, "pond"]), features, features, "file names")
    assert "scene_accuracy" not in section
    assert section["skipped"] == ("only one scene class among the evaluated rows (pond: 2 rows); it needs at least "
                                  "2. 1 of 3 rows have no class: file names have no <class>_<digits> prefix "
                                  "(1 row)")
    assert section["left_out"]["rows"] == [2]


def test_a_create_folder_without_source_files_says_so():
    """metadata.jsonl from a create.py folder made before source_file: every name is image_NNNNNN."""
    features = np.zeros((3, 4))
    section = scene_report(rows_of([None] * 3, "create_name"), features, features, "file names")
    assert section["skipped"] == ("no row has a scene class: file names are create.py's image_NNNNNN and "
                                  "metadata.jsonl has no source_file (remake the folder with this version's "
                                  "create.py and format.py, or give --class_column) (3 rows)")
    assert scene_summary(section) == f"scene accuracy skipped: {section['skipped']}"


def test_no_class_with_two_rows_has_no_ceiling():
    features = np.eye(3)
    figures = scene_figures(features, features, ["a", "b", "c"])
    assert figures["scene_accuracy_real"] is None and figures["cv_folds"] == 0


def test_recorder_keeps_the_features_fid_computes_in_order():
    recorder = FeatureRecorder(FeatureVectors(3))
    fid = make_fid(recorder)
    real, fake = torch.arange(12.).reshape(4, 3), -torch.arange(6.).reshape(2, 3)
    fid.update(real[:2], real=True)
    fid.update(real[2:], real=True)
    np.testing.assert_array_equal(recorder.take(), real.numpy())
    fid.update(fake, real=False)
    np.testing.assert_array_equal(recorder.take(), fake.numpy())
    assert recorder.take().shape == (0, 3)
    assert float(fid.real_features_num_samples) == 4  # FID itself still saw every image
