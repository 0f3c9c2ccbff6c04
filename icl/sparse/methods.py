"""The names of the fills of a sparse annotation: what ``--fill`` (and the API's ``fill=``) may say.

Why its own module: the options, the self-check and the fills all speak these words; a light module lets the
command line know them without loading the fills.
"""
from __future__ import annotations

NEAREST = "nearest"  # copy of the nearest annotated slice
INTERPOLATION = "interpolation"  # shape-based interpolation (icl.sparse.classic)
MODEL = "model"  # the model's propagation (icl.sparse.model_fill)
AUTO = "auto"  # per structure, the best of the self-check (icl.sparse.fill)
REGISTRATION = "registration"  # support from another scan, registered to the query (icl.sparse.registration)
CLASSIC_FILLS = (INTERPOLATION, NEAREST)  # the classic fills of a scan annotated on a few slices
SAME_SCAN_FILLS = (AUTO, MODEL, INTERPOLATION, NEAREST)  # a scan annotated on a few slices
CROSS_SCAN_FILLS = (AUTO, MODEL, REGISTRATION)  # support from another scan
FILLS = (AUTO, MODEL, INTERPOLATION, NEAREST, REGISTRATION)
NO_MODEL_FILLS = (*CLASSIC_FILLS, REGISTRATION)  # fills that need no model: none is loaded
