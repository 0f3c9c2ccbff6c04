"""Training: the ``-tasks`` schedule and the tasks it draws (``schedule``, ``tasks``, ``prior_tasks``), one step of
the model (``step``), all loss code (``losses``), validation, adapters (``adapters``), wandb logging and the loop
(``loop``: ``train_3d.py``)."""
