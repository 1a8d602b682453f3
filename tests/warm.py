"""Run the heavy entry scripts from a warm interpreter (tests/zygote.py): subprocess.run's and Popen's shape, minus
the ~6.5 s import per run.

Only `[sys.executable, SCRIPT, ...]` for a script in WARM_SCRIPTS goes warm; anything else, and everything when
WARM_RUNS=0 is set, runs as a plain subprocess. A run still is its own process executing the script file as
`__main__` on real files, with its exit status, stdout and stderr; what it does not see is its own import of the
third-party stack, so import-time noise and import failures are covered by the plain runs: test_quiet, train.sh,
demo.sh, accelerate launch, torchrun and the two-node runs never go warm, and `cold=True` keeps one full run of
each other script cold (train_controlnet.py in test_controlnet_learns, train_text_to_image_lora.py's ref6 run,
merge_lora.py's merge). One zygote serves one environment.
"""

import atexit
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
WARM_SCRIPTS = {"train_text_to_image.py", "train_text_to_image_lora.py", "train_controlnet.py", "generate.py",
                "evaluate.py", "merge_lora.py"}
ZYGOTE = Path(__file__).resolve().parent / "zygote.py"
# Each zygote holds ~600 MB; runs a stopped zygote forked finish on their own.
MAX_ZYGOTES = 3

# Set by pytest for each test phase, and read by nothing at import: a zygote's key leaves it out, and each run gets
# its own environment in full.
VOLATILE = {"PYTEST_CURRENT_TEST"}

_zygotes = {}  # frozenset(environment items but VOLATILE) -> (Popen, socket path), least recently used first
_lock = threading.Lock()
_folder = None
_unavailable = None  # why warm runs are off, once a zygote failed to start


def single_thread_env() -> dict:
    """The environment of the end-to-end runs: one thread per process, so two runs share the two cores without
    spinning, offline (no Hub, wandb without login). Every run in it goes to one zygote."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}


def goes_warm(command, env) -> bool:
    """True when command is this interpreter running one of WARM_SCRIPTS and warm runs are not switched off."""
    environment = os.environ if env is None else env
    return (environment.get("WARM_RUNS", "1") != "0" and len(command) >= 2 and str(command[0]) == sys.executable
            and Path(str(command[1])).name in WARM_SCRIPTS)


def _zygote_for(environment: dict) -> str:
    """The socket of the zygote for this environment, started (and waited for) on first use."""
    global _folder
    key = frozenset((name, value) for name, value in environment.items() if name not in VOLATILE)
    with _lock:
        if key not in _zygotes:
            if _folder is None:
                _folder = tempfile.mkdtemp(prefix="zygote-")
            while len(_zygotes) >= MAX_ZYGOTES:
                _zygotes.pop(next(iter(_zygotes)))[0].terminate()
            name = os.path.join(_folder, str(len(os.listdir(_folder))))
            with open(f"{name}.log", "w") as log:
                process = subprocess.Popen([sys.executable, str(ZYGOTE), f"{name}.sock"], env=environment,
                                           cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                           stderr=log, text=True)
            if process.stdout.readline().strip() != "ready":
                raise ZygoteUnavailable(f"{ZYGOTE} did not start: see {name}.log")
            _zygotes[key] = (process, f"{name}.sock")
        _zygotes[key] = _zygotes.pop(key)  # now the most recently used
        return _zygotes[key][1]


@atexit.register
def _stop_zygotes() -> None:
    """Stop every zygote when the test session ends."""
    for process, _ in _zygotes.values():
        process.terminate()
    if _folder is not None:
        shutil.rmtree(_folder, ignore_errors=True)


class WarmProcess:
    """A run forked by a zygote: Popen's communicate / wait / kill / returncode for output captured as text."""

    def __init__(self, command, cwd=None, env=None):
        self.args = command
        self.returncode = None
        self._outputs = []  # the stdout and stderr files the run writes, read back by communicate
        for _ in range(2):
            handle, path = tempfile.mkstemp(prefix="warm-")
            os.close(handle)
            self._outputs.append(path)
        self._connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        environment = dict(os.environ if env is None else env)
        self._connection.connect(_zygote_for(environment))
        request = {"argv": command[1:], "cwd": str(cwd or os.getcwd()), "env": environment,
                   "stdout": self._outputs[0], "stderr": self._outputs[1]}
        self._connection.sendall((json.dumps(request) + "\n").encode())
        self._received = b""
        self.pid = int(self._reply(None).split()[1])

    def _reply(self, timeout):
        """The zygote's next reply line; subprocess.TimeoutExpired when none comes within timeout seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._received:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._connection], [], [], left)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout)
            chunk = self._connection.recv(4096)
            if not chunk:
                raise RuntimeError(f"the zygote hung up on {self.args}")
            self._received += chunk
        line, self._received = self._received.split(b"\n", 1)
        return line.decode()

    def wait(self, timeout=None) -> int:
        """The exit code once the run ends; subprocess.TimeoutExpired after timeout seconds."""
        if self.returncode is None:
            self.returncode = int(self._reply(timeout).split()[1])
            self._connection.close()
        return self.returncode

    def communicate(self, timeout=None):
        """(stdout, stderr) as text once the run ends."""
        self.wait(timeout)
        texts = [Path(path).read_text() for path in self._outputs]
        for path in self._outputs:
            os.unlink(path)
        return texts[0], texts[1]

    def kill(self) -> None:
        """SIGKILL the run."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class ZygoteUnavailable(RuntimeError):
    """A zygote did not start."""


def start(command, cwd=None, env=None, cold=False):
    """A WarmProcess for command when it goes warm (and is not asked to run cold), else a Popen capturing text
    output. If a zygote cannot start, this and every later run go cold, with one warning: slower, never wrong."""
    global _unavailable
    command = [str(c) for c in command]
    if not cold and goes_warm(command, env) and _unavailable is None:
        try:
            return WarmProcess(command, cwd, env)
        except ZygoteUnavailable as error:
            _unavailable = str(error)
            warnings.warn(f"warm runs are off for this session, every run starts cold: {error}")
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(command, cwd=None, env=None, timeout=None, cold=False) -> subprocess.CompletedProcess:
    """subprocess.run(command, capture_output=True, text=True, ...), warm when the command allows it."""
    process = start(command, cwd, env, cold)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()  # as subprocess.run does: reap it (and here, remove its output files)
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
