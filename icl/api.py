"""The Python API, as documented: ``from icl.api import ICLSegmenter``. The inference road itself lives in
:mod:`icl.infer` (the segmenter, scan identity, support slices, query folders, output safety).

    from icl.api import ICLSegmenter
    seg = ICLSegmenter()                                     # the default CPU model (checkpoint/icl_tiny_cpu.pth)
    labels = seg.segment(query="q.nii.gz", support="s.nii.gz", support_label="s_lab.nii.gz")
    seg.save(labels, "pred.nii.gz")
"""
from icl.infer.segmenter import ICLSegmenter, Segmentation

__all__ = ["ICLSegmenter", "Segmentation"]
