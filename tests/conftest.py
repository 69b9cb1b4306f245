"""Shared test hygiene: no test leaves a command's MLflow request limits behind for the next.

A command run in-process (`harness.launch.main([...])`) calls `harness.store.bound_requests`,
which sets MLflow's HTTP retry/timeout variables in os.environ for the rest of the process;
subprocesses started by later tests would inherit them and wait out outages they should see.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from harness.store import _SET_BY_US, CLI_REQUEST_LIMITS

_KEYS = (*CLI_REQUEST_LIMITS, _SET_BY_US)


@pytest.fixture(autouse=True)
def _restore_mlflow_request_limits() -> Iterator[None]:
    before = {key: os.environ.get(key) for key in _KEYS}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
