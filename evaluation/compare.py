"""Print evaluate.py reports side by side: scene accuracy (both directions), its real ceiling and chance, FID, CLIP.

Run: python -m evaluation.compare "base=eval_base/eval_report.json" "fine-tuned=eval/eval_report.json"
(a bare path is labelled by its folder).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file rather than with -m
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import json

from utils.cli import ArgumentParser, UsageError, run_main

COLUMNS = (("scene acc.", "scene_accuracy"), ("real-trained", "scene_accuracy_real_trained"),
           ("ceiling", "scene_accuracy_real"), ("chance", "chance"), ("classes", "num_classes"),
           ("N", "scene_num_samples"), ("FID", "fid"), ("CLIP", "clip_score"))
# Shown when a report has GSD figures (evaluate.py --gsd_probe_data).
GSD_COLUMNS = (("GSD rho", "gsd_sweep_spearman"), ("rho shuffled", "gsd_sweep_spearman_shuffled"),
               ("GSD err oct", "gsd_error_octaves"), ("real err", "gsd_error_octaves_real"),
               ("absent err", "gsd_error_octaves_absent"))


def load_report(spec: str) -> tuple:
    """'label=path' or 'path' -> (label, report dict); UsageError naming the file when it cannot be read."""
    label, _, path = spec.rpartition("=")
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UsageError(f"{path} is not a readable eval_report.json ({type(err).__name__})") from None
    return label or path.parent.name, report


def cell(value) -> str:
    """A figure as the table shows it."""
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def table(reports) -> str:
    """The comparison table, one row per report, then what the stand-in flag means."""
    width = max(len(label) for label, _ in reports)
    gsd = any("gsd_sweep_spearman" in report for _, report in reports)
    columns = COLUMNS + (GSD_COLUMNS if gsd else ())
    lines = [" ".join([" " * width] + [f"{name:>12}" for name, _ in columns])]
    for label, report in reports:
        lines.append(" ".join([f"{label:<{width}}"] + [f"{cell(report.get(key)):>12}" for _, key in columns]))
    lines.append("scene acc.: classifier trained on generated images, tested on real ones; real-trained: the "
                 "reverse; ceiling: the same classifier on real images (cross-validated)")
    if gsd:
        lines.append("GSD rho: Spearman's rho between the GSD asked for and the GSD a probe sees, over a sweep (same "
                     "caption and seed); rho shuffled: the images paired with shuffled requests (the floor); err "
                     "oct: mean error in octaves of rows drawn with their metadata, of the real images (ceiling) "
                     "and of images drawn without metadata (floor)")
    if any(report.get("stand_in_models") for _, report in reports):
        lines.append("stand-in (random) Inception/CLIP weights: FID and CLIP score are not comparable with "
                     "published figures; scene accuracies compare these models with each other only")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Print the table of the given reports."""
    parser = ArgumentParser(prog="python -m evaluation.compare", description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", help="eval_report.json files, each optionally as LABEL=PATH")
    args = parser.parse_args(argv)
    print(table([load_report(spec) for spec in args.reports]))
    return 0


if __name__ == "__main__":
    run_main(main)
