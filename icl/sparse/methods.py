"""The names of the fills of a sparse annotation: what ``--fill`` (and the API's ``fill=``) may say.

Why its own module: the options, the self-check and the fills all speak these words; a light module lets the
command line know them without loading the fills.
"""
from __future__ import annotations

NEAREST = "nearest"  # copy of the nearest annotated slice
INTERPOLATION = "interpolation"  # shape-based interpolation (icl.sparse.classic)
MODEL = "model"  # the model's propagation (icl.sparse.model_fill)
AUTO = "auto"  # per structure, the best of the self-check (icl.sparse.fill)
REGISTRATION = "registration"  # drawn masks carried by registering images: 2D between the slices of a drawing
# (icl.sparse.slice_registration), 3D from another scan to the query (icl.sparse.registration)
SHAPE_FILLS = (INTERPOLATION, NEAREST)  # read the drawn shapes only (icl.sparse.classic)
CLASSIC_FILLS = (INTERPOLATION, NEAREST, REGISTRATION)  # the classic fills of a scan annotated on a few slices
SAME_SCAN_FILLS = (AUTO, MODEL, INTERPOLATION, NEAREST, REGISTRATION)  # a scan annotated on a few slices
CROSS_SCAN_FILLS = (AUTO, MODEL, REGISTRATION)  # support from another scan
FILLS = (AUTO, MODEL, INTERPOLATION, NEAREST, REGISTRATION)
NO_MODEL_FILLS = CLASSIC_FILLS  # fills that need no model: none is loaded
