"""Connection admission's per-address limits (net/admission.py), sans-I/O."""

from __future__ import annotations

import dataclasses
import os

from p2pfs.net.admission import Admission, Admit, source_of
from p2pfs.net.engine import TransportConfig


def test_an_ipv6_host_counts_as_its_64_against_the_per_address_limits() -> None:
    """A host picks any address in its /64 at will: counted per address, one host behind
    many of them would take every connection slot of the node."""
    config = dataclasses.replace(
        TransportConfig(), max_connections_per_ip=2, max_pending_per_ip=2, retry_threshold=100
    )
    admission: Admission[str] = Admission(config, os.urandom(32))
    same_64 = [f"2001:db8:1:2::{n}" for n in range(1, 4)]
    assert [admission.authenticated(ip, ip) for ip in same_64] == [True, True, False]
    assert admission.authenticated("2001:db8:1:3::1", "2001:db8:1:3::1")  # another /64
    # IPv4: per address, as before.
    assert [admission.authenticated(ip, ip) for ip in ("10.0.0.1", "10.0.0.2")] == [True, True]
    # Half-open handshakes likewise: the third from the /64 is asked to prove its address.
    for n, ip in enumerate(f"2001:db8:9::{n}" for n in range(1, 3)):
        assert admission.initial(ip, validated=False) is Admit.ACCEPT
        admission.add_pending(f"pending-{n}", ip, validated=False)
    assert admission.initial("2001:db8:9::77", validated=False) is Admit.RETRY
    admission.finished("2001:db8:1:2::1")
    assert admission.authenticated("2001:db8:1:2::99", "2001:db8:1:2::99")


def test_sources_are_ipv4_addresses_or_ipv6_64s() -> None:
    assert source_of("192.0.2.7") == "192.0.2.7"
    assert source_of("2001:db8:1:2:aaaa::5") == "2001:db8:1:2::/64"
    # Link-local: per address, since every neighbour on a link shares fe80::/64.
    assert source_of("fe80::1%eth0") == "fe80::1%eth0"
    assert source_of("not an address:") == "not an address:"
