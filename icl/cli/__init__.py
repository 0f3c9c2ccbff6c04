"""The command-line entry points, thin over the API (:mod:`icl.infer`) or the engine (:mod:`icl.engine`):
``segment`` (also ``python -m icl.segment``), ``demo``, ``recipe``, ``preprocess``, ``phantom``; ``train_3d.py`` and
``eval_3d.py`` stand at the repository's root."""
