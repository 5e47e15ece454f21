"""SIGTERM (preemption, scancel, a test runner) becomes a clean "save and exit" at the next step.

One process: a Python handler records the signal, and the previous handler is put back when the run
ends, so a program that trains as a library still reacts to SIGTERM afterwards. Several processes:
JAX's preemption service (started by `jax.distributed.initialize`) catches SIGTERM on whichever
process receives it and makes every process agree on the same sync point, so all of them stop at the
same step and save together. `requested()` must be called at the same points, in the same order, on
every process (after every train step and every eval batch).
"""

from __future__ import annotations

import signal

import jax
from jax._src import distributed
from jax.experimental import multihost_utils

from jsft.parallel import multihost


class StopRequest:
    def __init__(self, fallback_every: int = 1):
        """`fallback_every`: with several processes but no preemption service, agree (one collective)
        only every this many calls."""
        self.signum: int | None = None
        self._calls = 0
        self._fallback_every = max(1, fallback_every)
        self._previous = None
        self._installed = False
        self._sync = jax.process_count() > 1 and distributed.global_state.preemption_sync_manager is not None

    def __enter__(self) -> StopRequest:
        if not self._sync:  # with the service, its own SIGTERM handler must stay in place
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
                self._installed = True
            except ValueError:  # not the main thread: no handler, no harm
                pass
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def _handle(self, signum, _frame) -> None:
        self.signum = signum

    def requested(self) -> bool:
        """True on every process at the same call once any of them got SIGTERM."""
        self._calls += 1
        if self._sync:
            if self.signum is None and multihost_utils.reached_preemption_sync_point(self._calls):
                self.signum = signal.SIGTERM
            return self.signum is not None
        if jax.process_count() > 1:
            if self._calls % self._fallback_every:
                return False
            if multihost.any_process(self.signum is not None):
                self.signum = self.signum or signal.SIGTERM
        return self.signum is not None
