"""evaluation/gsd.py: the zoom convention, the probe's features and fit, the figures (error in octaves, share within
half an octave, Spearman's rho, the sweep and its shuffled floor), the plan, and the section on a tiny metadata
pipeline (rows drawn with their own metadata, the sweep, resuming)."""

import io
import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image

from diffusion_model.sample_data import SAMPLE_GSD, make_sample_row
from evaluation import gsd as G
from evaluation.data import EvalRow
from utils.cli import UsageError


def sample_images(count: int, seed: int, levels: int = 3) -> list:
    """(image, GSD) of sample_data rows drawn at `levels` GSDs."""
    rows = [make_sample_row(i, seed, levels) for i in range(count)]
    return [(Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB"), row["gsd"]) for row in rows]


def test_zoom_crop_is_the_centre_at_one_zoomth_of_the_side():
    """Zoom 4 of a 64 px image whose centre 16 px are red: all red; zoom 1: the whole image, mostly not red."""
    image = Image.new("RGB", (64, 64), (0, 0, 255))
    image.paste((255, 0, 0), (24, 24, 40, 40))
    zoomed = np.asarray(G.zoom_crop(image, 4.0, 8))
    assert zoomed.shape == (8, 8, 3) and (zoomed[..., 0] > 200).all()
    whole = np.asarray(G.zoom_crop(image, 1.0, 8))
    assert (whole[..., 2] > 200).mean() > 0.5


def test_zooms_start_at_one_and_stay_in_range():
    zooms = G.draw_zooms(50, np.random.default_rng(0), 4.0)
    assert zooms[0] == 1.0 and ((zooms >= 1.0) & (zooms <= 4.0)).all() and len(set(zooms.round(6))) == 50
    assert (G.draw_zooms(50, np.random.default_rng(0), 4.0) == zooms).all()


def test_probe_crops_label_each_crop_gsd_over_zoom():
    image = Image.new("RGB", (64, 64), (10, 20, 30))
    crops, labels = G.probe_crops([(image, 2.0)], 16, seed=0, zooms_per_image=5)
    zooms = G.draw_zooms(5, np.random.default_rng(0))
    assert len(crops) == 5 and crops[0].size == (16, 16)
    assert labels == pytest.approx(np.log2(2.0 / zooms))  # zooming in makes a finer GSD


def test_features_see_scale():
    """Fine stripes (coarse GSD: more ground per pixel) have more high-frequency power than wide ones."""
    x = np.arange(32)
    fine = Image.fromarray(np.tile(((x // 2) % 2 * 255).astype(np.uint8), (32, 1))).convert("RGB")
    wide = Image.fromarray(np.tile(((x // 8) % 2 * 255).astype(np.uint8), (32, 1))).convert("RGB")
    f, w = G.image_features(fine), G.image_features(wide)
    assert f.shape == w.shape and np.isfinite(f).all()
    edges = G.band_edges(32)
    quarter, sixteenth = (6 + int(np.searchsorted(edges, frequency, side="right")) - 1 for frequency in (0.25, 1 / 16))
    assert f[quarter] > w[quarter] + 2 and f[sixteenth] < w[sixteenth] - 2  # stripes of period 4 and 16 px


def test_probe_learns_the_gsd_of_unseen_scenes_and_not_from_shuffled_labels():
    """Trained on 30 sample scenes at 3 GSDs (zoomed), it ranks 15 unseen ones by GSD; with the labels shuffled across
    crops it cannot (the probe reads the images, not the row order)."""
    train, test = sample_images(30, 0), sample_images(15, 1)
    crops, labels = G.probe_crops(train, 16, seed=0)
    features = G.features_array(crops)
    truth = [math.log2(g) for _, g in test]
    test_x = G.features_array([image.resize((16, 16), G.RESAMPLE) for image, _ in test])
    figures = G.adherence(truth, G.fit_probe(features, labels).predict(test_x))
    assert figures["spearman"] > 0.8 and figures["error_octaves"] < 0.5, figures
    shuffled = np.random.default_rng(0).permutation(labels)
    blind = G.adherence(truth, G.fit_probe(features, shuffled).predict(test_x))
    assert blind["spearman"] < 0.5 and blind["error_octaves"] > figures["error_octaves"], blind


def test_spearman_ranks_and_constant_sides():
    assert G.spearman([1, 2, 3, 4], [10, 20, 25, 100]) == pytest.approx(1.0)
    assert G.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert G.spearman([1, 2, 3], [5, 5, 5]) == 0.0  # a model that draws one image whatever the GSD
    assert G.spearman([1], [2]) == 0.0


def test_adherence_in_octaves():
    figures = G.adherence([0.0, 1.0, 2.0, 3.0], [0.25, 1.0, 3.0, 2.4])
    assert figures["error_octaves"] == pytest.approx((0.25 + 0 + 1 + 0.6) / 4)
    assert figures["within_half_octave"] == pytest.approx(0.5)
    assert figures["num_samples"] == 4 and figures["spearman"] == pytest.approx(0.8)
    assert G.adherence([], [])["error_octaves"] is None


def test_sweep_is_log_spaced_and_clipped_to_the_covered_range():
    assert G.sweep_gsds((0.1, 100.0), 3) == pytest.approx([0.3, math.sqrt(3.0), 10.0], rel=1e-5)
    assert G.sweep_gsds((0.5, 4.0), 4) == pytest.approx([0.5, 1.0, 2.0, 4.0])
    assert G.sweep_gsds((2.0, 2.0), 8) == [] and G.sweep_gsds((20.0, 40.0), 8) == []


def test_sweep_rho_and_its_shuffled_floor():
    requested = np.log2([0.5, 1, 2, 4, 8, 16])
    followed = {1: requested + 0.3, 2: requested * 0.5}
    rho, per_row = G.sweep_rho(requested, followed)
    assert rho == pytest.approx(1.0) and per_row == {1: pytest.approx(1.0), 2: pytest.approx(1.0)}
    assert abs(G.shuffled_sweep_rho(requested, followed, seed=0)) < 0.15
    assert G.sweep_rho(requested, {1: np.zeros(6)})[0] == 0.0


def test_model_request_keeps_valid_values_of_the_model_fields():
    metadata = {"gsd": 0.5, "lat": 37.7, "lon": -122.4, "date": "2021-07-01", "cloud": 3.0}
    assert G.model_request(metadata, ("gsd",)) == {"gsd": 0.5}
    assert G.model_request(metadata, ("gsd", "lat", "lon")) == {"gsd": 0.5, "lat": 37.7, "lon": -122.4}
    assert G.model_request({"gsd": -1.0, "lat": 95.0, "lon": 3.0}, ("gsd", "lat", "lon")) == {}
    assert G.model_request(None, ("gsd",)) == {} and G.model_request({"gsd": 2}, ()) == {}


def gsd_folder(source, folder, gsds):
    """A copy of a create.py + format.py folder whose metadata.jsonl lines carry the given GSDs in turn."""
    shutil.copytree(source, folder)
    path = folder / "metadata.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if gsds[i % len(gsds)] is not None:
            line["metadata"] = {"gsd": gsds[i % len(gsds)]}
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def held_out(folder, count):
    """EvalRows of a folder's first count lines, with their metadata."""
    from evaluation.data import load_rows

    rows, _bad, _read = load_rows(str(folder), None, 0, count)
    return rows


def test_plan_reads_the_probe_folder_and_skips_with_reasons(tiny_data_dir, tmp_path):
    folder = gsd_folder(tiny_data_dir, tmp_path / "gsd", [0.5, 1.0, 2.0, None])
    rows = held_out(folder, 4)
    assert [G.row_gsd(row.metadata) for row in rows] == [0.5, 1.0, 2.0, None]
    plan = G.plan_gsd(str(folder), rows, sweep_rows=2, sweep_points=3)
    assert plan.skipped is None and plan.covered == (0.5, 2.0) and len(plan.probe_rows) == 6
    assert plan.sweep == pytest.approx([0.5, 1.0, 2.0]) and plan.settings()["gsd_sweep_rows"] == 2
    assert "no --gsd_probe_data" in G.plan_gsd(None, rows, 2, 3).skipped
    plain = held_out(tiny_data_dir, 4)
    assert "no held-out row has a gsd" in G.plan_gsd(str(folder), plain, 2, 3).skipped
    with pytest.raises(UsageError, match="no line of its metadata.jsonl has a gsd"):
        G.plan_gsd(str(tiny_data_dir), rows, 2, 3)
    with pytest.raises(UsageError, match="is not a folder"):
        G.plan_gsd(str(tmp_path / "missing"), rows, 2, 3)


def test_section_draws_rows_with_their_metadata_and_the_sweep(metadata_model_dir, tiny_data_dir, tmp_path):
    """On a pipeline whose (random, 'trained') embedding takes the GSD: each row's image is drawn with its own GSD
    (not the absent-metadata image), the sweep's images change with the GSD, the figures are filled, and a second
    call draws nothing new."""
    import torch

    from evaluation.generation import generate_missing, image_path
    from inference.pipeline import load_pipeline

    folder = gsd_folder(tiny_data_dir, tmp_path / "gsd", [0.5, 1.0, 2.0, 4.0])
    rows = held_out(folder, 4)
    plan = G.plan_gsd(str(folder), rows, sweep_rows=2, sweep_points=3)
    pipeline = load_pipeline(str(metadata_model_dir), None, torch.device("cpu"), torch.float32)
    options = {"num_inference_steps": 2, "guidance_scale": 1.0, "height": 32, "width": 32, "batch_size": 4}
    generated = tmp_path / "eval" / "generated"
    generated.mkdir(parents=True)
    generate_missing(pipeline, rows, generated, seed=0, num_inference_steps=2, guidance_scale=1.0, resolution=32,
                     batch_size=4)

    def section():
        """The section as evaluate.py computes it."""
        return G.gsd_section(pipeline, plan, rows, tmp_path / "eval", generated, seed_of=lambda row: row.number,
                             resolution=32, seed=0, options=options)

    first = section()
    gsd_dir = tmp_path / "eval" / G.GSD_DIRNAME
    assert first["model_takes_gsd"] is True and first["images_generated"] == 4 + 2 * 3
    row_image = np.asarray(Image.open(gsd_dir / "row_000001.png"))
    assert not np.array_equal(row_image, np.asarray(Image.open(image_path(generated, rows[0]))))
    sweep = [np.asarray(Image.open(G.sweep_path(gsd_dir, rows[0], p))) for p in range(3)]
    assert not np.array_equal(sweep[0], sweep[2])
    for name in ("generated", "ceiling_real", "floor_absent"):
        assert first[name]["num_samples"] == 4 and 0 <= first[name]["error_octaves"] < 10
    assert first["sweep"]["gsd"] == plan.sweep and first["sweep"]["rows"] == [1, 2]
    assert set(first["sweep"]["predicted_gsd"]) == {"1", "2"} and -1 <= first["sweep"]["spearman"] <= 1
    assert first["probe"]["images"] == 8 and first["probe"]["crops"] == 8 * G.PROBE_ZOOMS_PER_IMAGE
    from inference.pipeline import generate

    own = generate(pipeline, [rows[2].caption], [rows[2].number], negative_prompt=None, num_inference_steps=2,
                   guidance_scale=1.0, height=32, width=32, conditioning={"metadata": {"gsd": 2.0}})[0]
    assert np.array_equal(np.asarray(own), np.asarray(Image.open(gsd_dir / "row_000003.png"))), "row 3 asks 2 m"
    again = section()
    assert again["images_generated"] == 0 and again["generated"] == first["generated"]
    seen_by_vae = G.gsd_section(pipeline, plan, rows, tmp_path / "eval", generated, seed_of=lambda row: row.number,
                                resolution=32, seed=0, options=options, through_vae=True)
    assert seen_by_vae["probe"]["through_vae"] and seen_by_vae["ceiling_real"] != first["ceiling_real"]
    headline = G.gsd_headline(first)
    assert headline["gsd_sweep_spearman"] == first["sweep"]["spearman"]
    assert "Spearman rho" in G.gsd_summary(first) and G.gsd_headline({"skipped": "x"}) == {}


def test_vae_round_trip_keeps_size_and_changes_pixels(tiny_model_dir):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_model_dir / "vae").eval()
    images = [image.resize((16, 16)) for image, _ in sample_images(3, 0)]
    out = G.vae_round_trip(vae, images, batch_size=2)
    assert [image.size for image in out] == [(16, 16)] * 3
    assert not np.array_equal(np.asarray(out[0]), np.asarray(images[0]))
