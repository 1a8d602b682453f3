"""A warm interpreter for the end-to-end tests: imports the third-party stack once, then forks one run per request.

Each entry-script process spends about 6.5 s of its 7-10 s importing torch, diffusers, transformers and the rest,
and the suite starts about 110 of them, so that import was most of the suite's CPU time. Run as
`python tests/zygote.py SOCKET`, it imports PRELOAD (nothing of ours, and no computation, so no thread pool exists to
be broken by fork), listens on the Unix socket SOCKET, and for each connection forks a watcher that forks the run.
The run executes the script as `python script.py ARGS` would (a new `__main__`, sys.argv, sys.path[0], cwd,
environment, fds 0-2 redirected), and ends by unwinding to the interpreter's normal exit (atexit handlers,
non-daemon threads, flushes), whose status the watcher reports. Several of these libraries read environment
variables at import, so a zygote serves only the environment it was started with (tests/warm.py keeps one per
environment, less pytest's per-test variable); each run then gets its requested environment in full.

Protocol, one JSON line per connection: {"argv", "cwd", "env", "stdout", "stderr"} (the last two are file paths);
the replies are "pid N", then "exit CODE" (a negative signal number, as subprocess reports it).
"""

import builtins
import importlib
import importlib.machinery
import json
import os
import signal
import socket
import sys
import types

PRELOAD = ("torch", "numpy", "PIL.Image", "pyarrow", "pyarrow.parquet", "safetensors.torch", "accelerate",
           "transformers", "diffusers", "diffusers.models", "diffusers.pipelines", "peft", "datasets",
           "matplotlib.figure", "matplotlib.backends.backend_agg", "tqdm.auto")
# Names the lazy packages resolve on first use; each one imports a large subtree.
PRELOAD_NAMES = (("transformers", ("CLIPTextModel", "CLIPTokenizer")),
                 ("diffusers", ("AutoencoderKL", "UNet2DConditionModel", "ControlNetModel", "DDPMScheduler",
                                "StableDiffusionPipeline", "StableDiffusionControlNetPipeline")))


def run_script(request: dict) -> None:
    """In the forked run: become `python argv[0] argv[1:]` in cwd with the given output files, and run it."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_TRUNC),
                            (2, request["stderr"], os.O_WRONLY | os.O_TRUNC)):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    # As the interpreter sets up `python script.py`: argv[0] as given, __file__ joined to the cwd but not normalised,
    # sys.path[0] the script's real folder, and a fresh __main__.
    script = os.path.join(os.getcwd(), request["argv"][0])
    sys.argv = list(request["argv"])
    sys.path[0] = os.path.dirname(os.path.realpath(script))
    main = types.ModuleType("__main__")
    main.__dict__.update(__file__=script, __cached__=None, __builtins__=builtins,
                         __loader__=importlib.machinery.SourceFileLoader("__main__", script))
    sys.modules["__main__"] = main
    with open(script, "rb") as source:
        code = compile(source.read(), script, "exec")
    try:
        exec(code, main.__dict__)
    except SystemExit:
        raise
    except BaseException as error:  # an uncaught exception: print it as the interpreter would, exit 1
        sys.excepthook(type(error), error, error.__traceback__)
        raise SystemExit(1) from None
    raise SystemExit(0)


def watch(connection: socket.socket) -> None:
    """In the forked watcher: fork the run, report its pid and then its exit status, and leave."""
    request = json.loads(connection.makefile("r").readline())
    pid = os.fork()
    if pid == 0:
        connection.close()
        run_script(request)  # never returns: SystemExit unwinds to the interpreter's exit
    connection.sendall(f"pid {pid}\n".encode())
    _, status = os.waitpid(pid, 0)
    connection.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
    os._exit(0)


def serve(path: str) -> None:
    """Preload, then fork a watcher per connection until the parent (the test session) goes away."""
    for name in PRELOAD:
        importlib.import_module(name)
    for module, names in PRELOAD_NAMES:
        for name in names:
            getattr(sys.modules[module], name)
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    listener.settimeout(1.0)
    print("ready", flush=True)
    while os.getppid() == parent:
        try:
            connection, _ = listener.accept()
        except socket.timeout:
            continue
        finally:
            while True:  # reap finished watchers
                try:
                    if os.waitpid(-1, os.WNOHANG)[0] == 0:
                        break
                except ChildProcessError:
                    break
        connection.settimeout(None)
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            listener.close()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            watch(connection)
        connection.close()


if __name__ == "__main__":
    serve(sys.argv[1])
