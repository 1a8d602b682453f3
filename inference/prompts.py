"""Prompts for generate.py: from the command line and/or a file, expanded to one (prompt, seed) pair per image."""

import secrets
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from utils.cli import UsageError

# Seeds drawn when none is given stay below 2**31 so they are easy to pass back as --seed.
MAX_DRAWN_SEED = 2**31
# The largest seed torch.Generator.manual_seed accepts; above it torch raises instead of seeding.
MAX_SEED = 2**64 - 1


def read_prompts_file(path: str) -> List[str]:
    """One prompt per line, stripped; blank lines skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--prompts_file '{path}' does not exist.") from None
    except IsADirectoryError:
        raise UsageError(f"--prompts_file '{path}' is a folder; pass a text file with one prompt per line.") from None
    except UnicodeDecodeError:
        raise UsageError(f"--prompts_file '{path}' is not UTF-8 text.") from None
    except OSError as err:
        raise UsageError(f"--prompts_file '{path}' cannot be read: {err.strerror}.") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def collect_prompts(prompts: Optional[Sequence[str]], prompts_file: Optional[str]) -> List[str]:
    """--prompt values first, then the file's lines; at least one non-empty prompt is required."""
    collected = [p.strip() for p in prompts or []]
    if any(not p for p in collected):
        raise UsageError("--prompt '' is empty: give some text to draw.")
    if prompts_file is not None:
        from_file = read_prompts_file(prompts_file)
        if not from_file:
            raise UsageError(f"--prompts_file '{prompts_file}' holds no prompt (only blank lines).")
        collected += from_file
    if not collected:
        raise UsageError("no prompt: pass --prompt TEXT (repeatable) or --prompts_file FILE.")
    return collected


def base_seed(seed: Optional[int]) -> int:
    """The given seed, or a freshly drawn one (recorded with each image so the run can be repeated)."""
    if seed is None:
        return secrets.randbelow(MAX_DRAWN_SEED)
    if seed < 0:
        raise UsageError(f"--seed {seed} must be 0 or more.")
    return seed


def plan_images(prompts: Sequence[str], num_images_per_prompt: int, seed: int) -> List[Tuple[str, int]]:
    """(prompt, seed) per image, prompt-major; image i gets seed + i, so every image has its own seed."""
    if num_images_per_prompt < 1:
        raise UsageError(f"--num_images_per_prompt {num_images_per_prompt} must be at least 1.")
    pairs = [(prompt, None) for prompt in prompts for _ in range(num_images_per_prompt)]
    if seed + len(pairs) - 1 > MAX_SEED:
        raise UsageError(f"--seed {seed} is too large: {len(pairs)} image(s) need seeds up to "
                         f"{seed + len(pairs) - 1}, above {MAX_SEED}, the largest torch accepts.")
    return [(prompt, seed + index) for index, (prompt, _) in enumerate(pairs)]
