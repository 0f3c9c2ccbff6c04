"""Reports: per-case × per-class tables (CSV + markdown), overlay PNGs and NIfTI masks — every writer is atomic.

Import the submodule you need (``icl.report.tables``, ``icl.report.overlays``, ``icl.report.nifti``) so that using
one does not load the others' dependencies.
"""
