"""Evaluation (``eval_3d.py``): which cases and support (``cases``), the per-case metrics (``metrics``, MONAI) and
the run over checkpoints (``evaluate``)."""
