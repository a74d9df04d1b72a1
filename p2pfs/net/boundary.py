"""Failure boundaries: the one audited place that decides what may be caught and contained.

A unit that remote input drives (a connection, a stream, a handler) ends alone when anything
goes wrong inside it, whatever the type: the QUIC engines raise odd ones on hostile input
(qh3: ``BufferReadError``, ``CryptoError``, ``UnicodeDecodeError``, and Rust panics as
``pyo3_runtime.PanicException``, which derives from ``BaseException``). Only the exceptions
that stop the task or the process are let through: trio's cancellation and the interpreter's
own (Ctrl-C, exit, generator close).
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

import trio

FATAL: tuple[type[BaseException], ...] = (
    trio.Cancelled,
    KeyboardInterrupt,
    SystemExit,
    GeneratorExit,
)


def is_fatal(exc: BaseException) -> bool:
    """True if ``exc`` (or anything inside it, for a group) must propagate."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(FATAL) is not None
    return isinstance(exc, FATAL)


def split_fatal(exc: BaseException) -> tuple[BaseException | None, BaseException | None]:
    """(what must propagate, what the boundary contains); either may be None.

    A nursery wraps its children's exceptions in a group, where cancellation and a real
    failure can travel together: the failure is contained, the cancellation goes on.
    """
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(FATAL)
    if isinstance(exc, FATAL):
        return exc, None
    return None, exc


def first_leaf(exc: BaseException) -> BaseException:
    """The first non-group exception inside ``exc`` (itself if it is no group)."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def describe(exc: BaseException) -> str:
    """A one-line description for the log: type name and a bounded message."""
    leaf = first_leaf(exc)
    text = str(leaf).replace("\n", " ")[:200]
    return f"{type(leaf).__name__}: {text}" if text else type(leaf).__name__


class EngineGuard:
    """``with guard:`` around calls into a QUIC engine: anything but a fatal exception is
    handed to ``on_failure`` and suppressed, so a hostile datagram fails only the connection
    whose engine state it corrupted.

    A class, not a generator context manager: it sits on the per-datagram path.
    """

    __slots__ = ("_on_failure",)

    def __init__(self, on_failure: Callable[[BaseException], None]) -> None:
        self._on_failure = on_failure

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        if exc is None or is_fatal(exc):
            return False
        self._on_failure(exc)
        return True
