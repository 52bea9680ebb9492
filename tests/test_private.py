"""Private (one-to-one) lines on a real host (issue 15; chatroom.py: WIRE's
say{to} and message{to}, ROOMS' say and resume, HOST's _on_say).

"The host delivers a private line to the sender (its confirmation) and to
that one person only; nobody else's socket carries it." Raw clients on
127.0.0.1 speak the protocol by hand; a third member's socket is recorded
byte for byte, so the rule is checked on the wire, not in an event list.
"""

from __future__ import annotations

from test_host import RawClient
from test_host import clients as clients  # a fixture
from test_resume import Watcher, come_back, drop, host_saw_it_go, seated

from chatroom import Bye, Error, Message, Resumed, Say, System


def record(client: RawClient) -> bytearray:
    """Every byte the host sends `client` from now on."""
    raw = bytearray()
    read = client.reader.read

    async def recording(n: int = -1) -> bytes:
        data = await read(n)
        raw.extend(data)
        return data
    client.reader.read = recording          # type: ignore[method-assign]
    return raw


async def test_a_private_line_reaches_its_recipient_and_no_other_socket(make_host, clients):
    host = await make_host()
    alice = Watcher((await seated(clients, host.port, "r", "alice"))[0])
    bob = Watcher((await seated(clients, host.port, "r", "bob"))[0])
    carol_client, _ = await seated(clients, host.port, "r", "carol")
    carol = Watcher(carol_client)
    wire = record(carol_client)
    await alice.until(lambda e: isinstance(e, System) and e.user == "carol")

    alice.client.send(Say("pm-77", "meet at the back door", "Bob"))
    mine = await alice.until(lambda e: isinstance(e, Message) and e.id == "pm-77")
    theirs = await bob.until(lambda e: isinstance(e, Message) and e.id == "pm-77")
    assert mine == theirs and (mine.sender, mine.to) == ("alice", "bob")
    assert mine.text == "meet at the back door"

    await alice.say("room line after it", "a-2")   # carol gets this, then we look
    await carol.until(lambda e: isinstance(e, Message) and e.id == "a-2")
    assert b"back door" not in wire and b"pm-77" not in wire
    assert [e.id for e in carol.seen if isinstance(e, Message)] == ["a-2"]


async def test_a_private_line_to_an_unknown_user_or_oneself_is_refused(make_host, clients):
    host = await make_host()
    alice = Watcher((await seated(clients, host.port, "r", "alice"))[0])
    bob = Watcher((await seated(clients, host.port, "r", "bob"))[0])
    alice.client.send(Say("x-1", "hello?", "nobody"))
    refused = await alice.until(lambda e: isinstance(e, Error))
    assert (refused.code, refused.id) == ("no_such_user", "x-1")
    alice.client.send(Say("x-2", "hello me", "ALICE"))
    refused = await alice.until(lambda e: isinstance(e, Error))
    assert (refused.code, refused.id) == ("bad_message", "x-2")
    await alice.say("sentinel", "x-3")
    await bob.until(lambda e: isinstance(e, Message) and e.id == "x-3")
    assert [e.id for e in bob.seen if isinstance(e, Message)] == ["x-3"]


async def test_flood_control_counts_private_lines_too(make_host, clients):
    host = await make_host(rate_limit_per_s=10, burst=3)
    eager = Watcher((await seated(clients, host.port, "r", "eager"))[0])
    await seated(clients, host.port, "r", "bob")
    eager.client.writer.write(b"".join(eager.client.wire.send(Say(f"e{n}", "hi", "bob"))
                                       for n in range(6)))
    answers = [await eager.until(lambda e: isinstance(e, (Message, Error)))
               for _ in range(6)]
    assert {a.code for a in answers if isinstance(a, Error)} == {"rate_limited"}


async def test_a_later_joiner_with_the_same_id_gets_no_private_history(make_host, clients):
    host = await make_host()
    alice = Watcher((await seated(clients, host.port, "r", "alice"))[0])
    bob_client, _ = await seated(clients, host.port, "r", "bob")
    alice.client.send(Say("s-1", "for the first bob only", "bob"))
    await bob_client.until(lambda e: isinstance(e, Message) and e.id == "s-1")
    await alice.say("for everyone", "p-1")
    bob_client.send(Bye())                  # leaves for good: its ID is free
    await alice.until(lambda e: isinstance(e, System) and e.event == "leave")

    newcomer = Watcher((await seated(clients, host.port, "r", "bob"))[0])
    await alice.say("sentinel", "p-2")
    await newcomer.until(lambda e: isinstance(e, Message) and e.id == "p-2")
    assert [(e.id, e.history) for e in newcomer.seen if isinstance(e, Message)] == \
        [("p-1", True), ("p-2", False)]


async def test_a_resume_gives_the_two_their_private_lines_and_no_one_else(
        make_host, clients):
    host = await make_host(grace_s=30)
    alice_client, alice_welcome = await seated(clients, host.port, "r", "alice")
    bob_client, bob_welcome = await seated(clients, host.port, "r", "bob")
    carol_client, carol_welcome = await seated(clients, host.port, "r", "carol")
    dave = Watcher((await seated(clients, host.port, "r", "dave"))[0])
    seen = (await carol_client.until(lambda e: isinstance(e, System) and e.user == "dave")).seq
    for client, user in ((bob_client, "bob"), (carol_client, "carol")):
        drop(client)
        await host_saw_it_go(host, user)
    alice_client.send(Say("s-1", "while you were out, just you", "bob"))
    await alice_client.until(lambda e: isinstance(e, Message) and e.id == "s-1")
    await dave.say("public while out", "d-1")

    back, answer = await come_back(clients, host.port, "r", "bob", bob_welcome.resume, seen)
    assert isinstance(answer, Resumed) and answer.missed == 2
    replay = [await back.next() for _ in range(answer.missed)]
    assert [(e.id, e.to) for e in replay] == [("s-1", "bob"), ("d-1", "")]

    carol, answer = await come_back(clients, host.port, "r", "carol", carol_welcome.resume,
                                    seen)
    assert isinstance(answer, Resumed) and answer.missed == 1
    carol_back = Watcher(carol)
    assert (await carol_back.until(lambda e: isinstance(e, Message))).id == "d-1"

    # The sender's resend after a drop is confirmed to it alone, not doubled.
    alice_client.send(Say("s-1", "while you were out, just you", "bob"))
    again = await alice_client.until(lambda e: isinstance(e, Message) and e.id == "s-1")
    assert (again.seq, again.to) == (replay[0].seq, "bob")
    alice_client.send(Say("a-9", "sentinel"))
    await carol_back.until(lambda e: isinstance(e, Message) and e.id == "a-9")
    bob_back = Watcher(back)
    await bob_back.until(lambda e: isinstance(e, Message) and e.id == "a-9")
    assert [e.id for e in carol_back.seen + bob_back.seen if isinstance(e, Message)] == \
        ["d-1", "a-9", "a-9"]
