"""Sans-I/O content model: chunking, hashing, content-defined Merkle trees, folder trees, diff.

Nothing in this package touches files, sockets, clocks or threads: bytes and iterables come
in, values come out.
"""
