"""The per-step loss log (OUTPUT_DIR/loss_log.csv): one row per optimizer step, whatever trackers are on.

It feeds the loss-curve PNG written at the end of training. A resumed run first cuts the log back to the
checkpoint's step, so replayed steps are not counted twice.
"""

from pathlib import Path
from typing import List, Tuple

from diffusion_model.atomic import open_text_atomic
from utils.constants import LOSS_LOG_FILENAME

HEADER = "step,loss,lr"


def loss_log_path(output_dir) -> Path:
    """Where the loss log of a run lives."""
    return Path(output_dir) / LOSS_LOG_FILENAME


def parse_row(line: str):
    """(step, loss, lr) from one CSV line, or None for the header or a line cut short by a crash."""
    parts = line.strip().split(",")
    if len(parts) != 3:
        return None
    try:
        return int(parts[0]), float(parts[1]), float(parts[2])
    except ValueError:
        return None


def read_loss_log(path) -> List[Tuple[int, float, float]]:
    """All well-formed rows of a loss log; [] when there is none."""
    path = Path(path)
    if not path.exists():
        return []
    rows = (parse_row(line) for line in path.read_text(encoding="utf-8").splitlines())
    return [row for row in rows if row is not None]


def truncate_loss_log(output_dir, step: int) -> None:
    """Keep only rows up to step (a fresh run keeps none), rewriting the file atomically."""
    path = loss_log_path(output_dir)
    if not path.exists():
        return
    with open_text_atomic(path) as handle:
        handle.write(HEADER + "\n")
        for row_step, loss, lr in read_loss_log(path):
            if row_step <= step:
                handle.write(f"{row_step},{loss!r},{lr!r}\n")


def append_loss(output_dir, step: int, loss: float, lr: float) -> None:
    """Append one optimizer step's mean loss and learning rate (header first when the file is new)."""
    path = loss_log_path(output_dir)
    new = not path.exists()
    with open(path, "a", encoding="utf-8") as handle:
        if new:
            handle.write(HEADER + "\n")
        handle.write(f"{step},{loss!r},{lr!r}\n")
