"""create.py end to end, as a subprocess on generated Parquet: odd cases, schemas, resume, kill -9, usage errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import odd_images as odd
from diffusion_model.sample_data import make_sample_parquet
from parquet_cases import GOOD, ODD_CASES, PLAIN_SCHEMA, expected_failures, write_odd_shards, write_rows

CREATE = "diffusion_model/create.py"
SHARED_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "naip_rsicd_sample.parquet"

EXPECTED_ODD_CAPTIONS = [
    (1, GOOD[0]),
    (2, "a red roof ."),
    (3, "a blue pond ."),
    (4, "a cyan lake ."),
    (5, "a grey ramp ."),
    (6, "a rotated field with a road ."),
    (7, "a tall image ."),
    (13, "河流 und Flußufer — été"),
    (13, "second caption ."),
    (14, "a harmless field ."),
    (17, "a grey half ."),
]


def name(number: int) -> str:
    """The captions.txt name of row number's image."""
    return f"rsicd_images/image_{number:06d}.jpg"


def read_captions(output_dir: Path) -> list:
    """captions.txt as (name, caption) pairs."""
    lines = (output_dir / "captions.txt").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "", "captions.txt must end with a newline"
    return [tuple(line.split("\t")) for line in lines[:-1]]


def read_source_files(output_dir: Path) -> list:
    """source_files.jsonl as (image name, source file name) pairs."""
    lines = (output_dir / "source_files.jsonl").read_text(encoding="utf-8").splitlines()
    return [(record["file_name"], record["source_file"]) for record in map(json.loads, lines)]


def read_report(output_dir: Path) -> dict:
    """create_report.json."""
    return json.loads((output_dir / "create_report.json").read_text(encoding="utf-8"))


def image_files(output_dir: Path) -> dict:
    """Name -> bytes of every file in rsicd_images/."""
    return {p.name: p.read_bytes() for p in sorted((output_dir / "rsicd_images").iterdir())}


def assert_usage_error(result, named: str) -> None:
    """Exit 2, one stderr line naming the bad value, no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert named in result.stderr


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory, run_script):
    """create.py over the odd-case shards, run from an unrelated directory."""
    root = tmp_path_factory.mktemp("odd")
    shards = write_odd_shards(root / "shards")
    output_dir = root / "out"
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    args = ["--parquet_path", root / "shards", "--output_dir", output_dir, "--resolution", 64,
            "--caption_mode", "all", "--num_workers", 2]
    return root, shards, output_dir, run_script(CREATE, args, cwd=elsewhere)


def test_odd_cases_exit_zero_with_summary(odd_run):
    _, shards, _, result = odd_run
    assert len(shards) == 3
    assert result.returncode == 0, result.stderr
    failures = len(expected_failures())
    assert f"10/{10 + failures} rows ok" in result.stdout and f"{failures} failed" in result.stdout


def test_odd_cases_images_are_rgb_jpegs_at_resolution(odd_run):
    _, _, output_dir, _ = odd_run
    ok_rows = sorted({number for number, _ in EXPECTED_ODD_CAPTIONS})
    files = image_files(output_dir)
    assert list(files) == [name(n).split("/")[1] for n in ok_rows]
    for number in ok_rows:
        with Image.open(output_dir / name(number)) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (64, 64))


def test_odd_cases_pixels(odd_run):
    _, _, output_dir, _ = odd_run
    pixels = {n: np.asarray(Image.open(output_dir / name(n))).astype(int) for n in (2, 5, 6)}
    assert abs(pixels[2][32, 8] - [255, 0, 0]).max() < 20 and pixels[2][32, 56].max() < 20, "alpha onto black"
    assert 100 < pixels[5][32, 32, 0] < 160, "16-bit mid-grey must not saturate"
    assert abs(pixels[6][8, 32] - [255, 0, 0]).max() < 30 and abs(pixels[6][56, 32] - [0, 0, 255]).max() < 30


def test_odd_cases_captions(odd_run):
    _, _, output_dir, _ = odd_run
    assert read_captions(output_dir) == [(name(n), caption) for n, caption in EXPECTED_ODD_CAPTIONS]


def test_odd_cases_source_files_name_each_image_s_source_row(odd_run):
    """source_files.jsonl: one line per image written, its source file name as the Parquet row gave it (a '..'
    name too: it is recorded as text, never opened), so the class in a name like airport_1.jpg is not lost."""
    _, _, output_dir, _ = odd_run
    ok_rows = sorted({number for number, _ in EXPECTED_ODD_CAPTIONS})
    assert read_source_files(output_dir) == [(name(n), ODD_CASES[n - 1][0]) for n in ok_rows]


def test_odd_cases_report(odd_run):
    _, shards, output_dir, _ = odd_run
    report = read_report(output_dir)
    expected = expected_failures()
    assert {f["row"]: f["reason"] for f in report["failures"]} == expected
    assert report["rows_failed"] == len(expected) and report["rows_processed"] == 18
    assert report["failures_by_reason"] == {"null_image": 2, "too_large": 2, "truncated": 1, "empty_image": 1,
                                            "undecodable": 1, "no_caption": 1}
    assert next(f for f in report["failures"] if f["row"] == 8)["filename"] == "rsicd_images/truncated.jpg"
    assert report["images_written"] == 10 and report["caption_lines"] == 11
    assert report["inputs"] == [str(p.resolve()) for p in shards]
    assert report["settings"]["resolution"] == 64 and report["settings"]["caption_mode"] == "all"
    assert report["rows_per_second"] > 0


def test_nothing_lands_outside_output_dir(odd_run):
    root, _, output_dir, _ = odd_run
    outside = [p for p in root.rglob("*") if output_dir not in p.parents and p != output_dir]
    assert sorted(p.relative_to(root).as_posix() for p in outside) == [
        "elsewhere", "shards", "shards/train-00000.parquet", "shards/train-00001.parquet", "shards/train-00002.parquet"]
    assert {p.name for p in output_dir.iterdir()} == {"rsicd_images", "captions.txt", "create_report.json",
                                                      "create_settings.json", "source_files.jsonl"}


def test_strict_exits_one_on_failed_row(tmp_path, run_script):
    write_odd_shards(tmp_path / "shards")
    args = ["--parquet_path", tmp_path / "shards", "--output_dir", tmp_path / "o", "--resolution", 32, "--limit", 8,
            "--strict", "--num_workers", 1]
    result = run_script(CREATE, args)
    assert result.returncode == 1
    assert read_report(tmp_path / "o")["failures_by_reason"] == {"truncated": 1}


def test_plain_schema_pad_mode_and_explicit_caption_file(tmp_path, run_script):
    rows = [{"image": odd.portrait_jpeg(), "text": "a tall\nimage"}, {"image": odd.rgba_png(), "text": None}]
    source = write_rows(tmp_path / "plain.parquet", rows, schema=PLAIN_SCHEMA)
    args = ["--parquet_path", source, "--output_dir", "o", "--caption_file", "o/list.txt", "--resize_mode", "pad",
            "--resolution", 40, "--num_workers", 1]
    result = run_script(CREATE, args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "o" / "list.txt").read_text(encoding="utf-8") == f"{name(1)}\ta tall image\n"
    image = Image.open(tmp_path / "o" / name(1))
    assert image.size == (40, 40) and max(image.getpixel((1, 20))) < 10, "pad fills the sides with background"
    assert read_report(tmp_path / "o")["failures"] == [{"row": 2, "filename": None, "reason": "no_caption", "detail": ""}]


def test_rerun_reuses_images_and_guards_settings(sample_parquet, tmp_path, run_script):
    base = ["--parquet_path", sample_parquet, "--output_dir", tmp_path / "o", "--resolution", 48, "--num_workers", 2]
    assert run_script(CREATE, base).returncode == 0
    first_files, first_captions = image_files(tmp_path / "o"), read_captions(tmp_path / "o")
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "o" / "rsicd_images").iterdir()}
    again = run_script(CREATE, base)
    assert again.returncode == 0
    report = read_report(tmp_path / "o")
    assert (report["images_reused"], report["images_written"]) == (len(first_files), 0)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "o" / "rsicd_images").iterdir()} == stamps
    assert image_files(tmp_path / "o") == first_files and read_captions(tmp_path / "o") == first_captions

    changed = base[:-4] + ["--resolution", 32, "--num_workers", 2]
    assert_usage_error(run_script(CREATE, changed), "resolution=48")
    assert run_script(CREATE, changed + ["--overwrite"]).returncode == 0
    assert read_report(tmp_path / "o")["images_written"] == len(first_files)
    assert Image.open(tmp_path / "o" / name(1)).size == (32, 32)


def test_kill_and_resume_matches_uninterrupted_run(tmp_path, run_script):
    source = make_sample_parquet(tmp_path / "s.parquet", 160, seed=1, row_group_size=16)
    common = ["--parquet_path", source, "--resolution", 256, "--caption_mode", "all"]
    reference = run_script(CREATE, common + ["--output_dir", tmp_path / "ref", "--num_workers", 2])
    assert reference.returncode == 0, reference.stderr

    args = [sys.executable, str(Path(__file__).resolve().parents[1] / CREATE), *map(str, common),
            "--output_dir", str(tmp_path / "run"), "--num_workers", "1"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    images_dir, deadline = tmp_path / "run" / "rsicd_images", time.monotonic() + 60
    while time.monotonic() < deadline and not (images_dir.is_dir() and len(list(images_dir.glob("*.jpg"))) >= 5):
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "run" / "create_report.json").exists(), "the kill must land mid-run"
    done_before = len(list(images_dir.glob("*.jpg")))

    resumed = run_script(CREATE, common + ["--output_dir", tmp_path / "run", "--num_workers", 2])
    assert resumed.returncode == 0, resumed.stderr
    assert read_report(tmp_path / "run")["images_reused"] >= done_before >= 5
    assert image_files(tmp_path / "run") == image_files(tmp_path / "ref")
    assert (tmp_path / "run" / "captions.txt").read_bytes() == (tmp_path / "ref" / "captions.txt").read_bytes()
    assert read_source_files(tmp_path / "run") == read_source_files(tmp_path / "ref")


@pytest.mark.skipif(not SHARED_SAMPLE.exists(), reason="shared NAIP sample not present")
def test_shared_naip_sample(tmp_path, run_script):
    parquet = pq.ParquetFile(SHARED_SAMPLE)
    assert (parquet.metadata.num_rows, parquet.metadata.num_row_groups) == (120, 4)
    result = run_script(CREATE, ["--parquet_path", SHARED_SAMPLE, "--output_dir", tmp_path / "o", "--resolution", 64,
                                 "--num_workers", 2, "--strict"])
    assert result.returncode == 0, result.stderr
    rows = parquet.read(columns=["captions"]).column("captions").to_pylist()
    first_clean = [next(" ".join(c.split()) for c in captions if sum(ch.isalpha() for ch in c) >= 3) for captions in rows]
    assert read_captions(tmp_path / "o") == [(name(i + 1), c) for i, c in enumerate(first_clean)]
    assert len(image_files(tmp_path / "o")) == 120
    assert Image.open(tmp_path / "o" / name(120)).size == (64, 64)


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--parquet_path", "missing.parquet"], "missing.parquet"),
        (["--parquet_path", "junk.parquet"], "junk.parquet"),
        (["--parquet_path", "good.parquet", "--caption_column", "label"], "'label'"),
        (["--parquet_path", "good.parquet", "--resolution", "0"], "--resolution"),
        (["--parquet_path", "good.parquet", "--jpeg_quality", "101"], "--jpeg_quality"),
        (["--parquet_path", "good.parquet", "--num_workers", "0"], "--num_workers"),
        (["--parquet_path", "good.parquet", "--resize_mode", "squash"], "squash"),
        (["--parquet_path", "good.parquet", "--caption_file", "../captions.txt"], "../captions.txt"),
        (["--parquet_path", "good.parquet", "--limit", "x"], "'x'"),
    ],
)
def test_usage_errors(tmp_path, run_script, extra, named):
    write_rows(tmp_path / "good.parquet", [{"image": odd.grayscale_jpeg(), "text": "a road ."}], schema=PLAIN_SCHEMA)
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 but not really")
    result = run_script(CREATE, ["--output_dir", "o", *extra], cwd=tmp_path)
    assert_usage_error(result, named)
    assert not (tmp_path / "o" / "rsicd_images").exists() or named == "squash"


def test_in_process_run_keeps_pillow_s_limit_and_max_pixels_decides(sample_parquet, tmp_path, monkeypatch):
    """create.main in a process whose Pillow limit the sample images exceed: every row is still made, as JPEGs and as
    shards (--max_pixels is create's guard), and afterwards the process has the limit it had before."""
    from diffusion_model import create

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    for name in ("SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    common = ["--input", str(sample_parquet), "--resolution", "16", "--limit", "4", "--num_workers", "1"]
    assert create.main([*common, "--output_dir", str(tmp_path / "o")]) == 0
    assert read_report(tmp_path / "o")["images_written"] == 4
    assert create.main([*common, "--output_dir", str(tmp_path / "s"), "--output_format", "webdataset"]) == 0
    assert pq.read_metadata(tmp_path / "s" / "shards_index.parquet").num_rows == 4
    assert Image.MAX_IMAGE_PIXELS == 100
