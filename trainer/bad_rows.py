"""Training rows that cannot be read, for every trainer: BadRows (recorded in shared memory, each replaced by the next
readable row) and BadRowsReport (OUTPUT_DIR/bad_rows.json, with each row's file and why).

What makes a row bad is the dataset's business (trainer.data.TrainingDataset: its image; trainer.controlnet_data:
its conditioning too); the dataset answers row_errors, row_files(row) and row_problem(row) for this module.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from utils.atomic import write_json_atomic
from utils.bad_rows import bad_rows_document
from utils.cli import UsageError
from utils.constants import BAD_ROWS_FILENAME
from utils.logger import get_logger

# The reason of a row that failed during training but reads when the report reads it again (a passing I/O error).
READ_AGAIN_REASON = "readable_when_read_again"


class BadRows:
    """Training rows that could not be read: each is recorded, counted and replaced by the next readable row.

    The flags live in shared memory, so rows met by DataLoader workers reach the main process's report. A bad row
    always gets the same substitute (the next readable row), so a resumed run sees what an uninterrupted one saw.
    """

    def __init__(self, num_rows: int, errors: tuple):
        """num_rows flags, all clear; errors: the exception types that mark a row as bad (any other one stops)."""
        self.flags = torch.zeros(max(1, num_rows), dtype=torch.uint8).share_memory_()
        self.num_rows, self.errors = num_rows, errors

    def first_good(self, index: int, load: Callable[[int], dict]) -> dict:
        """load(row) of the first readable row from index on (wrapping round); each bad row met is recorded."""
        for offset in range(self.num_rows):
            row = (index + offset) % self.num_rows
            if self.flags[row]:
                continue
            try:
                return load(row)
            except self.errors as err:
                self.record(row, err)
        raise UsageError(f"none of the {self.num_rows} training rows can be read (each warning above names a "
                         "row and why).")

    def record(self, row: int, err: Exception) -> None:
        """Flag row (a warning the first time this process meets it)."""
        if not self.flags[row]:
            self.flags[row] = 1
            get_logger().warning("training row %d cannot be read, so the next readable row stands in for it "
                                 "(counted in bad_rows.json): %s", row, err)

    def flagged(self) -> list:
        """The bad rows met so far, in order."""
        return self.flags[:self.num_rows].nonzero().flatten().tolist()


def bad_row_entry(dataset, row: int) -> dict:
    """A bad row's report line: its training row, reason, file and detail, the row read once more to get them."""
    problem = dataset.row_problem(row)
    if problem is None:
        problem = {"reason": READ_AGAIN_REASON, "file": dataset.row_files(row)[0],
                   "detail": "readable when read again for this report"}
    return {"row": row, **problem}


@dataclass
class BadRowsReport:
    """OUTPUT_DIR/bad_rows.json: every training row that could not be read, and why. Written (0 rows too) at each
    checkpoint and at the end, gathered from every process; a resumed run keeps the rows recorded before it."""

    dataset: object  # trainer.data.TrainingDataset (or its ControlNet form): bad_rows, row_files, row_problem
    output_dir: Path
    checkpointing_steps: int

    @property
    def path(self) -> Path:
        """Where the report goes."""
        return Path(self.output_dir) / BAD_ROWS_FILENAME

    def restore(self, resumed: bool) -> None:
        """When resuming, flag the rows the run recorded before (same row, one of its files), so its record stays
        whole."""
        if not resumed or not self.path.is_file():
            return
        try:
            entries = json.loads(self.path.read_text(encoding="utf-8"))["rows"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            get_logger().warning("%s cannot be read (%s): its rows are not carried into this run's report.",
                                 self.path, err)
            return
        bad_rows = self.dataset.bad_rows
        for entry in entries:
            row = entry.get("row") if isinstance(entry, dict) else None
            if isinstance(row, int) and 0 <= row < bad_rows.num_rows and \
                    entry.get("file") in self.dataset.row_files(row):
                bad_rows.flags[row] = 1

    def write(self, accelerator, final: bool = False) -> None:
        """Gather every process's bad rows (all of them must call this), then the main one writes the report."""
        bad_rows = self.dataset.bad_rows
        flags = bad_rows.flags[:bad_rows.num_rows].to(device=accelerator.device, dtype=torch.int32)
        gathered = accelerator.reduce(flags, "sum").cpu()
        bad_rows.flags[:bad_rows.num_rows] |= (gathered > 0).to(torch.uint8)
        if not accelerator.is_main_process:
            return
        entries = [bad_row_entry(self.dataset, row) for row in bad_rows.flagged()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, bad_rows_document(entries))
        if final and entries:
            get_logger().warning("%d training row(s) could not be read; the next readable row stood in for each: %s",
                                 len(entries), self.path)

    def during_training(self, run, step: int) -> None:
        """After an optimizer step: rewrite the report beside each checkpoint."""
        if step % self.checkpointing_steps == 0:
            self.write(run.accelerator)
