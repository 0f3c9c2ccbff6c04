"""The model layer that training, evaluation, the CLI and the API all stand on: building the predictor
(``build``), which weights to load and how (``weights``, ``lora``), and mixed precision (``precision``).
It imports nothing from ``icl.engine`` (the training engine), so inference does not either."""
