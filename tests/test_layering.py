"""Imports only run downward (BUILD_NOTES.md, "Module map and layers"): import-linter's contracts in
setup.cfg ([importlinter]) hold on the tree, and they fail on a copy given an upward import, at module
level or inside a function."""

import os
import shutil
import subprocess
import sys

from tests import zygote

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTRACTS = [
    "Layers: imports only run downward",
    "Nothing imports an entry point (main, bench, sweep, study)",
    "The modes do not import one another",
    "Models read neither the config nor files",
    "The ground floor (data, parallel) imports nothing of jsft above it",
]


def lint_imports(root: str) -> subprocess.CompletedProcess:
    """`lint-imports` as .ci/run runs it, from `root` (which holds setup.cfg and the jsft/ it checks)."""
    exe = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    exe = exe if os.path.exists(exe) else shutil.which("lint-imports") or "lint-imports"
    env = dict(os.environ, PYTHONPATH=root)  # the copy's jsft, not the installed one
    cmd = [exe, "--config", os.path.join(root, "setup.cfg"), "--no-cache", "--no-logo"]
    return zygote.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_the_tree_keeps_every_contract():
    r = lint_imports(REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in CONTRACTS:
        assert f"{name} KEPT" in r.stdout, r.stdout


def test_an_upward_import_breaks_the_contracts_even_inside_a_function(tmp_path):
    no_cache = shutil.ignore_patterns("__pycache__")
    shutil.copytree(os.path.join(REPO, "jsft"), tmp_path / "jsft", ignore=no_cache)
    shutil.copy(os.path.join(REPO, "setup.cfg"), tmp_path / "setup.cfg")
    with open(tmp_path / "jsft" / "models" / "llama.py", "a") as f:
        f.write("\nimport jsft.modes.train  # noqa: E402,F401 - a model reaching up to the training mode\n")
    with open(tmp_path / "jsft" / "data" / "packing.py", "a") as f:
        f.write("\n\ndef _lazy():\n    from jsft.run import Run  # noqa: PLC0415\n\n    return Run\n")
    r = lint_imports(str(tmp_path))
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    for name in (CONTRACTS[0], CONTRACTS[3], CONTRACTS[4]):
        assert f"{name} BROKEN" in out, out
    assert f"{CONTRACTS[1]} KEPT" in out, out  # (the modes' independence breaks too: through the cycle)
    assert "jsft.models.llama -> jsft.modes.train" in out, out
    assert "jsft.data.packing -> jsft.run" in out, out  # the import inside a function counts


def test_importing_the_config_helpers_loads_no_jax_or_datasets():
    code = (
        "import sys, jsft.config; print(sorted(m for m in ('jax', 'flax', 'datasets') if m in sys.modules))"
    )
    # A real interpreter: the zygote has jax and datasets imported already.
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
