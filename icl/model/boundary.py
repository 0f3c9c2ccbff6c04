"""The boundary to ``sam2_ext``: its errors become ``InputError``, option names spelled as the command's flags.

Why in the model layer: ``sam2_ext`` is what this layer stands on; the data, report and error modules below the
model must not import it (``tests/test_layers.py``).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from icl.errors import InputError, spell_flag
from sam2_ext.errors import OptionError, Sam2ExtError


@contextlib.contextmanager
def library_errors(dashes: str = "-") -> Iterator[None]:
    """Turn a ``Sam2ExtError`` into an ``InputError``; an ``OptionError``'s option name spelled with ``dashes``."""
    try:
        yield
    except Sam2ExtError as err:
        where = spell_flag(err.where, dashes) if isinstance(err, OptionError) else err.where
        raise InputError(where, err.problem) from None
