"""The memory planner counts exactly what the sharding rules place on each device."""

import json
import os
import sys

from tests import zygote
from tests.conftest import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, sys
sys.path.insert(0, "REPO")
from configs import demo
from jsft.modes import plan
config = demo.get_config()
config.model.vocab_size = 512
config.mesh.shape = (1, 4, 1)
rows = {}
plan.run_plan(config, plan_rows=rows)
print(json.dumps(rows))
"""


def test_plan_counts_sharded_state_exactly_and_names_the_accelerators():
    env = cpu_env(4)
    r = zygote.run(
        [sys.executable, "-c", SCRIPT.replace("REPO", REPO)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    # The demo model with a 512 vocabulary: every parameter has an `embed` dimension (128 % 4 == 0),
    # so FSDP over 4 devices stores exactly a quarter of the float32 parameters on each.
    n_params = 512 * 128 * 2 + 4 * (128 * 32 * (4 + 2 + 2 + 4) + 3 * 128 * 384 + 2 * 128) + 128
    assert rows["parameters"] == n_params * 4 // 4
    # Adam's two moments, plus its step counter (a replicated scalar).
    assert 0 <= rows["optimizer state"] - 2 * rows["parameters"] <= 16
    assert rows["gradients (float32)"] == rows["parameters"]
    assert rows["activations + workspace (XLA temp - gradients)"] > 0
    assert rows["peak per device"] >= rows["parameters"] + rows["optimizer state"]
    assert "H200 (141 GB)" in r.stdout and "TPU v5e (16 GB)" in r.stdout


def test_plan_mode_on_the_command_line_needs_no_workdir_and_refuses_minus_one():
    base = [sys.executable, "-m", "jsft.main", "--config=configs/demo.py", "--mode=plan"]
    r = zygote.run(
        base + ["--config.model.vocab_size=512", "--config.mesh.shape=(2,1,1)"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1, 'expert': 1} = 2 devices" in r.stdout
    r = zygote.run(
        base + ["--config.model.vocab_size=512"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert r.returncode != 0 and "needs explicit sizes, no -1" in r.stderr


def test_the_plan_names_the_kernel_of_its_figures_and_what_each_accelerator_runs():
    import dataclasses  # noqa: PLC0415

    from jsft.models.llama import LlamaConfig  # noqa: PLC0415
    from jsft.modes import plan  # noqa: PLC0415

    arch = LlamaConfig.tiny(vocab_size=64)  # float32 compute: no cuDNN
    assert plan.attention_line("auto", arch) == (
        "attention: figures with flash (compiled for the CPU); model.attention=auto is pallas_gpu on GPUs, "
        "splash on TPUs"
    )
    # An accelerator kernel cannot be compiled on the CPU: flash stands in, and the line says so.
    line = plan.attention_line("splash", dataclasses.replace(arch, attention="flash"))
    assert line.endswith("model.attention=splash is refused on GPUs, splash on TPUs")
    assert "figures with flash" in line


OFFLOAD_SCRIPT = r"""
import json, sys
sys.path.insert(0, "REPO")
from configs import demo
from jsft.modes import plan
out = {}
for remat in ("save_dots", "offload"):
    config = demo.get_config()
    config.model.vocab_size = 512
    config.mesh.shape = (1, 4, 1)
    config.model.remat = remat
    rows = {}
    plan.run_plan(config, plan_rows=rows)
    out[remat] = rows
out["tokens"] = config.data.batch_size // config.optim.grad_accum_steps * config.data.seq_len
out["itemsize"] = {"float32": 4, "bfloat16": 2}[config.model.compute_dtype]
print(json.dumps(out))
"""


def test_offload_moves_save_dots_activations_to_the_host_in_the_plan():
    r = zygote.run(
        [sys.executable, "-c", OFFLOAD_SCRIPT.replace("REPO", REPO)],
        cwd=REPO,
        env=cpu_env(4),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    dots, offload = out["save_dots"], out["offload"]
    # The demo model: 4 layers, d_model 128, 4 heads and 2 KV heads of 32, MLP 384. Kept per token and
    # layer: q and the attention output (2 x 4 x 32), k and v (2 x 2 x 32), o_proj (128), gate and up
    # (2 x 384); over 4 devices.
    host = 4 * out["tokens"] * (2 * 4 * 32 + 2 * 2 * 32 + 128 + 2 * 384) * out["itemsize"] // 4
    assert offload["host memory: offloaded activations (from shapes)"] == host > 0
    act = "activations + workspace (XLA temp - gradients)"
    assert offload[act] == max(dots[act] - host, 0)
    assert offload["peak per device"] == dots["peak per device"] - host
    assert "host memory: offloaded activations (from shapes)" not in dots
