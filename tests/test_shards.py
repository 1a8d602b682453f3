"""create.py --output_format webdataset (diffusion_model/shards.py), in process: tar shards, index, stats, failed rows,
resume of unfinished shards only, tasks whose union is byte for byte one run, the merge, and the usage errors."""

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffusion_model import create
from diffusion_model.shards import ShardPlan, add_member, task_from_env
from diffusion_model.sources.webdataset import open_webdataset
from parquet_cases import ODD_CASES, expected_failures, write_odd_shards
from utils.cli import run_main

SHARD_SIZE = 5
ODD_ROWS = len(ODD_CASES) + 1  # write_odd_shards adds a null-struct row


def create_args(source, output, *extra) -> list:
    """A webdataset create.py command line at 16 px, one worker, every caption kept."""
    return ["--input", str(source), "--output_dir", str(output), "--output_format", "webdataset", "--shard_size",
            str(SHARD_SIZE), "--resolution", "16", "--num_workers", "1", "--caption_mode", "all", *map(str, extra)]


def run(argv: list, capsys) -> tuple:
    """create.py's main as the script runs it: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as done:
        run_main(create.main, argv)
    out, err = capsys.readouterr()
    return done.value.code, out, err


def shard_bytes(folder: Path) -> dict:
    """Every file under folder/shards by name, as bytes."""
    return {p.name: p.read_bytes() for p in sorted((folder / "shards").iterdir())}


@pytest.fixture(scope="module")
def odd_source(tmp_path_factory) -> Path:
    """The odd-case Parquet shards (good rows and every kind of bad one)."""
    folder = tmp_path_factory.mktemp("odd") / "src"
    write_odd_shards(folder)
    return folder


@pytest.fixture(scope="module")
def single_run(odd_source, tmp_path_factory):
    """One run over the whole source: (folder, stdout)."""
    output = tmp_path_factory.mktemp("single") / "out"
    with pytest.MonkeyPatch.context() as patch:
        for name in ("SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN"):
            patch.delenv(name, raising=False)
        assert create.main(create_args(odd_source, output)) == 0
    return output


def test_shards_hold_image_captions_and_record_per_sample(single_run):
    """Each good row is key.jpg (16 px), key.txt (all captions), key.json (row, source file); bad rows are absent."""
    failed = expected_failures()
    good = [n for n in range(1, ODD_ROWS + 1) if n not in failed]
    members = {}
    for tar_path in sorted((single_run / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar})
    assert sorted(members) == sorted(f"image_{n:06d}.{e}" for n in good for e in ("jpg", "txt", "json"))
    assert Image.open(io.BytesIO(members["image_000001.jpg"])).size == (16, 16)
    assert members["image_000013.txt"].decode().splitlines() == ["河流 und Flußufer — été", "second caption ."]
    record = json.loads(members["image_000013.json"])
    assert record["row"] == 13 and record["source_file"] == "rsicd_images/unicode.jpg"
    assert record["captions"] == ["河流 und Flußufer — été", "second caption ."]


def test_index_offsets_point_at_the_images_and_bad_rows_are_reported(single_run):
    """The global index lists every sample in row order with its shard and the image's bytes' place in the tar."""
    index = pq.read_table(single_run / "shards_index.parquet").to_pylist()
    failed = expected_failures()
    assert [r["row"] for r in index] == [n for n in range(1, ODD_ROWS + 1) if n not in failed]
    for record in index:
        assert record["shard"] == (record["row"] - 1) // SHARD_SIZE
        tar_path = single_run / "shards" / f"shard-{record['shard']:06d}.tar"
        with tarfile.open(tar_path) as tar:
            expected = tar.extractfile(f"{record['key']}.jpg").read()
        with open(tar_path, "rb") as handle:
            handle.seek(record["image_offset"])
            assert handle.read(record["image_size"]) == expected
    report = json.loads((single_run / "create_report.json").read_text())
    assert {f["row"]: f["reason"] for f in report["failures"]} == failed
    assert report["rows_processed"] == ODD_ROWS and report["images_ok"] == len(index)
    stats = json.loads((single_run / "shards_stats.json").read_text())
    assert [s["rows"] for s in stats["per_shard"]] == [5, 5, 5, 3]
    written = {name: (single_run / name).stat().st_mtime_ns for name in ("shards_stats.json", "shards_index.parquet")}
    assert written["shards_stats.json"] >= written["shards_index.parquet"]


def test_project_reader_reads_the_shards_back(single_run):
    """create.py's own webdataset reader takes the output as a source: same rows, captions from key.txt."""
    tars = sorted((single_run / "shards").glob("*.tar"))
    rows = list(open_webdataset(tars).rows())
    assert len(rows) == len(pq.read_table(single_run / "shards_index.parquet"))
    assert all(r.failure is None and r.image for r in rows)


def test_rerun_redoes_only_unfinished_shards_byte_identical(single_run, odd_source, tmp_path, capsys):
    """A shard without its stats (killed before them) and a leftover temp tar are redone; the rest is kept as is."""
    import shutil

    copy = tmp_path / "out"
    shutil.copytree(single_run, copy)
    before = shard_bytes(copy)
    (copy / "shards" / "shard-000001.json").unlink()
    (copy / "shards" / "shard-000002.tar.tmp").write_bytes(b"half a tar")
    kept = (copy / "shards" / "shard-000000.tar").stat().st_mtime_ns
    code, out, _ = run(create_args(odd_source, copy), capsys)
    assert code == 0 and "1 written, 3 already finished" in out
    assert shard_bytes(copy) == before
    assert (copy / "shards" / "shard-000000.tar").stat().st_mtime_ns == kept


def test_tasks_union_equals_one_run_and_merge_waits_for_all(single_run, odd_source, tmp_path, capsys, monkeypatch):
    """Three tasks (the last one told by Slurm's variables) write only their shards; --merge refuses until all have
    run, then writes the same index; every shard file is byte-identical to the single run's."""
    output = tmp_path / "tasks"
    for task in (0, 1):
        code, out, _ = run(create_args(odd_source, output, "--num_shards", 3, "--shard_index", task), capsys)
        assert code == 0 and f"task {task + 1} of 3" in out and "--merge" in out
    assert sorted(p.name for p in (output / "shards").glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert not (output / "shards_index.parquet").exists()
    code, _, err = run(["--merge", str(output)], capsys)
    assert code == 2 and err.count("\n") == 1 and "2 of 4 shards are not finished (shard 2, 3)" in err
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    code, out, _ = run(create_args(odd_source, output), capsys)
    assert code == 0 and "(task 3 of 3): shards 2-3 of 4" in out
    code, out, _ = run(["--merge", str(output)], capsys)
    assert code == 0 and "10 samples" in out
    assert shard_bytes(output) == shard_bytes(single_run)
    assert (output / "shards_index.parquet").read_bytes() == (single_run / "shards_index.parquet").read_bytes()


@pytest.mark.parametrize("extra, message", [
    (["--output_format", "imagefolder", "--num_shards", 2], "--num_shards 2 needs --output_format webdataset"),
    (["--num_shards", 2, "--shard_index", 2], "--shard_index must be between 0 and 1 (--num_shards 2), got 2"),
    (["--shard_size", 0], "--shard_size must be at least 1, got 0"),
    (["--append"], "--append is not supported with --output_format webdataset"),
    (["--resolution", 24], "holds images made with resolution=16"),
])
def test_usage_errors_are_one_line_exit_2(single_run, odd_source, extra, message, capsys):
    """Flags that clash, a task number out of range, and a resume with other settings: one line, exit 2."""
    code, _, err = run(create_args(odd_source, single_run, *extra), capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_merge_of_a_folder_without_shards_is_a_usage_error(tmp_path, capsys):
    """--merge on a folder create.py did not shard: one line, exit 2."""
    code, _, err = run(["--merge", str(tmp_path)], capsys)
    assert code == 2 and "no create.py --output_format webdataset settings" in err


def test_task_from_env_defaults_and_bad_values():
    """Flags win over Slurm's variables; an array counted from 1 starts at task 0; garbage is a usage error."""
    from utils.cli import UsageError

    assert task_from_env(None, None, {}) == (1, 0)
    assert task_from_env(None, None, {"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "6",
                                      "SLURM_ARRAY_TASK_MIN": "5"}) == (4, 1)
    assert task_from_env(2, 1, {"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "3"}) == (2, 1)
    with pytest.raises(UsageError, match="SLURM_ARRAY_TASK_ID='x' is not a whole number"):
        task_from_env(None, None, {"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "x"})


def test_plan_blocks_cover_every_shard_once():
    """The tasks' blocks partition the shards, in order, whatever the counts (more tasks than shards too)."""
    for rows, size, tasks in ((18, 5, 3), (10, 3, 7), (1, 10, 2), (100, 7, 4)):
        blocks = [ShardPlan(rows, size, tasks, k).block for k in range(tasks)]
        assert [j for b in blocks for j in b] == list(range(ShardPlan(rows, size).total))


def test_members_have_fixed_time_owner_and_mode(tmp_path):
    """add_member writes no clock or user into the tar, and returns where the data starts."""
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        offset = add_member(tar, "k.txt", b"hello")
    with tarfile.open(path) as tar:
        info = tar.getmember("k.txt")
    assert (info.mtime, info.uid, info.uname, info.mode) == (0, 0, "", 0o644)
    assert path.read_bytes()[offset:offset + 5] == b"hello"


def test_no_input_and_no_merge_is_a_usage_error(capsys):
    """--input and --output_dir stay required unless --merge is given."""
    code, _, err = run(["--output_format", "webdataset"], capsys)
    assert code == 2 and "the following arguments are required: --input, --output_dir" in err


def test_kill_minus_9_then_rerun_redoes_only_unfinished_shards(tmp_path, capsys, monkeypatch):
    """create.py killed with SIGKILL after some shards: at most one temporary tar is left; the rerun writes only the
    shards that were not finished, and every shard file is byte-identical to an uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from diffusion_model.sample_data import make_sample_parquet

    for name in ("SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    source = make_sample_parquet(tmp_path / "s.parquet", 160, seed=1, row_group_size=16)
    common = ["--input", str(source), "--output_format", "webdataset", "--shard_size", "16", "--resolution", "256",
              "--num_workers", "1"]
    assert create.main(common + ["--output_dir", str(tmp_path / "ref")]) == 0
    script = Path(create.__file__).resolve()
    process = subprocess.Popen([sys.executable, str(script), *common, "--output_dir", str(tmp_path / "run")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    shards, deadline = tmp_path / "run" / "shards", time.monotonic() + 60
    while time.monotonic() < deadline and len(list(shards.glob("*.json")) if shards.is_dir() else []) < 2:
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "run" / "shards_index.parquet").exists(), "the kill must land mid-run"
    finished = len(list(shards.glob("*.json")))
    assert len(list(shards.glob("*.tmp"))) <= 1
    capsys.readouterr()
    code, out, _ = run(common + ["--output_dir", str(tmp_path / "run")], capsys)
    assert code == 0 and f"{10 - finished} written, {finished} already finished" in out
    assert shard_bytes(tmp_path / "run") == shard_bytes(tmp_path / "ref")


def test_metadata_goes_into_each_record_and_the_index(tmp_path, capsys, monkeypatch):
    """--metadata values (the GSD corrected for the resize, as in metadata_values.jsonl) are in each sample's .json
    and the index's metadata column, and counted in the shard's stats."""
    from diffusion_model.sample_data import make_sample_parquet

    for name in ("SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    source = make_sample_parquet(tmp_path / "s.parquet", 3, seed=0)
    code, _, _ = run(create_args(source, tmp_path / "out", "--metadata", "gsd=0.5,sensor=naip"), capsys)
    assert code == 0
    side = Image.open(io.BytesIO(pq.read_table(source)["image"][0].as_py()["bytes"])).size[0]
    expected = {"gsd": 0.5 * side / 16, "sensor": "naip"}
    index = pq.read_table(tmp_path / "out" / "shards_index.parquet").to_pylist()
    assert [json.loads(r["metadata"]) for r in index] == [expected] * 3
    with tarfile.open(tmp_path / "out" / "shards" / "shard-000000.tar") as tar:
        assert json.loads(tar.extractfile("image_000002.json").read())["metadata"] == expected
    assert json.loads((tmp_path / "out" / "shards" / "shard-000000.json").read_text())["metadata_rows"] == 3
