"""The modes `--mode` picks (train, eval and generate, export, plan): each builds a `Run` and drives it.

They sit above the composition root (`jsft/run.py`), which sits above the jobs it composes (train/,
evals/, interop/); nothing below imports a mode.
"""
