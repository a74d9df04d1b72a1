"""Discovery on the public BitTorrent Mainline DHT (BEP 5), through a libtorrent session.

The session is used for its DHT only: no torrents, no local service discovery, no UPnP or
NAT-PMP. libtorrent runs its own network thread; its results arrive as *alerts*, which we
pull in one dedicated thread of ours (a blocking ``wait_for_alert``), copy into plain
frozen dataclasses (an alert object dies at the next ``pop_alerts``) and hand to trio with
``TrioToken.run_sync_soon``. Everything stateful (lookups in flight, the announce schedule)
lives on the trio side, so no lock guards it. Calls into the session from trio are
non-blocking posts to libtorrent's own thread.

A share is announced under ``mainline_info_hash(discovery_key)`` with our QUIC port (not
the DHT port: BEP 5's ``implied_port`` is off), so whoever looks the info-hash up learns
``our public IP : QUIC port``. Mainline records carry no NodeId, hence ``node_id=None``.

BEP 44 mutable items (signed pointers) are not used: nothing in the daemon wrote or read
one, so that code was removed (issue 14) rather than kept untested by any real caller.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import libtorrent as lt
import trio

from p2pfs.address import PeerAddress
from p2pfs.discovery.keys import mainline_info_hash
from p2pfs.discovery.seam import Provider
from p2pfs.errors import LocalProtocolError

log = logging.getLogger(__name__)

SOURCE = "mainline"
REANNOUNCE_INTERVAL = 15 * 60.0
"""BEP 5 nodes drop peers after about 30 minutes; twice per lifetime keeps us listed."""
FIND_TIMEOUT = 8.0
"""A get_peers traversal on the internet takes a few seconds; libtorrent gives no 'done'."""
FIND_SETTLE = 0.5
"""Once a provider is found, wait this long for the other replies of the same traversal."""
EMPTY_TABLE_RETRY_MAX = 60.0
"""While the routing table is empty an announce reaches nobody: retry with backoff to this."""
ALERT_WAIT_MS = 1000
"""Bound on one ``wait_for_alert``; shutdown also wakes it at once with a posted alert."""

DEFAULT_INTERFACES = ("0.0.0.0", "[::]")
LOOPBACK_INTERFACES = ("127.0.0.1",)

LOOPBACK_TESTING_SETTINGS: lt.settings_pack = {
    # Issue 4 measured these: with the real-network defaults, libtorrent drops nodes that
    # share an IP (all of them, on 127.0.0.1), treats loopback as "dark internet" and wants
    # node ids derived from the IP (BEP 42), so sessions on one host never see each other.
    "dht_bootstrap_nodes": "",
    "dht_restrict_routing_ips": False,
    "dht_restrict_search_ips": False,
    "dht_ignore_dark_internet": False,
    "dht_prefer_verified_node_ids": False,
    "dht_enforce_node_id": False,
    # Measured here: every node shares 127.0.0.1, so libtorrent's per-IP abuse guard (5
    # requests/s, then blocked for 5 minutes) and its 8 kB/s DHT upload cap make lookups
    # fail after a few dozen; on the internet each peer has its own IP and they stay on.
    "dht_block_ratelimit": 1_000_000,
    "dht_upload_rate_limit": 10_000_000,
}


# --- what the alert thread hands to trio (plain data; alerts die at the next pop) ---------


@dataclass(frozen=True, slots=True)
class _PeersReply:
    info_hash: bytes
    peers: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class _AnnounceReceived:
    info_hash: bytes


@dataclass(frozen=True, slots=True)
class _Stats:
    nodes: int


@dataclass(frozen=True, slots=True)
class _Bootstrapped:
    pass


@dataclass(frozen=True, slots=True)
class _ExternalAddress:
    host: str


_Event = _PeersReply | _AnnounceReceived | _Stats | _Bootstrapped | _ExternalAddress


def _event_from_alert(alert: object) -> _Event | None:
    """Copy what we use out of a libtorrent alert (runs in the alert thread)."""
    if isinstance(alert, lt.dht_get_peers_reply_alert):
        peers = tuple((str(host), int(port)) for host, port in alert.peers())
        return _PeersReply(bytes(alert.info_hash.to_bytes()), peers)
    if isinstance(alert, lt.dht_announce_alert):
        return _AnnounceReceived(bytes(alert.info_hash.to_bytes()))
    if isinstance(alert, lt.dht_stats_alert):
        return _Stats(sum(int(bucket["num_nodes"]) for bucket in alert.routing_table))
    if isinstance(alert, lt.dht_bootstrap_alert):
        return _Bootstrapped()
    if isinstance(alert, lt.external_ip_alert):
        return _ExternalAddress(str(alert.external_address))
    return None


# --- the finder ---------------------------------------------------------------------------


class _PeerLookup:
    def __init__(self) -> None:
        self.found: dict[PeerAddress, None] = {}
        self.arrived = trio.Event()


class MainlineFinder:
    """A :class:`~p2pfs.discovery.seam.Finder` on the public Mainline DHT.

    ``quic_port`` is what we announce (peers connect there); ``listen_port`` is the DHT's
    own UDP (and libtorrent's TCP) port, 0 for any. ``bootstrap`` replaces libtorrent's
    default bootstrap nodes (``None`` keeps them). ``loopback_testing`` applies
    :data:`LOOPBACK_TESTING_SETTINGS` and listens on 127.0.0.1 only; use
    :meth:`add_dht_node` to join the sessions of a test to each other.
    """

    name = SOURCE
    ends_by_silence = False

    def __init__(
        self,
        quic_port: int,
        *,
        listen_port: int = 0,
        interfaces: Sequence[str] | None = None,
        bootstrap: Iterable[tuple[str, int]] | None = None,
        loopback_testing: bool = False,
        reannounce_interval: float = REANNOUNCE_INTERVAL,
        find_timeout: float = FIND_TIMEOUT,
        find_settle: float = FIND_SETTLE,
    ) -> None:
        if not 0 < quic_port < 65536 or not 0 <= listen_port < 65536:
            raise LocalProtocolError("mainline: ports must be in 1..65535 (listen port 0: any)")
        self._quic_port = quic_port
        self._reannounce_interval = reannounce_interval
        self._find_timeout = find_timeout
        self._find_settle = find_settle
        if interfaces is None:
            interfaces = LOOPBACK_INTERFACES if loopback_testing else DEFAULT_INTERFACES
        self._settings = self._settings_pack(listen_port, interfaces, bootstrap, loopback_testing)

        self._session: lt.session | None = None
        self._serving = False
        self._dht_port = 0
        self._stop = threading.Event()
        # trio-side state, touched only from trio (alert events arrive via run_sync_soon).
        self._announces: dict[bytes, float] = {}
        self._attempts: dict[bytes, int] = {}
        self._schedule_changed = trio.Event()
        self._nodes = 0
        self._stats_arrived = trio.Event()
        self._peer_lookups: dict[bytes, set[_PeerLookup]] = {}
        self._own_hosts = {"127.0.0.1", "::1"}
        self.announces_received: Counter[bytes] = Counter()
        """BEP 5 announces other nodes made to this one, by info-hash: what this node was
        asked to store for the DHT (tests watch another node's announces arrive here)."""

    @staticmethod
    def _settings_pack(
        listen_port: int,
        interfaces: Sequence[str],
        bootstrap: Iterable[tuple[str, int]] | None,
        loopback_testing: bool,
    ) -> lt.settings_pack:
        settings: lt.settings_pack = {
            "listen_interfaces": ",".join(f"{host}:{listen_port}" for host in interfaces),
            "enable_dht": True,
            # A DHT-only session: nothing else may touch the LAN or the router.
            "enable_lsd": False,
            "enable_upnp": False,
            "enable_natpmp": False,
            # An explicit port that is taken is an error, not a silent move to another one.
            "max_retry_port_bind": 0,
            "listen_system_port_fallback": listen_port == 0,
            "alert_mask": int(lt.alert_category.dht)
            | int(lt.alert_category.dht_operation)
            | int(lt.alert_category.status)
            | int(lt.alert_category.error),
        }
        if loopback_testing:
            settings.update(LOOPBACK_TESTING_SETTINGS)
        if bootstrap is not None:
            settings["dht_bootstrap_nodes"] = ",".join(f"{host}:{port}" for host, port in bootstrap)
        return settings

    _translate = staticmethod(_event_from_alert)

    @property
    def dht_port(self) -> int:
        """The DHT's UDP port (of the first interface; with port 0 libtorrent binds each
        interface address separately and they may differ). 0 before ``serve`` started."""
        return self._dht_port

    # --- lifetime --------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self._serving or self._stop.is_set():
            raise LocalProtocolError("a MainlineFinder serves once")
        token = trio.lowlevel.current_trio_token()
        ready = trio.Event()
        done = trio.Event()
        outcome: list[BaseException | int] = []
        thread = threading.Thread(
            target=self._alert_thread,
            args=(token, ready, done, outcome),
            name="p2pfs-mainline-alerts",
            daemon=True,
        )
        thread.start()
        try:
            await ready.wait()
            result = outcome[0]
            if isinstance(result, BaseException):
                raise result
            self._dht_port = result
            self._serving = True
            log.info(
                "mainline: DHT listening on port %d, announcing QUIC port %d",
                result,
                self._quic_port,
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._announce_loop)
                nursery.start_soon(self._watch_thread, done, outcome)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._serving = False
            session, self._session = self._session, None
            if session is not None:
                # Wake the alert thread now instead of at its next timeout.
                session.post_dht_stats()
                del session
            self._stop.set()
            with trio.CancelScope(shield=True):
                await done.wait()
            thread.join()

    def _alert_thread(
        self,
        token: trio.lowlevel.TrioToken,
        ready: trio.Event,
        done: trio.Event,
        outcome: list[BaseException | int],
    ) -> None:
        try:
            session = lt.session(lt.session_params(self._settings))
        except BaseException as exc:  # noqa: BLE001 - carried to serve(), which raises it
            outcome.append(exc)
            token.run_sync_soon(ready.set)
            token.run_sync_soon(done.set)
            return
        try:
            port = int(session.listen_port())  # synchronous: sockets are open or failed
            if port == 0:
                outcome.append(
                    OSError(f"mainline: cannot listen on {self._settings['listen_interfaces']}")
                )
                token.run_sync_soon(ready.set)
                return
            self._session = session
            outcome.append(port)
            token.run_sync_soon(ready.set)
            while not self._stop.is_set():
                session.wait_for_alert(ALERT_WAIT_MS)
                events = [e for e in map(self._translate, session.pop_alerts()) if e]
                if events:
                    token.run_sync_soon(self._dispatch, events)
        except BaseException as exc:  # noqa: BLE001 - carried to serve(), which raises it
            outcome.append(exc)
        finally:
            # The session's destructor blocks (it closes sockets, stops the DHT): here, not
            # in trio. run_sync_soon is FIFO, so ``done`` comes after every dispatch.
            del session
            token.run_sync_soon(done.set)

    @staticmethod
    async def _watch_thread(done: trio.Event, outcome: list[BaseException | int]) -> None:
        """A failure in the alert thread ends ``serve`` with that error, not silence."""
        await done.wait()
        if isinstance(outcome[-1], BaseException):
            raise outcome[-1]
        raise LocalProtocolError("mainline: the alert thread stopped unasked")

    def _require_session(self) -> lt.session:
        session = self._session
        if not self._serving or session is None:
            raise LocalProtocolError("MainlineFinder is not serving")
        return session

    def add_dht_node(self, host: str, port: int) -> None:
        """Tell the DHT about a node (tests join loopback sessions to each other this way)."""
        self._require_session().add_dht_node((host, port))

    # --- alert events, on the trio side ---------------------------------------------------

    def _dispatch(self, events: list[_Event]) -> None:
        for event in events:
            if isinstance(event, _PeersReply):
                for lookup in self._peer_lookups.get(event.info_hash, ()):
                    for host, port in event.peers:
                        if 0 < port < 65536:
                            lookup.found.setdefault(PeerAddress(host, port))
                    lookup.arrived.set()
            elif isinstance(event, _AnnounceReceived):
                self.announces_received[event.info_hash] += 1
            elif isinstance(event, _Stats):
                self._nodes = event.nodes
                self._stats_arrived.set()
            elif isinstance(event, _Bootstrapped):
                # Announces made before the table filled reached nobody: redo them now.
                log.debug("mainline: bootstrap done, re-announcing %d keys", len(self._announces))
                for key in self._announces:
                    self._announces[key] = -math.inf
                self._schedule_changed.set()
            else:
                self._own_hosts.add(event.host)

    # --- announcing ------------------------------------------------------------------------

    async def announce(self, key: bytes) -> None:
        self._require_session()
        self._announces[key] = -math.inf
        self._attempts[key] = 0
        self._schedule_changed.set()
        await trio.lowlevel.checkpoint()

    def addresses_changed(self) -> None:
        """Every key announced again now (Mainline records carry the sender's address)."""
        for key in self._announces:
            self._announces[key] = -math.inf
        self._schedule_changed.set()

    async def withdraw(self, key: bytes) -> None:
        # BEP 5 has no "unannounce": the records elsewhere expire within ~30 minutes.
        self._announces.pop(key, None)
        self._attempts.pop(key, None)
        self._schedule_changed.set()
        await trio.lowlevel.checkpoint()

    async def _refresh_node_count(self) -> None:
        self._stats_arrived = trio.Event()
        self._require_session().post_dht_stats()
        with trio.move_on_after(1.0):
            await self._stats_arrived.wait()

    async def _announce_loop(self) -> None:
        while True:
            now = trio.current_time()
            due = [key for key, at in self._announces.items() if at <= now]
            if due:
                await self._refresh_node_count()
                session = self._require_session()
                now = trio.current_time()
                for key in due:
                    if key not in self._announces:
                        continue  # withdrawn while we waited for the node count
                    info_hash = mainline_info_hash(key)
                    session.dht_announce(lt.sha1_hash(info_hash), self._quic_port, 0)
                    if self._nodes > 0:
                        delay = self._reannounce_interval
                    else:
                        attempt = self._attempts.get(key, 0)
                        self._attempts[key] = attempt + 1
                        delay = min(2.0**attempt, EMPTY_TABLE_RETRY_MAX, self._reannounce_interval)
                    self._announces[key] = now + delay
                    log.debug(
                        "mainline: announced %s (%d nodes), next in %.0f s",
                        info_hash.hex()[:12],
                        self._nodes,
                        delay,
                    )
            self._schedule_changed = trio.Event()
            with trio.move_on_at(min(self._announces.values(), default=math.inf)):
                await self._schedule_changed.wait()

    # --- finding ---------------------------------------------------------------------------

    async def find(self, key: bytes, limit: int = 16) -> Sequence[Provider]:
        session = self._require_session()
        info_hash = mainline_info_hash(key)
        lookup = _PeerLookup()
        self._peer_lookups.setdefault(info_hash, set()).add(lookup)
        try:
            session.dht_get_peers(lt.sha1_hash(info_hash))
            with trio.move_on_after(self._find_timeout) as scope:
                while True:
                    await lookup.arrived.wait()
                    lookup.arrived = trio.Event()
                    if len(self._providers(key, lookup)) >= limit:
                        break
                    if lookup.found:
                        scope.deadline = min(
                            scope.deadline, trio.current_time() + self._find_settle
                        )
        finally:
            lookups = self._peer_lookups[info_hash]
            lookups.discard(lookup)
            if not lookups:
                del self._peer_lookups[info_hash]
        return self._providers(key, lookup)[:limit]

    def _providers(self, key: bytes, lookup: _PeerLookup) -> list[Provider]:
        return [
            Provider(address, None, SOURCE)
            for address in lookup.found
            if not self._is_us(key, address)
        ]

    def _is_us(self, key: bytes, address: PeerAddress) -> bool:
        # Our own record comes back for keys we announce; the fetcher would dial itself.
        return (
            key in self._announces
            and address.port == self._quic_port
            and address.host in self._own_hosts
        )
