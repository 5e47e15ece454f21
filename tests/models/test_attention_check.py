"""The accelerator check's kernel step: on a GPU it checks the Pallas kernel in both dtypes and cuDNN
in bfloat16; here it runs the Pallas GPU kernel in interpret mode and finds it within tolerance."""

from jsft.models import attention_check


def test_a_gpu_checks_its_own_kernels_besides_the_portable_ones():
    pairs = attention_check.kernels_for("gpu")
    assert {("pallas_gpu", "float32"), ("pallas_gpu", "bfloat16"), ("cudnn", "bfloat16")} <= set(pairs)
    assert ("cudnn", "float32") not in pairs  # cuDNN takes half precision only
    assert {k for k, _ in attention_check.kernels_for("cpu")} == {"flash", "chunked", "xla_sdpa"}
    assert ("splash", "bfloat16") in attention_check.kernels_for("tpu")


def test_the_pallas_gpu_kernel_passes_the_check_in_interpret_mode():
    rows = attention_check.check([("pallas_gpu", "float32"), ("pallas_gpu", "bfloat16")], repeats=0)
    assert len(rows) == 4 and all(row["ok"] for row in rows), rows
    assert all(row["max_rel_err"] < 1e-5 for row in rows if row["dtype"] == "float32")
