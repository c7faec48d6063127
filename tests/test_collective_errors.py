"""`raise_on_every_rank` / `first_error` without a process group, and how an error travels between processes.
The multi-process behaviour (every rank raising the first rank's error) is checked under gloo in
tests/test_errors_distributed.py, in the spawn that checks `initialize`'s errors."""

from __future__ import annotations

import pytest

from autotp.collective_errors import _portable, _rebuild, first_error, raise_on_every_rank
from autotp.config import ConfigError


def test_one_process_raises_its_own_error():
    error = ConfigError("config key 'x' = 1: wrong")
    with pytest.raises(ConfigError) as caught:
        raise_on_every_rank(error)
    assert caught.value is error
    raise_on_every_rank(None)
    assert first_error(None) is None


def test_type_and_message_survive_the_trip():
    kind, message = _portable(ConfigError("bad value"))
    rebuilt = _rebuild(kind, message)
    assert type(rebuilt) is ConfigError and str(rebuilt) == "bad value"


def test_an_unpicklable_or_odd_class_becomes_runtime_error():
    class Local(ValueError):  # defined in a function: another process cannot import it
        pass

    assert _portable(Local("x")) == (RuntimeError, "x")

    class TwoArguments(Exception):
        def __init__(self, first, second):
            super().__init__(first, second)

    rebuilt = _rebuild(TwoArguments, "message")
    assert type(rebuilt) is RuntimeError and str(rebuilt) == "message"
