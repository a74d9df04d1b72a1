"""The one exception hierarchy of p2pfs.

Every error says who is to blame: the remote peer (it sent bytes that break the protocol),
the data (it fails verification), or ourselves (a caller misused an API). Storage errors are
local I/O trouble, distinct from all three.
"""

from typing import TypeVar

E = TypeVar("E", bound=BaseException)


class P2pfsError(Exception):
    """Root of every error p2pfs raises on purpose."""


class RemoteProtocolError(P2pfsError):
    """Bytes from outside (a peer, a ticket, a file on disk we did not write) are malformed.

    Raised by every ``*_untrusted`` decoder; the peer that sent them is to blame.
    """


class IntegrityError(P2pfsError):
    """Well-formed data does not match the hash that vouches for it."""


class LocalProtocolError(P2pfsError):
    """Our own code or the local user asked for something impossible."""


class InvalidNameError(LocalProtocolError):
    """A file name that p2pfs refuses to store or transmit (``..``, ``/``, NUL, non-UTF-8...)."""


class StorageError(P2pfsError):
    """The local index or file system failed us (corrupt database, failed write)."""


class AuthenticationError(RemoteProtocolError):
    """A peer could not prove it holds the key of the NodeId it claims (or that we expected)."""


class ConnectionClosedError(P2pfsError):
    """A connection ended (peer close, idle timeout, local close) while an operation needed it.

    ``error_code`` is the QUIC application (or transport) error code carried by the close;
    ``locally`` says we asked for the close, so callers can tell "we hung up" from the peer
    closing, an idle timeout or a protocol failure.
    """

    def __init__(self, message: str, *, error_code: int = 0, locally: bool = False) -> None:
        super().__init__(message)
        self.error_code = error_code
        self.locally = locally


class StreamResetError(P2pfsError):
    """The peer abandoned a stream (RESET_STREAM or STOP_SENDING) with ``error_code``."""

    def __init__(self, message: str, *, error_code: int) -> None:
        super().__init__(message)
        self.error_code = error_code


def explaining_error(raised: BaseException) -> P2pfsError | None:
    """The P2pfsError that explains ``raised``, looking inside exception groups (a failure
    in a nursery arrives wrapped), or None if it is not one of ours."""
    if isinstance(raised, P2pfsError):
        return raised
    if isinstance(raised, BaseExceptionGroup):
        for inner in raised.exceptions:
            found = explaining_error(inner)
            if found is not None:
                return found
    return None


def blame(exc: P2pfsError) -> str:
    """Whose fault, as the control API and the HTTP API name it: ``remote`` (the peer or
    the network), ``local`` (our input or state), else the error's class name."""
    if isinstance(
        exc, RemoteProtocolError | IntegrityError | ConnectionClosedError | StreamResetError
    ):
        return "remote"
    if isinstance(exc, LocalProtocolError):
        return "local"
    return type(exc).__name__


CONNECTION_FAILURES = (
    RemoteProtocolError,
    ConnectionClosedError,
    StreamResetError,
    LocalProtocolError,
)
"""What a connection attempt or a stream on it raises when the path or the peer fails (our
endpoint closing counts as LocalProtocolError): the caller ends that attempt alone."""


def first_leaf(group: BaseExceptionGroup[E]) -> E:
    """The first exception in ``group`` that is no group itself (for a log line)."""
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf  # type: ignore[return-value]
