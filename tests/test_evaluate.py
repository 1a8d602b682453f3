"""evaluate.py end to end, as users run it: the tiny pipeline, stand-in metric models, metadata.jsonl and Parquet
inputs, resuming after lost images, and one-line usage errors."""

import io
import json
import math
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from utils.cli import UsageError

import warm
from conftest import REPO_ROOT
from warm import single_thread_env
from evaluation.generation import SETTINGS_FILENAME
from test_evaluation_gsd import gsd_folder

RESOLUTION = 32
STEPS = 2
METADATA_ROWS = 4
GSDS = [0.5, 1.0, 2.0, 4.0]
GSD_FLAGS = ["--gsd_probe_vae", "--gsd_sweep_rows", 2, "--gsd_sweep_points", 3]


def evaluate_command(model, source_flag, source, stand_ins, out, *extra) -> list:
    """The evaluate.py command line for a quick run on the tiny pipeline with the stand-in models."""
    return [sys.executable, str(REPO_ROOT / "evaluate.py"), "--model", str(model), source_flag, str(source),
            "--inception_weights", str(stand_ins["inception_weights"]), "--clip_model", str(stand_ins["clip_model"]),
            "--output_dir", str(out), "--num_inference_steps", str(STEPS), "--resolution", str(RESOLUTION),
            "--metric_batch_size", "4", *map(str, extra)]


def start(command) -> subprocess.Popen:
    """Start a run single-threaded, so two can share the two cores."""
    return warm.start(command, cwd=REPO_ROOT, env=single_thread_env())


def wait(process: subprocess.Popen) -> subprocess.CompletedProcess:
    """Wait for a run, whatever its exit code."""
    out, err = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    """Wait for a run; fail with its stderr if it failed."""
    done = wait(process)
    assert done.returncode == 0, done.stderr
    return done


def png_bytes(seed: int) -> bytes:
    """A small noise PNG."""
    image = Image.effect_noise((48, 40), 60 + seed).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_image_text_shards(folder) -> None:
    """A folder of two image+text Parquet shards: 4 rows, the third one's bytes are not an image."""
    folder.mkdir()
    rows = [(png_bytes(0), "a pond next to a road"), (png_bytes(1), "fields and a river"),
            (b"not an image at all", "a town"), (png_bytes(3), "bare land")]
    for index, part in enumerate((rows[:2], rows[2:])):
        table = pa.table({"image": pa.array([r[0] for r in part], pa.binary()), "text": [r[1] for r in part]})
        pq.write_table(table, folder / f"test-{index:05d}.parquet")


def write_class_named_index(folder) -> None:
    """index.csv beside images/: 4 sample scenes in 2 classes, the class in each file name (river_2.png)."""
    import csv

    import source_cases

    rows = []
    for index in (0, 1, 5, 6):  # the sample scenes cycle through 5 classes: farmland, river, farmland, river
        scene, image, captions = source_cases.scene(index)
        name = f"images/{scene}_{index + 1}.png"
        source_cases.save(image, folder / name, "PNG")
        rows.append({"file_name": name, "text": source_cases.first_caption(captions)})
    with open(folder / "index.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["file_name", "text"])
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, tiny_data_dir, stand_in_models, sample_parquet, lora_run_dir,
         mask_data_dir, mask_controlnet_dir):
    """A metadata.jsonl run and a Parquet-shards run side by side; an RSICD-schema run beside a LoRA checkpoint's
    run; then the first resumed after losing 2 images, beside a mask ControlNet's run."""
    root = tmp_path_factory.mktemp("evaluate")
    shards = root / "shards"
    write_image_text_shards(shards)
    # The tiny data folder with a GSD on each row: the metadata.jsonl run also measures GSD adherence.
    gsd_data = gsd_folder(tiny_data_dir, root / "gsd_data", GSDS)
    meta_cmd = evaluate_command(tiny_model_dir, "--data_dir", gsd_data, stand_in_models, root / "meta",
                                "--gsd_probe_data", gsd_data, *GSD_FLAGS, "--num_samples", METADATA_ROWS, "--seed", 7)
    parquet_cmd = evaluate_command(tiny_model_dir, "--parquet_path", shards, stand_in_models, root / "parquet",
                                   "--sheet_pairs", 2, "--dtype", "bf16")
    # RSICD schema through --input (the reader create.py uses), names carrying classes: 5 classes in turn, 2 rows each.
    rsicd_cmd = evaluate_command(tiny_model_dir, "--input", sample_parquet, stand_in_models, root / "rsicd",
                                 "--num_samples", 10, "--sheet_pairs", 0)
    # A LoRA run's checkpoint-N (base from lora_run.json) at --lora_scale 0.5, on a CSV index through --input.
    write_class_named_index(root / "index")
    lora_cmd = evaluate_command(lora_run_dir / "checkpoint-2", "--input", root / "index" / "index.csv",
                                stand_in_models, root / "lora", "--lora_scale", 0.5)
    meta_process, parquet_process = start(meta_cmd), start(parquet_cmd)
    meta, parquet = finish(meta_process), finish(parquet_process)
    rsicd_process, lora_process = start(rsicd_cmd), start(lora_cmd)
    rsicd, lora = finish(rsicd_process), wait(lora_process)  # the LoRA run's own test checks its exit code
    generated = root / "meta" / "generated"
    first = {p.name: p.read_bytes() for p in sorted(generated.glob("*.png"))}
    report = json.loads((root / "meta" / "eval_report.json").read_text())
    lost = ["000002.png", "000004.png"]
    for name in lost:
        (generated / name).unlink()
    kept_mtimes = {name: (generated / name).stat().st_mtime_ns for name in first if name not in lost}
    # Beside the resume: the same folder with another seed, which must be refused without touching anything.
    other_seed = start(meta_cmd[:-1] + ["8"])
    # A mask ControlNet on its own training folder (a copy, one line without a conditioning image added).
    control_data = shutil.copytree(mask_data_dir, root / "control_data")
    with open(control_data / "metadata.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"file_name": "rsicd_images/image_000001.jpg", "text": "no conditioning here"}) + "\n")
    control_process = start(evaluate_command(tiny_model_dir, "--data_dir", control_data, stand_in_models,
                                             root / "control", "--controlnet", mask_controlnet_dir, "--seed", 3))
    resumed = finish(start(meta_cmd))
    control = finish(control_process)
    refused = other_seed.communicate(timeout=300)
    return {"root": root, "gsd_data": gsd_data, "meta": meta, "parquet": parquet, "rsicd": rsicd, "lora": lora,
            "first_images": first,
            "first_report": report,
            "lost": lost, "kept_mtimes": kept_mtimes, "resumed": resumed, "control": control,
            "refused": (other_seed.returncode, refused[1])}


def test_report_has_n_settings_and_both_figures(runs, tiny_model_dir):
    report = runs["first_report"]
    assert report["num_samples"] == METADATA_ROWS and report["rows_read"] == METADATA_ROWS
    assert math.isfinite(report["fid"]) and report["fid"] > 0
    assert report["clip_score"] == pytest.approx(max(100 * report["clip_cosine"], 0.0), abs=1e-3)
    assert report["stand_in_models"] is True
    assert any("N=4 is small" in w for w in report["warnings"])
    assert report["settings"]["num_inference_steps"] == STEPS and report["settings"]["seed"] == 7
    assert report["settings"]["resolution"] == RESOLUTION and report["data"]["caption_index"] == 0
    assert report["model"] == str(tiny_model_dir)
    assert report["fid_details"]["inception_weights"]["matches_standard_name"] is False
    assert report["bad_rows"]["count"] == 0


def test_one_image_per_row_at_the_resolution_and_a_sheet(runs):
    assert sorted(runs["first_images"]) == [f"{n:06d}.png" for n in range(1, METADATA_ROWS + 1)]
    for data in runs["first_images"].values():
        assert Image.open(io.BytesIO(data)).size == (RESOLUTION, RESOLUTION)
    sheet = (runs["root"] / "meta" / "sheet.html").read_text()
    for n in range(1, METADATA_ROWS + 1):
        assert f"generated/{n:06d}.png" in sheet and (runs["root"] / "meta" / "sheet" / f"real_{n:06d}.png").is_file()
    # 32 px images shown 4x, pixelated, beside a caption per row (each img tag: real, then generated)
    # and the GSD sweep's 2 rows x 3 GSDs
    assert sheet.count("style='width:128px;height:128px'") == 2 * METADATA_ROWS + 2 * 3 and "pixelated" in sheet


def test_resume_generates_only_the_lost_images_with_the_same_pixels_and_figures(runs):
    generated = runs["root"] / "meta" / "generated"
    assert "generating 2 of 4 images (2 already on disk)" in runs["resumed"].stderr
    for name, mtime in runs["kept_mtimes"].items():
        assert (generated / name).stat().st_mtime_ns == mtime
    for name in runs["lost"]:
        assert (generated / name).read_bytes() == runs["first_images"][name]
    report = json.loads((runs["root"] / "meta" / "eval_report.json").read_text())
    assert report["timings_s"]["images_generated"] == 2
    for key in ("fid", "clip_score", "clip_cosine"):
        assert report[key] == runs["first_report"][key]


def test_parquet_shards_with_an_undecodable_row_are_measured_and_the_row_reported(runs):
    report = json.loads((runs["root"] / "parquet" / "eval_report.json").read_text())
    assert report["rows_read"] == 4 and report["num_samples"] == 3
    assert report["bad_rows"]["count"] == 1
    assert report["bad_rows"]["rows"][0]["row"] == 3 and report["bad_rows"]["rows"][0]["reason"] == "undecodable"
    assert sorted(p.name for p in (runs["root"] / "parquet" / "generated").glob("*.png")) == [
        "000001.png", "000002.png", "000004.png"]
    assert "1 of 4 rows left out" in runs["parquet"].stderr
    assert math.isfinite(report["fid"])
    assert len(list((runs["root"] / "parquet" / "sheet").glob("*.png"))) == 2


def test_dtype_bf16_on_cpu_is_recorded_with_the_device(runs):
    """The Parquet run samples in bf16: its resume guard's settings and its report say so; the fp32 run's too."""
    for run, dtype in (("parquet", "bfloat16"), ("meta", "float32")):
        guard = json.loads((runs["root"] / run / "generated" / SETTINGS_FILENAME).read_text())
        assert (guard["device"], guard["dtype"]) == ("cpu", dtype)
        report = json.loads((runs["root"] / run / "eval_report.json").read_text())
        assert report["settings"]["dtype"] == dtype and report["settings"]["device"] == f"cpu (torch.{dtype})"


def test_resume_with_another_dtype_is_refused_unless_overwrite(runs, tiny_model_dir, tiny_data_dir,
                                                               stand_in_models, capsys):
    """As an fp16 GPU run resumed on CPU would be: one line naming dtype; --overwrite passes the guard."""
    import evaluate
    from evaluation.args import parse_args
    from evaluation.generation import check_settings, settings_from_args
    from utils.cli import UsageError

    argv = [str(a) for a in evaluate_command(tiny_model_dir, "--data_dir", runs["gsd_data"], stand_in_models,
                                             runs["root"] / "meta", "--gsd_probe_data", runs["gsd_data"],
                                             *GSD_FLAGS, "--num_samples", METADATA_ROWS, "--seed", 7)[2:]]
    with pytest.raises(UsageError, match=r"other settings \(dtype\)"):
        evaluate.main(argv + ["--dtype", "bf16"])
    generated = runs["root"] / "meta" / "generated"
    args = parse_args(argv + ["--dtype", "bf16", "--overwrite"])
    check_settings(generated, settings_from_args(args, torch.device("cpu"), torch.bfloat16), overwrite=True)
    # per-row seeds on disk, --shared_seed asked: the two kinds of image set must not mix in one figure
    with pytest.raises(UsageError, match=r"other settings \(shared_seed\)"):
        evaluate.main(argv + ["--shared_seed"])


def test_rsicd_parquet_input_reports_scene_accuracy_with_classes_from_file_names(runs):
    """evaluate.py --input on an RSICD-schema Parquet (it used to fail in scene.read_labels with a TypeError)."""
    report = json.loads((runs["root"] / "rsicd" / "eval_report.json").read_text())
    assert report["data"]["input"].endswith(".parquet") and report["data"]["parquet_path"] is None
    assert report["num_classes"] == 5 and report["scene_num_samples"] == 10 and report["chance"] == 0.2
    for key in ("scene_accuracy", "scene_accuracy_real", "scene_accuracy_real_trained"):
        assert 0.0 <= report[key] <= 1.0
    assert report["scene_details"]["class_counts"] == {c: 2 for c in ("bareland", "farmland", "pond", "residential",
                                                                       "river")}
    assert report["scene_details"]["left_out"]["count"] == 0
    assert "scene accuracy (N=10, 5 classes)" in runs["rsicd"].stderr


def test_rows_without_classes_leave_the_scene_figure_out_with_the_reason(runs):
    """image+text shards carry no file names: the figure is skipped, and the report says why."""
    report = json.loads((runs["root"] / "parquet" / "eval_report.json").read_text())
    assert report["scene_accuracy"] is None and report["num_classes"] is None
    assert report["scene_details"]["left_out"] == {"count": 3, "reason": "no_class", "rows": [1, 2, 4],
                                                   "why": {"no_name": 3}}
    assert report["scene_details"]["skipped"].startswith("no row has a scene class: the source gives no file name")
    assert "scene accuracy skipped: no row has a scene class" in runs["parquet"].stderr


def test_a_create_folder_s_classes_come_from_metadata_source_file(runs):
    """tiny_data_dir is create.py -> format.py over RSICD-named rows: its images are image_NNNNNN.jpg, and the
    classes come back from metadata.jsonl's source_file (they used to be 'image' for every row, and skipped)."""
    report = runs["first_report"]
    assert report["scene_details"]["class_counts"] == {"farmland": 1, "pond": 1, "residential": 1, "river": 1}
    assert report["num_classes"] == 4 and report["scene_details"]["left_out"]["count"] == 0


def test_other_settings_in_the_same_folder_are_refused_in_one_line(runs):
    code, stderr = runs["refused"]
    assert code == 2
    meta = runs["root"] / "meta" / "generated"
    assert stderr.strip() == (f"error: {meta} holds images made with other settings (seed); "
                              "use another --output_dir or --overwrite")


@pytest.mark.parametrize("change, words", [
    (["--num_samples", "1"], "--num_samples 1 must be at least 2"),
    (["--caption_index", "9"], "--caption_index 9 is out of range"),
    (["--resolution", "30"], "--resolution 30 must be a positive multiple of 8"),
    (["--inception_weights", "/nonexistent/inception.pth"], "--inception_weights /nonexistent/inception.pth"),
    (["--clip_model", "/nonexistent/clip"], "--clip_model /nonexistent/clip"),
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
    (["--split", "val"], "--split apply to --input only"),
    (["--class_column", "scene"], "--class_column 'scene' is a key of no line"),
    (["--controlnet_conditioning_scale", "0.5"], "--controlnet_conditioning_scale apply with --controlnet only"),
    (["--control_train_dir", "/nonexistent/data"], "--control_train_dir apply with --controlnet only"),
    (["--controlnet", "/nonexistent/controlnet"], "--controlnet '/nonexistent/controlnet' is not a folder"),
])
def test_usage_errors_are_one_line_naming_the_value(change, words, tmp_path, tiny_model_dir, tiny_data_dir,
                                                   stand_in_models):
    """In-process through main(); run_main turns each into one stderr line and exit 2 (checked once below)."""
    import evaluate
    from utils.cli import UsageError

    argv = evaluate_command(tiny_model_dir, "--data_dir", tiny_data_dir, stand_in_models, tmp_path / "out")[2:]
    flag, value = change
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += change
    with pytest.raises(UsageError, match=words):
        evaluate.main(argv)
    assert not (tmp_path / "out" / "generated").exists()


def test_input_reaches_the_held_out_rows(tmp_path, tiny_model_dir, stand_in_models):
    """--input goes through the same readers as create.py, at the test split, before any model loads: the Karpathy
    file's test rows (3 sentences each after junk and repeats) are what --caption_index is checked against."""
    import evaluate
    import source_cases
    from utils.cli import UsageError

    source_cases.write_karpathy(tmp_path / "src")
    argv = evaluate_command(tiny_model_dir, "--input", tmp_path / "src" / "dataset_test.json", stand_in_models,
                            tmp_path / "eval", "--caption_index", 3)[2:]
    with pytest.raises(UsageError, match="--caption_index 3 is out of range: rows have at most 3 caption"):
        evaluate.main(argv)
    assert not (tmp_path / "eval" / "generated").exists()


def test_a_lora_checkpoint_is_evaluated_on_its_recorded_base(runs):
    """--model a LoRA run's checkpoint-N (base from lora_run.json) at --lora_scale 0.5, on a CSV index read with
    --input: measured, scale recorded, scene classes from the index's file names."""
    out, done = runs["root"] / "lora", runs["lora"]
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "eval_report.json").read_text())
    assert math.isfinite(report["fid"]) and report["settings"]["lora_scale"] == 0.5
    assert sorted(p.name for p in (out / "generated").glob("*.png")) == [f"{n:06d}.png" for n in range(1, 5)]
    assert report["scene_details"]["class_counts"] == {"farmland": 2, "river": 2}
    assert report["num_classes"] == 2 and report["chance"] == 0.5 and 0.0 <= report["scene_accuracy"] <= 1.0
    assert "Traceback" not in done.stderr


# --- a ControlNet (--controlnet, --controlnet_conditioning_scale, --control_train_dir)


def test_a_mask_controlnet_reports_control_miou_with_ceiling_and_floor(runs, mask_controlnet_dir, mask_data_dir):
    out = runs["root"] / "control"
    report = json.loads((out / "eval_report.json").read_text())
    rows = [f"{n:06d}.png" for n in range(1, 9)]
    assert sorted(p.name for p in (out / "generated").glob("*.png")) == rows
    assert sorted(p.name for p in (out / "generated_shuffled").glob("*.png")) == rows
    # Real held-out images are the segmenter's own training pairs here: near the top; the random ControlNet's
    # images are not scenes, so far below.
    assert report["control_miou_real"] > 0.9 and report["control_pixel_accuracy_real"] > 0.9
    assert 0 <= report["control_miou"] < 0.6 and 0 <= report["control_miou_shuffled"] < 0.6
    assert 0 <= report["control_pixel_accuracy"] <= 1 and 0 <= report["control_pixel_accuracy_shuffled"] <= 1
    details = report["control_details"]
    assert details["segmenter_train_dir"] == str(mask_data_dir) and details["segmenter_train_pairs"] == 8
    assert details["controlnet"] == str(mask_controlnet_dir) and details["conditioning_type"] == "mask"
    assert len(details["per_class_iou"]["generated"]) == 5 and "against its own mask" in details["shuffled"]
    assert report["settings"]["controlnet"] == str(mask_controlnet_dir)
    assert report["settings"]["controlnet_conditioning_scale"] == 1.0
    # The added line without a conditioning image is left out, counted with its reason.
    assert report["bad_rows"]["by_reason"] == {"no_conditioning_image": 1} and report["num_samples"] == 8
    sheet = (out / "sheet.html").read_text()
    assert "<th>conditioning</th><th>real</th><th>generated</th>" in sheet
    assert "sheet/conditioning_000001.png" in sheet and (out / "sheet" / "conditioning_000001.png").is_file()
    # Each row's own conditioning steered its image, another row's its shuffled twin (same caption and seed).
    differ = [Image.open(out / "generated" / name).tobytes() != Image.open(out / "generated_shuffled" / name).tobytes()
              for name in rows]
    assert all(differ)


def test_scale_zero_draws_both_sets_alike_and_control_train_dir_picks_the_segmenters_pairs(
        runs, tmp_path, tiny_model_dir, mask_data_dir, mask_controlnet_dir, stand_in_models):
    """--controlnet_conditioning_scale 0 turns the ControlNet off, so own and shuffled conditioning draw the same
    images and the same figure; --control_train_dir replaces the ControlNet's training folder for the segmenter."""
    import evaluate
    from test_generate import restored_process_state

    other = shutil.copytree(mask_data_dir, tmp_path / "other_pairs")
    argv = evaluate_command(tiny_model_dir, "--data_dir", mask_data_dir, stand_in_models, tmp_path / "eval",
                            "--controlnet", mask_controlnet_dir, "--controlnet_conditioning_scale", 0,
                            "--control_train_dir", other, "--num_samples", 3)[2:]
    with restored_process_state():
        torch.set_num_threads(1)
        assert evaluate.main(argv) == 0
    report = json.loads((tmp_path / "eval" / "eval_report.json").read_text())
    assert report["control_details"]["segmenter_train_dir"] == str(other)
    assert report["settings"]["controlnet_conditioning_scale"] == 0.0
    assert report["control_miou"] == report["control_miou_shuffled"]
    for n in range(1, 4):
        name = f"{n:06d}.png"
        assert (tmp_path / "eval" / "generated" / name).read_bytes() == \
            (tmp_path / "eval" / "generated_shuffled" / name).read_bytes()


def test_gsd_adherence_is_measured_with_its_ceiling_and_floors(runs):
    """--gsd_probe_data on held-out rows carrying a gsd: the GSD headline and details (probe through the VAE, the
    sweep over the probe data's range, its rows and points as asked), the summary line and the sheet's sweep. The
    tiny model takes no metadata: its sweep images do not change, rho 0 (metadata models: test_evaluation_gsd.py)."""
    report = runs["first_report"]
    details = report["gsd_details"]
    assert details["model_takes_gsd"] is False and details["probe"]["through_vae"] is True
    assert details["probe"]["covered_gsd"] == [0.5, 4.0] and details["probe"]["images"] == 8
    assert details["sweep"]["gsd"] == pytest.approx([0.5, 1.414214, 4.0]) and details["sweep"]["rows"] == [1, 2]
    assert details["images_generated"] == METADATA_ROWS + 2 * 3
    assert report["gsd_sweep_spearman"] == 0.0 and report["gsd_sweep_spearman_shuffled"] == 0.0
    assert report["gsd_error_octaves"] == details["generated"]["error_octaves"] == pytest.approx(
        report["gsd_error_octaves_absent"])  # no metadata taken: the rows' images are the plain ones
    assert 0.0 <= report["gsd_within_half_octave"] <= 1.0 and report["gsd_error_octaves_real"] >= 0
    assert len(list((runs["root"] / "meta" / "gsd").glob("sweep_*.png"))) == 6
    assert "INFO GSD adherence (N=4): error " in runs["meta"].stderr
    sheet = (runs["root"] / "meta" / "sheet.html").read_text()
    assert "GSD sweep" in sheet and "gsd/sweep_000002_02.png" in sheet and "<th>4 m</th>" in sheet
    resumed = json.loads((runs["root"] / "meta" / "eval_report.json").read_text())
    assert resumed["gsd_details"]["images_generated"] == 0 and resumed["gsd_sweep_spearman"] == 0.0


def test_another_sweep_in_the_same_folder_is_refused(runs, tiny_model_dir, stand_in_models):
    """The GSD images' settings guard a rerun like generated/'s: another --gsd_sweep_rows is one line."""
    import evaluate

    argv = [str(a) for a in evaluate_command(tiny_model_dir, "--data_dir", runs["gsd_data"], stand_in_models,
                                             runs["root"] / "meta", "--gsd_probe_data", runs["gsd_data"],
                                             "--gsd_sweep_rows", 3, "--num_samples", METADATA_ROWS, "--seed", 7)[2:]]
    with pytest.raises(UsageError, match=r"gsd holds images made with other settings \(gsd_sweep, gsd_sweep_rows\)"):
        evaluate.main(argv)


@pytest.mark.parametrize("change, words", [
    (["--gsd_sweep_points", "1"], "--gsd_sweep_points 1 must be at least 2"),
    (["--gsd_sweep_rows", "0"], "--gsd_sweep_rows 0 must be at least 1"),
    (["--gsd_probe_data", "/nonexistent/data"], "--gsd_probe_data /nonexistent/data is not a folder"),
])
def test_gsd_usage_errors(change, words, tmp_path, tiny_model_dir, tiny_data_dir, stand_in_models):
    """Bad GSD flags are refused before anything loads or is written."""
    import evaluate

    argv = evaluate_command(tiny_model_dir, "--data_dir", tiny_data_dir, stand_in_models, tmp_path / "out")[2:]
    with pytest.raises(UsageError, match=words):
        evaluate.main([str(a) for a in argv] + change)
    assert not (tmp_path / "out" / "generated").exists()
