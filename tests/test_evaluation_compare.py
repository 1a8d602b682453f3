"""evaluation/compare.py: reports side by side, labelled, with the stand-in caveat; unreadable files refused."""

import json

from evaluation.compare import main, table


def report(accuracy, stand_in=True) -> dict:
    """The keys the table reads."""
    return {"scene_accuracy": accuracy, "scene_accuracy_real_trained": 0.5, "scene_accuracy_real": 0.95,
            "chance": 0.2, "num_classes": 5, "scene_num_samples": 40, "fid": 123.4, "clip_score": 20.0,
            "stand_in_models": stand_in}


def test_one_row_per_report_with_the_ceiling_and_chance():
    text = table([("untrained base", report(0.2)), ("fine-tuned", report(0.85))])
    lines = text.splitlines()
    assert "ceiling" in lines[0] and "chance" in lines[0]
    assert lines[1].startswith("untrained base") and "0.200" in lines[1]
    assert lines[2].startswith("fine-tuned") and "0.850" in lines[2] and "0.950" in lines[2]
    assert "not comparable" in text


def test_missing_figures_read_n_a_and_real_weights_have_no_caveat():
    text = table([("x", {**report(None, stand_in=False)})])
    assert "n/a" in text.splitlines()[1] and "not comparable" not in text


def test_gsd_columns_only_when_a_report_has_gsd_figures():
    """A report with the GSD sweep adds its rho, shuffled floor and errors; a report without shows n/a there."""
    assert "GSD rho" not in table([("x", report(0.5))])
    gsd = {**report(0.8), "gsd_sweep_spearman": 0.71, "gsd_sweep_spearman_shuffled": -0.01,
           "gsd_error_octaves": 0.9, "gsd_error_octaves_real": 0.1, "gsd_error_octaves_absent": 1.3}
    lines = table([("base", report(0.2)), ("fine-tuned", gsd)]).splitlines()
    assert "GSD rho" in lines[0] and "rho shuffled" in lines[0] and "absent err" in lines[0]
    assert lines[2].split()[-5:] == ["0.710", "-0.010", "0.900", "0.100", "1.300"]
    assert lines[1].split()[-5:] == ["n/a"] * 5
    assert any(line.startswith("GSD rho: Spearman") for line in lines)


def test_cli_labels_and_refuses_unreadable_files(tmp_path, capsys, run_script):
    path = tmp_path / "eval" / "eval_report.json"
    path.parent.mkdir()
    path.write_text(json.dumps(report(0.6)))
    assert main([str(path), f"after={path}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("eval ") and lines[2].startswith("after")
    done = run_script("evaluation/compare.py", [tmp_path / "nope.json"])
    assert done.returncode == 2 and "nope.json" in done.stderr and "Traceback" not in done.stderr
