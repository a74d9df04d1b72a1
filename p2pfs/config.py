"""``HOME/config.toml``: every ``p2pfs daemon`` flag, as a file; flags given on the command
line override it.

Keys are the flags' long names without the dashes (``listen = "0.0.0.0:7337"``,
``no-lan = true``, ``max-upload-rate = 1000000``, ``peer = ["192.0.2.7:7337"]``; ``_`` may
stand for ``-``). A repeatable flag takes a list, and flags add to the file's list. An
unknown key or a value of the wrong type is an error naming the file and the key, so a typo
is never silently ignored.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pfs.errors import LocalProtocolError

CONFIG_NAME = "config.toml"


@dataclass(frozen=True, slots=True)
class Option:
    """One flag a config key may set: its destination and the type its value must have."""

    dest: str
    kind: type
    repeated: bool = False


def load_config(home: Path, options: Mapping[str, Option]) -> dict[str, Any]:
    """The file's settings as ``{dest: value}`` (empty when there is no file)."""
    path = home / CONFIG_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise LocalProtocolError(f"cannot read {path}: {exc}") from exc
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LocalProtocolError(f"{path}: {exc}") from exc
    settings: dict[str, Any] = {}
    for key, value in table.items():
        option = options.get(key.replace("_", "-"))
        if option is None:
            known = ", ".join(sorted(options))
            raise LocalProtocolError(f"{path}: unknown setting {key!r} (known: {known})")
        settings[option.dest] = _checked(path, key, option, value)
    return settings


def _checked(path: Path, key: str, option: Option, value: Any) -> Any:
    if option.repeated:
        values = value if isinstance(value, list) else [value]
        return [_one(path, key, option.kind, item) for item in values]
    return _one(path, key, option.kind, value)


def _one(path: Path, key: str, kind: type, value: Any) -> Any:
    # bool is an int in Python: a port given as `true` must not pass as 1.
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    raise LocalProtocolError(
        f"{path}: {key} must be {_names[kind]}, not {type(value).__name__} {value!r}"
    )


_names: dict[type, str] = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
}
