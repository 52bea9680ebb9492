"""Every address of a host (chatroom.py: DISCOVERY's order_addresses and
HostBrowser, CONNECTIONS' connect_first, CLIENT CORE's join).

A host with a second subnet, a VPN, a Docker bridge or IPv6 advertises
several addresses, some of which don't reach us. The client orders them
(ours first), tries them with a stagger ("happy eyeballs"), and the first
connection wins. Here the unreachable addresses are other loopback
addresses: 127.0.0.2 with nothing listening (refused at once), and a
"black hole" on 127.0.0.3, a listener whose queue is full and that never
accepts, so the kernel drops the SYN and a connect hangs, like a packet
filter would. Every byte stays on 127.0.0.0/8; mDNS runs on 127.0.0.1.

No test asserts on how long something took: a stagger of a minute shows
that a failure starts the next attempt at once (the test's deadline is far
shorter), never a measured time.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import socket
import sys
import threading
import uuid
from pathlib import Path

import pytest

import chatroom
from conftest import child_env

CHATROOM = Path(__file__).resolve().parent.parent / "chatroom.py"
LOCAL = "127.0.0.1"
REFUSING = "127.0.0.2"
BLACK_HOLE = "127.0.0.3"
DEADLINE_S = 20.0


# --- ordering ------------------------------------------------------------------------------

def test_our_networks_first_then_ipv4_then_ipv6_link_local_last():
    ours = [ipaddress.ip_network("192.168.1.0/24"), ipaddress.ip_network("fd00::/64")]
    advertised = ["172.17.0.1", "fe80::1", "fd00::5", "10.8.0.2", "192.168.1.20", "not an ip",
                  "192.168.1.20"]
    assert chatroom.order_addresses(advertised, ours) == [
        "192.168.1.20", "fd00::5", "172.17.0.1", "10.8.0.2", "fe80::1"]
    assert chatroom.order_addresses(["10.0.0.1", "10.0.0.2"], []) == ["10.0.0.1", "10.0.0.2"]
    assert chatroom.order_addresses([], ours) == []


def test_what_a_host_advertises_has_no_scope_bound_addresses():
    addresses = chatroom.lan_addresses()
    assert addresses, "this machine has at least a loopback address"
    parsed = [ipaddress.ip_address(a) for a in addresses]
    assert not any(a.is_link_local for a in parsed)
    loopback = [a.is_loopback for a in parsed]
    assert loopback == sorted(loopback), "loopback addresses come last"


# --- connect_first, with stand-in connections ------------------------------------------------

class Attempts:
    """Stand-in connects: each address is told what to do, and every
    attempt is recorded (started, cancelled, closed)."""

    def __init__(self, plan: dict[str, str]) -> None:
        self.plan = plan                # address -> "ok", "refuse" or "hang"
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.closed: list[str] = []

    async def connect(self, address: str):
        self.started.append(address)
        what = self.plan[address]
        if what == "refuse":
            raise ConnectionRefusedError(111, f"refused by {address}")
        if what == "hang":
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.append(address)
                raise
        attempts = self

        class Transport:
            def close(self) -> None:
                attempts.closed.append(address)

        return Transport(), address


async def test_a_hanging_first_address_loses_to_the_second():
    attempts = Attempts({"a": "hang", "b": "ok"})
    address, (_transport, said) = await asyncio.wait_for(
        chatroom.connect_first(["a", "b"], attempts.connect, 30, stagger_s=0.05), DEADLINE_S)
    assert (address, said) == ("b", "b")
    assert attempts.started == ["a", "b"] and attempts.cancelled == ["a"]


async def test_a_failure_starts_the_next_attempt_at_once():
    attempts = Attempts({"a": "refuse", "b": "refuse", "c": "ok"})
    address, _ = await asyncio.wait_for(   # a stagger of a minute is never waited for
        chatroom.connect_first(["a", "b", "c"], attempts.connect, 120, stagger_s=60),
        DEADLINE_S)
    assert address == "c" and attempts.started == ["a", "b", "c"]


async def test_when_every_address_fails_the_first_ones_reason_is_raised():
    attempts = Attempts({"a": "refuse", "b": "refuse"})
    with pytest.raises(ConnectionRefusedError, match="refused by a"):
        await chatroom.connect_first(["a", "b"], attempts.connect, 30, stagger_s=0.05)
    with pytest.raises(OSError):
        await chatroom.connect_first([], attempts.connect, 30)


async def test_nothing_answering_is_a_timeout_and_nothing_is_left_behind():
    attempts = Attempts({"a": "hang", "b": "hang"})
    with pytest.raises(TimeoutError):
        await chatroom.connect_first(["a", "b"], attempts.connect, 0.3, stagger_s=0.05)
    await asyncio.sleep(0)                  # let the cancellations land
    assert sorted(attempts.cancelled) == ["a", "b"]


async def test_a_second_connection_that_also_made_it_is_closed():
    attempts = Attempts({"a": "ok", "b": "ok"})
    both = asyncio.get_running_loop().create_future()

    async def connect(address: str):        # both finish in the same turn of the loop
        await both
        return await attempts.connect(address)

    asyncio.get_running_loop().call_later(0.1, both.set_result, None)
    address, _ = await chatroom.connect_first(["a", "b"], connect, 30, stagger_s=0)
    assert attempts.closed == [{"a": "b", "b": "a"}[address]]


# --- the real thing on loopback -------------------------------------------------------------

@pytest.fixture
def black_hole():
    """A listener on BLACK_HOLE:port whose accept queue is full: connects
    to it hang. Returns a factory: black_hole(port)."""
    sockets: list[socket.socket] = []

    def make(port: int) -> None:
        server = socket.socket()
        server.bind((BLACK_HOLE, port))
        server.listen(0)
        filler = socket.create_connection((BLACK_HOLE, port), timeout=5)
        sockets.extend((server, filler))

    yield make
    for sock in sockets:
        sock.close()


async def test_the_client_joins_through_the_address_that_answers(make_host, black_hole):
    host = await make_host("addresses")
    black_hole(host.port)
    events: list[dict] = []
    arrived = threading.Event()

    def on_event(event: dict) -> None:
        events.append(event)
        if event["type"] in ("ready", "closed"):
            arrived.set()

    core = chatroom.ClientCore(on_event, chatroom.Limits(connect_timeout_s=15))
    core.start()
    try:
        joined = core.join([BLACK_HOLE, REFUSING, LOCAL], host.port, "r", "alice")
        assert await asyncio.wait_for(asyncio.wrap_future(joined), DEADLINE_S) is True
        ready = next(e for e in events if e["type"] == "ready")
        assert (ready["address"], ready["port"]) == (LOCAL, host.port)
    finally:
        await asyncio.wait_for(asyncio.wrap_future(core.leave()), DEADLINE_S)
        await asyncio.to_thread(core.stop)


async def test_when_no_address_answers_the_error_names_them_all(black_hole):
    port = _free_port()
    black_hole(port)
    events: list[dict] = []
    core = chatroom.ClientCore(events.append, chatroom.Limits(connect_timeout_s=0.5))
    core.start()
    try:
        joined = core.join([BLACK_HOLE, REFUSING], port, "r", "alice")
        assert await asyncio.wait_for(asyncio.wrap_future(joined), DEADLINE_S) is False
    finally:
        await asyncio.to_thread(core.stop)
    error = next(e for e in events if e["type"] == "error")
    assert error["code"] == "host_unreachable"
    assert BLACK_HOLE in error["message"] and REFUSING in error["message"], error
    assert events[-1] == {"type": "closed", "reason": "unreachable"}


def _free_port(address: str = BLACK_HOLE) -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


@contextlib.asynccontextmanager
async def advertised(name: str, addresses: list[str], port: int):
    """A chatroom record for `name` naming `addresses` and `port`, on
    127.0.0.1's mDNS, with no host behind it."""
    from zeroconf import IPVersion
    from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

    zc = AsyncZeroconf(interfaces=[LOCAL], ip_version=IPVersion.V4Only)
    info = AsyncServiceInfo(
        chatroom.SERVICE_TYPE, f"{name}.{chatroom.SERVICE_TYPE}", port=port,
        parsed_addresses=addresses, properties=chatroom.encode_txt(name, []),
        server=f"{name}.local.")
    try:
        async with asyncio.timeout(DEADLINE_S):
            await (await zc.async_register_service(info))
        yield
    finally:
        await zc.async_unregister_all_services()
        await zc.async_close()


async def test_the_browser_keeps_every_address_a_record_names():
    """A record naming three addresses: the browser on loopback keeps the
    two loopback ones (never reaching past this machine)."""
    name = f"addresses-{uuid.uuid4().hex[:8]}"
    browser = chatroom.HostBrowser(LOCAL)
    try:
        async with advertised(name, [BLACK_HOLE, LOCAL, "192.0.2.99"], 47997):  # never dialled
            async with asyncio.timeout(DEADLINE_S):
                await browser.start()
                while not [h for h in browser.hosts.values() if h.name == name]:
                    await asyncio.sleep(0.05)
            found = next(h for h in browser.hosts.values() if h.name == name)
    finally:
        await browser.close()
    # mDNS keeps no order among a record's addresses; both are ours.
    assert sorted(found.addresses) == [LOCAL, BLACK_HOLE]
    assert found.address == found.addresses[0]
    assert found.to_event()["addresses"] == list(found.addresses)


async def test_a_host_found_on_the_lan_but_closed_to_us_is_a_firewall():
    """mDNS answered but the port doesn't: the error says it is most
    likely a firewall on that computer, with the port and each system's fix."""
    name = f"walled-{uuid.uuid4().hex[:8]}"
    port = _free_port(LOCAL)                # nothing listens there
    async with advertised(name, [LOCAL], port):
        cli = await asyncio.create_subprocess_exec(
            sys.executable, str(CHATROOM), "--cli", "--json", "--interface", LOCAL,
            "--name", name, "--timeout", "5", "--room", "r", "--user", "u",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=child_env())
        out, _err = await asyncio.wait_for(cli.communicate(), DEADLINE_S)
    events = [json.loads(line) for line in out.decode().splitlines()]
    assert cli.returncode == 1, events
    error = next(e for e in events if e["type"] == "error")
    assert error["code"] == "host_unreachable", error
    assert "firewall" in error["message"] and f"{port}/tcp" in error["message"], error
