"""The library's own error types: every problem with something a caller gave (a config, a weights file, an option).

Why its own: ``sam2_ext`` is a library on top of sam2 and knows nothing of the applications built on it. An
application maps these errors to its own at its boundary (``icl`` turns them into one-line ``InputError`` messages
and spells option names the way its command line does).
"""
from __future__ import annotations

from pathlib import Path


class Sam2ExtError(Exception):
    """A bad input. ``where`` names the file (a path) or the option (a plain name such as ``memory_selector``)."""

    def __init__(self, where: str | Path, problem: str):
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{self.where}: {problem}")


class ConfigError(Sam2ExtError):
    """A model config that cannot be found, parsed or used."""


class CheckpointError(Sam2ExtError):
    """A weights file that cannot be read or does not fit the model."""


class OptionError(Sam2ExtError):
    """A bad value of a named option (``where`` is the option's name, e.g. ``image_size``, ``memory_selector``)."""
