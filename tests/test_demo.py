"""demo.sh end to end at small sizes: every step runs and everything the closing summary names exists.

The one run is DEMO_METADATA=1, the default demo plus the GSD steps (scenes at 2 GSDs, a held-out create.py
folder, --metadata_fields gsd, the GSD figures); the default's own Parquet evaluation is tested in test_evaluate.py
and its sample data in test_sample_data.py."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from utils import grids
from utils.quiet import NOTICES

REPO = Path(__file__).resolve().parents[1]
SMALL = {"DEMO_ROWS": "8", "DEMO_STEPS": "2", "DEMO_RESOLUTION": "16", "DEMO_SAMPLE_STEPS": "2",
         "DEMO_EVAL_SAMPLES": "4", "DEMO_VAE_STEPS": "2", "DEMO_TEXT_STEPS": "2", "DEMO_METADATA": "1",
         "DEMO_GSD_LEVELS": "2"}
BACKGROUND_LOGS = ("eval_base.log", "generate.log")


def run_demo(out: Path) -> subprocess.CompletedProcess:
    """./demo.sh OUT with the small sizes, as a user runs it."""
    env = {**os.environ, **SMALL, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["./demo.sh", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One small demo run: (its output folder, the finished process)."""
    out = tmp_path_factory.mktemp("demo") / "out"
    return out, run_demo(out)


def summary_paths(stdout: str) -> dict:
    """'label: path' lines of the closing summary, first path of each."""
    tail = stdout.split("Where everything is:", 1)[1]
    return {label.strip(): value.split()[0] for label, value in re.findall(r"^  ([^:]+):\s+(\S.*)$", tail, re.M)}


def test_every_step_runs_and_each_path_in_the_summary_exists(demo):
    out, done = demo
    assert done.returncode == 0, done.stderr[-3000:]
    for step in range(1, 8):
        assert f"=== {step}/7" in done.stdout
    paths = summary_paths(done.stdout)
    expected = {"images (create.py)", "metadata.jsonl", "checkpoints", "validation images", "training progress",
                "trained pipeline", "loss curve", "generated grid", "evaluation report", "base model's report"}
    assert expected <= set(paths)
    for label in expected:
        assert Path(paths[label]).exists(), f"{label}: {paths[label]}"


def test_outputs_hold_what_the_pipeline_made(demo):
    out, done = demo
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((out / "data" / "rsicd_images").glob("*.jpg"))) == int(SMALL["DEMO_ROWS"])
    assert len((out / "data" / "metadata.jsonl").read_text().splitlines()) == int(SMALL["DEMO_ROWS"])
    assert sorted(p.name for p in (out / "model").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert (out / "model" / "model_index.json").is_file() and (out / "model" / "loss_curve.png").is_file()
    # 5 prompts (one per scene class) x 2 images, each with its sidecar
    assert len(list((out / "generated").glob("*.json"))) == 10 and (out / "generated" / "grid.png").is_file()
    for name in ("eval_base", "eval_model"):
        report = json.loads((out / name / "eval_report.json").read_text())
        assert report["num_samples"] == int(SMALL["DEMO_EVAL_SAMPLES"])
        # sample rows are named by their class in turn: 4 rows, 4 classes
        assert report["num_classes"] == 4 and report["chance"] == 0.25 and report["scene_accuracy"] is not None
        assert report["fid"] < 100_000, "stand-in features are scaled so FID does not read as a broken number"
    assert "untrained base" in done.stdout and "fine-tuned" in done.stdout and "ceiling" in done.stdout


def test_metadata_demo_trains_on_the_gsd_and_reports_the_sweep(demo):
    """DEMO_METADATA=1: every row has its GSD (2 levels), the model's UNet is conditioned on it, both reports carry
    the sweep's rho and its shuffled floor, and the comparison prints them (the base takes no metadata: rho 0)."""
    out, done = demo
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "data" / "metadata.jsonl").read_text().splitlines()]
    assert sorted({line["metadata"]["gsd"] for line in lines}) == [0.4375, 0.875]  # 1 and 2 m at 224 -> 512 px
    assert json.loads((out / "model" / "unet" / "metadata_spec.json").read_text())["fields"] == ["gsd"]
    for name, takes in (("eval_base", False), ("eval_model", True)):
        report = json.loads((out / name / "eval_report.json").read_text())
        assert report["gsd_details"]["model_takes_gsd"] is takes
        assert report["gsd_details"]["sweep"]["gsd"][0] == 0.4375 and report["gsd_details"]["sweep"]["gsd"][-1] == 0.875
        assert -1 <= report["gsd_sweep_spearman"] <= 1 and "gsd_sweep_spearman_shuffled" in report
    base = json.loads((out / "eval_base" / "eval_report.json").read_text())
    assert base["gsd_sweep_spearman"] == 0.0  # one image per sweep row, whatever the GSD asked
    assert "GSD rho" in done.stdout and "rho shuffled" in done.stdout


def demo_layout(rows: int, columns: int):
    """A demo picture's layout: 16 px tiles enlarged 8x to 128, the long class captions wrapped in the widest margin."""
    font = grids.label_font()
    return grids.grid_layout((128, 128), rows, columns, grids.MAX_ROW_LABEL_WIDTH, grids.line_height(font))


def test_progress_picture_has_the_base_and_one_column_per_validation(demo):
    out, done = demo
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(SMALL["DEMO_RESOLUTION"]) * 8 == 128
    validations = [p for p in (out / "model" / "validation").glob("step-*") if p.name != "step-0"]
    with Image.open(out / "model" / "validation_progress.png") as progress:
        assert progress.size == demo_layout(5, len(validations) + 1).size  # 5 prompts, one per class
    with Image.open(out / "model" / "validation_grid.png") as grid:
        assert grid.size == demo_layout(5, 1).size
    with Image.open(out / "generated" / "grid.png") as grid:
        assert grid.size == demo_layout(5, 2).size  # 5 prompts x 2 images
    with Image.open(out / "model" / "validation" / "step-0" / "0.png") as native:
        assert native.size == (16, 16)
    assert "](validation_progress.png)" in (out / "model" / "README.md").read_text()


def test_output_free_of_third_party_notices(demo):
    """No known third-party notice reaches the user, from any step (the launched trainer included)."""
    out, done = demo
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr + "".join((out / log).read_text() for log in BACKGROUND_LOGS)
    quoted = ("Failed to load CPU gemm_4bit_forward", "requires torchvision (not installed)", "Traceback")
    for text in quoted + tuple(fragment for _, fragment in NOTICES):
        assert text not in output, text
    # diffusers/transformers loading and saving bars interleave with ours; the scripts turn them off.
    for bar in ("Loading pipeline components", "Loading weights", "Writing model shards"):
        assert bar not in output, bar


def test_a_foreign_non_empty_folder_is_refused_and_left_alone(demo, tmp_path):
    out, done = demo
    assert done.returncode == 0
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    refused = run_demo(foreign)
    assert refused.returncode == 2
    assert str(foreign) in refused.stderr and "Traceback" not in refused.stderr
    assert (foreign / "thesis.tex").read_text() == "keep me"
