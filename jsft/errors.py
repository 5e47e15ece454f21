"""The errors a user's input can cause: each message names the file and line, the config key or the
path, and what to change. `jsft.main` prints them as one `jsft: error: ...` line."""

from collections.abc import Callable
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
