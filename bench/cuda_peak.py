"""Run a Python training script in this process; at exit print its whole-process peak CUDA memory.

So our trainer and diffusers' reference script, which prints no memory figure, are measured the same way: torch's
max_memory_allocated and max_memory_reserved over the process's life, model loading and any cache build included.

Run: python bench/cuda_peak.py SCRIPT [ARGS...]   (prints 'cuda_peak allocated X GiB reserved Y GiB' on stderr)
"""

import runpy
import sys


def report() -> None:
    """Print the peaks, when the script used CUDA at all."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gib = 1024 ** 3
        sys.stderr.write(f"cuda_peak allocated {torch.cuda.max_memory_allocated() / gib:.2f} GiB reserved "
                         f"{torch.cuda.max_memory_reserved() / gib:.2f} GiB\n")


def main(argv: list) -> None:
    """Run argv[0] as __main__ with argv as its sys.argv; report even when it exits or fails."""
    sys.argv = list(argv)
    sys.path.insert(0, str(__import__("pathlib").Path(argv[0]).resolve().parent))
    try:
        runpy.run_path(argv[0], run_name="__main__")
    finally:
        report()


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.stderr.write("usage: cuda_peak.py SCRIPT [ARGS...]\n")
        sys.exit(2)
    main(sys.argv[1:])
