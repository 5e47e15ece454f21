"""The streaming safetensors writer: files the safetensors library reads back exactly, planned by bytes."""

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from jsft.interop.safetensors_writer import SafetensorsWriter, TensorInfo, plan_files


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "a.weight": rng.standard_normal((5, 7)).astype(np.float32),
        "b.bias": rng.standard_normal(3).astype(ml_dtypes.bfloat16),
        "c.half": rng.standard_normal((2, 3, 4)).astype(np.float16),
        "d.ids": np.arange(6, dtype=np.int64).reshape(3, 2),
        "e.scalar": np.array(1.5, np.float32),
        "f.empty": np.zeros((0, 4), np.float32),
        "g.last": rng.standard_normal(9).astype(ml_dtypes.bfloat16),
    }


def _infos(tensors):
    return [TensorInfo(k, v.dtype.name, v.shape) for k, v in tensors.items()]


def _read(directory, file):
    with safe_open(str(directory / file), "numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _write(directory, tensors, max_file_bytes):
    with SafetensorsWriter(str(directory), _infos(tensors), max_file_bytes) as writer:
        for name, value in tensors.items():
            writer.write(name, value)
    return writer.files_written


@pytest.mark.parametrize("max_file_bytes", [10**9, 60])
def test_the_safetensors_library_reads_back_every_tensor_exactly(tmp_path, max_file_bytes):
    tensors = _tensors()
    files = _write(tmp_path, tensors, max_file_bytes)
    if max_file_bytes > 1000:
        assert files == ["model.safetensors"]  # one file: no index, as transformers writes it
        weight_map = dict.fromkeys(tensors, "model.safetensors")
    else:
        assert files[-1] == "model.safetensors.index.json" and len(files) > 3
        index = json.loads((tmp_path / files[-1]).read_text())
        weight_map = index["weight_map"]
        assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
        assert sorted(set(weight_map.values())) == files[:-1]
    read = {}
    for file in sorted(set(weight_map.values())):
        values, metadata = _read(tmp_path, file)
        assert metadata == {"format": "pt"}
        assert all(weight_map[k] == file for k in values)
        read.update(values)
    assert read.keys() == tensors.keys()
    for name, value in tensors.items():
        assert read[name].dtype == value.dtype and read[name].shape == value.shape, name
        np.testing.assert_array_equal(read[name], value, err_msg=name)


def test_files_are_planned_greedily_by_bytes_and_a_large_tensor_gets_its_own():
    infos = [
        TensorInfo(n, "float32", (s,)) for n, s in [("a", 10), ("b", 10), ("c", 100), ("d", 5), ("e", 5)]
    ]
    plan = plan_files(infos, max_file_bytes=80)
    assert [[t.name for t in f] for f in plan] == [["a", "b"], ["c"], ["d", "e"]]


def test_a_tensor_out_of_plan_is_refused_and_an_unfinished_export_writes_no_index(tmp_path):
    tensors = _tensors()
    writer = SafetensorsWriter(str(tmp_path), _infos(tensors), 60)
    with pytest.raises(
        ValueError, match=r"expected a.weight float32\[5, 7\] next, got a.weight float32\[7, 5\]"
    ):
        writer.write("a.weight", tensors["a.weight"].T.copy())
    with pytest.raises(ValueError, match="expected a.weight"):
        writer.write("b.bias", tensors["b.bias"])
    writer.write("a.weight", tensors["a.weight"])
    with pytest.raises(ValueError, match="6 planned tensors were never written"):
        writer.close()
    with pytest.raises(RuntimeError), SafetensorsWriter(str(tmp_path / "x"), _infos(tensors), 60):
        raise RuntimeError("the gather failed")
    assert not (tmp_path / "model.safetensors.index.json").exists()
