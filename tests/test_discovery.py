"""Discovery (chatroom.py, DISCOVERY): TXT records, and mDNS on 127.0.0.1.

Every zeroconf instance here, in process or in a subprocess, is bound to
127.0.0.1 (never the default all-interfaces one), and every advertised host
has a name unique to this test run, by which results are filtered: the
machine may be shared with other runs.

No test asserts on how long something took; deadlines only make a hang
fail fast.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import chatroom
from conftest import child_env

LOCAL = "127.0.0.1"
CHATROOM = str(Path(__file__).resolve().parent.parent / "chatroom.py")
DEADLINE_S = 10.0


def unique(prefix: str = "test") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def as_props(txt: dict[str, str]) -> dict[bytes, bytes]:
    """What zeroconf hands a browser: bytes keys and values."""
    return {k.encode(): v.encode() for k, v in txt.items()}


async def poll(check, timeout: float = DEADLINE_S, every: float = 0.05):
    """check()'s first true value, or AssertionError after `timeout` s."""
    async with asyncio.timeout(timeout):
        while not (value := check()):
            await asyncio.sleep(every)
    return value


def leftover_mdns_tasks() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("mdns:")]


# --- TXT records ---------------------------------------------------------------

def test_txt_round_trip_with_chinese():
    rooms = [("二班", 3), ("lobby", 2), ("Café du 日本", 1)]
    txt = chatroom.encode_txt("教室主机", rooms)
    assert txt["v"] == str(chatroom.PROTOCOL_VERSION) and txt["rc"] == "3"
    assert chatroom.decode_txt(as_props(txt)) == (
        "教室主机", chatroom.PROTOCOL_VERSION, rooms, 3)


def test_txt_no_rooms():
    txt = chatroom.encode_txt("host", [])
    assert chatroom.decode_txt(as_props(txt)) == ("host", chatroom.PROTOCOL_VERSION, [], 0)


def test_txt_budget_lists_some_rooms_and_counts_all():
    rooms = [(f"房间{i:02d}-" + "长" * 20, 100 - i) for i in range(100)]
    txt = chatroom.encode_txt("busy host", rooms)
    listed = [k for k in txt if k.startswith("r") and k != "rc"]
    assert 0 < len(listed) < 100
    assert txt["rc"] == "100"
    size = sum(len(k.encode()) + len(v.encode()) + 2 for k, v in txt.items())
    assert size <= chatroom.TXT_BUDGET_BYTES
    assert all(len(k.encode()) + 1 + len(v.encode()) <= 255 for k, v in txt.items())
    name, version, decoded, total = chatroom.decode_txt(as_props(txt))
    assert decoded == rooms[:len(listed)]           # largest first, a prefix
    assert total == 100


ROOM_IDS = st.text(st.characters(categories=("L", "Nd"), exclude_characters="\x00"),
                   min_size=1, max_size=chatroom.MAX_ID_CHARS)


@settings(max_examples=200, deadline=None)
@given(name=st.text(st.characters(categories=("L", "N", "P", "Zs")), max_size=80),
       rooms=st.lists(st.tuples(ROOM_IDS, st.integers(1, chatroom.MAX_ROOM_MEMBERS)),
                      max_size=60))
def test_txt_round_trip_property(name, rooms):
    txt = chatroom.encode_txt(name, rooms)
    size = sum(len(k.encode()) + len(v.encode()) + 2 for k, v in txt.items())
    assert size <= chatroom.TXT_BUDGET_BYTES
    decoded = chatroom.decode_txt(as_props(txt))
    assert decoded is not None
    got_name, version, got_rooms, total = decoded
    assert got_name == chatroom.printable(name[:63])
    assert version == chatroom.PROTOCOL_VERSION
    assert got_rooms == rooms[:len(got_rooms)]
    assert total == len(rooms)


GOOD = {b"v": b"1", b"n": b"host", b"rc": b"1", b"r0": b"2 lobby"}

HOSTILE_NONE = {
    "non_utf8_value": {**GOOD, b"n": b"\xff\xfehost"},
    "non_utf8_key": {**GOOD, b"\xffk": b"x"},
    "missing_v": {k: v for k, v in GOOD.items() if k != b"v"},
    "v_not_a_number": {**GOOD, b"v": b"one"},
    "v_out_of_range": {**GOOD, b"v": b"70000"},
    "v_without_value": {**GOOD, b"v": None},
    "rc_not_a_number": {**GOOD, b"rc": b"many"},
    "rc_float": {**GOOD, b"rc": b"1.5"},
    "name_too_long": {**GOOD, b"n": b"h" * 300},
}


@pytest.mark.parametrize("props", HOSTILE_NONE.values(), ids=HOSTILE_NONE.keys())
def test_hostile_txt_is_not_a_host(props):
    assert chatroom.decode_txt(props) is None


HOSTILE_ROOMS = {
    "count_not_a_number": {**GOOD, b"r0": b"x lobby"},
    "no_room_name": {**GOOD, b"r0": b"3"},
    "empty_room": {**GOOD, b"r0": b""},
    "missing_room": {k: v for k, v in GOOD.items() if k != b"r0"},
    "room_too_long": {**GOOD, b"r0": b"1 " + b"r" * 200},
    "negative_count": {**GOOD, b"r0": b"-1 lobby"},
    # str.isdigit() is true for these, int() refuses them
    "superscript_count": {**GOOD, b"r0": "² lobby".encode()},
    "circled_count": {**GOOD, b"r0": "① lobby".encode()},
}


@pytest.mark.parametrize("props", HOSTILE_ROOMS.values(), ids=HOSTILE_ROOMS.keys())
def test_hostile_txt_rooms_are_skipped(props):
    decoded = chatroom.decode_txt(props)
    assert decoded is not None
    name, version, rooms, total = decoded
    assert (name, version, rooms, total) == ("host", 1, [], 1)


def test_hostile_txt_huge_room_count_is_cheap():
    decoded = chatroom.decode_txt({**GOOD, b"rc": b"9" * 40})
    assert decoded is not None and decoded[2] == [("lobby", 2)]


TXT_KEYS = st.sampled_from([b"v", b"n", b"rc", b"r0", b"r1", b"r2"]) | st.binary(max_size=6)
TXT_VALUES = st.none() | st.binary(max_size=40) | st.text(max_size=20).map(str.encode) | \
    st.builds(lambda n, s: f"{n} {s}".encode(),
              st.text(st.characters(categories=("Nd", "No")), min_size=1, max_size=3),
              st.text(min_size=0, max_size=5))


VALID = {b"v": b"1", b"n": b"host", b"rc": b"3", b"r0": b"3 a", b"r1": b"2 b", b"r2": b"1 c"}


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(TXT_KEYS, TXT_VALUES, max_size=8) |
       st.dictionaries(TXT_KEYS, TXT_VALUES, max_size=3).map(lambda over: {**VALID, **over}))
def test_hostile_txt_never_raises(props):
    # Random records, and valid ones with a few values replaced.
    decoded = chatroom.decode_txt(props)
    if decoded is not None:
        name, version, rooms, total = decoded
        assert type(name) is str and type(version) is int and total >= len(rooms)
        assert all(type(r) is str and type(n) is int and n >= 0 for r, n in rooms)


# --- mDNS in process -------------------------------------------------------------

async def test_advertiser_is_found_updated_and_withdrawn():
    name = unique()
    advertiser = chatroom.Advertiser(name, 47999, LOCAL)   # only advertised, never dialled
    browser = chatroom.HostBrowser(LOCAL)

    def mine() -> list[chatroom.HostInfo]:
        return [h for h in browser.hosts.values() if h.name == name]

    try:
        async with asyncio.timeout(DEADLINE_S):
            await advertiser.start()
        found = await chatroom.discover(5, interface=LOCAL, name=name, settle=0.3)
        assert [(h.name, h.address, h.port, h.rooms, h.rooms_total, h.version)
                for h in found] == [(name, LOCAL, 47999, (), 0, chatroom.PROTOCOL_VERSION)]

        await browser.start()
        await poll(mine)
        advertiser.rooms_changed([("lobby", 5)])
        advertiser.rooms_changed([("二班", 2), ("lobby", 1)])      # a burst: the last wins
        await poll(lambda: mine() and mine()[0].rooms == (("二班", 2), ("lobby", 1)))
        assert mine()[0].rooms_total == 2

        await advertiser.close()
        await poll(lambda: not mine())
    finally:
        await advertiser.close()
        await browser.close()
    assert leftover_mdns_tasks() == []


async def test_advertiser_closed_during_a_pending_update():
    advertiser = chatroom.Advertiser(unique(), 47998, LOCAL)
    try:
        async with asyncio.timeout(DEADLINE_S):
            await advertiser.start()
        advertiser.rooms_changed([("lobby", 1)])        # the update waits to debounce
    finally:
        async with asyncio.timeout(DEADLINE_S):
            await advertiser.close()
            await advertiser.close()                    # twice is harmless
    await asyncio.sleep(chatroom.ADVERTISE_DEBOUNCE_S + 0.2)
    assert leftover_mdns_tasks() == []


async def test_in_process_advertised_host_shows_rooms_and_closes_cleanly():
    name = unique()
    host = chatroom.Host(bind=LOCAL, port=0, name=name, advertise=True, interface=LOCAL)
    browser = chatroom.HostBrowser(LOCAL)
    writer = None

    def mine() -> list[chatroom.HostInfo]:
        return [h for h in browser.hosts.values() if h.name == name]

    try:
        async with asyncio.timeout(DEADLINE_S):
            await host.start()
        await browser.start()
        assert (await poll(mine))[0].port == host.port
        reader, writer = await asyncio.open_connection(LOCAL, host.port)
        writer.write(chatroom.encode(chatroom.Hello(1, "三班", "bob")))
        await poll(lambda: mine() and mine()[0].rooms == (("三班", 1),))
        async with asyncio.timeout(DEADLINE_S):
            await host.close()
        await poll(lambda: not mine())
        assert [t for t in asyncio.all_tasks()
                if t.get_name().startswith(("outbox:", "host:", "mdns:"))] == []
    finally:
        if writer is not None:
            writer.close()
        await browser.close()
        async with asyncio.timeout(DEADLINE_S):
            await host.close()


# --- subprocesses ----------------------------------------------------------------

class Proc:
    """A chatroom.py subprocess whose stdout is JSON lines."""

    def __init__(self, proc: asyncio.subprocess.Process, args: tuple) -> None:
        self.proc = proc
        self.args = args
        self.events: list[dict] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def next_event(self, timeout: float = DEADLINE_S) -> dict | None:
        async with asyncio.timeout(timeout):
            line = await self.proc.stdout.readline()
        if not line:
            return None
        event = json.loads(line.decode("utf-8"))
        self.events.append(event)
        return event

    async def event(self, kind: str, timeout: float = DEADLINE_S) -> dict:
        async with asyncio.timeout(timeout):
            while (event := await self.next_event(timeout)) is not None:
                if event["type"] == kind:
                    return event
        raise AssertionError(f"{self.args}: no {kind!r} event before exit; got {self.events}")

    async def finish(self, timeout: float = DEADLINE_S) -> int:
        """Read stdout to the end and wait for the exit status."""
        async with asyncio.timeout(timeout):
            while await self.next_event(timeout) is not None:
                pass
            return await self.proc.wait()

    async def stop(self) -> None:
        """SIGINT, then SIGKILL if it lingers: only this process, by its PID."""
        if self.proc.returncode is None:
            with _suppress_lookup():
                os.kill(self.pid, signal.SIGINT)
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                with _suppress_lookup():
                    os.kill(self.pid, signal.SIGKILL)
                await self.proc.wait()


class _suppress_lookup:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is ProcessLookupError


@pytest.fixture
async def run(tmp_path):
    """Start chatroom.py subprocesses; every one is stopped afterwards."""
    started: list[Proc] = []

    async def start(*args: str, stdin: bool = False) -> Proc:
        log = open(tmp_path / f"stderr-{len(started)}.txt", "wb")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, CHATROOM, *args,
            stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=log, env=child_env())
        log.close()
        started.append(Proc(proc, args))
        return started[-1]

    yield start
    for proc in started:
        if proc.proc.stdin is not None:
            proc.proc.stdin.close()
        await proc.stop()


async def start_host(run, name: str) -> tuple[Proc, int]:
    host = await run("--host", "--json", "--port", "0", "--interface", LOCAL, "--name", name)
    listening = await host.event("listening", timeout=15)
    assert listening["advertised"] is True and listening["address"] == LOCAL
    assert listening["name"] == name
    return host, listening["port"]


async def discover_cli(run, name: str, timeout: float = 3) -> list[dict]:
    proc = await run("--discover", "--json", "--interface", LOCAL,
                     "--timeout", str(timeout), "--name", name)
    assert await proc.finish(timeout + DEADLINE_S) == 0
    return [e for e in proc.events if e["type"] == "host"]


async def test_discover_subprocess_host_and_its_rooms(run):
    name = unique()
    host, port = await start_host(run, name)

    key = next(e for e in host.events if e["type"] == "listening")["fingerprint"]
    hosts = await discover_cli(run, name)
    assert hosts == [{"type": "host", "name": name, "address": LOCAL, "addresses": [LOCAL],
                      "port": port, "version": chatroom.PROTOCOL_VERSION, "rooms": [],
                      "rooms_total": 0, "fingerprint": key}]

    alice = await run("--cli", "--json", "--server", f"{LOCAL}:{port}",
                      "--room", "二班", "--user", "alice", stdin=True)
    ready = await alice.event("ready")
    assert (ready["room"], ready["user"], ready["port"]) == ("二班", "alice", port)
    await asyncio.sleep(1.5)                # the TXT update is debounced
    async with asyncio.timeout(30):
        while (hosts := await discover_cli(run, name)) and \
                hosts[0]["rooms"] != [{"room": "二班", "members": 1}]:
            pass                            # retried only if the update came late
    assert len(hosts) == 1
    assert (hosts[0]["rooms"], hosts[0]["rooms_total"]) == ([{"room": "二班", "members": 1}], 1)

    alice.proc.stdin.close()                # end of input: leave
    assert await alice.finish() == 0
    assert alice.events[-1] == {"type": "closed", "reason": "quit"}


async def test_cli_joins_the_one_host_it_finds(run):
    name = unique()
    host, port = await start_host(run, name)
    cli = await run("--cli", "--json", "--interface", LOCAL, "--name", name,
                    "--room", "r", "--user", "u", stdin=True)
    ready = await cli.event("ready", timeout=15)
    assert (ready["address"], ready["port"], ready["host"]) == (LOCAL, port, name)
    assert (ready["room"], ready["user"], ready["members"]) == ("r", "u", ["u"])
    cli.proc.stdin.write(b"/quit\n")
    await cli.proc.stdin.drain()
    assert await cli.finish() == 0
    assert cli.events[-1] == {"type": "closed", "reason": "quit"}


async def test_cli_with_two_hosts_of_one_name_is_ambiguous(run):
    name = unique()
    (_, port1), (_, port2) = await asyncio.gather(start_host(run, name),
                                                  start_host(run, name))
    # --settle 3: look for the whole 3 s. With the default 0.6 s, a busy
    # machine that made the second host answer late let the client join the
    # first (a run with two CPU burners beside it failed that way).
    cli = await run("--cli", "--json", "--interface", LOCAL, "--name", name,
                    "--timeout", "3", "--settle", "3", "--room", "r", "--user", "u",
                    stdin=True)
    assert await cli.finish(20) == 1
    errors = [e for e in cli.events if e["type"] == "error"]
    assert [e["code"] for e in errors] == ["ambiguous_host"], cli.events
    hosts = errors[0]["hosts"]
    assert len(hosts) == 2
    assert sorted(h["port"] for h in hosts) == sorted([port1, port2])
    assert all(h["name"] == name and h["address"] == LOCAL for h in hosts)
    assert not any(e["type"] == "ready" for e in cli.events)


async def test_cli_without_a_host_says_so(run):
    cli = await run("--cli", "--json", "--interface", LOCAL, "--name", unique("nobody"),
                    "--timeout", "1", "--room", "r", "--user", "u", stdin=True)
    assert await cli.finish(15) == 1
    assert [e["code"] for e in cli.events if e["type"] == "error"] == ["no_host"]
    assert not any(e["type"] == "ready" for e in cli.events)
    said = next(e["message"] for e in cli.events if e["type"] == "error")
    assert "looked on lo (127.0.0.1)" in said and "--server" in said, said  # where, what next


async def test_host_shutdown_withdraws_the_record(run):
    name = unique()
    host, port = await start_host(run, name)
    browser = chatroom.HostBrowser(LOCAL)

    def mine() -> list[chatroom.HostInfo]:
        return [h for h in browser.hosts.values() if h.name == name]

    try:
        await browser.start()
        assert (await poll(mine))[0].port == port
        member = await run("--cli", "--json", "--server", f"{LOCAL}:{port}",
                           "--room", "r", "--user", "bob", "--retry-for", "0", stdin=True)
        await member.event("ready")

        os.kill(host.pid, signal.SIGINT)
        assert await host.finish() == 0
        assert host.events[-1] == {"type": "closed", "reason": "host_shutdown"}
        assert await member.finish() == 3           # the host ended the session
        assert member.events[-1] == {"type": "closed", "reason": "host_shutdown"}
        await poll(lambda: not mine())
    finally:
        await browser.close()
