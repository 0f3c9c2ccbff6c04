"""Engine: joins the data side (icl.data) to the SAM2 side (sam2_ext) — losses, metrics, training, evaluation.

Submodules are imported explicitly (``from icl.engine.metrics import case_class_metrics``) so that importing the
package stays cheap and free of import cycles.
"""
