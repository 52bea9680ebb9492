"""Private (one-to-one) lines on a real host (issue 15; chatroom.py: WIRE's
say{to} and message{to}, ROOMS' say and resume, HOST's _on_say).

"The host delivers a private line to the sender (its confirmation) and to
that one person only; nobody else's socket carries it." Raw clients on
127.0.0.1 speak the protocol by hand; a third member's socket is recorded
byte for byte, so the rule is checked on the wire, not in an event list.
"""

from __future__ import annotations

import json
import re

import pytest
from test_cli import is_system, of_type
from test_host import RawClient
from test_host import clients as clients  # a fixture
from test_resume import Watcher, come_back, drop, host_saw_it_go, seated

import chatroom
from chatroom import Bye, Error, Message, Mistyped, PrivateLine, Resumed, Say, System, parse_command


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


# --- /msg in the terminal ---------------------------------------------------------

@pytest.mark.parametrize("line, user, text", [
    ("/msg bob hi there", "bob", "hi there"),
    ("/MSG 张伟 你好", "张伟", "你好"),
    ('/msg "li lei" hello  you', "li lei", "hello  you"),      # spaces kept as typed
    ("/msg 'li lei' hi", "li lei", "hi"),
    ("/msg  bob   /not a command", "bob", "  /not a command"),
])
def test_msg_parses_a_user_and_the_text(line, user, text):
    assert parse_command(line) == PrivateLine(line, user, text)


@pytest.mark.parametrize("line, code", [
    ("/msg", "no_such_user"), ("/msg   ", "no_such_user"),
    ("/msg bob", "bad_message"), ("/msg bob   ", "bad_message"),
    ('/msg "li lei"', "bad_message"),
])
def test_msg_without_a_user_or_text_is_refused_with_its_usage(line, code):
    command = parse_command(line)
    assert isinstance(command, Mistyped) and command.code == code
    assert "/msg USER TEXT" in command.message


def test_msg_in_the_terminal_marks_message_to_and_reaches_one_person(host, join):
    """`/msg bob hi`: message{to: "bob"} to alice and bob; carol sees nothing;
    a room line says to: null."""
    alice = join(host.port, "R", "alice")
    bob = join(host.port, "R", "bob")
    carol = join(host.port, "R", "carol")
    alice.wait_for(is_system("enter", "carol"))
    carol_mark = carol.mark()
    alice.send("/msg Bob 悄悄话 just us")
    for client in (alice, bob):
        got = client.wait_for("message")
        assert (got["from"], got["to"], got["text"]) == ("alice", "bob", "悄悄话 just us")
    alice.send("room line")
    for client in (bob, carol):
        got = client.wait_for("message")
        assert (got["text"], got["to"]) == ("room line", None)
    assert not of_type(carol.between(carol_mark), "message")   # nothing before it

    alice.send("/msg nobody hello")
    assert alice.wait_for("error")["code"] == "no_such_user"
    alice.send("/msg alice hello me")
    assert alice.wait_for("error")["code"] == "bad_message"
    alice.send("/msg bob")
    assert alice.wait_for("error")["code"] == "bad_message"
    alice.send("/msg a/b hello")            # not an ID at all: the client says so
    assert alice.wait_for("error")["code"] == "bad_user_id"


def test_a_private_line_reads_as_private_for_a_person(host, join):
    alice = join(host.port, "R", "alice")
    bob = join(host.port, "R", "bob", json_mode=False)
    bob.wait_for("Joined room")
    alice.wait_for(is_system("enter", "bob"))
    alice.send("/msg bob hi")
    line = bob.wait_for(lambda l: "(private)" in l)
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] alice → bob \(private\): hi", line), line


def test_a_private_line_for_a_person_escapes_its_names():
    line = chatroom.Printer.format({"type": "message", "from": "mal\x1b[2J", "to": "b\u202eob",
                                    "text": "hi", "ts": 0, "history": True})
    assert line is not None and "\x1b" not in line and "\u202e" not in line
    assert line.endswith(" (private): hi  (earlier)")
    room = chatroom.Printer.format({"type": "message", "from": "a", "to": None, "text": "hi",
                                    "ts": 0})
    assert room is not None and room.endswith("] a: hi")


# --- getting back: private lines keep their recipient -------------------------------

def test_a_private_line_typed_while_away_goes_once_back_to_its_recipient_alone(
        start_host, join, faulty):
    """Issue 13's "typed while away is sent once back", for /msg: the resend
    keeps `to`. And private lines bob sent while alice was away come to her
    with what she missed, and to nobody else."""
    host = start_host("--grace", "30")
    proxy = faulty(host.port)
    alice = join(proxy.port, "R", "alice")
    bob = join(host.port, "R", "bob")
    carol = join(host.port, "R", "carol")
    alice.wait_for(is_system("enter", "carol"))
    proxy.cut()
    alice.wait_for("reconnecting", timeout=30)
    bob.send("/msg alice while you were away, just you")
    bob.wait_for(lambda e: e.get("type") == "message" and e["to"] == "alice")
    alice.send("/msg bob typed while away, just you")
    back = alice.wait_for("resumed", timeout=30)
    assert back["lost"] == 0
    got = bob.wait_for(lambda e: e.get("type") == "message" and e["from"] == "alice")
    assert (got["text"], got["to"]) == ("typed while away, just you", "bob")
    missed = alice.wait_for(lambda e: e.get("type") == "message" and e["from"] == "bob")
    assert (missed["text"], missed["to"]) == ("while you were away, just you", "alice")
    bob.send("sentinel")
    for client in (alice, carol):
        client.wait_for(lambda e: e.get("type") == "message" and e["text"] == "sentinel")
    assert [e["text"] for e in of_type(carol.seen(), "message")] == ["sentinel"]
    mine = [e for e in of_type(alice.seen(), "message") if e["from"] == "alice"]
    assert [(e["text"], e["to"]) for e in mine] == [("typed while away, just you", "bob")]


def test_a_crashed_clients_pending_private_line_keeps_its_recipient(tmp_path):
    store = chatroom.PlaceStore(tmp_path)
    place = chatroom.Place(["127.0.0.1"], 1, "R", "alice", token="t" * 32)
    place.pending = {"c-1": "to the room", "c-2": "to bob"}
    place.pending_to = {"c-2": "bob"}
    job = store.save(place, [])
    assert job is not None
    job()
    again = chatroom.Place(["127.0.0.1"], 1, "R", "alice")
    record = chatroom.PlaceStore(tmp_path).load(again) or json.loads(
        next((tmp_path / "places").iterdir()).read_text())   # (our own pid is alive)
    chatroom.restore_place(again, {**record, "pending_to": {**record["pending_to"],
                                                            "c-9": "not pending"}})
    assert again.pending == place.pending and again.pending_to == {"c-2": "bob"}
