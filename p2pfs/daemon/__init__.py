"""The node daemon: root nursery, control API, share server and fetcher."""
