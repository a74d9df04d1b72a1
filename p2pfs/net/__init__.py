"""QUIC transport: authenticated peer connections over one trio UDP socket per node.

async with open_endpoint(identity, "0.0.0.0", 4433, handler=serve) as endpoint:
    conn = await endpoint.connect(("192.0.2.7", 4433), expected_peer=node_id)
    stream = await conn.open_stream()
    await stream.send_all(b"..."); await stream.send_eof()
    reply = await stream.receive_some()
"""

from p2pfs.net.codes import CloseCode
from p2pfs.net.connection import PeerConnection
from p2pfs.net.endpoint import Endpoint, Handler, open_endpoint
from p2pfs.net.engine import ALPN, ENGINES, Engine, TransportConfig, load_engine
from p2pfs.net.stream import Stream

__all__ = [
    "ALPN",
    "ENGINES",
    "CloseCode",
    "Endpoint",
    "Engine",
    "Handler",
    "PeerConnection",
    "Stream",
    "TransportConfig",
    "load_engine",
    "open_endpoint",
]
