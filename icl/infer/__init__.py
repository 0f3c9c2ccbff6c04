"""The inference road from NIfTI files to a label map, shared by the CLI, the API and the viewer: the segmenter
(``segmenter``), what a scan may be and when two scans are one (``scan_source``), the support slices (``support``),
query folders (``query_folder``) and output safety (``outputs``). It stands on ``icl.sparse`` and ``icl.model``,
never on the training engine (``tests/test_layers.py``)."""
