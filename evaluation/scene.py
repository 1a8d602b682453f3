"""Scene accuracy: does a generated image show the scene class its caption's row belongs to?

Each held-out row gets a class, from RSICD's file-name prefix (`rsicd_images/airport_1.jpg` -> airport; in a create.py
folder, the source name metadata.jsonl keeps as source_file) or from a column the user names; rows without one
(RSICD's numeric names) are left out of this figure, counted, listed and explained.
A scikit-learn logistic regression over image features (evaluate.py uses the FID Inception pool features it
computes anyway, so the figure costs no extra forward pass) is fitted and scored in two directions:
  - train on generated, test on real (`scene_accuracy`): the Txt2Img-MHN "zero-shot OA" direction, the one papers
    quote. It asks whether the generated images carry enough of each class to recognise real ones.
  - train on real, test on generated (`scene_accuracy_real_trained`): a classifier of real scenes judges each
    generated image. It is the direction a reader expects from "is this a pond?", and it is reported beside.
`scene_accuracy_real` is the same classifier's cross-validated accuracy on the real held-out images alone: the
ceiling either direction could reach with these features and this N. `chance` is the accuracy of always answering
the most frequent class (1/classes when they are balanced).
"""

import re
import warnings
from collections import Counter
from pathlib import PurePosixPath
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

# The class is the shortest prefix (from a letter) before "_<digit>": airport_1, farmland_2009_00 (NAIP tiles named by
# year and cell), storage_tank_001 (NWPU-RESISC45); RSICD's numeric names (00012.jpg) have none.
CLASS_NAME_PATTERN = re.compile(r"^(?P<scene>[A-Za-z][A-Za-z0-9 _-]*?)_\d")
CV_FOLDS = 5
MAX_ITER = 2000
REASON_NO_CLASS = "no_class"
# Why a row has no class (EvalRow.no_class), in the words a skipped figure's report gives.
NO_CLASS_WHY = {
    "create_name": "file names are create.py's image_NNNNNN and metadata.jsonl has no source_file (remake the folder "
                   "with this version's create.py and format.py, or give --class_column)",
    "no_name": "the source gives no file name (give --class_column)",
    "no_prefix": "file names have no <class>_<digits> prefix",
    "empty_cell": "the --class_column cell is empty",
}
SCENE_CLASSIFIER = ("scikit-learn StandardScaler (fitted on the real images' features) + LogisticRegression (lbfgs, "
                    "multinomial) on the 2048-d FID Inception pool features; answers within 1e-6 in probability go "
                    "to the most frequent training class")
# Predicted probabilities closer than this are solver noise, not evidence: a classifier fitted on images that do not
# differ (a caption-blind model drawing every caption from one seed) then answers one class and scores chance.
PROBABILITY_TIE = 1e-6


class FeatureRecorder(nn.Module):
    """The FID feature extractor, keeping a copy of every batch's features, so the scene classifier reuses the pool
    features FID computes (evaluate.py feeds real images first, then generated: take() between them)."""

    def __init__(self, extractor: nn.Module):
        """extractor: the module FID calls on each uint8 batch; its num_features is passed on to torchmetrics."""
        super().__init__()
        self.extractor = extractor
        self.num_features = extractor.num_features
        self.batches: List[np.ndarray] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features of a batch, recorded as float64 on the CPU."""
        features = self.extractor(images)
        self.batches.append(features.detach().double().cpu().numpy().reshape(len(features), -1))
        return features

    def take(self) -> np.ndarray:
        """All features recorded since the last take(), one row per image, in the order fed."""
        batches, self.batches = self.batches, []
        return np.concatenate(batches) if batches else np.zeros((0, int(self.num_features)))


def class_from_filename(name: Optional[str]) -> Optional[str]:
    """RSICD's rule: `rsicd_images/airport_1.jpg` -> 'airport', `farmland_2009_00.jpg` -> 'farmland'; a stem with no
    `<class>_<digits>` start -> None."""
    if not name:
        return None
    match = CLASS_NAME_PATTERN.match(PurePosixPath(str(name).replace("\\", "/")).stem)
    return match.group("scene").lower() if match else None


def class_from_value(value) -> Optional[str]:
    """A --class_column cell as a class name; empty or missing -> None."""
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def make_classifier(seed: int):
    """Multinomial logistic regression (scikit-learn), deterministic for a seed."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=MAX_ITER, random_state=seed)


def predict(classifier, x: np.ndarray, train_y: np.ndarray) -> np.ndarray:
    """The classifier's answers; where classes tie within PROBABILITY_TIE, the most frequent training class."""
    probabilities = classifier.predict_proba(x)
    _, counts = np.unique(train_y, return_counts=True)  # in classifier.classes_'s order: both are sorted
    # rank: training frequency first, then the sorted order (earlier is preferred)
    preference = (counts * len(counts) - np.arange(len(counts))).astype(float)
    tied = probabilities >= probabilities.max(axis=1, keepdims=True) - PROBABILITY_TIE
    return classifier.classes_[np.argmax(np.where(tied, preference, -np.inf), axis=1)]


def fit_and_score(train_x: np.ndarray, train_y: Sequence[str], test_x: np.ndarray, test_y: Sequence[str],
                  seed: int = 0, reference: Optional[np.ndarray] = None) -> float:
    """Accuracy on (test_x, test_y) of a classifier fitted on (train_x, train_y); 0 right when one class is seen.

    Features are standardised with reference's statistics (default: train_x's). Standardising on near-identical
    generated features would blow their float noise (batch-size rounding in the Inception pass) up to unit variance."""
    from sklearn.preprocessing import StandardScaler

    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    classes = np.unique(train_y)
    if len(classes) < 2:  # nothing to fit: the only answer is that one class
        return float(np.mean(test_y == classes[0]))
    scaler = StandardScaler().fit(train_x if reference is None else reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence notices on tiny N; the figure and its N say what matters
        classifier = make_classifier(seed).fit(scaler.transform(train_x), train_y)
    return float(np.mean(predict(classifier, scaler.transform(test_x), train_y) == test_y))


def cross_validated_accuracy(x: np.ndarray, y: Sequence[str], seed: int = 0) -> tuple:
    """Accuracy of out-of-fold predictions over stratified folds (at most CV_FOLDS) and the number of folds;
    (None, 0) when no class has two rows, so no fold could hold a class in both its halves."""
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(y)
    _, counts = np.unique(y, return_counts=True)
    if counts.max() < 2:
        return None, 0
    folds = int(min(CV_FOLDS, counts.max()))
    correct = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a class with fewer rows than folds: it is missing from some training folds
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        for train, test in splitter.split(x, y):
            correct += fit_and_score(x[train], y[train], x[test], y[test], seed) * len(test)
    return correct / len(y), folds


def chance_accuracy(y: Sequence[str]) -> float:
    """Accuracy of always answering the most frequent class."""
    _, counts = np.unique(np.asarray(y), return_counts=True)
    return float(counts.max() / counts.sum())


def scene_figures(real: np.ndarray, generated: np.ndarray, classes: Sequence[str], seed: int = 0) -> dict:
    """Both directions, the real ceiling and chance, for rows whose real and generated features share an index."""
    y = np.asarray(classes)
    names, counts = np.unique(y, return_counts=True)
    ceiling, folds = cross_validated_accuracy(real, y, seed)
    return {
        # both directions on the real scenes' scale (see fit_and_score)
        "scene_accuracy": fit_and_score(generated, y, real, y, seed, reference=real),
        "scene_accuracy_real_trained": fit_and_score(real, y, generated, y, seed, reference=real),
        "scene_accuracy_real": ceiling,
        "chance": chance_accuracy(y),
        "num_classes": len(names),
        "class_counts": {str(n): int(c) for n, c in zip(names, counts)},
        # A class with one row cannot be both fitted and tested in cross-validation: the ceiling misses it.
        "classes_with_one_row": [str(n) for n, c in zip(names, counts) if c < 2],
        "cv_folds": folds,
    }


def row_count(count: int) -> str:
    """'1 row', '3 rows'."""
    return f"{count} row{'s' * (count != 1)}"


def no_class_words(why: Dict[str, int]) -> str:
    """Why rows have no class, each reason with its row count."""
    return "; ".join(f"{NO_CLASS_WHY.get(key, key)} ({row_count(count)})" for key, count in why.items())


def skip_reason(classes: Sequence[str], rows: int, why: Dict[str, int]) -> Optional[str]:
    """Why the figure cannot be computed (no class, or only one, among the rows), in plain words; None if it can."""
    if not classes:
        return f"no row has a scene class: {no_class_words(why)}"
    names, counts = np.unique(classes, return_counts=True)
    if len(names) > 1:
        return None
    left = sum(why.values())
    return (f"only one scene class among the evaluated rows ({names[0]}: {row_count(int(counts[0]))}); it needs at "
            "least 2"
            + (f". {left} of {rows} rows have no class: {no_class_words(why)}" if left else ""))


def scene_report(rows: Sequence, real: np.ndarray, generated: np.ndarray, class_source: str, seed: int = 0) -> dict:
    """The report's scene section: figures over the rows (EvalRows, in feature order) with a class, and the rows
    left out, counted, listed and explained."""
    keep = [i for i, row in enumerate(rows) if row.scene]
    left_out = [row for row in rows if not row.scene]
    why = dict(Counter(row.no_class or REASON_NO_CLASS for row in left_out))
    section = {"num_samples": len(keep), "class_source": class_source,
               "left_out": {"count": len(left_out), "reason": REASON_NO_CLASS, "rows": [r.number for r in left_out],
                            "why": why}}
    classes = [rows[i].scene for i in keep]
    skipped = skip_reason(classes, len(rows), why)
    if skipped:
        section["skipped"] = skipped
        return section
    section.update(scene_figures(np.asarray(real)[keep], np.asarray(generated)[keep], classes, seed))
    return section


def class_source(class_column: Optional[str]) -> str:
    """How classes were found, in words for the report."""
    if class_column:
        return f"column {class_column!r}"
    return ("file-name prefix (RSICD: rsicd_images/<class>_<n>.jpg; a create.py folder: metadata.jsonl's "
            "source_file); names without one have no class")


def directions_note() -> List[str]:
    """What each accuracy in the report means (written into eval_report.json beside the figures)."""
    return [
        "scene_accuracy: logistic regression trained on the generated images' Inception pool features (label: "
        "the class of the caption's row), tested on the real held-out images (Txt2Img-MHN's zero-shot OA direction)",
        "scene_accuracy_real_trained: the same classifier trained on the real images, tested on the generated ones",
        "scene_accuracy_real: cross-validated accuracy on the real images alone, the ceiling for these features "
        "and this N",
        "chance: accuracy of always answering the most frequent class",
    ]


def scene_summary(section: dict) -> str:
    """One log line: both directions, the real ceiling and chance, with N and the class count."""
    if "skipped" in section:
        return f"scene accuracy skipped: {section['skipped']}"
    ceiling = section["scene_accuracy_real"]
    return (f"scene accuracy (N={section['num_samples']}, {section['num_classes']} classes): "
            f"{section['scene_accuracy']:.3f} trained on generated / tested on real, "
            f"{section['scene_accuracy_real_trained']:.3f} trained on real / tested on generated; "
            f"real images {'n/a' if ceiling is None else f'{ceiling:.3f}'} (ceiling), chance {section['chance']:.3f}"
            f"; {section['left_out']['count']} row(s) without a class left out")
