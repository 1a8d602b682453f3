"""train_text_to_image.py end to end on a data folder with two images that cannot be read (a truncated JPEG and a
text file named .jpg): the run finishes, and bad_rows.json names both rows with why, with and without
--cache_latents.

Two trainer runs (~10 s each), at once, shared through a module fixture.
"""

import json
import shutil
from pathlib import Path

import pytest

# pytest puts tests/ on sys.path.
import odd_images as odd
from test_train_e2e import run_parallel, succeeded, trainer_command

# metadata.jsonl rows whose image is broken, and the reason bad_rows.json must give each.
BROKEN = {1: "truncated", 5: "undecodable"}


@pytest.fixture(scope="module")
def broken_runs(tiny_model_dir, tiny_data_dir, tmp_path_factory) -> dict:
    """A copy of the tiny data folder with BROKEN's images broken, trained on uncached and cached (8 rows in
    batches of 4: one epoch, so every row is met): name → (output dir, CompletedProcess, broken file names)."""
    root = tmp_path_factory.mktemp("bad_rows")
    data = root / "data"
    shutil.copytree(tiny_data_dir, data)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines() if line.strip()]
    names = {rows[row]["file_name"]: reason for row, reason in BROKEN.items()}
    for name, reason in names.items():
        (data / name).write_bytes(odd.truncated_jpeg() if reason == "truncated" else odd.junk_bytes())
    flags = ["--max_train_steps", 2, "--train_batch_size", 4]
    commands = {"uncached": trainer_command(tiny_model_dir, data, root / "uncached", *flags),
                "cached": trainer_command(tiny_model_dir, data, root / "cached", *flags, "--cache_latents")}
    results = run_parallel(commands)
    return {name: (root / name, results[name], names) for name in commands}


@pytest.mark.parametrize("name", ["uncached", "cached"])
def test_unreadable_images_are_counted_in_bad_rows_json_and_the_run_finishes(broken_runs, name):
    """Exit 0 and the final UNet; a warning per bad row; bad_rows.json counts 2 rows by reason, each with its file
    as metadata.jsonl names it and Pillow's complaint."""
    output, done, names = broken_runs[name]
    succeeded(done)
    assert (output / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert done.stderr.count("cannot be read, so the next readable row stands in for it") >= 2
    report = json.loads((output / "bad_rows.json").read_text())
    assert report["count"] == 2 and report["by_reason"] == {"truncated": 1, "undecodable": 1}
    assert {entry["file"]: entry["reason"] for entry in report["rows"]} == names
    assert all(entry["detail"] for entry in report["rows"])


def test_the_cache_marks_the_unreadable_rows(broken_runs):
    """The cached run's manifest lists the two rows the build could not read."""
    output, _, _ = broken_runs["cached"]
    (manifest,) = Path(output, ".cache", "latents").glob("*/manifest.json")
    report = json.loads((output / "bad_rows.json").read_text())
    assert json.loads(manifest.read_text())["unreadable_rows"] == sorted(entry["row"] for entry in report["rows"])
