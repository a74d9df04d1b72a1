"""Helpers shared by the vector makers: annotated hex, fixed pseudo-random inputs, typed JSON.

An annotated encoding is a list of ``[hex, note]`` pieces whose hex parts, concatenated, are
the exact bytes; every maker asserts that before it writes a vector.
"""

from __future__ import annotations

from typing import Any

import blake3
import msgpack

Pieces = list[list[str]]


def annotate(value: Any, label: str) -> Pieces:
    """msgpack of the subset p2pfs uses, as [hex, note] pieces in order."""
    if value is None:
        return [["c0", f"{label}: nil"]]
    if isinstance(value, bool):
        return [[("c3" if value else "c2"), f"{label}: {str(value).lower()}"]]
    if isinstance(value, int):
        encoded = msgpack.packb(value)
        return [[encoded.hex(), f"{label}: {'int' if value < 0 else 'uint'} {value}"]]
    if isinstance(value, str):
        encoded = msgpack.packb(value)
        raw = value.encode()
        header = encoded[: len(encoded) - len(raw)]
        return [[header.hex(), f"{label}: str header, {len(raw)} bytes"], [raw.hex(), f"{value!r}"]]
    if isinstance(value, bytes):
        encoded = msgpack.packb(value, use_bin_type=True)
        header = encoded[: len(encoded) - len(value)]
        return [[header.hex(), f"{label}: bin header, {len(value)} bytes"], [value.hex(), label]]
    if isinstance(value, list):
        header = msgpack.packb([None] * len(value))[: -len(value) or None]
        pieces = [[header.hex(), f"{label}: array of {len(value)}"]]
        for index, item in enumerate(value):
            pieces += annotate(item, f"{label}[{index}]")
        return pieces
    if isinstance(value, dict):
        header = msgpack.packb(dict.fromkeys(range(len(value))))[: -2 * len(value) or None]
        pieces = [[header.hex(), f"{label}: map of {len(value)}"]]
        for key, item in value.items():
            pieces += annotate(key, f"{label} key")
            pieces += annotate(item, f"{label}[{key!r}]")
        return pieces
    raise TypeError(type(value))


def joined(pieces: Pieces) -> str:
    return "".join(hex_part for hex_part, _note in pieces)


def encoding_vector(name: str, description: str, value: Any, encoded: bytes) -> dict[str, Any]:
    """A vector whose bytes are one msgpack value, annotated element by element."""
    pieces = annotate(value, name)
    assert joined(pieces) == encoded.hex(), name
    return {"name": name, "description": description, "encoding": pieces}


def pieces_vector(name: str, description: str, pieces: Pieces, encoded: bytes) -> dict[str, Any]:
    """A vector annotated by hand (fixed binary layouts), checked against the code's bytes."""
    assert joined(pieces) == encoded.hex(), name
    return {"name": name, "description": description, "encoding": pieces}


def pseudo_random(label: str, size: int) -> bytes:
    """Fixed bytes for a vector: BLAKE3 XOF of the ASCII label."""
    return blake3.blake3(label.encode()).digest(length=size)


def to_json(value: Any) -> Any:
    """A msgpack value as JSON that keeps bytes apart from text: bytes are {"bin": hex}."""
    if isinstance(value, bytes):
        return {"bin": value.hex()}
    if isinstance(value, list | tuple):
        return [to_json(item) for item in value]
    if isinstance(value, dict):
        return {"map": [[to_json(k), to_json(v)] for k, v in value.items()]}
    return value
