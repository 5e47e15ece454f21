"""tests/zygote.py: a forked child gives what a subprocess gives (exit code, output, working directory,
environment, stdin, simulated devices, time-outs), and what a fork cannot honour runs as a subprocess."""

import os
import subprocess
import sys

import pytest

from tests import zygote
from tests.conftest import cpu_env

SCRIPT = """
import os, sys
import jax
print(len(jax.devices()), os.getcwd(), os.environ.get("JSFT_ZYGOTE_PROBE"), sys.argv[1:], sys.stdin.read())
print("to stderr", file=sys.stderr)
os.write(2, b"fd 2\\n")
sys.exit(int(sys.argv[1]))
"""


@pytest.mark.parametrize("code", [0, 3])
def test_a_forked_child_gives_what_a_subprocess_gives(tmp_path, code):
    env = cpu_env(4, JSFT_ZYGOTE_PROBE="probe")
    kw = dict(cwd=tmp_path, env=env, input="in", capture_output=True, text=True, timeout=120)
    forked = zygote.run([sys.executable, "-c", SCRIPT, str(code)], **kw)
    real = subprocess.run([sys.executable, "-c", SCRIPT, str(code)], **kw)
    assert zygote._zygote is not None and zygote._zygote.can_run(env)  # it was forked
    assert (
        (forked.returncode, forked.stdout)
        == (real.returncode, real.stdout)
        == (
            code,
            f"4 {tmp_path} probe ['{code}'] in\n",
        )
    )
    assert forked.stderr.splitlines()[-2:] == ["to stderr", "fd 2"]


def test_an_uncaught_exception_and_a_string_exit_are_exit_code_1_with_the_message(tmp_path):
    r = zygote.run([sys.executable, "-c", "raise KeyError('boom')"], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" in r.stderr and "KeyError: 'boom'" in r.stderr
    r = zygote.run([sys.executable, "-c", "import sys; sys.exit('bad')"], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr == "bad\n"


def test_a_module_runs_as_main_with_its_arguments():
    r = zygote.run([sys.executable, "-m", "jsft.main", "--config=nope.py"], capture_output=True, text=True)
    assert r.returncode == 1 and "jsft: error: --config=nope.py: no such file" in r.stderr


def test_a_child_past_its_timeout_is_killed():
    with pytest.raises(subprocess.TimeoutExpired):
        zygote.run([sys.executable, "-c", "import time; time.sleep(60)"], capture_output=True, timeout=1)
    assert zygote.run([sys.executable, "-c", "pass"], capture_output=True).returncode == 0  # still serving


def test_a_variable_read_at_import_time_runs_a_real_subprocess():
    zygote.run([sys.executable, "-c", "pass"], capture_output=True)  # the zygote is up
    env = dict(os.environ, HF_HOME="/somewhere/else")
    assert zygote._zygote.differ(env) == ["HF_HOME"]
    code = "import os; print(os.environ['HF_HOME'])"
    r = zygote.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.stdout == "/somewhere/else\n"
    assert zygote._zygote.differ(dict(os.environ, JSFT_LOCAL_DIR="/x", XLA_FLAGS="--y")) == []
