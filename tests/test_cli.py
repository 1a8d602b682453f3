"""utils/cli.py: a usage error is one line and exit 2; when a launcher started several processes (each finds the
same mistake) rank 0 writes it at once and the others only if the launcher has not stopped them after a wait. The
rank comes from the launcher's environment."""

from types import SimpleNamespace

import pytest

from utils import cli

RANK_VARIABLES = cli.RANK_VARIABLES


class Stopped(Exception):
    """The launcher stopping a process while it waits."""


@pytest.fixture()
def launched(monkeypatch):
    """No launcher variables yet (env sets them); a wait records its length, then stops the process as the
    launcher would."""
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    waits = []

    def stop(seconds):
        waits.append(seconds)
        raise Stopped

    monkeypatch.setattr(cli, "time", SimpleNamespace(sleep=stop))
    return SimpleNamespace(env=monkeypatch, waits=waits)


def refuse(argv):
    """A script main that finds a mistake."""
    raise cli.UsageError("--resolution 63 must be a multiple of 8")


@pytest.mark.parametrize("env, rank", [({}, 0), ({"RANK": "1"}, 1), ({"RANK": "0", "PMI_RANK": "3"}, 0),
                                       ({"OMPI_COMM_WORLD_RANK": "2"}, 2), ({"RANK": "", "PMI_RANK": "5"}, 5)])
def test_process_rank_from_the_launchers_variables(launched, env, rank):
    for name, value in env.items():
        launched.env.setenv(name, value)
    assert cli.process_rank() == rank


@pytest.mark.parametrize("rank", [None, "0"])
def test_run_main_usage_error_is_one_line_at_once_on_rank_zero(launched, capsys, rank):
    if rank is not None:
        launched.env.setenv("RANK", rank)
    with pytest.raises(SystemExit) as stopped:
        cli.run_main(refuse, [])
    assert stopped.value.code == 2 and launched.waits == []
    assert capsys.readouterr().err.splitlines() == ["error: --resolution 63 must be a multiple of 8"]


def test_other_ranks_wait_and_write_nothing_when_stopped(launched, capsys):
    launched.env.setenv("RANK", "1")
    with pytest.raises(Stopped):
        cli.run_main(refuse, [])
    launched.env.setenv("PMI_RANK", "1")
    launched.env.delenv("RANK")
    with pytest.raises(Stopped):
        cli.ArgumentParser(prog="prog").parse_args(["--bogus"])
    assert launched.waits == [cli.OTHER_RANKS_WAIT_S] * 2 and cli.OTHER_RANKS_WAIT_S >= 1
    assert capsys.readouterr().err == ""


def test_other_ranks_write_the_line_when_not_stopped(launched, capsys):
    """A launcher that leaves the others running, or a rank 0 that never got there: the line still shows."""
    launched.env.setenv("RANK", "1")
    launched.env.setattr(cli, "time", SimpleNamespace(sleep=launched.waits.append))
    with pytest.raises(SystemExit) as stopped:
        cli.ArgumentParser(prog="prog").parse_args(["--bogus"])
    assert stopped.value.code == 2 and launched.waits == [cli.OTHER_RANKS_WAIT_S]
    assert capsys.readouterr().err.splitlines() == ["prog: error: unrecognized arguments: --bogus"]
