"""The names the data generators answer to: phantom shape classes, look-alike and anatomy task levels, the anatomy
generator's parts.

Why its own module: training options check these words (``-tasks``, ``-held_out_shapes``, ``-anatomy_drop``) before
anything is generated; a light module lets them do so without loading the generators.
"""
from __future__ import annotations

from numbers import Integral

#: Phantom shape classes (icl.data.phantom), also the look-alike tasks' 2D shape classes (icl.data.lookalike).
SHAPES: tuple[str, ...] = ("ellipsoid", "torus", "tube", "box", "cone", "twin_blobs")
#: Look-alike curriculum levels (icl.data.lookalike), by name or number.
LEVELS: tuple[str, ...] = ("discs_fixed", "discs_random", "adjacent", "far", "sparse", "cross")
#: Anatomy-like task levels (icl.data.anatomy_tasks).
ANATOMY_LEVELS: tuple[str, ...] = ("anat_sparse", "anat_adjacent", "anat_far", "anat_cross")
#: The same task kinds on real labelled volumes (icl.data.real_tasks, ``-real_volumes``), in the same order.
REAL_LEVELS: tuple[str, ...] = ("real_sparse", "real_adjacent", "real_far", "real_cross")
#: Parts of the anatomy image renderer an ablation may leave out (icl.data.anatomy_image).
RENDER_PARTS: tuple[str, ...] = ("weak_contrast", "rim", "texture", "clutter", "blur", "lowres", "bias", "noise",
                                 "gamma")
#: Parts of the whole anatomy generator an ablation may leave out (``-anatomy_drop``).
GENERATOR_PARTS: tuple[str, ...] = (*RENDER_PARTS, "extras", "deformation")


def level_name(level: int | str) -> str:
    """Curriculum level by number or name -> its name (raises ValueError on an unknown one)."""
    if isinstance(level, Integral) or (isinstance(level, str) and level.isdigit()):
        return LEVELS[int(level)]
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; choose from {', '.join(LEVELS)} or 0..{len(LEVELS) - 1}")
    return level
