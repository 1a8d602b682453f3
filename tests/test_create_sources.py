"""create.py on every source form besides Parquet, end to end as users run it: create.py -> format.py ->
datasets.load_dataset("imagefolder"), with hostile rows in each; --split, --append, resume, usage errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest

import source_cases as cases
from conftest import REPO_ROOT
from test_create import assert_usage_error, image_files, name, read_captions, read_report, read_source_files

CREATE = "diffusion_model/create.py"
FORMAT = "diffusion_model/format.py"
RESOLUTION = 32

# form -> (writer, the --input path under its folder, label the summary line must carry)
FORMS = {
    "karpathy": (lambda root: cases.write_karpathy(root)["train"], "dataset_test.json", "karpathy, split train"),
    "nwpu": (cases.write_nwpu, "dataset_nwpu.json", "nwpu, split train"),
    "csv": (cases.write_csv, "index.csv", "csv"),
    "jsonl": (cases.write_jsonl, "index.jsonl", "jsonl"),
    "webdataset": (cases.write_webdataset, ".", "webdataset"),
}


SCALE = 224 / RESOLUTION  # the scenes are 224 px, written at RESOLUTION: each output pixel covers SCALE of theirs


def table_metadata(count: int = 4) -> list:
    """metadata.jsonl's metadata of the CSV and JSONL cases' good rows (gsd=res,lat=latitude,date=acquired)."""
    expected = []
    for index in range(count):
        meta = cases.scene_metadata(index)
        expected.append({"gsd": round(meta["gsd"] * SCALE, 6), **({"lat": meta["lat"]} if index != 1 else {}),
                         "date": meta["date"]})
    return expected


FMOW_CENTRE = {"lat": 41.0, "lon": 11.0}
# form -> (create.py's metadata flags, metadata.jsonl's metadata of the good rows in order, bad values reported)
METADATA = {
    "csv": (["--metadata_columns", "gsd=res,lat=latitude,date=acquired"], table_metadata(),
            [{"row": 2, "field": "lat", "value": "north", "reason": "not a number"}]),
    "jsonl": (["--metadata_columns", "gsd=res,lat=latitude,date=acquired"], table_metadata(),
              [{"row": 2, "field": "lat", "value": "north", "reason": "not a number"}]),
    "webdataset": (["--metadata_columns", "gsd=res"], [{"gsd": round(0.5 * (i + 1) * SCALE, 6)} for i in range(6)],
                   []),
    "karpathy": (["--metadata_sidecars"],
                 [{"gsd": 2.1, **FMOW_CENTRE, "date": "2016-07-01T10:00:00+00:00"},
                  {"gsd": 4.2, **FMOW_CENTRE, "date": "2016-07-02T10:00:00+00:00"}, None],
                 [{"row": 3, "field": "sidecar", "value": "00002.json", "reason": "missing"}]),
    "nwpu": (["--metadata", "gsd=0.2,sensor=aerial"], [{"gsd": 1.4, "sensor": "aerial"}] * 6, []),
}


def create(run_script, source, output_dir, *extra):
    """Run create.py at a small resolution; assert it succeeded."""
    result = run_script(CREATE, ["--input", source, "--output_dir", output_dir, "--resolution", RESOLUTION,
                                 "--num_workers", 2, *extra])
    assert result.returncode == 0, result.stderr
    return result


def assert_outcomes(output_dir: Path, expected: list, offset: int = 0) -> None:
    """Every good row kept with its caption under its row number; every bad row in the report with its reason."""
    good = [(name(offset + i + 1), caption) for i, (reason, caption) in enumerate(expected) if reason is None]
    bad = {offset + i + 1: reason for i, (reason, _) in enumerate(expected) if reason}
    assert [c for c in read_captions(output_dir) if int(c[0][-10:-4]) > offset] == good
    report = read_report(output_dir)
    failures = [f for f in report["failures"] + report["other_sources_failures"] if f["row"] > offset]
    assert {f["row"]: f["reason"] for f in failures} == bad
    assert all(f["filename"] and (f["detail"] or f["reason"] == "no_caption") for f in failures)


def load_imagefolder(output_dir: Path, run_script, cache_dir: Path):
    """format.py, then the datasets imagefolder loader on the folder."""
    formatted = run_script(FORMAT, ["--caption_file", output_dir / "captions.txt",
                                    "--output_file", output_dir / "metadata.jsonl"])
    assert formatted.returncode == 0, formatted.stderr
    return datasets.load_dataset("imagefolder", data_dir=str(output_dir), cache_dir=str(cache_dir), split="train")


@pytest.mark.parametrize("form", list(FORMS))
def test_form_end_to_end(form, tmp_path, run_script):
    writer, index, label = FORMS[form]
    expected = writer(tmp_path / "src")
    output_dir = tmp_path / "out"
    flags, metadata, bad_values = METADATA[form]
    result = create(run_script, tmp_path / "src" / index, output_dir, *flags)
    good = sum(reason is None for reason, _ in expected)
    assert f"create ({label}): {good}/{len(expected)} rows ok" in result.stdout
    assert f"metadata on {sum(m is not None for m in metadata)} rows" in result.stdout
    assert_outcomes(output_dir, expected)
    report = read_report(output_dir)
    assert report["source"]["format"] == form and report["rows_in_inputs"] == len(expected)
    assert report["metadata_problems"] == bad_values and report["metadata"]["bad_values"] == len(bad_values)
    dataset = load_imagefolder(output_dir, run_script, tmp_path / "cache")
    assert dataset.num_rows == good
    records = [json.loads(line) for line in (output_dir / "metadata.jsonl").read_text().splitlines()]
    assert [r.get("metadata") for r in records] == metadata, "each image's metadata, GSD scaled to the output"
    assert "metadata" in dataset.column_names
    assert dataset[0]["image"].size == (RESOLUTION, RESOLUTION)
    assert [row["text"] for row in dataset] == [c for r, c in expected if r is None]
    outside = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*") if output_dir not in (p, *p.parents)}
    assert outside <= {"src", "outside.png", "cache"}, "nothing written beside the output folder"


def test_karpathy_splits_are_numbered_on_their_own_and_named(tmp_path, run_script):
    expected = cases.write_karpathy(tmp_path / "src")
    lines = {}
    for split in ("val", "test"):
        lines[split] = create(run_script, tmp_path / "src" / "dataset_test.json", tmp_path / split, "--split", split).stdout
        assert_outcomes(tmp_path / split, expected[split])
        assert read_report(tmp_path / split)["source"]["split"] == split
    assert "create (karpathy, split val (as 'val', 'valid' in the file)): 4/5 rows ok" in lines["val"]
    assert "create (karpathy, split test): 3/4 rows ok" in lines["test"]
    val = read_report(tmp_path / "val")
    assert val["source"]["split_names"] == ["val", "valid"] and val["source"]["splits_not_read"] == {
        "train": 7, "test": 3}


def test_webdataset_limit_crosses_shards(tmp_path, run_script):
    expected = cases.write_webdataset(tmp_path / "src")
    create(run_script, tmp_path / "src", tmp_path / "out", "--limit", 6, "--format", "webdataset")
    assert_outcomes(tmp_path / "out", expected[:6])
    assert read_report(tmp_path / "out")["rows_processed"] == 6


def test_append_numbers_after_the_existing_rows_and_reruns_resume(tmp_path, run_script):
    csv_expected = cases.write_csv(tmp_path / "csv")
    wds_expected = cases.write_webdataset(tmp_path / "wds")
    k_expected = cases.write_karpathy(tmp_path / "k")["train"]
    out = tmp_path / "out"
    csv_flags, wds_flags = ["--metadata_columns", "gsd=res"], ["--metadata", "sensor=s2"]
    create(run_script, tmp_path / "csv" / "index.csv", out, *csv_flags)
    first = create(run_script, tmp_path / "wds", out, "--append", *wds_flags)
    assert "webdataset" in first.stdout
    n_csv_lines, n_wds_lines = (sum(r is None for r, _ in expected) for expected in (csv_expected, wds_expected))
    assert (f"; {n_csv_lines + n_wds_lines} caption lines in {out / 'captions.txt'} ({n_wds_lines} from this source, "
            f"{n_csv_lines} from the folder's other sources);") in first.stdout
    assert read_report(out)["caption_lines_in_file"] == n_csv_lines + n_wds_lines
    create(run_script, tmp_path / "k" / "dataset_test.json", out, "--append")
    n_csv, n_wds = len(csv_expected), len(wds_expected)
    assert_outcomes(out, k_expected, offset=n_csv + n_wds)
    report = read_report(out)
    assert report["source"]["first_row"] == n_csv + n_wds + 1
    assert [(s["format"], s["first_row"], s["rows"]) for s in report["sources"]] == [
        ("csv", 1, n_csv), ("webdataset", n_csv + 1, n_wds), ("karpathy", n_csv + n_wds + 1, len(k_expected))]
    assert {f["row"] for f in report["other_sources_failures"]} == {
        i + 1 for i, (r, _) in enumerate(csv_expected + wds_expected) if r}, "earlier sources' bad rows stay named"
    captions = read_captions(out)
    numbers = [int(line[0][-10:-4]) for line in captions]
    assert numbers == sorted(numbers) and len(captions) == sum(r is None for r, _ in csv_expected + wds_expected + k_expected)

    # Each image's source name, whatever the form: the CSV's file_name, the tar's sample key, the JSON's filename.
    sources = dict(read_source_files(out))
    assert sorted(sources) == [n for n, _ in captions]
    assert sources[name(1)] == "images/scene_0.png" and sources[name(n_csv + 1)] == "shard-0000.tar:s0/000000"
    assert sources[name(n_csv + n_wds + 1)] == "00000.tif"

    # Each source's metadata lines stay through the later appends (the Karpathy source gave none).
    metadata = (out / "metadata_values.jsonl").read_text()
    by_row = {int(r["file_name"][-10:-4]): r["metadata"] for r in map(json.loads, metadata.splitlines())}
    assert by_row == {**{i + 1: {"gsd": round(0.5 * (i + 1) * SCALE, 6)} for i in range(4)},
                      **{n_csv + i + 1: {"sensor": "s2"} for i, (r, _) in enumerate(wds_expected) if r is None}}

    # The same append again resumes its own rows: nothing is added twice, nothing rewritten.
    before_files, before_captions = image_files(out), read_captions(out)
    again = create(run_script, tmp_path / "wds", out, "--append", *wds_flags)
    assert read_report(out)["images_written"] == 0 and read_report(out)["source"]["first_row"] == n_csv + 1
    assert image_files(out) == before_files and read_captions(out) == before_captions, again.stdout
    # So does the first command: the appended sources' lines stay.
    create(run_script, tmp_path / "csv" / "index.csv", out, *csv_flags)
    assert read_captions(out) == before_captions and dict(read_source_files(out)) == sources
    assert (out / "metadata_values.jsonl").read_text() == metadata
    assert_outcomes(out, csv_expected + wds_expected + k_expected)

    dataset = load_imagefolder(out, run_script, tmp_path / "cache")
    assert dataset.num_rows == len(before_captions)
    assert dataset["source_file"] == [sources[n] for n in dict(before_captions)]


def test_append_overwrite_redoes_only_its_own_rows_and_never_other_image_settings(tmp_path, run_script):
    cases.write_csv(tmp_path / "csv")
    cases.write_webdataset(tmp_path / "wds")
    out = tmp_path / "out"
    create(run_script, tmp_path / "csv" / "index.csv", out)
    create(run_script, tmp_path / "wds", out, "--append")
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "rsicd_images").iterdir()}
    create(run_script, tmp_path / "wds", out, "--append", "--overwrite")
    after = {p.name: p.stat().st_mtime_ns for p in (out / "rsicd_images").iterdir()}
    assert set(after) == set(stamps)
    rewritten = {n for n in after if after[n] != stamps[n]}
    n_csv = read_report(out)["source"]["first_row"] - 1
    assert rewritten == {n for n in after if int(n[-10:-4]) > n_csv} and rewritten
    for extra in ([], ["--overwrite"]):
        result = run_script(CREATE, ["--input", tmp_path / "wds", "--output_dir", out, "--append",
                                     "--resolution", 48, *extra])
        assert_usage_error(result, f"resolution={RESOLUTION}")


def write_neither_json(root: Path) -> None:
    """A .json that is neither Karpathy nor NWPU."""
    (root / "other.json").write_text(json.dumps({"hello": 1}))


@pytest.mark.parametrize(
    "make, extra, named",
    [
        (cases.write_csv, ["--input", "src/index.csv", "src/../wds"], "mixes source forms"),
        (cases.write_nwpu, ["--input", "src/dataset_nwpu.json", "--format", "karpathy"], "looks like a nwpu"),
        (cases.write_csv, ["--input", "src/index.csv", "--split", "test"], "--split test"),
        (cases.write_csv, ["--input", "src/index.csv", "--caption_column", "label"], "'label'"),
        (cases.write_nwpu, ["--input", "src/dataset_nwpu.json", "--images_dir", "nowhere"], "nowhere"),
        (write_neither_json, ["--input", "src/other.json"], "other.json"),
        (cases.write_csv, ["--input", "src/nothing.csv"], "nothing.csv"),
        (cases.write_webdataset, ["--input", "src", "--split", "val"], "--split val"),
        (cases.write_csv, ["--input", "src/index.csv", "--format", "tsv"], "tsv"),
        (cases.write_webdataset, ["--input", "src", "--images_dir", "src"], "--images_dir src does not apply"),
        (cases.write_nwpu, ["--input", "src/dataset_nwpu.json", "--caption_column", "raw"], "--caption_column raw"),
        (cases.write_csv, ["--input", "src/index.csv", "--metadata_columns", "height=res"],
         "unknown field 'height' (known: gsd, lat, lon, date, cloud, off_nadir, sensor)"),
        (cases.write_csv, ["--input", "src/index.csv", "--metadata_columns", "gsd=resolution"],
         "--metadata_columns gsd=resolution: 'resolution' is not a column of"),
        (cases.write_webdataset, ["--input", "src", "--metadata_sidecars"], "--metadata_sidecars does not apply"),
        (cases.write_csv, ["--input", "src/index.csv", "--metadata", "gsd=-1"], "gsd=-1: must be above 0"),
    ],
)
def test_usage_errors(tmp_path, run_script, make, extra, named):
    (tmp_path / "src").mkdir()
    make(tmp_path / "src")
    cases.write_webdataset(tmp_path / "wds")
    result = run_script(CREATE, ["--output_dir", "o", *extra], cwd=tmp_path)
    assert_usage_error(result, named)
    assert not (tmp_path / "o").exists() or named == "tsv"


def test_junk_shard_is_a_usage_error(tmp_path, run_script):
    (tmp_path / "bad.tar").write_bytes(b"not a tar at all" * 100)
    assert_usage_error(run_script(CREATE, ["--input", tmp_path / "bad.tar", "--output_dir", tmp_path / "o"]),
                       "bad.tar")


def test_kill_during_an_append_and_resume_matches_an_uninterrupted_run(tmp_path, run_script):
    cases.write_csv(tmp_path / "csv")
    cases.write_webdataset(tmp_path / "wds", per_shard=30)
    common = ["--resolution", 256, "--caption_mode", "all"]
    for out in ("ref", "run"):
        create(run_script, tmp_path / "csv" / "index.csv", tmp_path / out, *common)
    create(run_script, tmp_path / "wds", tmp_path / "ref", "--append", *common)
    base_images = len(list((tmp_path / "run" / "rsicd_images").iterdir()))

    args = [sys.executable, str(REPO_ROOT / CREATE), "--input", str(tmp_path / "wds"), "--output_dir",
            str(tmp_path / "run"), "--append", "--num_workers", "1", *map(str, common)]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    images_dir, deadline = tmp_path / "run" / "rsicd_images", time.monotonic() + 60
    while time.monotonic() < deadline and len(list(images_dir.glob("*.jpg"))) < base_images + 5:
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "run" / "create_report.json").exists(), "the kill must land mid-append"
    assert (tmp_path / "run" / "create_report.previous.json").exists(), "the first source's report is set aside"

    create(run_script, tmp_path / "wds", tmp_path / "run", "--append", *common)
    report = read_report(tmp_path / "run")
    assert report["images_reused"] >= 5 and report["other_sources_failures"] == read_report(tmp_path / "ref")[
        "other_sources_failures"], "the first source's failed rows survive the kill"
    assert not (tmp_path / "run" / "create_report.previous.json").exists()
    assert image_files(tmp_path / "run") == image_files(tmp_path / "ref")
    assert (tmp_path / "run" / "captions.txt").read_bytes() == (tmp_path / "ref" / "captions.txt").read_bytes()
    assert read_source_files(tmp_path / "run") == read_source_files(tmp_path / "ref")
