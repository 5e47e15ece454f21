"""Python subprocesses for the tests without paying Python's and JAX's start-up each time.

The end-to-end tests run `python -m jsft.main ...` (and a few `python -c SCRIPT`) a few hundred
times; each start imported jax, flax, optax, orbax, datasets and jsft again (~3 s of CPU on this
machine). `run` is `subprocess.run`, and a `[sys.executable, ...]` command with
`capture_output=True` gives the same result as a subprocess (a `CompletedProcess` with the exit
code and the captured output of a separate process, `TimeoutExpired` past `timeout`) but is forked
from a *zygote*: one Python process per test worker that has imported those libraries and nothing
else (no JAX backend, so no XLA threads; the `XLA_FLAGS` of each request, e.g. its number of
simulated devices, still take effect when the child starts its backend). The child gets the
request's working directory, environment, argv and stdin, and its file descriptors 1 and 2 go to
files, so everything it prints (Python, absl, XLA) is captured.

What a fork cannot give is run as a real subprocess instead: an environment that differs from the
zygote's in a variable that a library may have read at import time (anything but `XLA_FLAGS`,
`JAX_PLATFORMS` and `JSFT_*`), or `JSFT_TEST_NO_ZYGOTE=1` (the whole suite then runs as before).
Children share the zygote's string-hash seed (`PYTHONHASHSEED`), where separate processes would
each draw one.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import tempfile
import threading
from multiprocessing.connection import Connection

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Variables read when they are used, not when a module is imported: a child may differ in them.
_CHILD_VARIABLES = ("XLA_FLAGS", "JAX_PLATFORMS", "PYTHON", "LOCAL_DEVICES", "PYTEST_CURRENT_TEST")
_CHILD_PREFIXES = ("JSFT_",)
# Variables a library sets for itself when a test imports it (torch, tensorboardX's crc32c, JAX's
# Mosaic GPU): harmless to a child, as long as the zygote has not imported that library.
_LIBRARY_VARIABLES = {
    "TORCHINDUCTOR_CACHE_DIR": "torch",
    "CRC32C_SW_MODE": "tensorboardX",
    "MOSAIC_GPU_CUDA_ROOT": "jax.experimental.mosaic.gpu",
}
# The environment when the test modules were imported (after conftest set the session's variables),
# before any test or fixture changed it: the zygote's, whichever test starts it.
_BASE_ENV = dict(os.environ)
_PRELOAD = (
    "absl.app",
    "absl.flags",
    "absl.logging",
    "ml_collections.config_flags",
    "numpy",
    "jax",
    "jax.numpy",
    "flax",
    "optax",
    "orbax.checkpoint",
    "datasets",
    "pyarrow",
    "jsft.config",
    "jsft.errors",
    "jsft.run",
    "jsft.data.inspect",
    "jsft.evals.generate",
    "jsft.interop.hf",
    "jsft.modes.evaluate",
    "jsft.modes.export",
    "jsft.modes.plan",
    "jsft.modes.train",
    "jsft.train.report",
    # not jsft.main (or any entry point): runpy executes it as __main__, and importing it here too
    # would define its absl flags twice.
)


# ---------------------------------------------------------------------------------------- the client


class _Zygote:
    def __init__(self):
        self.lock = threading.Lock()
        self.env = _BASE_ENV  # the zygote's environment when it started
        parent, child = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.zygote", str(child.fileno())],
            cwd=REPO,
            env=self.env,
            pass_fds=[child.fileno()],
            stdin=subprocess.DEVNULL,
        )
        child.close()
        self.conn = Connection(parent.detach())
        atexit.register(self.close)
        # The variables its imports set (JAX's TF_CPP_MIN_LOG_LEVEL, ...; every child gets them unless
        # its request sets them, as a process importing those libraries would), and its modules.
        added, modules = self.conn.recv()
        self.child_variables = {
            *_CHILD_VARIABLES,
            *added,
            *(k for k, module in _LIBRARY_VARIABLES.items() if module not in modules),
        }

    def close(self):
        self.conn.close()  # the zygote exits on end of file
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def can_run(self, env: dict[str, str]) -> bool:
        return self.proc.poll() is None and not self.differ(env)

    def differ(self, env: dict[str, str]) -> list[str]:
        """The variables where `env` differs from the zygote's in a way a fork cannot honour."""
        keys = set(env) | set(self.env)
        return sorted(
            k
            for k in keys
            if env.get(k) != self.env.get(k)
            and k not in self.child_variables
            and not k.startswith(_CHILD_PREFIXES)
        )

    def run(self, args, cwd, env, stdin_data: bytes | None, timeout):
        with self.lock, tempfile.TemporaryDirectory(prefix="jsft-zygote-") as d:
            out, err, inp = (os.path.join(d, n) for n in ("stdout", "stderr", "stdin"))
            with open(inp, "wb") as f:
                f.write(stdin_data or b"")
            self.conn.send((list(args), cwd, env, out, err, inp))
            pid = self.conn.recv()
            timed_out = not self.conn.poll(timeout)
            if timed_out:
                os.kill(pid, 9)
            code = self.conn.recv()
            with open(out, "rb") as f:
                stdout = f.read()
            with open(err, "rb") as f:
                stderr = f.read()
        return code, stdout, stderr, timed_out


_zygote: _Zygote | None = None


def run(
    cmd, *, cwd=None, env=None, input=None, timeout=None, capture_output=False, text=False, check=False, **kw
):
    """`subprocess.run(cmd, ...)`; a `[sys.executable, ...]` command with `capture_output=True` is
    forked from the zygote where that gives the same result (see the module's docstring)."""
    global _zygote
    cmd = [str(c) for c in cmd]
    env = dict(os.environ if env is None else env)
    forkable = cmd[0] == sys.executable and len(cmd) > 1 and capture_output and not kw
    # `-m MODULE`, `-c CODE` or a script; interpreter options (-X importtime, ...) need a real one.
    forkable = forkable and (cmd[1] in ("-m", "-c") or not cmd[1].startswith("-"))
    if forkable and os.environ.get("JSFT_TEST_NO_ZYGOTE") != "1":
        if _zygote is None:
            _zygote = _Zygote()
        if _zygote.can_run(env):
            data = input.encode() if isinstance(input, str) else input
            cwd = os.path.abspath(cwd or os.getcwd())
            code, out, err, timed_out = _zygote.run(cmd[1:], cwd, env, data, timeout)
            if text:
                out, err = out.decode(errors="replace"), err.decode(errors="replace")
            if timed_out:
                raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err)
            result = subprocess.CompletedProcess(cmd, code, out, err)
            if check:
                result.check_returncode()
            return result
    if forkable and os.environ.get("JSFT_TEST_ZYGOTE_LOG"):  # which runs were not forked, and why
        differ = _zygote.differ(env) if _zygote is not None else "no zygote"
        with open(os.environ["JSFT_TEST_ZYGOTE_LOG"], "a") as f:
            f.write(f"subprocess: {cmd[1]}; environment differs in {differ}\n")
    return subprocess.run(
        cmd,
        cwd=cwd,
        env=env,
        input=input,
        timeout=timeout,
        capture_output=capture_output,
        text=text,
        check=check,
        **kw,
    )


# ---------------------------------------------------------------------------------------- the zygote


def _child(args, cwd, env, out, err, inp, added) -> None:
    """Become `python *args` in `cwd` with `env`; never returns."""
    import atexit as atexit_module  # noqa: PLC0415
    import runpy  # noqa: PLC0415
    import traceback  # noqa: PLC0415

    code = 1
    try:
        for fd, path, mode in ((0, inp, os.O_RDONLY), (1, out, os.O_WRONLY), (2, err, os.O_WRONLY)):
            f = os.open(path, mode | (os.O_CREAT | os.O_TRUNC if fd else 0), 0o644)
            os.dup2(f, fd)
            os.close(f)
        os.chdir(cwd)
        platforms = env.get("JAX_PLATFORMS")
        if platforms != os.environ.get("JAX_PLATFORMS"):  # jax read the zygote's at import
            import jax  # noqa: PLC0415

            jax.config.update("jax_platforms", platforms)
        os.environ.clear()
        os.environ.update({**added, **env})
        # sys.path[0] as the interpreter sets it: the working directory for -m, '' for -c, else the
        # script's directory.
        sys.path[0] = {"-m": cwd, "-c": ""}.get(args[0]) or os.path.dirname(os.path.abspath(args[0]))
        if args[0] == "-m":
            sys.argv = [args[1], *args[2:]]  # runpy puts the module's file in argv[0]
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        elif args[0] == "-c":
            sys.argv = ["-c", *args[2:]]
            exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        else:
            sys.argv = list(args)
            runpy.run_path(args[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - what the interpreter would print and exit 1 with
        traceback.print_exc()
        code = 1
    finally:
        try:
            threading._shutdown()  # as the interpreter does at exit: join non-daemon threads, then atexit
            atexit_module._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _serve(fd: int) -> None:
    import importlib  # noqa: PLC0415

    from jsft.errors import import_without  # noqa: PLC0415

    start = dict(os.environ)
    for name in _PRELOAD:
        importlib.import_module(name)
    # What a run imports later, the way jsft imports it (torch and scipy.stats hidden; ~1 s a run).
    import_without("tensorboardX", ("torch",))
    import_without("rouge_score.rouge_scorer", ("scipy.stats",))
    for name in ("sacrebleu", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        importlib.import_module(name)
    conn = Connection(fd)
    added = {k: v for k, v in os.environ.items() if k not in start}
    conn.send((added, sorted(sys.modules)))
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            conn.close()
            _child(*request, added)
        conn.send(pid)
        _, status = os.waitpid(pid, 0)
        conn.send(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
