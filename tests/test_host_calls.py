"""Call signalling in the host (chatroom.py: HostCalls), with raw peers.

An in-process host on 127.0.0.1; each person is a RawClient speaking the
wire protocol. No media flows here: these tests check who is told what
(invitations, the timeout, decline, links with addresses and keys, hang
ups, leaving) and that the media relay passes sealed packets only between
the two ends of a link. Deadlines only make a hang fail fast.
"""

from __future__ import annotations

import asyncio

import pytest
from test_host import DEADLINE_S, RawClient

import chatroom
from chatroom import (
    Bye,
    Call,
    CallEnded,
    CallFailed,
    CallInvite,
    CallMissed,
    CallStart,
    Decline,
    Error,
    Hangup,
    MediaData,
    MediaPort,
    RelayMedia,
)


async def person(host: chatroom.Host, user: str, room: str = "r", port: int = 0,
                 codecs: tuple = ("vp8", "jpeg", "opus", "pcm")) -> RawClient:
    client = await RawClient.connect(host.port)
    await client.login(room, user)
    client.send(MediaPort(port, codecs))
    client.user = user
    return client


async def nothing_more(client: RawClient, kinds: tuple) -> None:
    """`client` got no event of `kinds` before a Who round trip completes."""
    client.send(chatroom.Who())
    seen = []
    while not isinstance(event := await client.next(), chatroom.Members):
        seen.append(event)
    assert not [e for e in seen if isinstance(e, kinds)], seen


async def linked(a: RawClient, b: RawClient) -> tuple[CallStart, CallStart]:
    """a calls b, b calls back: both get call_start."""
    a.send(Call(b.user))
    assert (await b.until(lambda e: isinstance(e, CallInvite))).sender == a.user
    b.send(Call(a.user))
    return (await a.until(lambda e: isinstance(e, CallStart) and e.peer == b.user),
            await b.until(lambda e: isinstance(e, CallStart) and e.peer == a.user))


async def test_only_the_callee_is_invited_and_calling_back_links_them(make_host):
    host = await make_host()
    alice = await person(host, "alice", port=40001, codecs=("jpeg", "pcm"))
    bob = await person(host, "bob", port=40002)
    carol = await person(host, "carol")
    start_a, start_b = await linked(alice, bob)
    assert (start_a.address, start_a.port) == ("127.0.0.1", 40002)
    assert (start_b.address, start_b.port) == ("127.0.0.1", 40001)
    assert start_a.link == start_b.link and start_a.key == start_b.key
    assert {start_a.side, start_b.side} == {"a", "b"}
    assert (start_a.video, start_a.audio) == ("jpeg", "pcm")    # what both have
    await nothing_more(carol, (CallInvite, CallStart))          # carol hears nothing
    # Every link gets its own fresh key and id.
    dave = await person(host, "dave")
    start_c, _ = await linked(carol, dave)
    assert start_c.key != start_a.key and start_c.link != start_a.link


async def test_an_unanswered_call_fails_busy_and_the_callee_missed_it(make_host):
    host = await make_host(call_timeout_s=0.3)
    alice, bob = await person(host, "alice"), await person(host, "bob")
    alice.send(Call("bob"))
    assert (await bob.until(lambda e: isinstance(e, CallInvite))).expires == 0.3
    assert await alice.until(lambda e: isinstance(e, CallFailed)) == CallFailed("bob", "busy")
    assert await bob.until(lambda e: isinstance(e, CallMissed)) == CallMissed("alice")
    bob.send(Call("alice"))                     # now a new invitation, not an answer
    assert (await alice.until(lambda e: isinstance(e, CallInvite))).sender == "bob"


async def test_decline_and_the_requests_that_are_refused(make_host):
    host = await make_host()
    alice, bob = await person(host, "alice"), await person(host, "bob")
    await person(host, "eve", room="elsewhere")

    async def refused(client: RawClient, event, code: str) -> None:
        client.send(event)
        error = await client.until(lambda e: isinstance(e, Error))
        assert error.code == code, error

    alice.send(Call("bob"))
    await bob.until(lambda e: isinstance(e, CallInvite))
    bob.send(Decline("alice"))
    assert await alice.until(lambda e: isinstance(e, CallFailed)) == \
        CallFailed("bob", "declined")
    await refused(bob, Decline("alice"), "no_invitation")
    await refused(alice, Call("ALICE"), "call_self")
    await refused(alice, Call("eve"), "no_such_user")          # another room
    await refused(alice, Call("nobody"), "no_such_user")
    await refused(alice, Hangup("bob"), "not_in_call")
    await linked(alice, bob)
    await refused(alice, Call("bob"), "already_in_call")


async def test_hang_up_one_then_all(make_host):
    host = await make_host()
    alice, bob, carol = [await person(host, n) for n in ("alice", "bob", "carol")]
    await linked(alice, bob)
    await linked(carol, alice)                  # carol joins: she links with both
    await bob.until(lambda e: isinstance(e, CallStart) and e.peer == "carol")
    alice.send(Hangup("bob"))
    assert await bob.until(lambda e: isinstance(e, CallEnded)) == CallEnded("alice", "hangup")
    assert await alice.until(lambda e: isinstance(e, CallEnded)) == CallEnded("bob", "hangup")
    carol.send(Hangup())
    ended = {(await alice.until(lambda e: isinstance(e, CallEnded))).peer,
             (await bob.until(lambda e: isinstance(e, CallEnded))).peer}
    assert ended == {"carol"}


async def test_a_call_is_full_at_max_call_size(make_host):
    host = await make_host(max_call_size=2)
    alice, bob, carol = [await person(host, n) for n in ("alice", "bob", "carol")]
    await linked(alice, bob)
    carol.send(Call("alice"))
    await alice.until(lambda e: isinstance(e, CallInvite))
    alice.send(Call("carol"))
    assert await carol.until(lambda e: isinstance(e, CallFailed)) == \
        CallFailed("alice", "call_full")
    assert await alice.until(lambda e: isinstance(e, CallFailed)) == \
        CallFailed("carol", "call_full")


@pytest.mark.parametrize("how", ["bye", "drop"])
async def test_leaving_ends_links_and_invitations(make_host, how):
    host = await make_host(grace_s=0.3)     # a dropped seat is held that long
    alice, bob, carol = [await person(host, n) for n in ("alice", "bob", "carol")]
    await linked(alice, bob)
    alice.send(Call("carol"))
    await carol.until(lambda e: isinstance(e, CallInvite))
    if how == "bye":
        alice.send(Bye())
    else:
        alice.writer.transport.abort()          # like kill -9: the socket just goes
    reason = "left" if how == "bye" else "lost"
    assert await bob.until(lambda e: isinstance(e, CallEnded)) == CallEnded("alice", reason)
    assert await carol.until(lambda e: isinstance(e, CallMissed)) == CallMissed("alice")


async def test_the_relay_passes_sealed_packets_only_between_a_links_ends(make_host):
    host = await make_host()
    alice, bob, mallory = [await person(host, n) for n in ("alice", "bob", "mallory")]
    start, _ = await linked(alice, bob)
    packet = bytes([0xC1, 1]) + bytes.fromhex(start.link) + bytes(range(100))
    alice.send(MediaData(packet))
    got = await bob.until(lambda e: isinstance(e, MediaData))
    assert bytes(got.data) == packet
    mallory.send(MediaData(packet))             # not her link: goes nowhere
    stranger = bytes([0xC1, 1, 9, 9, 9, 9]) + b"x" * 20
    alice.send(MediaData(stranger))             # no such link
    await nothing_more(bob, (MediaData,))
    assert host.calls.refused == 2 and host.calls.relayed == 1
    # A relay request reaches the peer, naming who asks.
    bob.send(RelayMedia("alice"))
    assert await alice.until(lambda e: isinstance(e, RelayMedia)) == RelayMedia("bob")


async def test_the_media_lane_drops_the_oldest_and_never_delays_chat(make_host):
    host = await make_host(media_lane_bytes=4096)
    alice, bob = await person(host, "alice"), await person(host, "bob")
    start, _ = await linked(alice, bob)
    session = next(s for s in host.sessions if host.rooms.user_of(s.seat) == "bob")
    packet = bytes([0xC1, 1]) + bytes.fromhex(start.link)
    for n in range(200):                        # far more than the lane holds, queued
        session.link.offer_media(MediaData(packet + n.to_bytes(4, "big") + b"v" * 400))
    assert session.link.media_bytes <= 4096 + 500
    assert session.link.media_dropped > 0      # before the writer had a turn
    # What bob gets is the newest packets, in order.
    numbers = []
    async with asyncio.timeout(DEADLINE_S):
        while not numbers or numbers[-1] != 199:
            event = await bob.next()
            if isinstance(event, MediaData):
                numbers.append(int.from_bytes(bytes(event.data)[6:10], "big"))
    assert numbers == sorted(numbers) and len(numbers) < 200


class _CappedSocket:
    """A socket stand-in whose system caps buffers at 208 KiB, as many Linux
    machines do, unless the privileged FORCE option asks (`privileged`)."""

    def __init__(self, privileged: bool) -> None:
        self.privileged, self.sizes = privileged, {}

    def setsockopt(self, _level, option, size):
        if option in (chatroom.SO_RCVBUFFORCE, chatroom.SO_SNDBUFFORCE):
            if not self.privileged:
                raise PermissionError(1, "Operation not permitted")
            import socket
            plain = {chatroom.SO_RCVBUFFORCE: socket.SO_RCVBUF,
                     chatroom.SO_SNDBUFFORCE: socket.SO_SNDBUF}[option]
            self.sizes[plain] = size
            return
        self.sizes[option] = min(size, 212992)

    def getsockopt(self, _level, option):
        return self.sizes[option]


@pytest.mark.skipif(chatroom.SO_RCVBUFFORCE is None, reason="Linux's option")
def test_media_buffers_ask_past_the_systems_cap_and_say_when_they_cannot(monkeypatch, caplog):
    import socket
    monkeypatch.setattr(chatroom, "_small_buffer_said", False)
    want = chatroom.MEDIA_SOCKET_BUFFER_BYTES
    assert (chatroom.SO_RCVBUFFORCE, chatroom.SO_SNDBUFFORCE) == (33, 32)
    assert chatroom._grow_buffer(_CappedSocket(True), socket.SO_RCVBUF,
                                 chatroom.SO_RCVBUFFORCE, want) == want
    assert not caplog.records
    with caplog.at_level("WARNING", logger="chatroom"):
        assert chatroom._grow_buffer(_CappedSocket(False), socket.SO_RCVBUF,
                                     chatroom.SO_RCVBUFFORCE, want) == 212992
        chatroom._grow_buffer(_CappedSocket(False), socket.SO_SNDBUF,
                              chatroom.SO_SNDBUFFORCE, want)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "208 KiB" in said[0] and "rmem_max" in said[0]   # once


def test_a_media_socket_gets_its_big_receive_buffer():
    sock = chatroom.UdpSocket("127.0.0.1", 0, lambda data, source: None, "test")
    try:
        assert sock.receive_buffer >= chatroom.MEDIA_SOCKET_BUFFER_BYTES
    finally:
        sock.close(wait=True)
