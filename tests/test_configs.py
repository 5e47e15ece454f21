"""Every shipped config loads and passes validation, with each of its named arguments."""

import importlib.util
import os

import pytest

from jsft import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [
    ("demo.py", None),
    ("demo.py", "smoke"),
    ("hf_sft.py", None),
    ("hf_sft.py", "cpu"),
    ("llama3_8b_sft.py", None),
    ("llama3_8b_sft.py", "v5p-64"),
    ("llama3_70b_sft.py", None),
    ("llama3_70b_sft.py", "v5p-128"),
]


@pytest.mark.parametrize("name,arg", CASES)
def test_config_loads_and_validates(name, arg):
    spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(REPO, "configs", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    config_lib.validate(config)
    with pytest.raises(ValueError, match="unknown"):
        module.get_config("no-such-argument")
