"""The per-step loss log (OUTPUT_DIR/loss_log.csv) and the loss curve drawn from it (OUTPUT_DIR/loss_curve.png).

One row per optimizer step, whatever trackers are on, so every run gets a curve without wandb or tensorboard.
A resumed run first cuts the log back to the checkpoint's step, so replayed steps are not counted twice.
"""

import io
import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from utils.atomic import open_text_atomic, write_bytes_atomic
from utils.constants import LOSS_CURVE_FILENAME, LOSS_LOG_FILENAME

HEADER = "step,loss,lr"
# The diffusion loss depends mostly on the random timestep drawn, so per-step values are too noisy to read a trend
# from: the smoothed line averages over about 2% of the run, and at least 10 steps.
SMOOTHING_FRACTION = 0.02
MIN_SMOOTHING_SPAN = 10
CURVE_SIZE_INCHES = (8, 4.5)
CURVE_DPI = 100


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


def smoothing_weight(num_steps: int) -> float:
    """EMA weight whose span (1 / (1 - weight)) is SMOOTHING_FRACTION of the run, at least MIN_SMOOTHING_SPAN."""
    return 1 - 1 / max(MIN_SMOOTHING_SPAN, SMOOTHING_FRACTION * num_steps)


def smooth(values: Sequence[float], weight: float) -> List[float]:
    """Exponential moving average, bias-corrected so the first points are not pulled towards 0."""
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing weight {weight} must be in [0, 1)")
    average, smoothed = 0.0, []
    for count, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight ** count))
    return smoothed


def plot_loss_curve(rows: Sequence[Tuple[int, float, float]]) -> bytes:
    """PNG bytes of the raw per-step loss and its smoothed line (log y when every loss is positive)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    from matplotlib.figure import Figure

    steps = [row[0] for row in rows]
    losses = [row[1] for row in rows]
    weight = smoothing_weight(len(losses))
    figure = Figure(figsize=CURVE_SIZE_INCHES, dpi=CURVE_DPI)
    axes = figure.add_subplot()
    axes.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="loss per step")
    axes.plot(steps, smooth(losses, weight), color="tab:blue", linewidth=2, label=f"smoothed (EMA {weight:.3g})")
    if all(loss > 0 and math.isfinite(loss) for loss in losses):
        axes.set_yscale("log")
    axes.set(xlabel="optimizer step", ylabel="training loss (MSE)", title=f"Training loss, {len(rows)} steps")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def write_loss_curve(output_dir) -> Optional[Path]:
    """Draw OUTPUT_DIR/loss_log.csv into OUTPUT_DIR/loss_curve.png (atomically); None when nothing was logged."""
    rows = read_loss_log(loss_log_path(output_dir))
    if not rows:
        return None
    path = Path(output_dir) / LOSS_CURVE_FILENAME
    write_bytes_atomic(path, plot_loss_curve(rows))
    return path
