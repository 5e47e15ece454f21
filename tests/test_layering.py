"""Imports only run downward: a module never imports one from a higher layer (BUILD_NOTES.md, "Module
map and layers"). Function-level imports count too."""

import ast
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Bottom to top. The most specific prefix wins: `jsft.train.loop` is a mode, the rest of `jsft.train`
# is the training core below it.
LAYERS = {
    "jsft.errors": 0,
    "jsft.parallel": 1,
    "jsft.data": 1,
    "jsft.models": 2,
    "jsft.interop": 3,  # Hugging Face weights and files: reads models and data only
    "jsft.train": 4,  # losses, optimizer, state, step, checkpoints, guards
    "jsft.evals": 5,
    "jsft.run": 6,  # config + workdir -> everything a mode needs
    "jsft.train.loop": 7,  # the modes
    "jsft.evals.run": 7,
    "jsft.interop.export": 7,
    "jsft.plan": 7,
    "jsft.config": 7,  # validation imports the choice lists of every layer (lazily)
    "jsft.main": 8,  # the command lines
    "jsft.bench": 8,
    "jsft.bench_train": 8,
    "jsft.bench_peft": 8,
    "jsft.study": 8,  # research studies built from whole runs
    "jsft.sweep": 8,  # sweeps of whole runs on an Optuna study
    "jsft.sweep_report": 8,
    "jsft.sweep_lib": 8,
}


def layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    assert best is not None, f"{module} is in no layer: add it to LAYERS (and BUILD_NOTES.md)"
    return LAYERS[best]


def imports_of(source: str, module: str) -> set[str]:
    """Every jsft module `source` imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("jsft")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jsft"):
            for a in node.names:  # `from jsft import config` names a module; `from jsft.x import y` may not
                candidate = f"{node.module}.{a.name}"
                found.add(candidate if _is_module(candidate) else node.module)
    found.discard(module)
    return found


def _is_module(name: str) -> bool:
    path = os.path.join(REPO, *name.split("."))
    return os.path.exists(path + ".py") or os.path.isdir(path)


def violations(sources: dict[str, str]) -> list[str]:
    bad = []
    for module, source in sorted(sources.items()):
        for target in sorted(imports_of(source, module)):
            if layer(target) > layer(module):
                bad.append(f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})")
    return bad


def _package_sources() -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(os.path.join(REPO, "jsft")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                with open(path) as f:
                    out[module] = f.read()
    return out


def test_no_module_imports_a_higher_layer():
    assert violations(_package_sources()) == []


def test_the_check_sees_an_upward_import_even_inside_a_function():
    source = "def f():\n    from jsft.interop import hf\n    return hf\n"
    assert violations({"jsft.models.registry": source}) == [
        "jsft.models.registry (layer 2) imports jsft.interop.hf (layer 3)"
    ]


def test_importing_the_config_helpers_loads_no_jax_or_datasets():
    code = (
        "import sys, jsft.config; print(sorted(m for m in ('jax', 'flax', 'datasets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
