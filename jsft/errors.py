"""The errors a user's input can cause: each message names the file and line, the config key or the
path, and what to change. `jsft.main` prints them as one `jsft: error: ...` line. Also two process
basics every layer may use: `help_exits_zero` and `import_without`."""

import importlib
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


class DataError(ValueError):
    """A problem with input data; the message names the source, the file and the line or row."""


_HELP = ("--help", "-help", "-h", "--helpfull", "--helpshort", "-?", "--helpxml")


def help_exits_zero(parser: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
    """An absl flags parser whose `--help` exits with status 0 (absl's own exits 1, so a script that
    probes `--help` would think the command failed); every other exit is left as it is."""

    def parse(argv: list[str]) -> Any:
        try:
            return parser(argv)
        except SystemExit as e:
            if e.code == 1 and any(a in _HELP for a in argv[1:]):
                raise SystemExit(0) from None
            raise

    return parse


def import_without(module: str, hidden: tuple[str, ...]) -> ModuleType:
    """Import `module` while the optional modules `hidden` cannot be imported, where they are not
    loaded yet: for libraries that try an optional heavy import at import time and work without it
    (tensorboardX tries torch, ~2 s; rouge-score's nltk tries scipy.stats, ~1.4 s). The hidden
    modules stay importable afterwards (a failed import caches nothing)."""
    if module in sys.modules:
        return sys.modules[module]
    hide = [name for name in hidden if name not in sys.modules]
    for name in hide:
        sys.modules[name] = None  # `import name` now raises ImportError
    try:
        return importlib.import_module(module)
    finally:
        for name in hide:
            del sys.modules[name]
