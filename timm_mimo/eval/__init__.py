"""Evaluation: :func:`evaluate` (a model on a split, with every metric and file ``validate.py`` offers), member
and ensemble predictions (``predict``), metrics and uncertainty, deep ensembles, the report and its
pictures, and the timing helpers of ``bench/``."""
from .evaluation import DataSettings, EvalOptions, ModelSource, OODSettings, OutputFiles, evaluate  # noqa: F401
