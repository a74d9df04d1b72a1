"""Gateway port mapping (UPnP IGD and NAT-PMP/PCP) of the node's UDP port, via libtorrent.

A libtorrent session of its own with only UPnP and NAT-PMP on (no DHT, LSD, torrents). As in
``discovery/mainline.py``, one thread of ours waits on the session's alerts and hands plain
values to trio with ``TrioToken.run_sync_soon``; the state lives in a ``PortMapState`` on the
trio side. libtorrent renews granted leases itself; we ask again (``RETRY_AFTER``) when
every transport failed, and delete the mapping on exit.

libtorrent 2.x keeps its port mappers per listen socket: with no listen interface
``add_port_mapping`` returns no handle and nothing is mapped (measured), so the session
listens on an ephemeral port, and libtorrent maps that port (TCP and UDP) for BitTorrent
on its own. We delete every mapping the session reports that is not ours as soon as it is
reported, so the gateway keeps only the node's UDP port.

Port mapping never stops the daemon: any failure here is logged once and the node goes on
without it.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable

import libtorrent as lt
import trio

from p2pfs.address import PeerAddress
from p2pfs.net.boundary import describe, split_fatal

from .portmapstate import ExternalIp, MapEvent, MapFailed, Mapped, PortMapState

logger = logging.getLogger(__name__)

ALERT_WAIT_MS = 250
"""Bound on one ``wait_for_alert``: how long the thread may take to notice a stop."""
STOP_TIMEOUT = 3.0
"""Seconds shutdown gives the gateway to confirm the deletion (within the daemon's grace)."""
LEASE = 3600
"""Seconds a lease asks for: a mapping of a daemon that died unasked lapses within this."""


def _settings() -> lt.settings_pack:
    return {
        # An ephemeral port on every IPv4 interface: libtorrent starts its mappers per
        # listen socket (see the module doc).
        "listen_interfaces": "0.0.0.0:0",
        "enable_dht": False,
        "enable_lsd": False,
        "enable_upnp": True,
        "enable_natpmp": True,
        "upnp_lease_duration": LEASE,
        # In libtorrent 2.x's settings, missing from its type stubs.
        "natpmp_lease_duration": LEASE,  # type: ignore[typeddict-unknown-key]
        "alert_mask": int(lt.alert_category.port_mapping)
        | int(lt.alert_category.status)
        | int(lt.alert_category.error),
    }


def _event_from_alert(alert: object) -> tuple[int, MapEvent] | ExternalIp | None:
    """Copy what we use out of an alert (runs in the alert thread): (mapping handle, event)."""
    if isinstance(alert, lt.portmap_alert):
        # Our handles only ever map UDP; libtorrent's own (TCP too) are deleted on sight.
        return int(alert.mapping), Mapped(_transport(alert), int(alert.external_port))
    if isinstance(alert, lt.portmap_error_alert):
        return int(alert.mapping), MapFailed(_transport(alert), str(alert.error.message()))
    if isinstance(alert, lt.external_ip_alert):
        return ExternalIp(str(alert.external_address))
    return None


def _transport(alert: lt.portmap_alert | lt.portmap_error_alert) -> str:
    return "upnp" if alert.map_transport == lt.portmap_transport.upnp else "natpmp"


class PortMapper:
    """Maps ``local_port`` (UDP) at the gateway while ``serve`` runs; ``changed`` is called
    (in trio) whenever the external address appears, changes or goes."""

    def __init__(self, local_port: int, changed: Callable[[PeerAddress | None], None]) -> None:
        self.state = PortMapState(local_port, trio.current_time())
        self._changed = changed
        self._handles: set[int] = set()
        self._session: lt.session | None = None
        self._stop = threading.Event()
        self._wake = trio.Event()
        self._thread_error: BaseException | None = None
        self._thread_ended = False
        self._last: PeerAddress | None = None
        self._logged_failure = False

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """A failure boundary (GUIDE rule 12): whatever goes wrong but cancellation, one log
        line and the node carries on unmapped."""
        task_status.started()
        try:
            await self._serve()
        except BaseException as exc:
            fatal, failure = split_fatal(exc)
            if failure is not None:
                logger.warning("port mapping stopped: %s", describe(failure))
                self._set_external(None)
            if fatal is exc:
                raise
            if fatal is not None:
                raise fatal from None

    async def _serve(self) -> None:
        token = trio.lowlevel.current_trio_token()
        ready, done = trio.Event(), trio.Event()
        thread = threading.Thread(
            target=self._alert_thread,
            args=(token, ready, done),
            name="p2pfs-portmap-alerts",
            daemon=True,
        )
        thread.start()
        try:
            await ready.wait()
            self._check_thread()
            self._request()
            while True:
                self._wake = trio.Event()
                retry = self.state.retry_at()
                with trio.move_on_at(math.inf if retry is None else retry) as timer:
                    await self._wake.wait()
                self._check_thread()
                if timer.cancelled_caught:
                    logger.debug("port mapping: asking the gateway again")
                    self._request()
        finally:
            self._stop.set()
            # The thread deletes the mapping and destroys the session, which waits for the
            # gateway's answers; bounded so shutdown stays within the daemon's grace.
            with trio.CancelScope(shield=True), trio.move_on_after(STOP_TIMEOUT) as waited:
                await done.wait()
            if waited.cancelled_caught:
                logger.info("port mapping: the gateway did not confirm the deletion in time")

    def _check_thread(self) -> None:
        if self._thread_error is not None:
            raise self._thread_error
        if self._thread_ended:
            raise RuntimeError("the port mapping thread stopped unasked")

    def _request(self) -> None:
        session = self._session
        if session is None:
            return
        for handle in self._handles:
            session.delete_port_mapping(handle)
        port = self.state.local_port
        self._handles = set(session.add_port_mapping(lt.portmap_protocol.udp, port, port))
        self.state.requested(trio.current_time())
        if not self._handles:
            self.state.handle(MapFailed("upnp", "no interface to map from"))
            self.state.handle(MapFailed("natpmp", "no interface to map from"))
            self._after_events()

    def _alert_thread(
        self, token: trio.lowlevel.TrioToken, ready: trio.Event, done: trio.Event
    ) -> None:
        session: lt.session | None = None
        try:
            session = lt.session(lt.session_params(_settings()))
            self._session = session
            token.run_sync_soon(ready.set)
            while not self._stop.is_set():
                session.wait_for_alert(ALERT_WAIT_MS)
                events = [e for e in map(_event_from_alert, session.pop_alerts()) if e]
                if events:
                    token.run_sync_soon(self._dispatch, events)
            # Delete ours, then let the session's destructor (in this thread, not trio's)
            # send the requests.
            for handle in self._handles:
                session.delete_port_mapping(handle)
        except BaseException as exc:  # noqa: BLE001 - carried to trio, which logs it once
            self._thread_error = exc
        finally:
            self._session = None
            del session
            self._thread_ended = True
            token.run_sync_soon(self._wake_up)
            token.run_sync_soon(ready.set)
            token.run_sync_soon(done.set)

    def _wake_up(self) -> None:
        self._wake.set()

    def _dispatch(self, events: list[tuple[int, MapEvent] | ExternalIp]) -> None:
        session = self._session
        for item in events:
            if isinstance(item, ExternalIp):
                self.state.handle(item)
                continue
            handle, event = item
            if handle not in self._handles:
                # libtorrent's own mapping of its listen port: not wanted at the gateway.
                if isinstance(event, Mapped) and session is not None:
                    session.delete_port_mapping(handle)
                continue
            self.state.handle(event)
        self._after_events()

    def _after_events(self) -> None:
        external = self.state.external()
        self._set_external(external)
        if self.state.state == "failed" and not self._logged_failure:
            self._logged_failure = True
            errors = ", ".join(f"{k}: {v}" for k, v in self.state.errors().items())
            logger.info(
                "port mapping: no gateway mapped UDP %d (%s)", self.state.local_port, errors
            )
        self._wake.set()

    def _set_external(self, external: PeerAddress | None) -> None:
        if external != self._last:
            self._last = external
            if external is not None:
                logger.info("port mapping: reachable at %s through the gateway", external)
            self._changed(external)
