"""What the tests (and the benchmarks) share: real daemons in real processes, the
network-namespace bed, the QUIC fuzzers. Not in the wheel."""
