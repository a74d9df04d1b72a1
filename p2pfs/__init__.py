"""p2pfs: peer-to-peer file sync with content-defined chunks and BLAKE3 Merkle trees."""

__version__ = "0.1.0"
