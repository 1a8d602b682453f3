"""Training from a sharded folder (trainer/shards.py): the table read by byte offset, split over processes with
equal batches, and train_text_to_image.py end to end: exact resume mid-epoch, and --cache_latents on shards.

Three trainer runs (~10 s each, the first two at once); the rest runs in process.
"""

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_model import create
from diffusion_model.sample_data import make_sample_parquet
from test_train_e2e import run_command, run_parallel, succeeded, trainer_command
from trainer.data import load_raw_dataset
from trainer.latent_cache.index import caption_column, index_captions
from trainer.latent_cache.keys import data_fingerprint
from trainer.shards import ShardGroupSampler, ShardTable, check_shards_dir, group_sampler
from utils.cli import UsageError

ROWS, SHARD_SIZE = 8, 3  # shards of 3, 3 and 2 rows


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory) -> Path:
    """8 sample rows at 64 px as webdataset shards of 3 rows, every caption kept, made by create.py in process."""
    root = tmp_path_factory.mktemp("train_shards")
    source = make_sample_parquet(root / "rsicd.parquet", ROWS, seed=0)
    output = root / "shards"
    with pytest.MonkeyPatch.context() as patch:
        for name in ("SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID"):
            patch.delenv(name, raising=False)
        assert create.main(["--input", str(source), "--output_dir", str(output), "--output_format", "webdataset",
                            "--shard_size", str(SHARD_SIZE), "--resolution", "64", "--num_workers", "1",
                            "--caption_mode", "all"]) == 0
    return output


def test_table_reads_rows_by_offset_like_a_datasets_table(shards_dir):
    """load_raw_dataset detects the folder; rows give a 64 px image, every caption and the record's fields."""
    table = load_raw_dataset(None, None, str(shards_dir), None)
    assert isinstance(table, ShardTable) and len(table) == ROWS
    assert table.column_names[:2] == ["image", "key"] and "text" in table.column_names
    row = table[4]
    assert row["image"].convert("RGB").size == (64, 64) and row["row"] == 5 and row["key"] == "image_000005"
    assert len(row["text"]) == 3 and all(isinstance(c, str) and c for c in row["text"])
    assert row["text"] == table.with_format("arrow")["text"][4].as_py()


def test_image_name_is_the_shard_and_member_holding_the_row_s_image(shards_dir):
    """What bad_rows.json names for a sharded row: the tar (relative to the folder) and the image's member."""
    import tarfile

    table = ShardTable(shards_dir).select([4, 0])
    tar, member = table.image_name(0).split(":")
    assert member.startswith(table[0]["key"] + ".")
    with tarfile.open(shards_dir / tar) as archive:
        assert archive.extractfile(member).read() == table[0]["image"].fp.getvalue()


def test_the_training_dataset_names_a_sharded_row_s_file_as_the_table_does(shards_dir):
    """bad_rows.json's file of a sharded row is the table's own image_name, not a datasets cell's path."""
    from trainer.data import TrainingDataset

    table = ShardTable(shards_dir).select([4, 0])
    dataset = TrainingDataset(table, None, None, "image", "text", seed=0, folder=shards_dir)
    assert [dataset.row_files(row) for row in range(2)] == [(table.image_name(0),), (table.image_name(1),)]


def test_shuffle_select_and_arrow_columns_follow_the_rows(shards_dir):
    """A seeded shuffle then select keeps rows and their columns aligned; the caption index reads the Arrow column."""
    table = ShardTable(shards_dir)
    subset = table.shuffle(seed=3).select(range(5))
    assert [subset[i]["row"] for i in range(5)] == [int(r) + 1 for r in subset.rows]
    texts = subset.with_format("arrow")["text"].to_pylist()
    assert texts == [subset[i]["text"] for i in range(5)]
    index = index_captions(caption_column(subset, "text"), "text")
    assert len(index) == 5 and index.is_list.all()
    assert subset.with_format("arrow")["metadata"] == [None] * 5


def test_fingerprint_follows_rows_and_shard_contents(shards_dir, tmp_path):
    """The cache key's data part changes with the rows shown and with a shard's recorded hash."""
    table = ShardTable(shards_dir)
    first = data_fingerprint(table, "image", "text")
    assert data_fingerprint(ShardTable(shards_dir), "image", "text") == first
    assert data_fingerprint(table.select(range(7)), "image", "text") != first
    copy = tmp_path / "copy"
    shutil.copytree(shards_dir, copy)
    stats = (copy / "shards_stats.json").read_text()
    (copy / "shards_stats.json").write_text(stats.replace('"sha256": "', '"sha256": "0', 1))
    assert data_fingerprint(ShardTable(copy), "image", "text") != first


def test_group_sampler_reads_a_few_shards_at_a_time():
    """Every row once per epoch; each group of 2 shards' rows comes out together; a new order each epoch, the same
    for the same (seed, epoch)."""
    shard_of_rows = np.repeat(np.arange(7), 5)[np.random.default_rng(0).permutation(35)]
    sampler = ShardGroupSampler(shard_of_rows, seed=1, group=2)
    first = list(sampler)
    assert sorted(first) == list(range(35)) and len(sampler) == 35
    for start in range(0, 30, 10):
        assert len(set(shard_of_rows[first[start:start + 10]])) == 2
    assert list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert list(ShardGroupSampler(shard_of_rows, seed=1, group=2)) == first


class TableRows(torch.utils.data.Dataset):
    """A dataset over a table, as TrainingDataset holds one, giving back its indices."""

    def __init__(self, table):
        """Wrap table."""
        self.table = table

    def __len__(self) -> int:
        """The table's rows."""
        return len(self.table)

    def __getitem__(self, index: int) -> int:
        """The index itself."""
        return index


def test_the_trainer_s_loader_uses_the_group_order_for_shards_only(shards_dir):
    """build_dataloader gives a sharded table's dataset the group sampler, any other dataset a plain shuffle."""
    from trainer.data import build_dataloader

    loader = build_dataloader(TableRows(ShardTable(shards_dir).select([7, 0, 3])), 2, 0, seed=0)
    assert isinstance(loader.sampler, ShardGroupSampler)
    assert sorted(loader.sampler) == [0, 1, 2]
    assert group_sampler(list(range(3)), 0) is None
    assert isinstance(build_dataloader(list(range(3)), 2, 0, seed=0).sampler, torch.utils.data.RandomSampler)


def source_rows(rows: list) -> list:
    """A batch as its rows' source numbers."""
    return [r["row"] for r in rows]


def test_two_processes_get_equal_batches_from_uneven_shards(shards_dir):
    """accelerate's sharding of the loader: both ranks get the same number of full batches (no rank waits alone)."""
    from accelerate.data_loader import prepare_data_loader

    table = ShardTable(shards_dir)
    loader = torch.utils.data.DataLoader(table, batch_size=3, shuffle=True, collate_fn=source_rows,
                                         generator=torch.Generator().manual_seed(0))
    counts, seen = [], set()
    for rank in (0, 1):
        shard = prepare_data_loader(loader, num_processes=2, process_index=rank, put_on_device=False,
                                    use_seedable_sampler=True, data_seed=0)
        batches = list(shard)
        counts.append([len(b) for b in batches])
        seen.update(r for b in batches for r in b)
    assert counts[0] == counts[1] == [3, 3]
    assert seen == set(range(1, ROWS + 1))


def test_unfinished_merge_and_unknown_column_are_usage_errors(shards_dir, tmp_path):
    """A folder whose merge did not finish, or a --caption_column it lacks: one clear error."""
    check_shards_dir(shards_dir, "image", "text")
    with pytest.raises(UsageError, match="'captions' is not a column of the sharded dataset"):
        check_shards_dir(shards_dir, "image", "captions")
    copy = tmp_path / "copy"
    shutil.copytree(shards_dir, copy)
    (copy / "shards_stats.json").unlink()
    with pytest.raises(UsageError, match="its merge did not finish"):
        check_shards_dir(copy, "image", "text")


def losses(output: Path) -> list:
    """The per-step losses of a run's loss_log.csv."""
    with open(Path(output) / "loss_log.csv", newline="") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def shards_command(model, data, output, *extra) -> list:
    """4 steps of batch 2 (4 per epoch: the checkpoint at 2 is mid-epoch), 2 DataLoader workers, flips."""
    return trainer_command(model, data, output, "--max_train_steps", 4, "--checkpointing_steps", 2,
                           "--train_batch_size", 2, "--dataloader_num_workers", 2, *extra)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, shards_dir, tmp_path_factory) -> dict:
    """An uninterrupted run and a cached one (in parallel), then a copy of the first resumed from checkpoint-2."""
    root = tmp_path_factory.mktemp("shard_runs")
    first = run_parallel({"full": shards_command(tiny_model_dir, shards_dir, root / "full"),
                          "cached": shards_command(tiny_model_dir, shards_dir, root / "cached", "--cache_latents")})
    for done in first.values():
        succeeded(done)
    shutil.copytree(root / "full", root / "resumed")
    shutil.rmtree(root / "resumed" / "checkpoint-4")
    succeeded(run_command(shards_command(tiny_model_dir, shards_dir, root / "resumed", "--resume_from_checkpoint",
                                         "checkpoint-2")))
    return {name: root / name for name in ("full", "cached", "resumed")}


def test_training_from_shards_resumes_exactly_mid_epoch(runs):
    """Resumed at step 2 of a 4-step epoch (2 workers reading the shards), the loss log equals the uninterrupted
    run's."""
    uninterrupted, resumed = losses(runs["full"]), losses(runs["resumed"])
    assert len(uninterrupted) == 4 and all(np.isfinite(uninterrupted))
    assert resumed == uninterrupted


def test_cached_training_from_shards_builds_its_cache_from_the_tars(runs):
    """--cache_latents reads every row of the shards once into one cache and trains on it."""
    folders = list((runs["cached"] / ".cache" / "latents").iterdir())
    assert len(folders) == 1
    assert f'"num_rows": {ROWS},' in (folders[0] / "manifest.json").read_text()
    assert len(losses(runs["cached"])) == 4 and all(np.isfinite(losses(runs["cached"])))
