"""Export at any scale: params sharded over devices and processes are written one tensor at a time,
byte-identical to an unsharded export, never holding the model on a host; the files load in transformers."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jsft.interop import hf, hf_save
from jsft.models.registry import ModelDef
from tests import zygote
from tests.conftest import cpu_env, free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LLAMA = dict(
    model_type="llama",
    vocab_size=96,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
)

# Shared by the subprocess scripts: a model whose params are created already sharded on a mesh.
SETUP = r"""
import json, sys, time
import jax, numpy as np
from jsft.interop import hf
from jsft.interop.hf_keys import get_path
from jsft.models.registry import ModelDef
from jsft.parallel import sharding
from jsft.parallel.mesh import build_mesh

def sharded_model(hf_config, mesh_shape):
    cfg = hf.config_from_hf(hf_config)
    model = ModelDef.create(cfg)
    mesh = build_mesh(mesh_shape)
    rules = sharding.parse_rules(dict(batch="data,fsdp", embed="fsdp", mlp="tensor", heads="tensor",
                                      kv_heads="tensor", vocab="tensor", head_dim="", layers="", seq=""))
    shardings = sharding.param_shardings(model.abstract_params(), model.logical_axes(), mesh, rules)
    with jax.set_mesh(mesh):
        params = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0))
    return cfg, jax.block_until_ready(params)
"""

SHARDED_EXPORT = (
    SETUP
    + r"""
out, hf_config = sys.argv[1], json.loads(sys.argv[2])
cfg, params = sharded_model(hf_config, (1, 4, 2))
assert all(len(a.sharding.device_set) == 8 for a in jax.tree.leaves(params))
split = [a for a in jax.tree.leaves(params) if not a.sharding.is_fully_replicated]
assert len(split) >= 8, "most params should be split over the devices"
plain = jax.device_get(params)  # the same values as host numpy arrays
t = time.perf_counter()
hf.save_pretrained(out + "/sharded", params, cfg, "llama", dtype="bfloat16", max_shard_bytes=30_000)
sharded_s = time.perf_counter() - t
hf.save_pretrained(out + "/plain", plain, cfg, "llama", dtype="bfloat16", max_shard_bytes=30_000)
# The reference: each spec's layout change done in numpy on the whole host copy (the old export path).
reference = {}
for spec in hf.specs(cfg):
    value = get_path(plain, spec.path)
    if spec.per_layer:
        for i in range(cfg.n_layers):
            reference[spec.hf.format(i=i)] = np.asarray(spec.to_hf(value[i], cfg)).astype("bfloat16")
    else:
        reference[spec.hf] = np.asarray(spec.to_hf(value, cfg)).astype("bfloat16")
np.savez(out + "/reference.npz", **{k: v.view(np.uint16) for k, v in reference.items()})
print(json.dumps({"sharded_export_s": sharded_s}))
"""
)


@pytest.fixture(scope="module")
def sharded_export(tmp_path_factory):
    """One 8-device process: the same random params exported sharded (fsdp x tensor) and as numpy."""
    out = tmp_path_factory.mktemp("sharded_export")
    env = cpu_env(8)
    r = zygote.run(
        [sys.executable, "-c", SHARDED_EXPORT, str(out), json.dumps(LLAMA)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stdout.strip().splitlines()[-1])
    return out


def _files(directory):
    return {n: (directory / n).read_bytes() for n in sorted(os.listdir(directory))}


def test_a_sharded_export_is_byte_identical_to_the_unsharded_one(sharded_export):
    sharded, plain = _files(sharded_export / "sharded"), _files(sharded_export / "plain")
    assert sharded.keys() == plain.keys()
    assert sum(n.endswith(".safetensors") for n in sharded) > 1  # several files and an index
    assert "model.safetensors.index.json" in sharded
    for name in sharded:
        assert sharded[name] == plain[name], name


def test_exported_bfloat16_tensors_equal_the_numpy_layout_change(sharded_export):
    from safetensors.numpy import load_file  # noqa: PLC0415

    reference = dict(np.load(sharded_export / "reference.npz"))
    index = json.loads((sharded_export / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(reference)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in reference.values())
    for file in sorted(set(index["weight_map"].values())):
        for name, value in load_file(str(sharded_export / "sharded" / file)).items():
            assert index["weight_map"][name] == file
            assert str(value.dtype) == "bfloat16"
            np.testing.assert_array_equal(value.view(np.uint16), reference[name], err_msg=name)


PEAK_MEMORY = (
    SETUP
    + r"""
from jax._src import array
from jsft.interop import hf_save

def peak_since_reset():  # Linux: writing 5 to clear_refs resets the peak resident size (VmHWM)
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024

def growth(fn):
    time.sleep(0.5)  # let XLA free earlier temporaries (it does so on its own threads)
    open("/proc/self/clear_refs", "w").write("5")
    before = peak_since_reset()
    fn()
    return peak_since_reset() - before

out, hf_config = sys.argv[1], json.loads(sys.argv[2])
cfg, params = sharded_model(hf_config, (1, 8, 1))
small_cfg, small = sharded_model(dict(hf_config, num_hidden_layers=1), (1, 8, 1))
hf.save_pretrained(out + "/warmup", small, small_cfg, "llama")  # XLA's first-use costs, not the export's
model_bytes = sum(a.nbytes for a in jax.tree.leaves(params))
largest = max(t.info.nbytes for t in hf_save.export_plan(params, cfg, "float32"))
# Record every host array the exporter fetches, and every device-to-host copy of a jax.Array.
fetched, copied = [], []
host_copy = hf_save.host_copy
hf_save.host_copy = lambda v: fetched.append(host_copy(v).nbytes) or host_copy(v)
value = array.ArrayImpl._value
array.ArrayImpl._value = property(lambda a: copied.append(value.fget(a).nbytes) or value.fget(a))
t = time.perf_counter()
export_growth = growth(lambda: hf.save_pretrained(out + "/model", params, cfg, "llama", dtype="float32"))
seconds = time.perf_counter() - t
array.ArrayImpl._value = value
gather_growth = growth(lambda: jax.device_get(params))  # control: what a whole-model gather costs
print(json.dumps(dict(model_bytes=model_bytes, largest_tensor=largest, fetched=max(fetched),
                      copied=max(copied, default=0), n_fetched=len(fetched), export_s=seconds,
                      export_peak_growth=export_growth, whole_gather_peak_growth=gather_growth)))
"""
)


def test_export_holds_at_most_one_tensor_on_the_host(tmp_path):
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to measure peak memory")
    # 48 layers of 1 MiB tensors (~190 MB in all): a whole-model gather would stand out by far.
    config = dict(LLAMA, hidden_size=256, intermediate_size=1024, num_hidden_layers=48, vocab_size=512)
    env = cpu_env(8)
    r = zygote.run(
        [sys.executable, "-c", PEAK_MEMORY, str(tmp_path), json.dumps(config)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    print(m)
    assert m["n_fetched"] == 48 * 9 + 3  # every tensor fetched once
    assert m["fetched"] == m["largest_tensor"] and m["copied"] <= m["largest_tensor"]
    assert m["largest_tensor"] * 100 < m["model_bytes"]
    # Peak memory (on CPU, device buffers are host memory too): the export adds a few tensors and
    # compiled code; gathering the whole model, as export used to, adds the model.
    assert m["export_peak_growth"] < m["model_bytes"] / 4
    assert m["whole_gather_peak_growth"] > m["model_bytes"] * 0.9


def test_a_crash_leaves_no_export_that_looks_complete(tmp_path, monkeypatch):
    model = ModelDef.create(hf.config_from_hf(LLAMA))
    params = model.init(jax.random.key(0))
    out = tmp_path / "out"
    hf.save_pretrained(str(out), params, model.config, "llama")  # a first, complete export
    assert (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists()

    written = []

    def fail_midway(self, name, array):
        if len(written) == 5:
            raise OSError("disk full")
        written.append(name)
        return write(self, name, array)

    write = hf_save.SafetensorsWriter.write
    monkeypatch.setattr(hf_save.SafetensorsWriter, "write", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        hf.save_pretrained(str(tmp_path / "new"), params, model.config, "llama", max_shard_bytes=20_000)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # nothing half-written, staging removed
    monkeypatch.undo()

    # Re-exporting over the first export (now in several files) leaves none of its weights behind.
    hf.save_pretrained(str(out), params, model.config, "llama", max_shard_bytes=20_000)
    names = sorted(os.listdir(out))
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [n for n in names if n.startswith("model-")]
    again = hf.load_params(str(out), model.config)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, again)


def test_a_bfloat16_export_in_one_file_loads_in_transformers(tmp_path):
    torch = pytest.importorskip("torch", reason="the hf extra (torch, transformers) is not installed")
    transformers = pytest.importorskip("transformers")
    model = ModelDef.create(hf.config_from_hf(LLAMA))
    params = model.init(jax.random.key(1))
    hf.save_pretrained(str(tmp_path), params, model.config, "llama", dtype="bfloat16", eos_id=2)
    assert not (tmp_path / "model.safetensors.index.json").exists()  # fits in one file, as transformers does
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    expected = hf_save.hf_tensors(params, model.config, "bfloat16")
    state = loaded.state_dict()
    assert set(expected) == set(state)
    for name, value in expected.items():
        assert state[name].dtype == torch.bfloat16
        np.testing.assert_array_equal(state[name].view(torch.int16).numpy(), value.view(np.int16), name)


MULTIPROCESS_EXPORT = (
    SETUP
    + r"""
out, hf_config, coordinator, n, i = sys.argv[1], json.loads(sys.argv[2]), *sys.argv[3:6]
if int(n) > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=int(n), process_id=int(i),
                               coordinator_bind_address=coordinator)
cfg, params = sharded_model(hf_config, (1, 4, 1))
files = hf.save_pretrained(out, params, cfg, "llama", dtype="bfloat16", max_shard_bytes=30_000)
result = dict(process=jax.process_index(), files=files, devices=len(jax.devices()))
with open(sys.argv[6], "w") as f:  # not stdout: gloo's C++ logging interleaves with it
    json.dump(result, f)
"""
)


@pytest.mark.slow
def test_two_processes_export_the_same_bytes_as_one(tmp_path):
    coordinator = f"127.0.0.1:{free_port()}"

    def start(out, n, i, devices):
        env = cpu_env(devices)
        args = [
            str(out),
            json.dumps(LLAMA),
            coordinator,
            str(n),
            str(i),
            str(tmp_path / f"result-{n}-{i}.json"),
        ]
        return subprocess.Popen(
            [sys.executable, "-c", MULTIPROCESS_EXPORT, *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    procs = [start(tmp_path / "multi", 2, i, 2) for i in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    single = start(tmp_path / "single", 1, 0, 4)
    _, err = single.communicate(timeout=300)
    assert single.returncode == 0, err[-3000:]
    zero, one = (json.loads((tmp_path / f"result-2-{i}.json").read_text()) for i in range(2))
    assert (zero["devices"], one["files"]) == (4, [])  # process 1 wrote nothing
    assert "model.safetensors.index.json" in zero["files"]
    assert _files(tmp_path / "multi") == _files(tmp_path / "single")
