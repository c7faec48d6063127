"""A config value read and checked: `ConfigError`, whose message names the key path and the value, and the typed
getters every section parser uses."""

from __future__ import annotations

from typing import Any, Optional, Union


class ConfigError(ValueError):
    """A config key has a wrong value; the message names the key path and the value."""



def _fail(key: str, value: Any, why: str) -> None:
    raise ConfigError(f"config key '{key}' = {value!r}: {why}")


def _get_int(d: dict, key: str, path: str, default=None, minimum: int = 1,
             integral_float: bool = False) -> Optional[int]:
    value = d.get(key, default)
    if value is None:
        return None
    if integral_float and isinstance(value, float) and value.is_integer():
        value = int(value)  # DeepSpeed configs write sizes as 5e8, which JSON loads as a float
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(f"{path}{key}", value, "must be an integer")
    if value < minimum:
        _fail(f"{path}{key}", value, f"must be >= {minimum}")
    return value


def _get_bool(d: dict, key: str, path: str, default: bool) -> bool:
    value = d.get(key, default)
    if not isinstance(value, bool):
        _fail(f"{path}{key}", value, "must be true or false")
    return value


def _get_bool_or_auto(d: dict, key: str, path: str) -> Union[bool, str]:
    value = d.get(key, "auto")
    if not isinstance(value, bool) and value != "auto":
        _fail(f"{path}{key}", value, "must be true, false or \"auto\"")
    return value


def _section(d: dict, key: str) -> dict:
    value = d.get(key, {})
    if value is None:
        return {}
    if not isinstance(value, dict):
        _fail(key, value, "must be an object")
    return value

