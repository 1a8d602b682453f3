"""GSD adherence: does a generated image show the ground sample distance (GSD) it was asked for?

A probe (scikit-learn, on cheap image features: colour statistics, a radial power spectrum in half-octave bands and
gradient energy at three scales) learns log2 GSD from the run's real training images at random zooms. Convention:
the centred square crop of side s / z of an image of side s whose metadata say GSD g, resized to the evaluation
resolution, is labelled g / z (zooming in makes a finer GSD; z is drawn log-uniformly in [1, PROBE_MAX_ZOOM], and
z = 1 is the whole image). GSDs are in the data folder's convention: that of the create.py image as metadata.jsonl
states it, which is what the model was conditioned on, whatever size the images are evaluated at.

Figures (each over images with a known requested GSD):
  - error_octaves: mean |log2 predicted - log2 requested|; within_half_octave: the share within 0.5 octave;
    spearman: Spearman's rho between requested and predicted GSD;
  - the sweep: each of a few held-out rows drawn at GSDs log-spaced over SWEEP_RANGE (clipped to the range the probe
    data's rows cover, which is what the model was trained on), same caption and seed; its rho per row, averaged;
  - the ceiling: the probe on the real held-out images; the floors: generations with the metadata absent (the plain
    evaluation images), and the sweep's images paired with a shuffled request (for one caption and seed, drawing
    point i with point j's GSD is exactly sweep image j, so the shuffled floor needs no more images).
"""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from diffusion_model.geo_metadata import check_value
from diffusion_model.imaging import RESAMPLE, decode_rgb
from utils.cli import UsageError

PROBE_MAX_ZOOM = 4.0
PROBE_ZOOMS_PER_IMAGE = 4
PROBE_MAX_IMAGES = 2000
SWEEP_RANGE = (0.3, 10.0)
HALF_OCTAVE = 0.5
SHUFFLES = 200
GRADIENT_SCALES = (1, 2, 4)
POWER_FLOOR = 1e-12
PROBE_DESCRIPTION = ("scikit-learn StandardScaler + RandomForestRegressor (200 trees, min 2 samples per leaf) on "
                     "colour means and spreads, half-octave radial power bands and gradient energy at 3 scales, "
                     "predicting log2 GSD")


def zoom_crop(image: Image.Image, zoom: float, resolution: int) -> Image.Image:
    """The centred square crop of side min(w, h) / zoom, resized to resolution x resolution (centred, as the
    held-out images are centre-cropped, and as a zoomed-in sensor keeps the subject of its tile)."""
    side = max(1, int(round(min(image.size) / zoom)))
    left, top = (image.size[0] - side) // 2, (image.size[1] - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((resolution, resolution), RESAMPLE)


def draw_zooms(count: int, rng: np.random.Generator, max_zoom: float = PROBE_MAX_ZOOM) -> np.ndarray:
    """count zoom factors: the first 1 (the whole image), the rest log-uniform in [1, max_zoom]."""
    zooms = 2.0 ** rng.uniform(0.0, math.log2(max_zoom), count)
    zooms[0] = 1.0
    return zooms


def band_edges(side: int) -> np.ndarray:
    """Half-octave edges of spatial frequency (cycles per pixel) from 1 / side to the corner of the spectrum."""
    return 2.0 ** np.arange(-math.log2(side), -0.5 + 1e-9, 0.5)


def radial_bands(gray: np.ndarray) -> np.ndarray:
    """log mean power of a grey image in each half-octave ring of spatial frequency (band_edges)."""
    power = np.abs(np.fft.fft2(gray - gray.mean())) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(gray.shape[0]), np.fft.fftfreq(gray.shape[1]), indexing="ij")
    radius = np.hypot(fx, fy)
    edges = band_edges(min(gray.shape))
    edges[-1] += 1e-9  # the corner itself belongs to the last ring
    bands = [power[(radius >= low) & (radius < high)] for low, high in zip(edges[:-1], edges[1:])]
    return np.log([band.mean() + POWER_FLOOR if band.size else POWER_FLOOR for band in bands])


def gradient_energy(gray: np.ndarray) -> np.ndarray:
    """log mean absolute difference between neighbouring pixels after 1x, 2x and 4x box shrinking."""
    values = []
    for scale in GRADIENT_SCALES:
        rows, cols = gray.shape[0] // scale * scale, gray.shape[1] // scale * scale
        shrunk = gray[:rows, :cols].reshape(rows // scale, scale, cols // scale, scale).mean(axis=(1, 3))
        diffs = [np.abs(np.diff(shrunk, axis=axis)).mean() if shrunk.shape[axis] > 1 else 0.0 for axis in (0, 1)]
        values.append(math.log(sum(diffs) + POWER_FLOOR))
    return np.array(values)


def image_features(image: Image.Image) -> np.ndarray:
    """The probe's features of one image: RGB means and spreads, radial power bands, gradient energy."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    gray = rgb.mean(axis=2)
    colour = np.concatenate([rgb.mean(axis=(0, 1)), rgb.std(axis=(0, 1))])
    return np.concatenate([colour, radial_bands(gray), gradient_energy(gray)])


def probe_crops(images: Sequence[Tuple[Image.Image, float]], resolution: int, seed: int = 0,
                zooms_per_image: int = PROBE_ZOOMS_PER_IMAGE) -> Tuple[list, np.ndarray]:
    """(crops, log2 GSD labels) of zoomed crops of (image, its GSD) pairs: GSD / zoom for each crop."""
    rng = np.random.default_rng(seed)
    crops, labels = [], []
    for image, gsd in images:
        for zoom in draw_zooms(zooms_per_image, rng):
            crops.append(zoom_crop(image, zoom, resolution))
            labels.append(math.log2(gsd / zoom))
    return crops, np.array(labels)


def features_array(images: Sequence[Image.Image]) -> np.ndarray:
    """The probe features of images, one row each."""
    return np.array([image_features(image) for image in images])


@torch.no_grad()
def vae_round_trip(vae, images: Sequence[Image.Image], batch_size: int = 16) -> List[Image.Image]:
    """images encoded (posterior mean) and decoded by vae: what a model drawing with that VAE could show."""
    out = []
    parameter = next(vae.parameters())
    for start in range(0, len(images), batch_size):
        batch = np.stack([np.asarray(image.convert("RGB"), np.float32) for image in images[start:start + batch_size]])
        pixels = torch.from_numpy(batch / 127.5 - 1.0).permute(0, 3, 1, 2).to(parameter.device, parameter.dtype)
        decoded = vae.decode(vae.encode(pixels).latent_dist.mode()).sample.float().clamp(-1, 1)
        arrays = ((decoded.permute(0, 2, 3, 1) + 1.0) * 127.5).round().byte().cpu().numpy()
        out += [Image.fromarray(array) for array in arrays]
    return out


def fit_probe(features: np.ndarray, labels: np.ndarray, seed: int = 0):
    """A regressor from features to log2 GSD, deterministic for a seed."""
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    forest = RandomForestRegressor(n_estimators=200, min_samples_leaf=2, random_state=seed, n_jobs=1)
    return make_pipeline(StandardScaler(), forest).fit(features, labels)


def spearman(first: Sequence[float], second: Sequence[float]) -> float:
    """Spearman's rho; 0 when either side does not vary (a model that ignores the GSD draws one image)."""
    from scipy.stats import rankdata

    a, b = rankdata(np.asarray(first, float)), rankdata(np.asarray(second, float))
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def adherence(requested_log2: Sequence[float], predicted_log2: Sequence[float]) -> dict:
    """Error in octaves (mean absolute), share within half an octave, Spearman's rho, N."""
    requested, predicted = np.asarray(requested_log2, float), np.asarray(predicted_log2, float)
    errors = np.abs(predicted - requested)
    return {"error_octaves": float(errors.mean()) if len(errors) else None,
            "within_half_octave": float((errors <= HALF_OCTAVE).mean()) if len(errors) else None,
            "spearman": spearman(requested, predicted), "num_samples": int(len(errors))}


def sweep_gsds(covered: Tuple[float, float], points: int, wanted: Tuple[float, float] = SWEEP_RANGE) -> List[float]:
    """points GSDs log-spaced over wanted clipped to covered; [] when the clipped range is empty or one value."""
    low, high = max(wanted[0], covered[0]), min(wanted[1], covered[1])
    if not low < high or points < 2:
        return []
    return [float(g) for g in np.round(2.0 ** np.linspace(math.log2(low), math.log2(high), points), 6)]


def sweep_rho(requested: Sequence[float], predicted: Dict[int, Sequence[float]]) -> Tuple[float, Dict[int, float]]:
    """The mean over rows of each row's sweep rho (requested vs predicted GSD), and each row's."""
    per_row = {row: spearman(requested, values) for row, values in predicted.items()}
    return float(np.mean(list(per_row.values()))), per_row


def shuffled_sweep_rho(requested: Sequence[float], predicted: Dict[int, Sequence[float]], seed: int = 0,
                       shuffles: int = SHUFFLES) -> float:
    """The sweep rho when each image is paired with another point's request: the mean over shuffles and rows."""
    rng = np.random.default_rng(seed)
    requested = np.asarray(requested, float)
    values = [spearman(requested[rng.permutation(len(requested))], row)
              for row in predicted.values() for _ in range(shuffles)]
    return float(np.mean(values))


def covered_range(gsds: Sequence[float]) -> Optional[Tuple[float, float]]:
    """(smallest, largest) GSD of the probe data's rows, None without any."""
    return (float(min(gsds)), float(max(gsds))) if len(gsds) else None


# --- The evaluation: plan (before loading anything), probe, generation, figures.

GSD_DIRNAME = "gsd"
ROW_PREFIX = "row_"
SWEEP_PREFIX = "sweep_"


@dataclass
class GsdPlan:
    """What the GSD section will do: the probe's rows, the GSD range they cover, the sweep, or why it is skipped."""

    probe_dir: Optional[Path]
    probe_rows: list = field(default_factory=list)
    covered: Optional[Tuple[float, float]] = None
    sweep: List[float] = field(default_factory=list)
    sweep_rows: int = 0
    skipped: Optional[str] = None

    def settings(self) -> dict:
        """What, besides the evaluation's settings, decides the GSD images' pixels (guards a resumed run)."""
        return {"gsd_sweep": self.sweep, "gsd_sweep_rows": self.sweep_rows}


def row_gsd(metadata) -> Optional[float]:
    """A row's GSD when its metadata hold a valid one, else None."""
    if not isinstance(metadata, dict) or metadata.get("gsd") is None:
        return None
    value, reason = check_value("gsd", metadata["gsd"])
    return None if reason else value


def plan_gsd(probe_dir: Optional[str], rows: Sequence, sweep_rows: int, sweep_points: int,
             limit: int = PROBE_MAX_IMAGES) -> GsdPlan:
    """Read the probe folder's metadata.jsonl (no images yet) and decide the sweep; skipped with a reason when the
    held-out rows or the probe folder have no GSD."""
    from evaluation.data import metadata_raw_rows

    if probe_dir is None:
        return GsdPlan(None, skipped="no --gsd_probe_data given")
    folder = Path(probe_dir)
    if not folder.is_dir():
        raise UsageError(f"--gsd_probe_data {probe_dir} is not a folder")
    if not any(row_gsd(row.metadata) for row in rows):
        return GsdPlan(folder, skipped="no held-out row has a gsd in its metadata (a create.py + format.py folder "
                                       "given as --data_dir carries them)")
    raw_rows, _bad = metadata_raw_rows(folder, None)
    probe_rows = [row for row in raw_rows if row_gsd(row.metadata)][:limit]
    if not probe_rows:
        raise UsageError(f"--gsd_probe_data {probe_dir}: no line of its metadata.jsonl has a gsd")
    covered = covered_range([row_gsd(row.metadata) for row in probe_rows])
    return GsdPlan(folder, probe_rows, covered, sweep_gsds(covered, sweep_points), sweep_rows)


def probe_images(raw_rows: Sequence) -> Tuple[list, int]:
    """(image, GSD) of each probe row whose image decodes, and how many did not."""
    from utils.image_errors import ImageRejected
    from evaluation.data import MAX_PIXELS

    images, failed = [], 0
    for row in raw_rows:
        try:
            images.append((decode_rgb(Path(row.image).read_bytes(), MAX_PIXELS), row_gsd(row.metadata)))
        except (OSError, ImageRejected):
            failed += 1
    return images, failed


def model_request(metadata, fields: Sequence[str]) -> dict:
    """A row's metadata as the model can take them: its fields only, valid values only, lat with lon."""
    request = {}
    for name in fields:
        value, reason = check_value(name, metadata.get(name)) if isinstance(metadata, dict) else (None, "none")
        if metadata and metadata.get(name) is not None and not reason:
            request[name] = value
    if ("lat" in request) != ("lon" in request):
        request.pop("lat", None), request.pop("lon", None)
    return request


def generate_jobs(pipeline, jobs: Sequence[tuple], **options) -> int:
    """Draw each (path, caption, seed, metadata) job not on disk yet, one pipeline call per distinct metadata; return
    how many were drawn. options: inference.pipeline.generate's keywords."""
    import json

    from evaluation.generation import save_png
    from inference.pipeline import generate

    pending = [job for job in jobs if not job[0].is_file()]
    groups: Dict[str, list] = {}
    for job in pending:
        groups.setdefault(json.dumps(job[3], sort_keys=True), []).append(job)
    for group in groups.values():
        conditioning = {"metadata": group[0][3]} if group[0][3] else None
        generate(pipeline, [job[1] for job in group], [job[2] for job in group], negative_prompt=None,
                 conditioning=conditioning, on_image=lambda index, image, g=group: save_png(image, g[index][0]),
                 **options)
    return len(pending)


def features_of(paths: Sequence[Path], resolution: int) -> np.ndarray:
    """Probe features of saved images, each at resolution x resolution."""
    from evaluation.scoring import load_generated

    return np.array([image_features(load_generated(path, resolution)) for path in paths])


def sweep_path(gsd_dir: Path, row, point: int) -> Path:
    """Where row's sweep image at point lives."""
    return gsd_dir / f"{SWEEP_PREFIX}{row.number:06d}_{point:02d}.png"


def row_jobs(rows: Sequence, gsd_dir: Path, fields: Sequence[str], seed_of) -> list:
    """One job per held-out row with a GSD: drawn with its own metadata (those the model takes)."""
    return [(gsd_dir / f"{ROW_PREFIX}{row.number:06d}.png", row.caption, seed_of(row),
             model_request(row.metadata, fields)) for row in rows]


def sweep_jobs(rows: Sequence, sweep: Sequence[float], gsd_dir: Path, fields: Sequence[str], seed_of) -> list:
    """Each sweep row drawn at every sweep GSD, its caption and seed fixed."""
    return [(sweep_path(gsd_dir, row, point), row.caption, seed_of(row), model_request({"gsd": gsd}, fields))
            for row in rows for point, gsd in enumerate(sweep)]


def trained_probe(plan: GsdPlan, resolution: int, seed: int, seen) -> Tuple[object, dict]:
    """The probe fitted on the plan's rows at random zooms, each crop as seen(crops) gives it back, and its
    description for the report."""
    images, failed = probe_images(plan.probe_rows)
    if not images:
        raise UsageError(f"--gsd_probe_data {plan.probe_dir}: none of its {len(plan.probe_rows)} images with a gsd "
                         "could be read")
    crops, labels = probe_crops(images, resolution, seed)
    return fit_probe(features_array(seen(crops)), labels, seed), {
        "data": str(plan.probe_dir), "images": len(images), "unreadable_images": failed, "crops": len(labels),
        "zoom": [1.0, PROBE_MAX_ZOOM], "covered_gsd": list(plan.covered),
        "crop_gsd": [float(2.0 ** labels.min()), float(2.0 ** labels.max())], "regressor": PROBE_DESCRIPTION}


def sweep_figures(probe, plan: GsdPlan, rows: Sequence, gsd_dir: Path, resolution: int, seed: int) -> dict:
    """The sweep's rho (mean over rows), each row's, its shuffled floor and the predicted GSDs."""
    if not plan.sweep or not rows:
        return {"skipped": f"the probe data cover one GSD only ({plan.covered[0]:g} m): nothing to sweep"}
    predicted = {row.number: [float(p) for p in 2.0 ** probe.predict(features_of(
        [sweep_path(gsd_dir, row, point) for point in range(len(plan.sweep))], resolution))] for row in rows}
    logs = {number: np.log2(values) for number, values in predicted.items()}
    rho, per_row = sweep_rho(np.log2(plan.sweep), logs)
    return {"gsd": plan.sweep, "rows": [row.number for row in rows], "spearman": rho,
            "spearman_by_row": {str(k): v for k, v in per_row.items()},
            "spearman_shuffled": shuffled_sweep_rho(np.log2(plan.sweep), logs, seed),
            "predicted_gsd": {str(k): v for k, v in predicted.items()}}


def gsd_section(pipeline, plan: GsdPlan, rows: Sequence, eval_dir: Path, generated_dir: Path, *, seed_of,
                resolution: int, seed: int, options: dict, through_vae: bool = False) -> dict:
    """The report's gsd section: the probe, then the generated rows (own metadata), the ceiling (real), the floor
    (metadata absent: the plain evaluation images) and the sweep; skipped with its reason when the plan says so.
    through_vae: the probe's crops and the real held-out images go through the pipeline's VAE first."""
    from evaluation.data import real_image
    from evaluation.generation import image_path

    if plan.skipped:
        return {"skipped": plan.skipped}
    encoder = pipeline.metadata_encoder
    fields = encoder.fields if encoder is not None else ()
    gsd_dir = eval_dir / GSD_DIRNAME
    gsd_dir.mkdir(parents=True, exist_ok=True)
    with_gsd = [row for row in rows if row_gsd(row.metadata)]
    sweep_rows = list(rows[:plan.sweep_rows]) if plan.sweep else []
    seen = (lambda images: vae_round_trip(pipeline.vae, images)) if through_vae else list
    probe, probe_info = trained_probe(plan, resolution, seed, seen)
    made = generate_jobs(pipeline, row_jobs(with_gsd, gsd_dir, fields, seed_of)
                         + sweep_jobs(sweep_rows, plan.sweep, gsd_dir, fields, seed_of), **options)
    requested = [math.log2(row_gsd(row.metadata)) for row in with_gsd]
    real = features_array(seen([real_image(row, resolution) for row in with_gsd]))
    return {"model_takes_gsd": "gsd" in fields, "probe": {**probe_info, "through_vae": through_vae},
            "images_generated": made,
            "generated": adherence(requested, probe.predict(features_of(
                [gsd_dir / f"{ROW_PREFIX}{row.number:06d}.png" for row in with_gsd], resolution))),
            "ceiling_real": adherence(requested, probe.predict(real)),
            "floor_absent": adherence(requested, probe.predict(features_of(
                [image_path(generated_dir, row) for row in with_gsd], resolution))),
            "sweep": sweep_figures(probe, plan, sweep_rows, gsd_dir, resolution, seed),
            "rows_without_gsd": len(rows) - len(with_gsd)}


def gsd_headline(section: Optional[dict]) -> dict:
    """The GSD figures shown beside FID (nothing when the section is absent or skipped)."""
    if not section or "skipped" in section:
        return {}
    sweep = section["sweep"]
    return {"gsd_error_octaves": section["generated"]["error_octaves"],
            "gsd_within_half_octave": section["generated"]["within_half_octave"],
            "gsd_error_octaves_real": section["ceiling_real"]["error_octaves"],
            "gsd_error_octaves_absent": section["floor_absent"]["error_octaves"],
            "gsd_sweep_spearman": sweep.get("spearman"), "gsd_sweep_spearman_shuffled": sweep.get("spearman_shuffled")}


def gsd_summary(section: dict) -> str:
    """One log line: error and share within half an octave, ceiling and floor, the sweep's rho and its floor."""
    if "skipped" in section:
        return f"GSD adherence skipped: {section['skipped']}"
    generated, real, absent, sweep = (section[k] for k in ("generated", "ceiling_real", "floor_absent", "sweep"))
    line = (f"GSD adherence (N={generated['num_samples']}): error {generated['error_octaves']:.2f} octaves, "
            f"{generated['within_half_octave']:.0%} within 0.5 octave; real images {real['error_octaves']:.2f} "
            f"(ceiling), metadata absent {absent['error_octaves']:.2f} (floor)")
    if "skipped" in sweep:
        return line + f"; sweep skipped: {sweep['skipped']}"
    return (line + f"; sweep {sweep['gsd'][0]:g}-{sweep['gsd'][-1]:g} m over {len(sweep['rows'])} row(s): "
            f"Spearman rho {sweep['spearman']:.3f} (shuffled {sweep['spearman_shuffled']:.3f})")


def gsd_notes() -> List[str]:
    """What each GSD figure means (written into eval_report.json beside them)."""
    return [
        "GSDs are in the data folder's convention (metadata.jsonl: the create.py image's GSD, which the model was "
        "conditioned on); the probe learns log2 GSD from the probe data's images at random zooms: a crop of side "
        f"s / z (z in [1, {PROBE_MAX_ZOOM:g}]) of an image of side s at GSD g, resized to the evaluation "
        "resolution, is labelled g / z",
        "generated: held-out rows drawn with their own metadata; error_octaves = mean |log2 predicted - log2 "
        "requested|, within_half_octave = share with an error <= 0.5, spearman = rank correlation",
        "ceiling_real: the probe on the real held-out images; floor_absent: the plain evaluation images (the same "
        "captions and seeds, all metadata absent)",
        f"sweep: the first rows drawn at GSDs log-spaced over {SWEEP_RANGE[0]:g}-{SWEEP_RANGE[1]:g} m clipped to the "
        "probe data's GSD range, same caption and seed; spearman is the mean of each row's rho; spearman_shuffled "
        f"pairs the images with shuffled requests ({SHUFFLES} shuffles); a sweep whose images do not change scores 0",
    ]


def sweep_sheet(eval_dir: Path, section: Optional[dict], captions: Dict[int, str], shown_size) -> List[str]:
    """HTML lines for sheet.html: one row per sweep row (its caption, then its image at each GSD, labelled with the
    GSD asked and the GSD the probe sees), each image shown at shown_size(its size); none without a sweep."""
    import html

    sweep = (section or {}).get("sweep") or {}
    if "rows" not in sweep:
        return []
    with Image.open(eval_dir / GSD_DIRNAME / f"{SWEEP_PREFIX}{sweep['rows'][0]:06d}_00.png") as first:
        style = shown_size(first.size)
    head = "".join(f"<th>{gsd:g} m</th>" for gsd in sweep["gsd"])
    lines = ["<h2>GSD sweep (asked / seen by the probe)</h2>", "<table>",
             f"<tr><th>row</th><th>caption</th>{head}</tr>"]
    for number in sweep["rows"]:
        cells = "".join(
            f"<td><img src='{GSD_DIRNAME}/{SWEEP_PREFIX}{number:06d}_{point:02d}.png' alt='{gsd:g} m' "
            f"style='{style}'><br>{seen:.2f} m</td>"
            for point, (gsd, seen) in enumerate(zip(sweep["gsd"], sweep["predicted_gsd"][str(number)])))
        lines.append(f"<tr><td>{number}</td><th scope='row'>{html.escape(captions.get(number, ''))}</th>{cells}</tr>")
    return lines + ["</table>"]
