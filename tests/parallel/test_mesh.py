"""Sharded training on 8 simulated CPU devices gives the single-device losses; shardings follow rules.

Each run is a subprocess: the device count is fixed when JAX starts
(XLA_FLAGS=--xla_force_host_platform_device_count=8).
"""

import json
import os
import sys

import numpy as np
import pytest

from tests import zygote
from tests.conftest import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "tests", "tiny_config.py")
# Shapes chosen so most dimensions divide by 8 (real tensor/fsdp sharding) and kv_heads=4 does not
# (exercising the replicate-if-not-divisible fallback).
MODEL = [
    "--config.model.d_model=64",
    "--config.model.n_heads=8",
    "--config.model.n_kv_heads=4",
    "--config.model.head_dim=8",
    "--config.model.mlp_dim=128",
    "--config.model.vocab_size=512",
    "--config.data.batch_size=8",
    "--config.train.eval_every_steps=0",
    "--config.train.log_every_steps=1",
    "--config.optim.warmup_steps=2",
]


def _env(devices):
    return cpu_env(devices)


def _train(data_dir, workdir, devices, *overrides):
    cmd = [
        sys.executable,
        "-m",
        "jsft.main",
        f"--config={TINY}:{data_dir}",
        f"--workdir={workdir}",
        *MODEL,
        *overrides,
    ]
    r = zygote.run(cmd, cwd=REPO, env=_env(devices), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout + r.stderr


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _one_device_equals_the_mesh(data_dir, tmp_path, *overrides):
    """The same run on one device and on a (2,2,2) mesh of 8: the same losses at steps 1-6."""
    _train(data_dir, tmp_path / "one", 1, "--config.mesh.shape=(1,1,1)", *overrides)
    _train(data_dir, tmp_path / "mesh", 8, "--config.mesh.shape=(2,2,2)", *overrides)
    one, mesh = _losses(tmp_path / "one"), _losses(tmp_path / "mesh")
    assert sorted(one) == sorted(mesh) == list(range(1, 7))
    np.testing.assert_allclose([mesh[s] for s in one], list(one.values()), rtol=2e-5)


@pytest.fixture(scope="module")
def baseline(tiny_data_dir, tmp_path_factory):
    wd = tmp_path_factory.mktemp("baseline")
    _train(tiny_data_dir, wd, 1, "--config.mesh.shape=(1,1,1)")
    return _losses(wd)


MESHES = ["(8,1,1)", "(1,8,1)", "(1,1,8)", "(2,2,2)", "(1,2,4)"]


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_every_mesh_trains_to_the_single_device_losses(tiny_data_dir, tmp_path, baseline, mesh):
    out = _train(tiny_data_dir, tmp_path, 8, f"--config.mesh.shape={mesh}")
    assert "over 8 devices" in out
    losses = _losses(tmp_path)
    assert sorted(losses) == sorted(baseline) == list(range(1, 7))
    np.testing.assert_allclose([losses[s] for s in baseline], list(baseline.values()), rtol=2e-5)


@pytest.mark.slow
# The default (flash) runs on every mesh above. The Pallas kernels (splash, pallas_gpu) are refused off
# their accelerator by a run; under a mesh (shard_map) they are checked in tests/models/test_pallas_gpu.py.
@pytest.mark.parametrize("kernel", ["reference", "chunked", "xla_sdpa"])
def test_other_attention_kernels_train_to_the_single_device_losses_on_a_mesh(
    tiny_data_dir, tmp_path, baseline, kernel
):
    _train(tiny_data_dir, tmp_path, 8, "--config.mesh.shape=(2,2,2)", f"--config.model.attention={kernel}")
    losses = _losses(tmp_path)
    np.testing.assert_allclose([losses[s] for s in baseline], list(baseline.values()), rtol=2e-5)


SHARDINGS_SCRIPT = r"""
import json, jax
from jsft.models.llama import LlamaConfig
from jsft.models.registry import ModelDef
from jsft.parallel import sharding
from jsft.parallel.mesh import build_mesh
mesh = build_mesh((2, 2, 2))
rules = sharding.parse_rules(dict(batch="data,fsdp", embed="fsdp", mlp="tensor", heads="tensor",
                                  kv_heads="tensor", vocab="tensor", head_dim="", layers="", seq=""))
model = ModelDef.create(LlamaConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=6, n_kv_heads=3,
                                    head_dim=8, mlp_dim=128))
dropped = []
shardings = sharding.param_shardings(model.abstract_params(), model.logical_axes(), mesh, rules, dropped)
params = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0))
out = {jax.tree_util.keystr(p): [str(x.sharding.spec), list(x.addressable_shards[0].data.shape)]
       for p, x in jax.tree_util.tree_leaves_with_path(params)}
print(json.dumps({"params": out, "dropped": [list(map(str, d)) for d in dropped]}))
"""


def test_parameters_land_with_the_shardings_the_rules_say():
    r = zygote.run(
        [sys.executable, "-c", SHARDINGS_SCRIPT],
        cwd=REPO,
        env=_env(8),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    params = result["params"]
    assert params["['embed']"] == ["P('tensor', 'fsdp')", [256, 32]]
    assert params["['lm_head']"] == ["P('fsdp', 'tensor')", [32, 256]]
    assert params["['layers']['attn']['q_proj']"] == ["P(None, 'fsdp', 'tensor', None)", [2, 32, 3, 8]]
    assert params["['layers']['mlp']['down_proj']"] == ["P(None, 'tensor', 'fsdp')", [2, 64, 32]]
    assert params["['layers']['attn_norm']['scale']"] == ["P(None, 'fsdp')", [2, 32]]
    # 3 kv heads do not divide over tensor=2: replicated on that dimension, and reported.
    assert params["['layers']['attn']['k_proj']"] == ["P(None, 'fsdp', None, None)", [2, 32, 3, 8]]
    assert ["kv_heads", "3", "('tensor',)"] in result["dropped"]


@pytest.mark.slow
def test_a_checkpoint_restores_onto_another_mesh_and_one_device(tiny_data_dir, tmp_path, baseline):
    first = tmp_path / "first"
    _train(tiny_data_dir, first, 8, "--config.mesh.shape=(1,8,1)", "--config.train.stop_after_steps=3")
    for name, devices, mesh in (("on_2x2x2", 8, "(2,2,2)"), ("on_1", 1, "(1,1,1)")):
        wd = tmp_path / name
        zygote.run(["cp", "-r", str(first), str(wd)], check=True)
        out = _train(tiny_data_dir, wd, devices, f"--config.mesh.shape={mesh}")
        assert "Resuming from the checkpoint at step 3" in out
        losses = _losses(wd)
        assert sorted(losses) == list(range(1, 7))
        np.testing.assert_allclose(
            [losses[s] for s in range(1, 7)], [baseline[s] for s in range(1, 7)], rtol=2e-5
        )


@pytest.mark.slow
def test_a_frozen_subset_on_a_mesh_trains_to_its_single_device_losses(tiny_data_dir, tmp_path):
    # Optimizer state exists for the trainable parameters only and takes their shardings.
    frozen = r"--config.train.frozen=embed|lm_head|layers\.attn\."
    _one_device_equals_the_mesh(tiny_data_dir, tmp_path, frozen)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lora_on_a_mesh_trains_to_its_single_device_losses(tiny_data_dir, tmp_path, method):
    # Adapters (rank 4 on every projection) shard like their weights' input/output axes; the QLoRA
    # base's codes and scales keep the weights' logical axes.
    peft = [f"--config.peft.method={method}", "--config.peft.rank=4", "--config.peft.quant_block=8"]
    _one_device_equals_the_mesh(tiny_data_dir, tmp_path, *peft)


@pytest.mark.slow
def test_objectives_on_a_mesh_train_to_their_single_device_losses(tiny_data_dir, tmp_path):
    # GEM (log_sigmoid) + z-loss through the fused kernel, NEFTune noise, on a (2,2,2) mesh.
    extra = [
        "--config.loss.objective=gem",
        "--config.loss.gem_h=log_sigmoid",
        "--config.loss.z_loss=0.001",
        "--config.loss.neftune_alpha=5",
    ]
    _one_device_equals_the_mesh(tiny_data_dir, tmp_path, *extra)


@pytest.mark.slow
def test_qsft_on_a_mesh_trains_to_its_single_device_losses(tmp_path):
    # Bellman targets from the target and behaviour copies (sharded like the parameters), Polyak update.
    from tests.conftest import make_records, write_jsonl  # noqa: PLC0415

    data = tmp_path / "data"
    data.mkdir()
    records = [dict(r, reward=float(i % 2)) for i, r in enumerate(make_records(400, 0))]
    write_jsonl(data / "train.jsonl", records)
    write_jsonl(data / "val.jsonl", make_records(24, 1))
    extra = ["--config.loss.objective=qsft", "--config.loss.qsft_gamma=0.9", "--config.loss.qsft_polyak=0.1"]
    _one_device_equals_the_mesh(data, tmp_path, *extra)


@pytest.mark.slow
def test_smoothing_prompt_weight_and_dropout_on_a_mesh_train_to_their_single_device_losses(
    tiny_data_dir, tmp_path
):
    extra = [
        "--config.loss.label_smoothing=0.1",
        "--config.loss.prompt_weight=0.2",
        "--config.model.dropout_embed=0.1",
        "--config.model.dropout_residual=0.1",
    ]
    _one_device_equals_the_mesh(tiny_data_dir, tmp_path, *extra)
