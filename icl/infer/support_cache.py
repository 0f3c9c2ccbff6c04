"""A segmenter's support scans, read and prepared once: the queries of a cohort reuse them, so work that does not
depend on the query — reading and checking the support files, windowing their images for registration, the full
leave-one-out check among them — is never repeated.

Keyed by the files themselves (real path, size, modification time), so an edited support is read again; scans given
in memory (arrays, nibabel images) are read on every call. One set is kept: the last one used.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from icl.data.frames import Scan
from icl.infer.support import load_support
from icl.sparse.fusion import SupportSet

Loaded = tuple[Scan, Scan, np.ndarray, list[int]]  # icl.infer.support.load_support's answer


def _file_key(x: Any) -> tuple | None:
    if not isinstance(x, (str, Path)):
        return None
    try:
        st = os.stat(x)
    except OSError:
        return None  # load_support says what is wrong with it
    return os.path.realpath(x), st.st_size, st.st_mtime_ns


class SupportCache:
    """The last support pairs a segmenter loaded (:meth:`load`) and their :class:`SupportSet` (:meth:`support_set`)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._loaded: list[Loaded] = []
        self._set: SupportSet | None = None

    def load(self, pairs: Sequence[tuple[Any, Any]], classes: list[int] | None, channel: int | None) -> list[Loaded]:
        """Every pair opened and checked (``load_support``): the first chooses the classes (``classes`` or all its
        label values), each other one must hold them all."""
        files = [_file_key(x) for pair in pairs for x in pair]
        key = None if None in files else (tuple(files), None if classes is None else tuple(classes), channel)
        if key is not None and key == self._key:
            return self._loaded
        loaded = [load_support(s, lab, classes, channel) for s, lab in pairs[:1]]
        loaded += [load_support(s, lab, loaded[0][3], channel) for s, lab in pairs[1:]]
        self._key, self._loaded, self._set = key, loaded, None
        return loaded

    def support_set(self, scans: Sequence[tuple[Scan, Scan]], classes: list[int]) -> SupportSet:
        """The (image, label) scans prepared for registration, once for these scans and classes."""
        scans = list(scans)
        same = self._set is not None and self._set.classes == list(classes) and len(self._set.scans) == len(scans) \
            and all(a is c and b is d for (a, b), (c, d) in zip(self._set.scans, scans))
        if not same:
            self._set = SupportSet(scans, classes)
        return self._set
