"""Coming back after a drop, on the host (chatroom.py: WIRE's hello, welcome
and resumed; ROOMS' log and resume; HOST's seats and grace period).

A member whose connection drops keeps its seat for the grace period: the
room is not told it left, its ID can't be taken, its calls go on. A client
that logs in again with the welcome's resume token sits down again and gets
every room event it missed, once, in order; after the grace period the room
is told it left, and the token is forgotten. Raw clients on 127.0.0.1 speak
the protocol by hand, so each rule is seen exactly as a client sees it.
"""

from __future__ import annotations

import asyncio

import pytest
from test_host import RawClient
from test_host import clients as clients  # a fixture

import chatroom
from chatroom import (
    CallEnded,
    CallStart,
    Error,
    Hello,
    Message,
    Resumed,
    Say,
    System,
    Welcome,
)

V = chatroom.PROTOCOL_VERSION
DEADLINE_S = 10.0


async def seated(clients, port: int, room: str, user: str) -> tuple[RawClient, Welcome]:
    client = await clients(port)
    client.send(Hello(V, room, user))
    welcome = await client.until(lambda e: isinstance(e, (Welcome, Error)))
    assert isinstance(welcome, Welcome), welcome
    return client, welcome


async def come_back(clients, port: int, room: str, user: str, token: str, seen: int):
    """A new connection that says the token: (client, Resumed or Welcome or Error)."""
    client = await clients(port)
    client.send(Hello(V, room, user, "", token, seen))
    answer = await client.until(lambda e: isinstance(e, (Resumed, Welcome, Error)))
    return client, answer


class Watcher:
    """A seated client whose every event is kept (RawClient.until drops
    what it skips), to check what a room saw."""

    def __init__(self, client: RawClient) -> None:
        self.client = client
        self.seen: list[chatroom.Event] = []

    async def until(self, wanted) -> chatroom.Event:
        async with asyncio.timeout(DEADLINE_S):
            while True:
                event = await self.client.next()
                assert event is not None, f"closed; saw {self.seen}"
                self.seen.append(event)
                if wanted(event):
                    return event

    async def say(self, text: str, msg_id: str) -> Message:
        self.client.send(Say(msg_id, text))
        return await self.until(lambda e: isinstance(e, Message) and e.id == msg_id)

    def notices_about(self, user: str) -> list[System]:
        return [e for e in self.seen if isinstance(e, System) and e.user == user]


def drop(client: RawClient) -> None:
    """The connection just goes (a reset, like a laptop off Wi-Fi)."""
    client.writer.transport.abort()


async def host_saw_it_go(host, user: str) -> None:
    """Wait until the host holds `user`'s seat (it noticed the drop)."""
    async with asyncio.timeout(DEADLINE_S):
        while not any(seat.away_since is not None and host.rooms.user_of(seat) == user
                      for seat in host.seats.values()):
            await asyncio.sleep(0.01)


async def test_the_welcome_carries_a_secret_token_and_the_grace(make_host, clients):
    host = await make_host(grace_s=42)
    _alice, welcome = await seated(clients, host.port, "r", "alice")
    _bob, other = await seated(clients, host.port, "r", "bob")
    assert welcome.grace == 42 and len(welcome.resume) == 32
    assert welcome.resume != other.resume
    no_hold = await make_host(grace_s=0)
    _carol, plain = await seated(clients, no_hold.port, "r", "carol")
    assert (plain.resume, plain.grace) == ("", 0)


async def test_back_within_the_grace_period_gets_what_it_missed_once_in_order(
        make_host, clients):
    host = await make_host(grace_s=30)
    alice, welcome = await seated(clients, host.port, "房间", "alice")
    bob = Watcher((await seated(clients, host.port, "房间", "bob"))[0])
    seen = (await alice.until(lambda e: isinstance(e, System) and e.user == "bob")).seq
    drop(alice)
    await host_saw_it_go(host, "alice")
    said = [await bob.say(f"while you were out {n}", f"b{n}") for n in range(5)]
    await seated(clients, host.port, "房间", "carol")

    back, answer = await come_back(clients, host.port, "房间", "alice", welcome.resume, seen)
    assert isinstance(answer, Resumed), answer
    assert (answer.room, answer.user, answer.missed, answer.lost) == ("房间", "alice", 6, 0)
    assert answer.members == ("alice", "bob", "carol")
    replay = [await back.next() for _ in range(answer.missed)]
    assert [e.seq for e in replay] == list(range(seen + 1, seen + 7))       # in order, once
    assert [e.text for e in replay if isinstance(e, Message)] == [m.text for m in said]
    assert isinstance(replay[-1], System) and replay[-1].user == "carol"
    assert not any(e.history for e in replay if isinstance(e, Message))
    # Live again: what bob says now arrives, and nobody saw alice leave or come.
    await bob.say("welcome back", "b9")
    assert (await back.until(lambda e: isinstance(e, Message))).text == "welcome back"
    assert bob.notices_about("alice") == []


async def test_a_resent_line_is_confirmed_not_doubled(make_host, clients):
    host = await make_host(grace_s=30)
    alice, welcome = await seated(clients, host.port, "r", "alice")
    bob = Watcher((await seated(clients, host.port, "r", "bob"))[0])
    first = await alice.say_and_confirm("did this arrive?", "a1")
    drop(alice)
    await host_saw_it_go(host, "alice")
    back, answer = await come_back(clients, host.port, "r", "alice", welcome.resume,
                                   first.seq - 1)      # it never saw the confirmation
    assert isinstance(answer, Resumed) and answer.missed >= 1
    back.send(Say("a1", "did this arrive?"))    # the client sends what it wasn't sure of
    again = await back.until(lambda e: isinstance(e, Message) and e.id == "a1"
                             and e.seq == first.seq and not e.history)
    assert again.seq == first.seq
    await bob.say("sentinel", "b1")
    texts = [e.text for e in bob.seen if isinstance(e, Message)]
    assert texts.count("did this arrive?") == 1, texts


async def test_nobody_can_take_a_held_id_or_its_seat_with_a_wrong_token(make_host, clients):
    host = await make_host(grace_s=30)
    alice, welcome = await seated(clients, host.port, "r", "alice")
    drop(alice)
    await host_saw_it_go(host, "alice")
    mallory = await clients(host.port)
    mallory.send(Hello(V, "r", "ALICE"))
    refused = await mallory.until(lambda e: isinstance(e, (Welcome, Error)))
    assert isinstance(refused, Error) and refused.code == "user_taken", refused
    for token, room, user in (("00" * 16, "r", "alice"), (welcome.resume, "r", "bob"),
                              (welcome.resume, "elsewhere", "alice")):
        _, answer = await come_back(clients, host.port, room, user, token, 0)
        assert not isinstance(answer, Resumed), (token, room, user, answer)
    _, answer = await come_back(clients, host.port, "r", "alice", welcome.resume, 0)
    assert isinstance(answer, Resumed)          # the right token still works


async def test_after_the_grace_period_the_room_is_told_and_the_token_is_forgotten(
        make_host, clients):
    host = await make_host(grace_s=0.3)
    alice, welcome = await seated(clients, host.port, "r", "alice")
    bob, _ = await seated(clients, host.port, "r", "bob")
    drop(alice)
    left = await bob.until(lambda e: isinstance(e, System) and e.event == "leave")
    assert left.user == "alice" and "(connection lost)" in left.text, left
    _, answer = await come_back(clients, host.port, "r", "alice", welcome.resume, 0)
    assert isinstance(answer, Welcome) and answer.resume != welcome.resume   # a new seat


async def test_a_resume_replaces_a_connection_the_host_still_thinks_alive(make_host, clients):
    """The client may notice its connection is dead long before the host
    does: the resume takes the seat at once, and the old connection goes
    without a leave notice."""
    host = await make_host(grace_s=30)
    alice, welcome = await seated(clients, host.port, "r", "alice")
    bob = Watcher((await seated(clients, host.port, "r", "bob"))[0])
    seen = (await alice.until(lambda e: isinstance(e, System) and e.user == "bob")).seq
    back, answer = await come_back(clients, host.port, "r", "alice", welcome.resume, seen)
    assert isinstance(answer, Resumed) and answer.missed == 0
    assert await alice.rest() == []         # the old connection is closed, no goodbye
    await bob.say("to the new one", "b1")
    assert (await back.until(lambda e: isinstance(e, Message))).text == "to the new one"
    assert bob.notices_about("alice") == []


async def test_too_much_missed_is_counted_as_lost(make_host, clients):
    host = await make_host(grace_s=30, resume_log_events=4)
    alice, welcome = await seated(clients, host.port, "r", "alice")
    bob, _ = await seated(clients, host.port, "r", "bob")
    seen = (await alice.until(lambda e: isinstance(e, System) and e.user == "bob")).seq
    drop(alice)
    await host_saw_it_go(host, "alice")
    for n in range(10):
        await bob.say_and_confirm(f"m{n}", f"b{n}")
    back, answer = await come_back(clients, host.port, "r", "alice", welcome.resume, seen)
    assert isinstance(answer, Resumed)
    assert (answer.missed, answer.lost) == (4, 6)
    replay = [await back.next() for _ in range(4)]
    assert [e.text for e in replay] == ["m6", "m7", "m8", "m9"]


async def test_a_call_survives_its_members_short_drop(make_host, clients):
    host = await make_host(grace_s=0.8)
    alice, welcome = await seated(clients, host.port, "r", "alice")
    bob = Watcher((await seated(clients, host.port, "r", "bob"))[0])
    for client in (alice, bob.client):
        client.send(chatroom.MediaPort(40000, ("opus",)))
    alice.send(chatroom.Call("bob"))
    await bob.until(lambda e: isinstance(e, chatroom.CallInvite))
    bob.client.send(chatroom.Call("alice"))
    await bob.until(lambda e: isinstance(e, CallStart))
    drop(alice)
    await host_saw_it_go(host, "alice")
    back, answer = await come_back(clients, host.port, "r", "alice", welcome.resume, 0)
    assert isinstance(answer, Resumed)
    # Past the grace period the seat is not away: nothing ends. (A timed wait
    # here shows an absence; the ping below orders what bob has been sent.)
    await asyncio.sleep(1.2)
    bob.client.send(chatroom.Ping(77))
    await bob.until(lambda e: isinstance(e, chatroom.Pong) and e.n == 77)
    assert not [e for e in bob.seen if isinstance(e, CallEnded)], bob.seen
    # A drop longer than the grace ends it, and says why.
    drop(back)
    ended = await bob.until(lambda e: isinstance(e, CallEnded))
    assert (ended.peer, ended.reason) == ("alice", "lost")


@pytest.mark.parametrize("grace", [30.0])
async def test_the_host_told_to_leave_never_holds_the_seat(make_host, clients, grace):
    """bye is leaving on purpose: no hold, the room is told at once."""
    host = await make_host(grace_s=grace)
    alice, welcome = await seated(clients, host.port, "r", "alice")
    bob, _ = await seated(clients, host.port, "r", "bob")
    alice.send(chatroom.Bye())
    left = await bob.until(lambda e: isinstance(e, System) and e.event == "leave")
    assert left.user == "alice" and left.text == "[SYSTEM] alice left the room"
    _, answer = await come_back(clients, host.port, "r", "alice", welcome.resume, 0)
    assert isinstance(answer, Welcome)
