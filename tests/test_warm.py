"""tests/warm.py: a run forked from the warm interpreter behaves as the same command run cold, where a script can
tell (argv, cwd, sys.path[0], __name__, environment, exit status, output, atexit, threads, uncaught errors)."""

import json
import os
import subprocess
import sys

import pytest

import warm

TEST_VARIABLE = "PYTEST_CURRENT_TEST"  # the one variable a zygote's key leaves out

# Named as an entry script, so that warm.run sends it to the zygote; it prints what a script can see of its start.
PROBE = '''
import atexit, json, os, sys, threading, time
atexit.register(lambda: print("atexit ran", flush=True))
def later():
    time.sleep(0.3)
    print("thread finished", flush=True)
threading.Thread(target=later).start()
print(json.dumps({"argv": sys.argv, "file": __file__, "cwd": os.getcwd(), "path0": sys.path[0], "name": __name__,
                  "main": sys.modules["__main__"].__dict__ is globals(), "spec": repr(__spec__),
                  "test": os.environ.get("PYTEST_CURRENT_TEST"), "warm_flag": os.environ.get("WARM_RUNS")}))
print("to stderr", file=sys.stderr)
if sys.argv[1:] == ["fail"]:
    raise ValueError("probe failed")
if sys.argv[1:] == ["hang"]:
    time.sleep(60)
sys.exit(int(sys.argv[1]))
'''


@pytest.fixture()
def probe(tmp_path, monkeypatch):
    """The probe script, saved as generate.py in its own folder, and a work folder to run it from; warm runs on,
    even in a WARM_RUNS=0 session, since they are what these tests test."""
    monkeypatch.delenv("WARM_RUNS", raising=False)
    folder = tmp_path / "scripts"
    folder.mkdir()
    (folder / "generate.py").write_text(PROBE)
    work = tmp_path / "work"
    work.mkdir()
    return folder / "generate.py", work


def both(command, cwd, env=None):
    """(warm, cold) CompletedProcess of the same command line."""
    assert warm.goes_warm(command, env)
    return (warm.run(command, cwd=cwd, env=env, timeout=60),
            subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=60))


def test_a_warm_run_starts_and_ends_as_a_cold_one(probe):
    script, work = probe
    # The zygote starts with one value of pytest's per-test variable; the run must see the value it was given.
    assert warm.run([sys.executable, str(script), "0"], cwd=work, env={**os.environ, TEST_VARIABLE: "first"},
                    timeout=60).returncode == 0
    hot, cold = both([sys.executable, "../scripts/generate.py", "3"], work, {**os.environ, TEST_VARIABLE: "second"})
    assert hot.returncode == cold.returncode == 3
    assert hot.stdout == cold.stdout
    assert hot.stderr == cold.stderr == "to stderr\n"
    seen = json.loads(hot.stdout.splitlines()[0])
    assert seen == {"argv": ["../scripts/generate.py", "3"], "file": str(work / "../scripts/generate.py"), "cwd": str(work),
                    "path0": str(script.parent), "name": "__main__", "main": True, "spec": "None",
                    "test": "second", "warm_flag": None}
    assert hot.stdout.splitlines()[1:] == ["thread finished", "atexit ran"]


def test_an_uncaught_error_is_a_traceback_and_exit_1(probe):
    script, work = probe
    hot, cold = both([sys.executable, str(script), "fail"], work)
    assert hot.returncode == cold.returncode == 1
    for done in (hot, cold):
        assert "Traceback (most recent call last)" in done.stderr
        assert done.stderr.rstrip().endswith("ValueError: probe failed")


def test_a_run_past_its_timeout_is_killed(probe):
    script, work = probe
    process = warm.start([sys.executable, str(script), "hang"], cwd=work)
    assert isinstance(process, warm.WarmProcess)
    with pytest.raises(subprocess.TimeoutExpired):
        process.wait(timeout=1)
    process.kill()
    assert process.wait(timeout=30) == -9


@pytest.mark.parametrize("command", [["bash", "-c", "true"], [sys.executable, "-c", "pass"],
                                     [sys.executable, "create.py"]])
def test_only_this_interpreter_running_an_entry_script_goes_warm(command):
    assert not warm.goes_warm(command, None)


def test_warm_runs_0_runs_everything_cold(probe):
    script, work = probe
    command = [sys.executable, str(script), "0"]
    assert warm.goes_warm(command, {"WARM_RUNS": "1"})
    assert not warm.goes_warm(command, {"WARM_RUNS": "0"})


def test_a_zygote_that_cannot_start_turns_warm_runs_off_with_a_warning(probe, tmp_path, monkeypatch):
    script, work = probe
    monkeypatch.setattr(warm, "ZYGOTE", tmp_path / "missing_zygote.py")
    monkeypatch.setattr(warm, "_unavailable", None)
    command = [sys.executable, str(script), "4"]
    environment = {**os.environ, "A_NEW_ENVIRONMENT": "so a new zygote is asked for"}
    with pytest.warns(UserWarning, match="every run starts cold"):
        first = warm.run(command, cwd=work, env=environment, timeout=60)
    second = warm.start(command, cwd=work, env=environment)
    assert first.returncode == 4 and "to stderr" in first.stderr
    second.communicate(timeout=60)
    assert not isinstance(second, warm.WarmProcess) and second.returncode == 4
