"""Evaluation: member and ensemble predictions (``predict``), metrics and uncertainty, deep ensembles,
the report and its pictures, and the timing helpers of ``bench/``."""
