"""Training: the command-line arguments (``args``), the training methods (``tasks``), the run's state,
signals and checkpoints (``run``) and the speed settings (``speed``). ``train.py`` assembles them."""
