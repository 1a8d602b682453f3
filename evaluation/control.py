"""Control fidelity: does a ControlNet's image obey its conditioning?

Held-out rows of a create.py + format.py folder carry a conditioning file (metadata.jsonl's conditioning_image). Each
row is drawn twice with its own caption and seed: with its own conditioning, and with another row's (a seeded
derangement, so no row keeps its own: the floor, what caption and seed alone explain). Both are scored against the
row's own conditioning:
- masks: a per-pixel segmenter trained offline on the real training pairs (the folder the ControlNet was trained on,
  from its conditioning.json's train_data_dir, or --control_train_dir) labels the generated images, and mIoU and pixel
  accuracy compare its labels with the input masks (control_miou). The same segmenter on the real held-out images
  gives the ceiling (control_miou_real), on the images drawn from shuffled masks the floor (control_miou_shuffled).
- bands and images: PSNR and SSIM of the generated image against the real target (torchmetrics), and the floor.
"""

import json
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from evaluation.data import BadRow, EvalRow
from utils.cli import UsageError
from utils.constants import BAD_CONDITIONING_REASON, CONDITIONING_KEY, METADATA_FILENAME
from utils.control_input import ControlInputError, ControlSpec, read_raw

SHUFFLED_DIRNAME = "generated_shuffled"
REASON_NO_CONDITIONING = "no_conditioning_image"
REASON_BAD_CONDITIONING = BAD_CONDITIONING_REASON
# Pixels the segmenter is fitted on, drawn at random (seeded) from every training pair: enough for a dozen features,
# few enough for seconds on a CPU at 512 px.
SEGMENTER_PIXELS = 200_000
SEGMENTER_ITERATIONS = 100
SEGMENTER = ("scikit-learn HistGradientBoostingClassifier per pixel on 12 features (RGB, RGB means over two windows of "
             "about 1/16 and 1/6 of the side, RGB standard deviation over the smaller), fitted on up to "
             f"{SEGMENTER_PIXELS:,} pixels of the real training pairs at the evaluation resolution")
SHUFFLE_NOTE = {"mask": "each row drawn with its caption and seed but another row's conditioning (a seeded "
                         "derangement), segmented and scored against its own mask: the floor",
                "other": "each row drawn with its caption and seed but another row's conditioning (a seeded "
                         "derangement), scored against its own real image: the floor"}


# --- pure metrics


def confusion(predicted: np.ndarray, truth: np.ndarray, classes: int) -> np.ndarray:
    """(classes, classes) pixel counts, rows the true class and columns the predicted one."""
    index = truth.astype(np.int64).ravel() * classes + predicted.astype(np.int64).ravel()
    return np.bincount(index, minlength=classes * classes).reshape(classes, classes)


def iou_figures(matrix: np.ndarray) -> dict:
    """mIoU over the classes present in the truth or the predictions, per-class IoU (None: absent from both) and
    pixel accuracy, from a confusion matrix summed over all images."""
    hits = np.diag(matrix).astype(np.float64)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - hits
    present = union > 0
    per_class = [float(h / u) if u > 0 else None for h, u in zip(hits, union)]
    total = matrix.sum()
    return {"miou": float(np.mean(hits[present] / union[present])) if present.any() else None,
            "pixel_accuracy": float(hits.sum() / total) if total else None, "per_class_iou": per_class}


def derangement(count: int, seed: int) -> List[int]:
    """A seeded permutation of range(count) leaving no index in place (count >= 2): a random cycle."""
    order = np.random.default_rng(seed).permutation(count)
    shuffled = [0] * count
    for position, index in enumerate(order):
        shuffled[int(index)] = int(order[(position + 1) % count])
    return shuffled


def window(side: int, fraction: float, smallest: int) -> int:
    """An odd window width of about fraction x side, at least smallest."""
    width = max(smallest, int(round(side * fraction)))
    return width + 1 - width % 2


def pixel_features(image: np.ndarray) -> np.ndarray:
    """(H*W, 12) float32 features of an (H, W, 3) uint8 image: colour, local means at two scales, local spread."""
    from scipy.ndimage import uniform_filter

    rgb = image.astype(np.float32) / 255.0
    small, large = window(image.shape[0], 1 / 16, 3), window(image.shape[0], 1 / 6, 5)
    mean_small = uniform_filter(rgb, size=(small, small, 1), mode="reflect")
    mean_large = uniform_filter(rgb, size=(large, large, 1), mode="reflect")
    spread = np.sqrt(np.maximum(uniform_filter(rgb ** 2, size=(small, small, 1), mode="reflect") - mean_small ** 2, 0))
    return np.concatenate([rgb, mean_small, mean_large, spread], axis=-1).reshape(-1, 12)


def fit_segmenter(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], seed: int = 0,
                  pixels: int = SEGMENTER_PIXELS):
    """A per-pixel classifier fitted on a seeded sample of the pairs' pixels."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    features = np.concatenate([pixel_features(image) for image in images])
    labels = np.concatenate([np.asarray(mask).ravel() for mask in masks])
    if len(labels) > pixels:
        keep = np.random.default_rng(seed).choice(len(labels), pixels, replace=False)
        features, labels = features[keep], labels[keep]
    classifier = HistGradientBoostingClassifier(max_iter=SEGMENTER_ITERATIONS, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return classifier.fit(features, labels)


def segment(classifier, image: np.ndarray) -> np.ndarray:
    """(H, W) class labels of an (H, W, 3) uint8 image."""
    if len(classifier.classes_) == 1:
        return np.full(image.shape[:2], classifier.classes_[0])
    return classifier.predict(pixel_features(image)).reshape(image.shape[:2])


def mask_figures(classifier, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], classes: int) -> dict:
    """mIoU, pixel accuracy and per-class IoU of the segmenter's labels of images against masks."""
    matrix = sum(confusion(segment(classifier, image), mask, classes) for image, mask in zip(images, masks))
    return iou_figures(np.asarray(matrix))


def fidelity(generated: Sequence[np.ndarray], real: Sequence[np.ndarray]) -> dict:
    """Mean per-image PSNR (dB) and SSIM of generated against real (H, W, 3) uint8 images, both on 0..1."""
    import torch

    from evaluation.fidelity_compat import register_torch_fidelity

    register_torch_fidelity()
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    def batch(images):
        return torch.from_numpy(np.stack(images).astype(np.float32) / 255.0).permute(0, 3, 1, 2)

    preds, target = batch(generated), batch(real)
    psnr = peak_signal_noise_ratio(preds, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(preds, target, data_range=1.0, reduction="none")
    return {"psnr": float(psnr.mean()), "ssim": float(ssim.mean())}


# --- rows, conditioning and the segmenter's training pairs


def conditioning_views(rows: Sequence[EvalRow], spec: ControlSpec, resolution: int) -> Tuple[list, list, dict]:
    """(usable rows, BadRows, number -> prepared (C, H, W) input at the resolution) of rows' conditioning files."""
    from utils.control_input import control_view

    good, bad, views = [], [], {}
    for row in rows:
        if row.conditioning is None:
            bad.append(BadRow(row.number, REASON_NO_CONDITIONING, f"metadata.jsonl names no {CONDITIONING_KEY}"))
            continue
        try:
            views[row.number] = control_view(read_raw(row.conditioning, spec), spec, resolution, resolution)
        except (ControlInputError, OSError) as err:
            bad.append(BadRow(row.number, REASON_BAD_CONDITIONING, str(err)))
            continue
        good.append(row)
    return good, bad, views


def segmenter_folder(control_train_dir: Optional[str], spec: ControlSpec) -> Path:
    """Where the segmenter's training pairs are: --control_train_dir, else the ControlNet's training folder."""
    value = control_train_dir or spec.extra.get("train_data_dir")
    if not value:
        raise UsageError("the ControlNet's conditioning.json names no train_data_dir for the segmenter's training "
                         "pairs: pass --control_train_dir (a create.py + format.py folder of masks)")
    folder = Path(value).expanduser()
    flag = "--control_train_dir" if control_train_dir else "the ControlNet's train_data_dir"
    if not (folder / METADATA_FILENAME).is_file():
        raise UsageError(f"{flag} {value} holds no {METADATA_FILENAME} (a create.py + format.py folder)")
    return folder


def training_pairs(folder: Path, spec: ControlSpec, resolution: int) -> Tuple[list, list, int]:
    """(images, class masks, lines skipped) of a folder's rows at the resolution: image centre-cropped and resized as
    evaluate.py's real images are, mask through the ControlNet's preprocessing (nearest neighbour)."""
    from diffusion_model.imaging import resize
    from utils.control_input import control_view

    images, masks, skipped = [], [], 0
    for line in (folder / METADATA_FILENAME).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            with Image.open(folder / record["file_name"]) as image:
                rgb = np.asarray(resize(image.convert("RGB"), resolution, "center_crop"))
            raw = read_raw(folder / record[CONDITIONING_KEY], spec)
            mask = control_view(raw, spec, resolution, resolution).argmax(axis=0)
        except (ValueError, KeyError, TypeError, OSError):
            skipped += 1
            continue
        images.append(rgb)
        masks.append(mask)
    return images, masks, skipped


def load_rgb(path: Path, resolution: int) -> np.ndarray:
    """An image file as (resolution, resolution, 3) uint8."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    return np.asarray(rgb if rgb.size == (resolution, resolution) else rgb.resize((resolution, resolution)))


# --- the report section


def control_figures(spec: ControlSpec, real: Sequence[np.ndarray], generated: Sequence[np.ndarray],
                    shuffled: Sequence[np.ndarray], targets: Sequence[np.ndarray], segmenter=None) -> dict:
    """The headline figures: mIoU and pixel accuracy (masks: generated, real ceiling, shuffled floor, against the
    rows' masks in targets) or PSNR and SSIM (bands, images: generated and shuffled against the real images)."""
    if spec.type == "mask":
        sets = {"": generated, "_real": real, "_shuffled": shuffled}
        figures = {suffix: mask_figures(segmenter, images, targets, spec.num_classes)
                   for suffix, images in sets.items()}
        headline = {f"control_{name}{suffix}": figures[suffix][name] for suffix in sets
                    for name in ("miou", "pixel_accuracy")}
        return {**headline, "per_class_iou": {suffix.strip("_") or "generated": figures[suffix]["per_class_iou"]
                                              for suffix in sets}}
    ours, floor = fidelity(generated, real), fidelity(shuffled, real)
    return {"control_psnr": ours["psnr"], "control_ssim": ours["ssim"], "control_psnr_shuffled": floor["psnr"],
            "control_ssim_shuffled": floor["ssim"]}


def control_summary(section: dict) -> str:
    """One log line of the control figures."""
    if "control_miou" in section:
        return ("control mIoU %.3f (pixel accuracy %.3f); real images %.3f (ceiling); shuffled conditioning %.3f "
                "(floor)" % (section["control_miou"], section["control_pixel_accuracy"], section["control_miou_real"],
                             section["control_miou_shuffled"]))
    return ("control PSNR %.2f dB, SSIM %.3f; shuffled conditioning %.2f dB, %.3f (floor)"
            % (section["control_psnr"], section["control_ssim"], section["control_psnr_shuffled"],
               section["control_ssim_shuffled"]))


def shuffled_views(rows: Sequence[EvalRow], views: Dict[int, np.ndarray], seed: int) -> Dict[int, np.ndarray]:
    """number -> another row's conditioning, by a seeded derangement of the rows."""
    others = derangement(len(rows), seed)
    return {row.number: views[rows[other].number] for row, other in zip(rows, others)}


class ControlEvaluation:
    """evaluate.py --controlnet: the ControlNet and its description, the rows' conditioning, both generations
    (own and shuffled conditioning) and the report section."""

    def __init__(self, args):
        """Check the ControlNet, and for masks the segmenter's training folder, before anything loads."""
        from inference.control import resolve_controlnet

        self.source = resolve_controlnet(args.controlnet)
        self.spec, self.scale, self.seed = self.source.spec, args.controlnet_conditioning_scale, args.seed
        self.train_dir = segmenter_folder(args.control_train_dir, self.spec) if self.spec.type == "mask" else None
        self.views: Dict[int, np.ndarray] = {}

    def select(self, rows: Sequence[EvalRow], resolution: int) -> Tuple[list, list]:
        """(rows with a usable conditioning file, BadRows for the others); keeps their prepared inputs."""
        rows, bad, self.views = conditioning_views(rows, self.spec, resolution)
        return rows, bad

    def pipeline(self, pipeline, device, dtype):
        """The base pipeline as a ControlNet pipeline."""
        from inference.control import controlnet_pipeline

        return controlnet_pipeline(pipeline, self.source, device, dtype)

    def check_settings(self, eval_dir: Path, settings: dict, overwrite: bool) -> None:
        """The shuffled images' folder must hold images of the same settings, as generated/ must."""
        from evaluation.generation import check_settings

        check_settings(eval_dir / SHUFFLED_DIRNAME, settings, overwrite)

    def generate(self, pipeline, rows: Sequence[EvalRow], eval_dir: Path, settings: dict, overwrite: bool,
                 **options) -> int:
        """Draw the missing images of both sets: generated/ (own conditioning), generated_shuffled/ (another
        row's); same captions and seeds. Returns how many were drawn."""
        from evaluation.generation import GENERATED_DIRNAME, generate_missing, missing_rows, record_settings
        from inference.control import control_batches

        record_settings(eval_dir / SHUFFLED_DIRNAME, settings, overwrite)
        drawn = 0
        for dirname, views in ((GENERATED_DIRNAME, self.views), (SHUFFLED_DIRNAME, shuffled_views(rows, self.views,
                                                                                                   self.seed))):
            pending = missing_rows(rows, eval_dir / dirname)
            drawn += generate_missing(pipeline, pending, eval_dir / dirname, **options, per_image=control_batches(
                [views[row.number] for row in pending], self.scale))
        return drawn

    def pictures(self, rows: Sequence[EvalRow]) -> list:
        """Each row's conditioning in false colour, for the sheet."""
        from utils.control_input import false_colour

        return [false_colour(self.views[row.number], self.spec) for row in rows]

    def report(self, rows: Sequence[EvalRow], eval_dir: Path, resolution: int) -> dict:
        """The control section of eval_report.json: headline figures first, then how they were made."""
        from evaluation.data import real_image
        from evaluation.generation import GENERATED_DIRNAME, image_path

        real = [np.asarray(real_image(row, resolution)) for row in rows]
        generated, shuffled = ([load_rgb(image_path(eval_dir / name, row), resolution) for row in rows]
                               for name in (GENERATED_DIRNAME, SHUFFLED_DIRNAME))
        details = {"controlnet": str(self.source.folder), "conditioning_type": self.spec.type,
                   "controlnet_conditioning_scale": self.scale, "num_samples": len(rows),
                   "shuffled": SHUFFLE_NOTE["mask" if self.spec.type == "mask" else "other"]}
        segmenter, targets = None, [self.views[row.number].argmax(axis=0) for row in rows]
        if self.spec.type == "mask":
            images, masks, skipped = training_pairs(self.train_dir, self.spec, resolution)
            if not images:
                raise UsageError(f"no usable image and mask pair in {self.train_dir} for the control segmenter")
            segmenter = fit_segmenter(images, masks, self.seed)
            details.update(segmenter=SEGMENTER, segmenter_train_dir=str(self.train_dir),
                           segmenter_train_pairs=len(images), segmenter_train_lines_skipped=skipped)
        else:
            details["fidelity"] = "torchmetrics PSNR (data range 1) and SSIM (Gaussian 11x11) per image, averaged"
        figures = control_figures(self.spec, real, generated, shuffled, targets, segmenter)
        headline = {key: value for key, value in figures.items() if key.startswith("control_")}
        return {**headline, "control_details": {**details, **{k: v for k, v in figures.items()
                                                              if k not in headline}}}
