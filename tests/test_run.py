"""The Run every mode shares: eval and export read parameters only, never the optimizer state."""

import importlib.util
import math
import os

import jax
import numpy as np
import pytest

from jsft.run import Run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _bytes(tree) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


class _RecordingCheckpointer:
    """Stands in for the workdir's checkpoints: records what a restore asks for, allocates nothing."""

    directory = "/nowhere"

    def __init__(self):
        self.targets = []

    def latest_step(self):
        return 500

    def all_steps(self):
        return [500]

    def read_meta(self, step):
        return {"best": {"step": 500, "value": 1.0, "evals_since_best": 0}}  # the best record

    def restore_params(self, step, target):
        self.targets.append(target)
        return target

    def close(self):
        pass


@pytest.mark.parametrize("which", ["latest", "best", "500"])
def test_llama3_8b_eval_and_export_restore_the_parameters_alone(which, monkeypatch):
    config = _config("llama3_8b_sft")
    config.model.hf_path = ""  # the planner shapes: LlamaConfig.llama3_8b()
    config.mesh.shape = (1, 1, 1)
    run = Run.create(config)
    model = run.model(config.model.vocab_size)
    recorder = _RecordingCheckpointer()
    monkeypatch.setattr(run, "checkpointer", lambda *a, **k: recorder)
    params, label, step = run.restore_params(model, which)  # what --mode eval and --mode export call
    (target,) = recorder.targets
    assert set(target) == set(model.abstract_params())  # a params tree: no opt_state, no step, no rng
    param_bytes = _bytes(model.abstract_params())
    assert _bytes(target) == param_bytes and param_bytes > 30e9  # 8.03B float32 parameters
    tx, _ = run.optimizer()
    state_target, _, _ = run.state_layout(model, tx)
    assert _bytes(state_target) > 2.9 * param_bytes  # what a full restore would have read (AdamW)
    assert step == 500 and label == f"{which}_step_500"


@pytest.mark.slow
def test_restored_parameters_equal_the_trained_ones(tiny_config, tmp_path):
    from jsft.modes.train import train_and_evaluate

    tiny_config.train.steps, tiny_config.train.eval_every_steps = 3, 0
    train_and_evaluate(tiny_config, str(tmp_path))
    run = Run.create(tiny_config, str(tmp_path))
    model = run.model(run.tokenizer().vocab_size)
    params, label, step = run.restore_params(model, "latest")
    tx, _ = run.optimizer()
    target, _, _ = run.state_layout(model, tx)
    ckpt = run.checkpointer()
    state, _ = ckpt.restore(3, target)
    ckpt.close()
    assert (label, step) == ("latest_step_3", 3)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
