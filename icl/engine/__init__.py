"""Engine: joins the data side (icl.data) to the SAM2 side (sam2_ext) — training (``icl.engine.train.loop``) and
evaluation (``icl.engine.eval``), and what both read: training clips (``clips``), checkpoints, the feature cache and
DDP helpers.

Submodules are imported explicitly so that importing the package stays cheap and free of import cycles.
"""
