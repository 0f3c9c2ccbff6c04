"""Sparse annotation → dense labels: the annotation conventions, the classic fills, the model's fill and the
per-structure self-check that chooses between them (``python -m icl.segment --support-slices labelled``)."""
