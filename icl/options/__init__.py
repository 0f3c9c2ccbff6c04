"""Every option of ``train_3d.py``, ``eval_3d.py`` and ``python -m icl.segment``, defined once: the machinery
(``spec``: an option's spec, the parser generator, the one check), single-value checks (``checks``), the shared
options (``common``) and one module per command (``train``, ``evaluate``, ``segment``)."""
