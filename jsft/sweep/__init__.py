"""Sweeps of whole runs on an Optuna study, `python -m jsft.sweep` (documented in __main__.py)."""
