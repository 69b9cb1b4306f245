"""Argument checks shared by the model families: one-line `ValueError`s naming the argument."""

from __future__ import annotations


def check(condition: bool, message: str) -> None:
    """Raise `ValueError(message)` unless `condition`; messages read 'argument: must ..., got ...'."""
    if not condition:
        raise ValueError(message)
