"""A multi-machine test bed: network namespaces as machines, a router namespace between
their subnets, real daemons started with their defaults (no --listen, no --peer), as
`make run` starts them.

Each machine sits alone on its own /24 behind the router, so LAN beacons do not cross and
machines meet only through tickets, the DHT or routed addresses, as on real networks. Only
namespaces this bed made are touched, and only processes started in them are killed.

The router's subnets are the bed's "internet": a machine there is publicly reachable. A home
(``NetBed.home``) is a machine on a private LAN behind its own home-router namespace, which
masquerades it onto the internet with the kernel's NAT (nftables): ``nat="cone"`` is
``masquerade`` (ports kept where free, one mapping per local port whatever the destination:
most home routers), ``nat="symmetric"`` is ``masquerade fully-random`` (a new random port
per destination). Nothing from the internet reaches the LAN unless the NAT's connection
tracking maps it there.

A home built with ``upnp=True`` also runs a real UPnP IGD and NAT-PMP/PCP server (Debian's
``miniupnpd-nftables``) on its router, which adds its DNAT rules to an nftables table of its
own beside the masquerade. miniupnpd refuses to map on a WAN address in a reserved range
(RFC 1918, CGNAT, the documentation ranges: "port forwarding is impossible"), as a real
router behind carrier-grade NAT should; so such a router's internet side gets an address
from ``UPNP_WAN`` (11.0.0.0/8, routed nowhere but inside the bed's namespaces).

The bed is test support that ``python -m benchmarks nat`` builds too; tests/netbed.py adds
the pytest fixtures.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.daemons import DaemonProcess

_beds = itertools.count()
DEFAULT_PORT = 7337
"""The node's one UDP port: QUIC and the private DHT share it (SPEC "One UDP port")."""
NETNS_ETC = Path("/etc/netns")
"""Per-namespace files ``ip netns exec`` binds over /etc (Machine.hosts)."""


UPNP_WAN = 11
"""First octet of a UPnP home router's internet side: not a reserved range (miniupnpd would
refuse to map), and routed nowhere outside the bed's namespaces."""

NAT_RULES = {
    "cone": "masquerade",
    "symmetric": "masquerade fully-random",
}


def _run(*command: str, stdin: str | None = None) -> str:
    completed = subprocess.run(
        command, input=stdin, capture_output=True, text=True, timeout=30, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {completed.stderr.strip()}")
    return completed.stdout


def can_build_namespaces() -> str | None:
    """None if this host can build the bed, else why not (for a skip reason)."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    return None


def can_build_nat() -> str | None:
    """None if this host can build homes behind NAT routers, else why not."""
    reason = can_build_namespaces()
    if reason is None and shutil.which("nft") is None:
        reason = "no `nft` command (Debian: apt-get install nftables; .ci/run installs it)"
    return reason


def _ipv6_firewall(lan: str) -> str:
    """A home router's stateful IPv6 firewall (RFC 6092's default), as nftables rules of a
    forward chain: what the LAN sent out may be answered, nothing else comes in."""
    return (
        "    meta nfproto ipv6 ct state established,related accept\n"
        "    meta nfproto ipv6 meta l4proto ipv6-icmp accept\n"
        f'    meta nfproto ipv6 iifname "{lan}" accept\n'
        "    meta nfproto ipv6 counter drop\n"
    )


def can_build_upnp() -> str | None:
    """None if this host can run homes whose routers run miniupnpd, else why not."""
    reason = can_build_nat()
    if reason is None and shutil.which("miniupnpd") is None:
        reason = "no `miniupnpd` (Debian: apt-get install miniupnpd-nftables; .ci/run installs it)"
    return reason


def new_tag(kind: str) -> str:
    """A namespace-name prefix unique to this process and bed (``kind``: 3 letters)."""
    return f"{kind}{os.getpid() % 1000:03d}{next(_beds) % 100:02d}"


@contextlib.contextmanager
def scratch_bed(prefix: str, kind: str) -> Iterator[tuple[NetBed, Path]]:
    """A bed (``kind``: its tag's 3 letters) in a scratch directory of its own, taken down
    and the directory removed after (a benchmark's bed)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as scratch:
        bed = NetBed(Path(scratch), new_tag(kind))
        try:
            yield bed, Path(scratch)
        finally:
            bed.close()


@dataclass
class Gateway:
    """A home's router namespace, when it runs miniupnpd."""

    namespace: str
    wan: str
    """Its internet-side interface."""
    lan: str
    """Its LAN-side interface."""
    lan_address: str
    wan_address: str
    miniupnpd: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def nft_rules(self) -> str:
        """miniupnpd's table as nft lists it (its DNAT rules are the live mappings)."""
        return _run(
            "ip", "netns", "exec", self.namespace, "nft", "list", "table", "inet", "miniupnpd"
        )

    def leases(self) -> list[str]:
        """miniupnpd's lease file: one ``PROTO:EXT:CLIENT:INT:EXPIRY:DESC`` line a mapping."""
        path = self.log.parent / "upnp.leases" if self.log is not None else None
        if path is None or not path.exists():
            return []
        return [line for line in path.read_text().splitlines() if line]


@dataclass
class Machine:
    bed: NetBed
    name: str
    namespace: str
    address: str
    veth: str
    """The machine's side of its link to the router (for byte counts)."""
    home: Path
    daemon: DaemonProcess | None = None
    public: str | None = None
    """Behind a NAT: its router's internet address (what peers see); None: public itself."""
    gateway: Gateway | None = None
    """Behind a router that runs miniupnpd (``NetBed.home(..., upnp=True)``)."""
    address6: str | None = None
    """Its IPv6 address (``NetBed.machine(..., ipv6=True)``); None: IPv4 alone."""

    @property
    def prefix(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.namespace)

    def start(self, *extra: str, home: Path | None = None) -> DaemonProcess:
        """A daemon at its defaults (UDP 7337, QUIC and DHT; LAN on), plus ``extra`` flags."""
        daemon = DaemonProcess(home or self.home, listen=None, extra_args=extra, prefix=self.prefix)
        daemon.start()
        self.bed.daemons.append(daemon)
        if home is None:
            self.daemon = daemon
        return daemon

    def cli(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """The CLI run on this machine (inside its namespace), against its daemon."""
        completed = subprocess.run(
            [*self.prefix, sys.executable, "-m", "p2pfs", "--home", str(self.home), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and completed.returncode != 0:
            raise RuntimeError(
                f"{self.name}: p2pfs {' '.join(args)} exited {completed.returncode}:\n"
                f"{completed.stderr}\n{self.daemon.log_tail() if self.daemon else ''}"
            )
        return completed

    def readdress(self, host: int) -> str:
        """Move this machine (one made by ``NetBed.machine``) to host ``host`` of its subnet,
        as a new DHCP lease would: the old address goes, the new one and the default route
        come. Returns the new address (also ``address`` from now on)."""
        subnet = self.address.rsplit(".", 1)[0]
        new = f"{subnet}.{host}"
        _run("ip", "-n", self.namespace, "addr", "del", f"{self.address}/24", "dev", self.veth)
        _run("ip", "-n", self.namespace, "addr", "add", f"{new}/24", "dev", self.veth)
        _run("ip", "-n", self.namespace, "route", "replace", "default", "via", f"{subnet}.1")
        self.address = new
        return new

    def add_ipv6(self, address: str, *, deprecated: bool = False) -> None:
        """Another IPv6 address on the machine's link (/64); ``deprecated``: with a
        preferred lifetime of 0, as the kernel marks an address on its way out (a privacy
        address past its day, a prefix the router withdrew)."""
        lifetime = ("preferred_lft", "0") if deprecated else ()
        _run(
            "ip", "-n", self.namespace, "addr", "add", f"{address}/64", "dev", self.veth,
            "nodad", *lifetime,
        )  # fmt: skip

    def firewall(self) -> None:
        """A host firewall on this machine, as server distributions ship one: what the
        machine sent may be answered, nothing else comes in (its loopback excepted)."""
        rules = (
            "table inet hostfw {\n"
            "  chain input {\n"
            "    type filter hook input priority 0; policy accept;\n"
            "    ct state established,related accept\n"
            '    iifname "lo" accept\n'
            "    meta l4proto { udp, tcp } ct state new counter drop\n"
            "  }\n"
            "}\n"
        )
        _run(*self.prefix, "nft", "-f", "-", stdin=rules)

    def firewall_drops(self) -> int:
        """Packets ``firewall`` dropped so far."""
        listed = _run(*self.prefix, "nft", "list", "table", "inet", "hostfw")
        return sum(int(n) for n in re.findall(r"counter packets (\d+)", listed))

    def hosts(self, names: dict[str, str]) -> None:
        """Give this machine its own ``/etc/hosts`` (``ip netns exec`` binds
        ``/etc/netns/NAMESPACE/hosts`` over it for what it starts) listing ``names`` (name ->
        address), and a resolver that asks nobody, so a name not listed fails at once.
        Call it before starting what should see it; later calls rewrite the same file in
        place, which a running daemon then reads at its next lookup."""
        directory = NETNS_ETC / self.namespace
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "resolv.conf").write_text(
            "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"
        )
        lines = ["127.0.0.1 localhost", *(f"{address} {name}" for name, address in names.items())]
        with (directory / "hosts").open("w") as hosts:  # truncated in place: the bind sees it
            hosts.write("\n".join(lines) + "\n")

    def popen(self, *args: str) -> subprocess.Popen[str]:
        """The CLI as a user starts it from a terminal. Ctrl-C is not left ignored:
        a test run started in the background (`pytest &`) has SIGINT ignored, the child
        would inherit that, and Python then installs no KeyboardInterrupt handler (a
        Ctrl-C test saw its fetch run to the end and exit 0). A handler of ours is reset to
        the default at exec, where an ignored signal stays ignored."""
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        return subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "p2pfs", "--home", str(self.home), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def cap_uplink(self, bits_per_second: int) -> None:
        """Shape what this machine sends on its link to ``bits_per_second`` (a token
        bucket queueing up to 50 ms, as a home uplink queues), as a slow uplink would: the
        kernel here has no netem, but tbf needs none."""
        _run(
            "tc", "-n", self.namespace, "qdisc", "replace", "dev", self.veth, "root",
            "tbf", "rate", f"{bits_per_second}bit", "burst", "64kb", "latency", "50ms",
        )  # fmt: skip

    def set_link_mtu(self, mtu: int) -> None:
        """Make the machine's link (both ends) carry IP packets of at most ``mtu`` bytes, as
        a VPN or tunnel hop on its path would (Tailscale's is 1,280). Peers beyond the
        router learn it from ICMP "fragmentation needed", this machine from its interface."""
        router_side = self.veth[:-1] + "r"
        _run("ip", "-n", self.namespace, "link", "set", self.veth, "mtu", str(mtu))
        _run("ip", "-n", self.bed.router, "link", "set", router_side, "mtu", str(mtu))

    def drop_packets_over(self, size: int) -> None:
        """The router drops, without a word, every packet over ``size`` bytes to or from
        this machine, fragmentable or not: a hop on its path smaller than the machine's
        link (a tunnel) whose ICMP "fragmentation needed" is filtered, so neither end ever
        learns the path's MTU (a black hole, RFC 8899). Give its peers
        ``count_each_datagram`` too (this machine gets it here): the router sees a GSO send
        as one packet, so it would drop a run of small datagrams whole.
        ``big_packets_dropped`` counts."""
        router_side = self.veth[:-1] + "r"
        rules = (
            f"table inet small{self.name} {{\n"
            "  chain forward {\n"
            "    type filter hook forward priority 0; policy accept;\n"
            f'    oifname "{router_side}" ip length > {size} counter drop\n'
            f'    iifname "{router_side}" ip length > {size} counter drop\n'
            "  }\n"
            "}\n"
        )
        _run("ip", "netns", "exec", self.bed.router, "nft", "-f", "-", stdin=rules)
        self.count_each_datagram()

    def big_packets_dropped(self) -> int:
        """Packets ``drop_packets_over`` has dropped so far, both ways."""
        listed = _run(
            "ip", "netns", "exec", self.bed.router, "nft", "list", "table", "inet",
            f"small{self.name}",
        )  # fmt: skip
        return sum(int(found) for found in re.findall(r"counter packets (\d+)", listed))

    def count_each_datagram(self) -> None:
        """Make the link's packet counts count datagrams: a UDP GSO send (up to 64 datagrams
        in one buffer) otherwise crosses a veth whole and is counted as one packet."""
        _run("ip", "-n", self.namespace, "link", "set", self.veth, "gso_max_segs", "1")

    def link_packets(self) -> tuple[int, int]:
        """(received, sent) packets on the machine's link, as the kernel counts them."""
        base = f"/sys/class/net/{self.veth}/statistics"
        received = _run(*self.prefix, "cat", f"{base}/rx_packets")
        sent = _run(*self.prefix, "cat", f"{base}/tx_packets")
        return int(received), int(sent)

    def link_bytes(self) -> tuple[int, int]:
        """(received, sent) bytes on the machine's link, as the kernel counts them."""
        base = f"/sys/class/net/{self.veth}/statistics"
        received = _run(*self.prefix, "cat", f"{base}/rx_bytes")
        sent = _run(*self.prefix, "cat", f"{base}/tx_bytes")
        return int(received), int(sent)


@dataclass
class NetBed:
    root: Path
    tag: str
    router: str = ""
    machines: list[Machine] = field(default_factory=list)
    daemons: list[DaemonProcess] = field(default_factory=list)
    gateways: list[Gateway] = field(default_factory=list)
    _namespaces: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.router = self._namespace("r")
        _run("ip", "netns", "exec", self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        _run(
            "ip", "netns", "exec", self.router, "sysctl", "-qw",
            "net.ipv6.conf.all.forwarding=1",
        )  # fmt: skip

    def _namespace(self, name: str) -> str:
        namespace = f"{self.tag}-{name}"
        _run("ip", "netns", "add", namespace)
        self._namespaces.append(namespace)
        _run("ip", "-n", namespace, "link", "set", "lo", "up")
        return namespace

    def _link_to_router(self, namespace: str, inside: str, outside: str, subnet: str) -> None:
        """A veth pair from ``namespace`` (``subnet``.2) to the bed's router (``subnet``.1),
        which is the namespace's default route."""
        _run("ip", "link", "add", inside, "type", "veth", "peer", "name", outside)
        _run("ip", "link", "set", inside, "netns", namespace)
        _run("ip", "link", "set", outside, "netns", self.router)
        _run("ip", "-n", self.router, "addr", "add", f"{subnet}.1/24", "dev", outside)
        _run("ip", "-n", self.router, "link", "set", outside, "up")
        _run("ip", "-n", namespace, "addr", "add", f"{subnet}.2/24", "dev", inside)
        _run("ip", "-n", namespace, "link", "set", inside, "up")
        _run("ip", "-n", namespace, "route", "add", "default", "via", f"{subnet}.1")

    def machine(self, name: str, *, ipv6: bool = False) -> Machine:
        """A new machine alone on its own subnet 10.(bed).(n).0/24 behind the router;
        ``ipv6``: on 2001:db8:(bed):(n)::/64 too (the documentation prefix, routed nowhere
        outside the bed), its IPv6 address ``address6``."""
        number = len(self.machines) + 1
        namespace = self._namespace(name)
        inside, outside = f"{self.tag}{number}m", f"{self.tag}{number}r"
        bed_number = 200 + int(self.tag[-2:]) % 50
        subnet = f"10.{bed_number}.{number}"
        self._link_to_router(namespace, inside, outside, subnet)
        machine = Machine(self, name, namespace, f"{subnet}.2", inside, self.root / name / "home")
        if ipv6:
            prefix = f"2001:db8:{bed_number}:{number}"
            # nodad: an address under duplicate address detection (~2 s) cannot be bound.
            _run("ip", "-n", self.router, "addr", "add", f"{prefix}::1/64", "dev", outside, "nodad")
            _run("ip", "-n", namespace, "addr", "add", f"{prefix}::2/64", "dev", inside, "nodad")
            _run("ip", "-n", namespace, "-6", "route", "add", "default", "via", f"{prefix}::1")
            machine.address6 = f"{prefix}::2"
        machine.home.mkdir(parents=True)
        self.machines.append(machine)
        return machine

    def forward_no_ipv4(self) -> None:
        """The router forwards IPv6 alone (an IPv6-only internet between the machines, as
        between two hosts whose IPv4 is behind carrier-grade NAT on both sides but whose
        IPv6 is routed); ``ipv4_refused`` counts what it dropped."""
        self._forwarding_rule("ip", "noipv4", "counter drop")

    def ipv4_refused(self) -> int:
        """IPv4 packets ``forward_no_ipv4`` has dropped so far."""
        return self._counted("ip", "noipv4")

    def _forwarding_rule(self, family: str, table: str, rule: str) -> None:
        """``rule`` on what the bed's router forwards, in an nftables table of its own."""
        rules = (
            f"table {family} {table} {{\n"
            "  chain forward {\n"
            "    type filter hook forward priority 0; policy accept;\n"
            f"    {rule}\n"
            "  }\n"
            "}\n"
        )
        _run("ip", "netns", "exec", self.router, "nft", "-f", "-", stdin=rules)

    def _counted(self, family: str, table: str) -> int:
        """Packets the counter of the router's ``table`` has counted so far."""
        listed = _run("ip", "netns", "exec", self.router, "nft", "list", "table", family, table)
        found = re.search(r"counter packets (\d+)", listed)
        assert found is not None, listed
        return int(found.group(1))

    def lan(self, *names: str) -> list[Machine]:
        """Machines together on one LAN 10.(bed).(100 + n).0/24: a bridge in the router's
        namespace, the router .1 on it and their default route; each machine reaches the
        others on-link (no gateway between them) through Ethernet frames of 1,500 bytes."""
        number = len(self.machines) + 1
        subnet = f"10.{200 + int(self.tag[-2:]) % 50}.{100 + number}"
        bridge = f"{self.tag}{number}b"
        _run("ip", "-n", self.router, "link", "add", bridge, "type", "bridge")
        _run("ip", "-n", self.router, "addr", "add", f"{subnet}.1/24", "dev", bridge)
        _run("ip", "-n", self.router, "link", "set", bridge, "up")
        machines = []
        for host, name in enumerate(names, start=2):
            number = len(self.machines) + 1
            namespace = self._namespace(name)
            inside, outside = f"{self.tag}{number}m", f"{self.tag}{number}r"
            _run("ip", "link", "add", inside, "type", "veth", "peer", "name", outside)
            _run("ip", "link", "set", inside, "netns", namespace)
            _run("ip", "link", "set", outside, "netns", self.router)
            _run("ip", "-n", self.router, "link", "set", outside, "master", bridge)
            _run("ip", "-n", self.router, "link", "set", outside, "up")
            _run("ip", "-n", namespace, "addr", "add", f"{subnet}.{host}/24", "dev", inside)
            _run("ip", "-n", namespace, "link", "set", inside, "up")
            _run("ip", "-n", namespace, "route", "add", "default", "via", f"{subnet}.1")
            machine = Machine(
                self, name, namespace, f"{subnet}.{host}", inside, self.root / name / "home"
            )
            machine.home.mkdir(parents=True)
            self.machines.append(machine)
            machines.append(machine)
        return machines

    def lans_carry_ipv6_alone(self) -> None:
        """The LANs' bridges (``lan``) drop IPv4 and ARP frames: neighbours there meet over
        IPv6 link-local addresses alone (each interface has one), as on an IPv6-only LAN."""
        self._forwarding_rule("bridge", "noipv4", "ether type { ip, arp } counter drop")

    def lose_on_the_internet(self, per_mille: int) -> None:
        """The router drops ``per_mille`` of every thousand UDP datagrams it forwards, each
        at random (nftables' numgen: the kernel here has no netem), as a lossy internet
        path would. Give the machines ``count_each_datagram`` so that a GSO send is not
        dropped, or kept, 64 datagrams at a time."""
        self._forwarding_rule(
            "inet", "lossy", f"meta l4proto udp numgen random mod 1000 < {per_mille} counter drop"
        )

    def dropped_on_the_internet(self) -> int:
        """Datagrams ``lose_on_the_internet`` has dropped so far."""
        return self._counted("inet", "lossy")

    def home(
        self,
        name: str,
        nat: str = "cone",
        upnp: bool = False,
        *,
        ipv6: bool = False,
        carrier_nat: bool = False,
        pcp: bool = True,
    ) -> Machine:
        """A machine on a private LAN 192.168.(n).0/24 behind its own home router, whose
        internet side is 10.(bed).(n).2 on the bed's router, masquerading (``nat``: "cone" or
        "symmetric", see NAT_RULES). ``upnp``: the router also runs miniupnpd (UPnP IGD and
        NAT-PMP/PCP; ``pcp`` False: UPnP alone), its internet side is then 11.(bed).(n).2
        (see the module doc).
        ``ipv6``: the LAN has a routed IPv6 prefix too, 2001:db8:(bed):(100 + n)::/64, no
        NAT, behind the router's stateful firewall (RFC 6092's default, as home routers
        ship: what the LAN sent out may be answered, nothing else comes in); the machine's
        IPv6 address is ``address6``.
        ``carrier_nat``: the home router's internet side is itself behind the ISP's
        carrier-grade NAT (a ``nat`` router of its own, namespace TAG-NAMEcgn), on
        100.64.(n).0/24 (RFC 6598's shared space); the machine's ``public`` address is the
        carrier's, 10.(bed).(n).2. Two NATs in a row: what mobile and many fixed-line
        subscribers have. The carrier drops unsolicited inbound packets without recording
        them, as carrier equipment does (RFC 6888's filtering), not as a bare Linux box."""
        if carrier_nat and (upnp or ipv6):
            raise ValueError("a carrier-NAT home is built without UPnP or IPv6")
        rule = NAT_RULES[nat]
        number = len(self.machines) + 1
        gateway = self._namespace(f"{name}gw")
        wan_in, wan_out = f"{self.tag}{number}w", f"{self.tag}{number}r"
        first = UPNP_WAN if upnp else 10
        subnet = f"{first}.{200 + int(self.tag[-2:]) % 50}.{number}"
        if carrier_nat:
            carrier = self._namespace(f"{name}cgn")
            carrier_wan = f"{self.tag}{number}c"
            self._link_to_router(carrier, carrier_wan, wan_out, subnet)
            self._masquerade(carrier, carrier_wan, rule)
            # A carrier's NAT keeps no state for what nobody inside asked for: dropped on
            # input, the flow is never recorded (conntrack confirms an entry only once its
            # packet gets through), where a bare Linux masquerade would record it as a flow
            # to itself and map the subscriber's later packet to that peer elsewhere.
            rules = (
                "table ip carrier {\n"
                "  chain input {\n"
                "    type filter hook input priority 0; policy accept;\n"
                f'    iifname "{carrier_wan}" ct state new counter drop\n'
                "  }\n"
                "}\n"
            )
            _run("ip", "netns", "exec", carrier, "nft", "-f", "-", stdin=rules)
            shared = f"100.64.{number}"
            self._wire(
                (carrier, f"{self.tag}{number}s", f"{shared}.1"), (gateway, wan_in, f"{shared}.2")
            )
        else:
            self._link_to_router(gateway, wan_in, wan_out, subnet)
        self._masquerade(gateway, wan_in, rule)
        namespace = self._namespace(name)
        inside, outside = f"{self.tag}{number}m", f"{self.tag}{number}l"
        lan = f"192.168.{number}"
        self._wire((gateway, outside, f"{lan}.1"), (namespace, inside, f"{lan}.2"))
        machine = Machine(
            self,
            name,
            namespace,
            f"{lan}.2",
            inside,
            self.root / name / "home",
            public=f"{subnet}.2",
        )
        machine.home.mkdir(parents=True)
        self.machines.append(machine)
        if ipv6:
            # With UPnP, miniupnpd's table holds the firewall, so its pinholes come first.
            machine.address6 = self._home_ipv6(
                gateway, (wan_in, wan_out), (outside, inside), number, firewall=not upnp
            )
        if upnp:
            machine.gateway = Gateway(gateway, wan_in, outside, f"{lan}.1", f"{subnet}.2")
            self._start_miniupnpd(
                machine.gateway,
                self.root / f"{name}gw",
                ipv6_lan=outside if ipv6 else None,
                pcp=pcp,
            )
            self.gateways.append(machine.gateway)
        return machine

    @staticmethod
    def _wire(upper: tuple[str, str, str], lower: tuple[str, str, str]) -> None:
        """A veth pair between two namespaces, each end (namespace, device, address) on
        one /24, the lower one's default route via the upper's address."""
        _run("ip", "link", "add", lower[1], "type", "veth", "peer", "name", upper[1])
        for namespace, device, address in (upper, lower):
            _run("ip", "link", "set", device, "netns", namespace)
            _run("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", device)
            _run("ip", "-n", namespace, "link", "set", device, "up")
        _run("ip", "-n", lower[0], "route", "add", "default", "via", upper[2])

    @staticmethod
    def _masquerade(router: str, outward: str, rule: str) -> None:
        """``router`` forwards, and NATs what leaves through ``outward`` by ``rule``."""
        _run("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        rules = (
            "table ip nat {\n"
            "  chain postrouting {\n"
            "    type nat hook postrouting priority 100; policy accept;\n"
            f'    oifname "{outward}" {rule}\n'
            "  }\n"
            "}\n"
        )
        _run("ip", "netns", "exec", router, "nft", "-f", "-", stdin=rules)

    def _home_ipv6(
        self,
        gateway: str,
        wan: tuple[str, str],
        lan: tuple[str, str],
        number: int,
        *,
        firewall: bool = True,
    ) -> str:
        """IPv6 for a home (see ``home``): its router's internet side on the bed's router,
        its LAN's prefix routed there, the stateful firewall (unless ``firewall`` is
        False: the caller puts it in a table of its own); the machine's address."""
        wan_in, wan_out = wan
        lan_out, lan_in = lan
        machine = self.machines[-1].namespace
        bed_number = 200 + int(self.tag[-2:]) % 50
        wan6, lan6 = f"2001:db8:{bed_number}:{number}", f"2001:db8:{bed_number}:{100 + number}"
        # nodad: an address under duplicate address detection (~2 s) cannot be bound.
        for namespace, device, address in (
            (self.router, wan_out, f"{wan6}::1/64"),
            (gateway, wan_in, f"{wan6}::2/64"),
            (gateway, lan_out, f"{lan6}::1/64"),
            (machine, lan_in, f"{lan6}::2/64"),
        ):
            _run("ip", "-n", namespace, "addr", "add", address, "dev", device, "nodad")
        _run("ip", "-n", self.router, "-6", "route", "add", f"{lan6}::/64", "via", f"{wan6}::2")
        _run("ip", "-n", gateway, "-6", "route", "add", "default", "via", f"{wan6}::1")
        # The machine's default route is via its router's link-local address, as router
        # advertisements give it in a real home (a PCP client must reach it by interface).
        _run("ip", "-n", gateway, "addr", "add", "fe80::1/64", "dev", lan_out, "nodad")
        _run("ip", "-n", machine, "-6", "route", "add", "default", "via", "fe80::1", "dev", lan_in)
        _run(
            "ip", "netns", "exec", gateway, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"
        )  # fmt: skip
        if firewall:
            rules = (
                "table inet firewall {\n"
                "  chain forward {\n"
                "    type filter hook forward priority 0; policy accept;\n"
                f"{_ipv6_firewall(lan_out)}"
                "  }\n"
                "}\n"
            )
            _run("ip", "netns", "exec", gateway, "nft", "-f", "-", stdin=rules)
        return f"{lan6}::2"

    def _start_miniupnpd(
        self, gateway: Gateway, directory: Path, *, ipv6_lan: str | None = None, pcp: bool = True
    ) -> None:
        """miniupnpd in the foreground (-d) on ``gateway``, its nftables chains made first:
        it only adds rules to chains that exist (Debian ships nft_init.sh for that).
        ``ipv6_lan``: the home has IPv6 (on that LAN device); its stateful firewall goes in
        miniupnpd's forward chain after the pinholes (as OpenWrt's fw4 has it: a verdict in
        one base chain does not spare a packet another base chain's drop), and miniupnpd
        serves IPv6 too (pinholes over PCP and UPnP IGD v2)."""
        table = "miniupnpd"
        _run(
            "ip",
            "netns",
            "exec",
            gateway.namespace,
            "nft",
            "-f",
            "-",
            stdin=(
                f"table inet {table} {{\n"
                # Policy accept: the bed's routers filter nothing; what keeps the internet
                # off the LAN is that only conntrack (or a DNAT rule) maps anything there.
                "  chain forward { type filter hook forward priority 0; policy accept;\n"
                "    jump miniupnpd;\n"
                f"{'' if ipv6_lan is None else _ipv6_firewall(ipv6_lan)}"
                "  }\n"
                "  chain miniupnpd { }\n"
                "  chain prerouting { type nat hook prerouting priority -100; policy accept;\n"
                "    jump prerouting_miniupnpd; }\n"
                "  chain postrouting { type nat hook postrouting priority 100; policy accept;\n"
                "    jump postrouting_miniupnpd; }\n"
                "  chain prerouting_miniupnpd { }\n"
                "  chain postrouting_miniupnpd { }\n"
                # Without PCP: miniupnpd serves PCP over IPv6 whatever enable_natpmp says.
                + (
                    ""
                    if pcp
                    else "  chain input { type filter hook input priority 0; policy accept;\n"
                    "    udp dport 5351 drop; }\n"
                )
                + "}\n"
            ),
        )
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "miniupnpd.conf"
        config.write_text(
            f"ext_ifname={gateway.wan}\n"
            f"listening_ip={gateway.lan}\n"
            "http_port=0\n"
            "enable_upnp=yes\n"
            f"enable_natpmp={'yes' if pcp else 'no'}\n"
            "secure_mode=yes\n"
            "system_uptime=yes\n"
            f"lease_file={directory / 'upnp.leases'}\n"
            f"upnp_table_name={table}\n"
            f"upnp_nat_table_name={table}\n"
            "upnp_forward_chain=miniupnpd\n"
            "upnp_nat_chain=prerouting_miniupnpd\n"
            "upnp_nat_postrouting_chain=postrouting_miniupnpd\n"
            "uuid=3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b\n"
            "allow 1024-65535 192.168.0.0/16 1024-65535\n"
            "deny 0-65535 0.0.0.0/0 0-65535\n"
        )
        log = (directory / "miniupnpd.log").open("w")
        gateway.miniupnpd = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                gateway.namespace,
                "miniupnpd",
                *(("-4",) if ipv6_lan is None else ()),
                "-d",
                "-f",
                str(config),
                "-P",
                str(directory / "miniupnpd.pid"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        gateway.log = directory / "miniupnpd.log"

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.stop()
        for gateway in self.gateways:
            if gateway.miniupnpd is not None:
                gateway.miniupnpd.terminate()
                try:
                    gateway.miniupnpd.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    gateway.miniupnpd.kill()
                    gateway.miniupnpd.wait()
        for namespace in reversed(self._namespaces):
            # Anything still running in our namespaces was started by this bed.
            pids = subprocess.run(
                ["ip", "netns", "pids", namespace], capture_output=True, text=True, check=False
            ).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), 9)
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)
            shutil.rmtree(NETNS_ETC / namespace, ignore_errors=True)
        with contextlib.suppress(OSError):
            NETNS_ETC.rmdir()  # only if empty: another bed's, or the system's, stay
