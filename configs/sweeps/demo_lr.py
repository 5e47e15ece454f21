"""A 4-trial sweep over the demo's learning rate (two values) and seed (two values), shortened runs.

python -m jsft.sweep --sweep configs/sweeps/demo_lr.py --dir /tmp/sweep_demo_lr [--workers 2]
"""

import ml_collections


def get_sweep() -> ml_collections.ConfigDict:
    sweep = ml_collections.ConfigDict()
    sweep.config = "configs/demo.py:smoke"
    sweep.overrides = {"train": {"steps": 20, "eval_every_steps": 10, "checkpoint_every_steps": 10}}
    sweep.space = {"optim": {"lr": ("grid", [1e-3, 3e-3])}, "seed": ("grid", [0, 1])}
    sweep.sampler = "grid"
    sweep.seed = 0
    sweep.objective = "eval/loss"
    sweep.direction = "minimize"
    sweep.trials = 0  # the whole grid
    sweep.pruner = ""
    return sweep
