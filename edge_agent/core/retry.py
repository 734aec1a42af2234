"""Retry policies, one shape for the whole product (tenacity): jittered exponential
backoff, a stop by time, only named transient errors, each retry logged by the caller.

Tests (and `EDGE_AGENT_RETRY_INSTANT=1`, read by the composition roots) make every wait
instant with `instant(True)`: the attempts and the stop stay, the sleeping goes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    retry_if_exception_type,
    retry_if_result,
    stop_after_delay,
    wait_none,
    wait_random_exponential,
)

_INSTANT = [False]


def instant(on: bool) -> None:
    """No waits between attempts (tests); the stop by time still holds."""
    _INSTANT[0] = on


def policy(
    *,
    stop_after_s: float,
    first_s: float = 0.5,
    max_s: float = 10.0,
    on: tuple[type[BaseException], ...] = (),
    when: Callable[[BaseException], bool] | None = None,
    until: Callable[[Any], bool] | None = None,
    before_sleep: Callable[[RetryCallState], None] | None = None,
) -> Retrying:
    """Attempts until one succeeds or `stop_after_s` passed: again after an exception of
    a type in `on` (and for which `when` is true, if given), or a result for which `until`
    is false. Out of time, the last attempt's exception is raised, or its result returned.
    Waits grow from `first_s` to `max_s`, each a random fraction of that (full jitter: many
    boards retrying at once do not retry in step)."""
    retry: Any = retry_if_exception_type(on) if on else None
    if when is not None:  # of those (or of any, without `on`), only the ones `when` names
        named = retry_if_exception(when)
        retry = named if retry is None else retry & named
    if until is not None:
        by_result = retry_if_result(lambda result: not until(result))
        retry = by_result if retry is None else retry | by_result
    return Retrying(
        stop=stop_after_delay(stop_after_s),
        wait=wait_none() if _INSTANT[0] else wait_random_exponential(multiplier=first_s, max=max_s),
        retry=retry if retry is not None else retry_if_exception_type(()),
        before_sleep=before_sleep,
        # out of time: the last attempt's exception, or its (unsatisfying) result
        retry_error_callback=_last_outcome,
    )


def _last_outcome(state: RetryCallState) -> Any:
    assert state.outcome is not None
    return state.outcome.result()  # raises the last exception, if the attempt raised
