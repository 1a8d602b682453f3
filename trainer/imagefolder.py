"""An image folder's rows through 🤗 datasets' imagefolder loader, its Arrow cache written by a short-lived process.

datasets' first load of a folder converts metadata.jsonl into its Arrow cache, turning the file into Python dicts
10 MB of JSON at a time; the process that does it keeps much of that heap afterwards (about +31 MiB at 100k rows
even after malloc_trim, growing with the rows). A child interpreter (`python -m trainer.imagefolder`, not
multiprocessing, which would rerun the caller's __main__) does the conversion and exits with its heap; this process
then memory-maps the finished cache, as every later run does.
"""

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from utils.cli import USAGE_EXIT_CODE, UsageError
from utils.constants import METADATA_FILENAME
from utils.quiet import no_datasets_bars

IMAGEFOLDER = "imagefolder"
# The child imports this package by name, from wherever the parent found it.
REPO_ROOT = str(Path(__file__).resolve().parents[1])
# Below this size (about 400 lines of format.py's metadata.jsonl) the conversion leaves little behind, and a child's
# start-up (about 1 s, importing datasets again) would cost more than it saves: the tests load dozens of such folders.
CHILD_MIN_BYTES = 64 * 1024


def data_files(data_dir: Path) -> dict:
    """datasets' data_files for DATA_DIR: its metadata.jsonl as the train split's only file.

    Named as the only data file, so datasets does not glob the folder for its split patterns, which stats every
    file once per pattern (6.5 million stats, 85 s and +240 MiB for 100k images); the rows, columns and features
    are those of data_dir=DATA_DIR, and a metadata.jsonl beside split-named subfolders loads instead of failing.
    """
    return {"train": [str(data_dir / METADATA_FILENAME)]}


def arrow_cache_ready(files: dict, cache_dir: Optional[str]) -> bool:
    """True when datasets has finished converting these files into its Arrow cache (cache_dir or its default)."""
    import datasets

    builder = datasets.load_dataset_builder(IMAGEFOLDER, data_files=files, cache_dir=cache_dir)
    return (Path(builder.cache_dir) / datasets.config.DATASET_INFO_FILENAME).is_file()


def read_folder(files: dict, cache_dir: Optional[str]):
    """datasets' load of the files: the first one converts them into its Arrow cache, a later one maps that cache."""
    import datasets
    from pyarrow import ArrowInvalid

    with no_datasets_bars():
        try:
            return datasets.load_dataset(IMAGEFOLDER, data_files=files, cache_dir=cache_dir)
        except (ArrowInvalid, datasets.exceptions.DatasetGenerationError) as err:
            # A file the preflight's line checks pass can still not be one table (a column string here, list there).
            cause = str(err.__cause__ or err).splitlines()[0]
            raise UsageError(f"{files['train'][0]} cannot be read as one table by datasets: {cause}") from None


def write_in_child(data_dir: Path, cache_dir: Optional[str]) -> None:
    """Run this module's main in a new interpreter on DATA_DIR; its usage error is raised here as the same line."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", __name__, str(data_dir), *([cache_dir] if cache_dir is not None else [])]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)  # its stderr is the user's
    said = done.stdout.strip().splitlines()[-1:]
    if done.returncode == USAGE_EXIT_CODE and said:
        raise UsageError(said[0])
    if done.returncode != 0:
        raise RuntimeError(f"datasets' first load of {data_dir / METADATA_FILENAME} failed in a child process "
                           f"(exit code {done.returncode}; its error is above)")


def load_imagefolder(data_dir: Path, cache_dir: Optional[str]):
    """DATA_DIR's metadata.jsonl rows with their images; a large file's first load converts it in a child process."""
    files = data_files(data_dir)
    large = (data_dir / METADATA_FILENAME).stat().st_size >= CHILD_MIN_BYTES
    if large and not arrow_cache_ready(files, cache_dir):
        write_in_child(data_dir, cache_dir)
    return read_folder(files, cache_dir)


def main(argv: Sequence[str]) -> int:
    """The child: DATA_DIR [CACHE_DIR]; a usage error is one line on stdout and exit code 2."""
    try:
        read_folder(data_files(Path(argv[0])), argv[1] if len(argv) > 1 else None)
    except UsageError as err:
        print(err, flush=True)
        return USAGE_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
