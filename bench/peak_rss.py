"""Run a command; print its peak RSS in MiB and CPU seconds (it and the children it waited for); exit with its code.

Why a separate process: Linux carries the parent's memory high-water mark into a child's ru_maxrss across
exec, so a child started straight from the (large) benchmark process would report the benchmark's memory.
Started from this small process instead, the command's figure is its own.

Run: python bench/peak_rss.py COMMAND [ARGS...]
"""

import os
import subprocess
import sys


def main(command: list) -> int:
    """Run command, wait for it with wait4, print 'peak_rss_mib <MiB> cpu_s <seconds>' as the last stdout line."""
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    print(f"peak_rss_mib {usage.ru_maxrss / 1024:.1f} cpu_s {usage.ru_utime + usage.ru_stime:.3f}", flush=True)
    return process.returncode


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.stderr.write("usage: peak_rss.py COMMAND [ARGS...]\n")
        sys.exit(2)
    sys.exit(main(sys.argv[1:]))
