from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pfs.content.names import (
    normalize_local_name,
    validate_name,
    validate_relative_path,
)
from p2pfs.errors import InvalidNameError


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "a/b", "a\x00b", "a\\b", "x" * 256, "caf\u0065\u0301", "bad\udcff"],
)
def test_invalid_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidNameError):
        validate_name(name)


def test_local_names_are_brought_to_nfc() -> None:
    decomposed = "caf\u0065\u0301"
    assert normalize_local_name(decomposed) == "caf\u00e9"
    with pytest.raises(InvalidNameError):
        normalize_local_name("bad\udcff")  # how Python shows a non-UTF-8 byte


@pytest.mark.parametrize("path", ["/etc/passwd", "a/../b", "a//b", "./a", "a/", "..", ""])
def test_invalid_paths_are_refused(path: str) -> None:
    with pytest.raises(InvalidNameError):
        validate_relative_path(path)


def test_valid_relative_path() -> None:
    assert validate_relative_path("docs/r\u00e9sum\u00e9.txt") == "docs/r\u00e9sum\u00e9.txt"


@given(st.text(min_size=1, max_size=50))
def test_validate_name_accepts_exactly_the_normal_portable_names(name: str) -> None:
    ok = (
        name not in (".", "..")
        and not any(ch in name for ch in "/\\\x00")
        and unicodedata.normalize("NFC", name) == name
        and not any(0xD800 <= ord(ch) <= 0xDFFF for ch in name)
        and len(name.encode("utf-8", "surrogatepass")) <= 255
    )
    if ok:
        assert validate_name(name) == name
    else:
        with pytest.raises(InvalidNameError):
            validate_name(name)
