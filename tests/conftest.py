"""Shared test hygiene: Ctrl-C reaches the commands the tests start, and no test leaves a command's
MLflow request limits behind for the next.

Started as a background job of a script (`pytest ... &`, `nohup pytest &`), pytest inherits SIGINT
ignored, and so would every command it starts: the Ctrl-C tests would see their launches finish
instead of stopping. A terminal's foreground job has SIGINT at its default; `pytest_configure`
restores that (a handled signal is reset to the default in the children at exec, an ignored one is not).

A command run in-process (`harness.launch.main([...])`) calls `harness.store.bound_requests`,
which sets MLflow's HTTP retry/timeout variables in os.environ for the rest of the process;
subprocesses started by later tests would inherit them and wait out outages they should see.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from harness.store import _SET_BY_US, CLI_REQUEST_LIMITS

_KEYS = (*CLI_REQUEST_LIMITS, _SET_BY_US)


def pytest_configure(config: pytest.Config) -> None:
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _restore_mlflow_request_limits() -> Iterator[None]:
    before = {key: os.environ.get(key) for key in _KEYS}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
