"""Studies that compare whole runs on one config, `python -m jsft.study NAME` (see __main__.py)."""
