"""Shared constants and logging for the project's scripts."""

from utils.quiet import silence_notices

# Here, not in each script: every process that runs our code (the launched trainer, dataloader workers) imports this
# package before the noisy libraries, and must be quiet too.
silence_notices()
