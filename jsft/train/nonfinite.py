"""The non-finite guard: a step whose loss or gradient is NaN/inf is never applied, and the loop decides
whether to stop (`train.on_nonfinite='stop'`) or to go on without that update ('skip').

Inside the jitted step, `apply_if_finite` runs the optimizer update only when the step is finite (a
`lax.cond`, so the update writes into the donated state in place: a select between old and new would
keep both alive, three extra float32 copies of the parameters), so no checkpoint can ever hold a
non-finite state. Outside, `NonFiniteGuard` reads the
per-step flags whenever the loop fetches metrics (log steps and before every save) and raises
`NonFiniteError` with the step number when the policy says stop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss or gradient; the message names the step and what to change."""


def apply_if_finite(finite: jax.Array, update: Callable[..., Any], *state: Any) -> Any:
    """`update(*state)` if `finite` (a scalar bool), else `state` unchanged."""
    return jax.lax.cond(finite, update, lambda *s: s, *state)


class NonFiniteGuard:
    def __init__(self, policy: str, max_skipped_steps: int):
        self.policy, self.max_skipped = policy, max_skipped_steps
        self.in_a_row = 0
        self.checked_step = 0  # every step up to this one has been checked

    def check(self, steps: Sequence[int], nonfinite: Sequence[bool]) -> int:
        """Account for the flags of `steps` (in order; already-checked steps are ignored); returns how
        many of them were skipped. Raises NonFiniteError when the policy says stop."""
        skipped = 0
        for step, bad in zip(steps, nonfinite, strict=True):
            if step <= self.checked_step:
                continue
            self.checked_step = step
            if not bad:
                self.in_a_row = 0
                continue
            if self.policy == "stop":
                raise NonFiniteError(
                    f"the loss or gradient is not finite at step {step}; that update was not applied and "
                    "nothing after it was saved (the last checkpoint is intact). Lower config.optim.lr, "
                    "check the data, or set config.train.on_nonfinite='skip' to drop such steps"
                )
            skipped += 1
            self.in_a_row += 1
            if self.in_a_row > self.max_skipped:
                raise NonFiniteError(
                    f"{self.in_a_row} steps in a row (up to step {step}) had a non-finite loss or gradient "
                    f"and were skipped, more than config.train.max_skipped_steps={self.max_skipped}; "
                    "nothing after them was saved. Lower config.optim.lr or check the data"
                )
        return skipped
