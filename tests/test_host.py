"""The host (chatroom.py, HOST) and the client core (CLIENT CORE), in process.

Every host here listens on 127.0.0.1 with port 0 and no mDNS. Peers are raw
asyncio connections speaking the wire protocol through chatroom's own helpers
(`encode`, `Wire`, `FrameDecoder`), or `ClientCore` instances, each with its
own loop thread.

No test asserts on how long something took: the deadlines below only make a
hang fail fast (the machine is shared and noisy).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import struct
import threading

import pytest

import chatroom
from chatroom import (
    Bye,
    Closing,
    Error,
    Hello,
    Limits,
    Message,
    Ping,
    Role,
    Say,
    System,
    Welcome,
    Who,
    Wire,
    encode,
)

LOCAL = "127.0.0.1"
DEADLINE_S = 10.0                   # "this hangs" deadline for one step
HOST_TASK_PREFIXES = ("outbox:", "host:", "mdns:")


# --- helpers -----------------------------------------------------------------

class RawClient:
    """A client made of a bare asyncio connection and chatroom's wire helpers.

    Frames we send go through a client-side `Wire` (so they are legal),
    except those sent with `send_raw`. Frames we read go through the same
    Wire, so a host that sends something the protocol forbids (anything
    after an error, say) fails the test with RemoteError.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.wire = Wire(Role.CLIENT)
        self.pending: collections.deque = collections.deque()
        self.eof = False
        self.reset = False              # the host aborted (RST) rather than closed

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection(LOCAL, port)
        return cls(reader, writer)

    def send(self, event: chatroom.Event) -> None:
        self.writer.write(self.wire.send(event))

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def next(self, timeout: float = DEADLINE_S) -> chatroom.Event | None:
        """The next event from the host; None once the host has closed."""
        async with asyncio.timeout(timeout):
            while not self.pending:
                if self.eof:
                    return None
                try:
                    data = await self.reader.read(64 * 1024)
                except ConnectionResetError:
                    data, self.reset = b"", True
                if not data:
                    self.eof = True
                self.pending.extend(self.wire.receive(data))
            return self.pending.popleft()

    async def until(self, wanted, timeout: float = DEADLINE_S) -> chatroom.Event:
        """Read until an event for which wanted(event) is true; fail at EOF."""
        seen = []
        async with asyncio.timeout(timeout):
            while True:
                event = await self.next(timeout)
                assert event is not None, f"connection closed; got only {seen}"
                if wanted(event):
                    return event
                seen.append(event)

    async def rest(self, timeout: float = DEADLINE_S) -> list[chatroom.Event]:
        """Every event until the host closes the connection."""
        events = []
        async with asyncio.timeout(timeout):
            while (event := await self.next(timeout)) is not None:
                events.append(event)
        return events

    async def login(self, room: str, user: str) -> Welcome:
        self.send(Hello(chatroom.PROTOCOL_VERSION, room, user))
        answer = await self.until(lambda e: isinstance(e, (Welcome, Error)))
        assert isinstance(answer, Welcome), answer
        return answer

    async def say_and_confirm(self, text: str, msg_id: str) -> Message:
        self.send(Say(msg_id, text))
        return await self.until(lambda e: isinstance(e, Message) and e.id == msg_id)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 2)


@pytest.fixture
async def clients():
    """Open RawClients; every one is closed afterwards."""
    opened: list[RawClient] = []

    async def connect(port: int, room: str | None = None, user: str | None = None):
        client = await RawClient.connect(port)
        opened.append(client)
        if room is not None:
            await client.login(room, user)
        return client

    yield connect
    for client in opened:
        await client.close()


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def host_tasks() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith(HOST_TASK_PREFIXES)]


# --- broken streams ------------------------------------------------------------

BROKEN_STREAMS = {
    "http_request": b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "binary_body": frame(b"\x00\x01\x02 file data before login"),
    "not_json": frame(b"{this is not json}"),
    "4gib_length_prefix": b"\xff\xff\xff\xff" + b"x" * 64,
    "invalid_utf8": frame(b'{"type":"hello","version":1,"room":"r","user":"\xff\xfe"}'),
    "json_array": frame(b'[{"type":"hello","version":1,"room":"r","user":"u"}]'),
    "unknown_type": frame(b'{"type":"dance","steps":3}'),
    "say_before_hello": encode(Say("m1", "hello before hello")),
    "lone_surrogate": frame(b'{"type":"hello","version":1,"room":"r","user":"\\ud800"}'),
    "duplicate_keys": frame(b'{"type":"hello","version":1,"room":"r","user":"a","user":"b"}'),
    "nan": frame(b'{"type":"hello","version":NaN,"room":"r","user":"u"}'),
    "missing_field": frame(b'{"type":"hello","version":1,"room":"r"}'),
    "empty_frame": frame(b""),
}


@pytest.mark.parametrize("stream", BROKEN_STREAMS.values(), ids=BROKEN_STREAMS.keys())
async def test_broken_stream_gets_one_bad_frame_error_and_eof(make_host, clients, stream):
    host = await make_host()
    alice = await clients(host.port, "lobby", "alice")
    await alice.say_and_confirm("before", "a1")

    bad = await clients(host.port)
    bad.send_raw(stream)
    events = await bad.rest()
    assert [type(e) for e in events] == [Error], events
    assert events[0].code == "bad_frame"
    assert bad.eof

    # The session already in the room is untouched and the room still works.
    confirmed = await alice.say_and_confirm("after", "a2")
    assert (confirmed.sender, confirmed.text) == ("alice", "after")
    bob = await clients(host.port, "lobby", "bob")
    enter = await alice.until(lambda e: isinstance(e, System))
    assert (enter.event, enter.user) == ("enter", "bob")
    message = await bob.say_and_confirm("hi alice", "b1")
    got = await alice.until(lambda e: isinstance(e, Message))
    assert got == message


async def test_stream_ending_inside_a_frame_gets_bad_frame(make_host, clients):
    host = await make_host()
    bad = await clients(host.port)
    bad.send_raw(encode(Hello(1, "r", "u"))[:10])
    bad.writer.write_eof()              # half-close: we can still read the answer
    events = await bad.rest()
    assert [(type(e), e.code) for e in events] == [(Error, "bad_frame")]


async def test_member_breaking_the_protocol_leaves_with_notice(make_host, clients):
    host = await make_host()
    alice = await clients(host.port, "lobby", "alice")
    mallory = await clients(host.port, "lobby", "mallory")
    mallory.send_raw(frame(b'{"type":"say","id":"x","text":"\\udfff"}'))
    events = await mallory.rest()
    assert [e.code for e in events if isinstance(e, Error)] == ["bad_frame"]
    assert isinstance(events[-1], Error)
    leave = await alice.until(lambda e: isinstance(e, System) and e.event == "leave")
    assert leave.user == "mallory"
    assert (await alice.say_and_confirm("still here", "a1")).text == "still here"


async def test_many_members_leaving_at_once_break_nothing(make_host, clients, caplog):
    """Twenty members drop at the same moment while the room still has
    others. This used to raise LocalError in the handler of whichever session
    delivered a leave notice to a peer whose end was already closed."""
    host = await make_host(grace_s=0.2)     # then the seats go, all at once
    stayer = await clients(host.port, "lobby", "stayer")
    leavers = [await clients(host.port, "lobby", f"leaver{i}") for i in range(20)]
    with caplog.at_level("ERROR", logger="chatroom"):
        for leaver in leavers:
            leaver.writer.transport.abort()         # all gone in one loop turn
        left = set()
        while len(left) < len(leavers):
            notice = await stayer.until(lambda e: isinstance(e, System) and e.event == "leave")
            left.add(notice.user)
    assert left == {f"leaver{i}" for i in range(20)}
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
    newcomer = await clients(host.port, "lobby", "newcomer")
    assert (await newcomer.say_and_confirm("the host is fine", "n1")).text == "the host is fine"


# --- login ---------------------------------------------------------------------

async def test_login_timeout_silent_and_slowloris(make_host, clients):
    host = await make_host(hello_timeout_s=0.5)
    silent = await clients(host.port)
    slowloris = await clients(host.port)
    slowloris.send_raw(encode(Hello(1, "r", "slow"))[:5])   # the header and one byte
    prompt = await clients(host.port, "r", "prompt")         # logged in in time

    for client in (silent, slowloris):
        events = await client.rest(timeout=5)
        assert [(type(e), e.code) for e in events] == [(Error, "login_timeout")]

    # The deadline is for logging in only: a member may then stay quiet.
    await asyncio.sleep(1.2)
    assert (await prompt.say_and_confirm("still in", "p1")).sender == "prompt"


async def test_version_mismatch(make_host, clients):
    host = await make_host()
    client = await clients(host.port)
    client.send(Hello(999, "r", "future"))
    events = await client.rest()
    assert [(type(e), e.code) for e in events] == [(Error, "version_mismatch")]
    assert client.eof


async def test_max_sessions_refuses_the_next_connection(make_host, clients):
    host = await make_host(max_sessions=2)
    first = await clients(host.port, "r", "first")
    second = await clients(host.port)                 # connected, not logged in
    third = await clients(host.port)
    events = await third.rest()
    assert [(type(e), e.code) for e in events] == [(Error, "host_full")]

    # A freed slot can be used again.
    first.send(Bye())
    assert (await first.rest())[-1] == Closing("bye")
    async with asyncio.timeout(DEADLINE_S):
        while True:
            fourth = await clients(host.port)
            fourth.send(Hello(1, "r", "fourth"))
            answer = await fourth.until(lambda e: isinstance(e, (Welcome, Error)))
            if isinstance(answer, Welcome):
                break
            assert answer.code == "host_full"   # the first may still be closing
            await asyncio.sleep(0.05)
    await second.login("r", "second")


# --- slow peers ----------------------------------------------------------------

async def test_slow_peer_is_disconnected_while_others_get_everything(make_host, clients):
    host = await make_host(outbox_limit_bytes=64 * 1024, grace_s=0.2,
                           rate_limit_per_s=0)          # thousands of lines: no flood control
    slow = await clients(host.port, "r", "slow")        # never reads again
    fast = await clients(host.port, "r", "fast")
    sender = await clients(host.port, "r", "sender")
    pad = "x" * 8192
    max_messages = 6000                                 # ~48 MiB: far past any buffer
    window = 4                                          # messages in flight at most

    fast_events: list[chatroom.Event] = []
    sender_notices: list[System] = []
    confirmed = 0
    progress = asyncio.Event()

    async def read_fast() -> None:
        while (event := await fast.next(30)) is not None:
            fast_events.append(event)
            progress.set()

    async def read_sender() -> None:
        nonlocal confirmed
        while (event := await sender.next(30)) is not None:
            if isinstance(event, Message):
                confirmed += 1
                progress.set()
            elif isinstance(event, System):
                sender_notices.append(event)

    def slow_left() -> System | None:
        return next((e for e in fast_events if isinstance(e, System)
                     and e.event == "leave" and e.user == "slow"), None)

    def fast_messages() -> list[Message]:
        return [e for e in fast_events if isinstance(e, Message)]

    readers = [asyncio.create_task(read_fast()), asyncio.create_task(read_sender())]
    try:
        sent, left_at = 0, None
        async with asyncio.timeout(90):
            while sent < max_messages:
                if left_at is None and slow_left() is not None:
                    left_at = sent
                if left_at is not None and sent >= left_at + 20:
                    break
                # Pace the sender so the fast readers' outboxes never hold
                # more than `window` messages: only the slow peer falls behind.
                while sent - min(len(fast_messages()), confirmed) >= window:
                    progress.clear()
                    await progress.wait()
                sender.send(Say(f"m{sent}", f"{sent} {pad}"))
                sent += 1
                await sender.writer.drain()
            assert left_at is not None, f"slow peer still connected after {sent} messages"
            while len(fast_messages()) < sent or confirmed < sent:
                progress.clear()
                await progress.wait()
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)

    notice = slow_left()
    assert notice.text == "[SYSTEM] slow left the room (too slow)", notice
    assert notice in sender_notices
    messages = fast_messages()
    assert [m.id for m in messages] == [f"m{i}" for i in range(sent)]
    assert all(m.text == f"{i} {pad}" and m.sender == "sender" for i, m in enumerate(messages))
    room_events = [e for e in fast_events if isinstance(e, (Message, System))]
    seqs = [e.seq for e in room_events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "gap or reorder in seq"
    assert not any(isinstance(e, Error) for e in fast_events)

    # The slow peer's connection really is gone (after its buffered bytes).
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(DEADLINE_S):
            while await slow.reader.read(1 << 20):
                pass
    # And the room goes on without it.
    sender.send(Who())
    members = await sender.until(lambda e: isinstance(e, chatroom.Members))
    assert members.members == ("fast", "sender")
    assert (await sender.say_and_confirm("done", "last")).text == "done"


# --- shutdown ------------------------------------------------------------------

async def test_shutdown_says_goodbye_and_leaves_nothing_behind(clients):
    before = asyncio.all_tasks()
    limits = Limits(close_timeout_s=1.0)
    host = chatroom.Host(bind=LOCAL, port=0, name="test-host", advertise=False, limits=limits)
    await host.start()
    try:
        members = [await clients(host.port, "r", f"user{i}") for i in range(3)]
        for i, member in enumerate(members):
            await member.say_and_confirm(f"hello {i}", f"m{i}")
        lurker = await clients(host.port)               # connected, never logs in
        assert host_tasks()

        async with asyncio.timeout(limits.close_timeout_s + 5):
            await host.close()

        for member in members:
            events = await member.rest(timeout=5)
            assert events and isinstance(events[-1], Closing), events
            assert events[-1].reason == "host_shutdown"
            assert member.eof and not member.reset
        assert await lurker.rest(timeout=5) == []
        assert host_tasks() == []
        leftovers = asyncio.all_tasks() - before - {asyncio.current_task()}
        assert not leftovers, leftovers

        async with asyncio.timeout(2):
            await host.close()                      # twice is harmless
    finally:
        async with asyncio.timeout(DEADLINE_S):
            await host.close()


async def test_shutdown_does_not_hang_on_a_peer_that_never_reads(clients):
    limits = Limits(close_timeout_s=0.5, rate_limit_per_s=0)    # up to 3000 lines, quickly
    host = chatroom.Host(bind=LOCAL, port=0, name="test-host", advertise=False, limits=limits)
    await host.start()
    try:
        await clients(host.port, "r", "stuck")               # never reads again
        talker = await clients(host.port, "r", "talker")
        talker.writer.transport.set_write_buffer_limits(0)
        session = next(s for s in host.sessions
                       if host.rooms.user_of(s.seat) == "stuck")
        pad = "y" * 8192
        async with asyncio.timeout(60):
            for i in range(3000):                          # until stuck's outbox backs up
                await talker.say_and_confirm(f"{i} {pad}", f"t{i}")
                if session.link.queued_bytes:
                    break
        assert session.link.queued_bytes, "could not fill the stuck peer's buffers"

        async with asyncio.timeout(limits.close_timeout_s + 5):
            await host.close()
        events = await talker.rest(timeout=5)
        assert events and isinstance(events[-1], Closing)
        assert events[-1].reason == "host_shutdown"
        assert host_tasks() == []
    finally:
        async with asyncio.timeout(DEADLINE_S):
            await host.close()


async def test_close_without_start_returns():
    # A Host whose start() was never reached (or failed before binding) is
    # closed by a fixture's teardown: close() must return, not wait forever.
    host = chatroom.Host(bind=LOCAL, port=0, advertise=False)
    async with asyncio.timeout(3):
        await host.close()


# --- the client core -----------------------------------------------------------

class Events:
    """Collects a ClientCore's events (delivered on the core's thread)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.all: list[dict] = []
        self.lock = threading.Lock()
        self.changed = asyncio.Event()

    def __call__(self, event: dict) -> None:
        with self.lock:
            self.all.append(event)
        with contextlib.suppress(RuntimeError):     # the test's loop may be gone
            self.loop.call_soon_threadsafe(self.changed.set)

    def snapshot(self) -> list[dict]:
        with self.lock:
            return list(self.all)

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.snapshot() if e["type"] == kind]

    async def wait_for(self, wanted, timeout: float = DEADLINE_S) -> dict:
        async with asyncio.timeout(timeout):
            while True:
                self.changed.clear()
                for event in self.snapshot():
                    if wanted(event):
                        return event
                await self.changed.wait()


@pytest.fixture
async def cores():
    """Start ClientCores; every one is stopped (thread joined) afterwards."""
    started: list[chatroom.ClientCore] = []

    def make(limits: Limits = Limits()) -> tuple[chatroom.ClientCore, Events]:
        events = Events()
        core = chatroom.ClientCore(events, limits)
        core.start()
        started.append(core)
        return core, events

    yield make
    for core in started:
        await asyncio.to_thread(core.stop)


async def test_client_core_round_trip(make_host, cores):
    host = await make_host(name="round-trip-host")
    threads_before = set(threading.enumerate())
    alice, alice_events = cores()
    bob, bob_events = cores()
    core_threads = set(threading.enumerate()) - threads_before
    assert len(core_threads) == 2

    assert await asyncio.wrap_future(alice.join(LOCAL, host.port, "二班", "alice"))
    ready = alice_events.of("ready")[0]
    assert ready == {"type": "ready", "room": "二班", "user": "alice", "members": ["alice"],
                     "host": "round-trip-host", "address": LOCAL, "port": host.port,
                     "max_file_size": chatroom.MAX_FILE_SIZE, "grace": chatroom.GRACE_S,
                     "protected": False, "rate": chatroom.RATE_LIMIT_PER_S,
                     "burst": chatroom.BURST,
                     "fingerprint": "", "encrypted": False}   # in-process: plain TCP
    assert alice.connected
    assert await asyncio.wrap_future(bob.join(LOCAL, host.port, "二班", "bob"))
    assert bob_events.of("ready")[0]["members"] == ["alice", "bob"]
    enter = await alice_events.wait_for(lambda e: e["type"] == "system" and e["user"] == "bob")
    assert enter["event"] == "enter" and enter["text"] == "[SYSTEM] bob entered the room"

    msg_id = await asyncio.wrap_future(alice.say("你好, bob\nsecond line"))
    assert msg_id
    for events in (alice_events, bob_events):
        got = await events.wait_for(lambda e: e["type"] == "message")
        assert (got["from"], got["text"], got["id"], got["history"]) == \
            ("alice", "你好, bob\nsecond line", msg_id, False)

    assert await asyncio.wrap_future(bob.who())
    members = await bob_events.wait_for(lambda e: e["type"] == "members")
    assert members["members"] == ["alice", "bob"]

    assert await asyncio.wrap_future(bob.say("HELP")) is not None
    await bob_events.wait_for(lambda e: e["type"] == "help")
    last = await asyncio.wrap_future(bob.say("sync"))
    await alice_events.wait_for(lambda e: e["type"] == "message" and e["id"] == last)
    assert alice_events.of("help") == []               # help went to bob alone

    await asyncio.to_thread(alice.stop)
    assert alice_events.snapshot()[-1] == {"type": "closed", "reason": "quit"}
    assert len(alice_events.of("closed")) == 1
    assert not alice.connected
    leave = await bob_events.wait_for(lambda e: e["type"] == "system" and e["event"] == "leave")
    assert (leave["user"], leave["text"]) == ("alice", "[SYSTEM] alice left the room")

    assert await asyncio.wrap_future(bob.leave()) is None
    assert bob_events.snapshot()[-1] == {"type": "closed", "reason": "quit"}
    await asyncio.to_thread(bob.stop)
    for thread in core_threads:
        thread.join(5)
        assert not thread.is_alive()
    assert host.rooms.summary() == []


async def test_client_core_refused_login_and_host_shutdown(make_host, cores):
    host = await make_host()
    alice, alice_events = cores(Limits(retry_for_s=0))     # the shutdown is the end
    other, other_events = cores()
    assert await asyncio.wrap_future(alice.join(LOCAL, host.port, "r", "Alice"))
    assert not await asyncio.wrap_future(other.join(LOCAL, host.port, "r", "alice"))
    await other_events.wait_for(lambda e: e["type"] == "closed")
    assert [e["type"] for e in other_events.snapshot()] == ["warning", "error", "closed"]
    assert other_events.of("error")[0]["code"] == "user_taken"
    assert other_events.of("closed")[0]["reason"] == "refused"

    async with asyncio.timeout(DEADLINE_S):
        await host.close()
    closed = await alice_events.wait_for(lambda e: e["type"] == "closed")
    assert closed["reason"] == "host_shutdown"
    assert alice_events.snapshot()[-1] == closed


# --- pings ---------------------------------------------------------------------

PING_LIMITS = dict(ping_interval_s=0.3, peer_silence_s=1.0)


async def after_a_tick(clients, port: int) -> float:
    """Return just after one of the host's housekeeping ticks (loop time).

    The host pings, and drops silent peers, only at its ticks (every
    chatroom.TICK_S). A probe in a room of its own is either pinged or
    dropped at a tick; either marks one.
    """
    probe = await clients(port, "probe-room", "probe")
    async with asyncio.timeout(DEADLINE_S):
        while (event := await probe.next()) is not None and not isinstance(event, Ping):
            pass
    return asyncio.get_running_loop().time()


async def test_peer_that_never_answers_pings_is_dropped(make_host, clients):
    host = await make_host(**PING_LIMITS, grace_s=0.2)
    observer = await clients(host.port, "r", "observer")

    async def chatter() -> None:                # never silent: never pinged
        while True:
            observer.send(Who())
            await asyncio.sleep(0.2)

    chatting = asyncio.create_task(chatter())
    try:
        # Join 0.1 s after a tick: silent 0.9 s at the next one, so pinged there.
        await after_a_tick(clients, host.port)
        await asyncio.sleep(0.1)
        mute = await clients(host.port, "r", "mute")
        events = await mute.rest(timeout=8)   # reads everything, answers nothing
        leave = await observer.until(
            lambda e: isinstance(e, System) and e.event == "leave", timeout=5)
    finally:
        chatting.cancel()
        await asyncio.gather(chatting, return_exceptions=True)
    assert any(isinstance(e, Ping) for e in events), events
    assert leave.user == "mute" and "connection lost" in leave.text, leave
    assert not any(isinstance(e, System) and e.event == "leave" and e.user == "observer"
                   for e in events)


async def test_client_core_answering_pings_stays_connected(make_host, clients, cores):
    # A peer that answers every ping must never be dropped, whenever it
    # joined. Join 0.2 s before a tick: it is silent 0.8 s at the tick
    # after, so not pinged yet (ping_interval_s 0.3 counts from the last
    # byte), and must be pinged, not dropped, at the one after that.
    host = await make_host(**PING_LIMITS)
    tick = await after_a_tick(clients, host.port)
    await asyncio.sleep(0.8)

    core, events = cores()
    assert await asyncio.wrap_future(core.join(LOCAL, host.port, "r", "pinged"))
    joined = asyncio.get_running_loop().time() - tick
    await asyncio.sleep(2.5)
    assert events.of("closed") == [], (
        f"dropped (joined {joined:.2f} s after a tick); events: {events.snapshot()}")
    assert core.connected
    msg_id = await asyncio.wrap_future(core.say("still here"))
    got = await events.wait_for(lambda e: e["type"] == "message" and e["id"] == msg_id)
    assert got["text"] == "still here"


async def test_start_on_a_taken_port_raises_and_close_returns(make_host):
    """A failed start undoes itself. This used to leave close() waiting
    forever, so the window's "Host a room here" never answered."""
    first = await make_host()
    second = chatroom.Host(bind=LOCAL, port=first.port, name="second", advertise=False)
    with pytest.raises(OSError):
        await second.start()
    async with asyncio.timeout(DEADLINE_S):
        await second.close()
    assert not os.path.exists(second.files.spool_dir)
