"""Shared constants and logging for the project's scripts."""
