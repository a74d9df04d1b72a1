"""Storage layer: the SQLite index of shares and local files, and the scanner that fills it.

Everything here is blocking; the daemon calls it through ``trio.to_thread``.
"""
