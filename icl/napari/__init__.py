"""The napari plugin (``napari.yaml``): a NIfTI reader and writer, and the "In-context fill" dock widget.

Why in the package: annotators draw in a viewer; the widget runs the same API as ``python -m icl.segment``
(``icl.api.ICLSegmenter``) on the layers they drew, so the viewer, the CLI and the benchmarks give the same labels.
A client of ``icl.api`` / ``icl.infer`` only; nothing outside this folder imports napari.
"""
