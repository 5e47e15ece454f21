"""Benchmarks, `python -m jsft.bench NAME` (listed in __main__.py): one module per thing measured."""
