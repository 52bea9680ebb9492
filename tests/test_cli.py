"""End-to-end tests: chatroom.py --host and --cli as subprocesses on 127.0.0.1.

Each test checks a promise of README.md ("The machine interface", "Rooms",
"IDs", "Host rules"). Waits are bounded by generous deadlines and the
absence of an event is checked by order (a later sentinel arrives first),
never by sleeping.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from conftest import (
    CHATROOM,
    LOOPBACK,
    frame,
    frame_json,
    raw_login,
    read_frame,
    read_frame_until,
    wait_closed,
)


def is_message(text: str | None = None, sender: str | None = None):
    """Predicate: a `message` event (with this text / from this sender)."""
    def match(event: dict) -> bool:
        return (event.get("type") == "message"
                and (text is None or event.get("text") == text)
                and (sender is None or event.get("from") == sender))
    return match


def is_system(kind: str, user: str):
    def match(event: dict) -> bool:
        return (event.get("type") == "system" and event.get("event") == kind
                and event.get("user") == user)
    return match


def of_type(events: list[dict], *types: str) -> list[dict]:
    return [e for e in events if e.get("type") in types]


def exchange_sentinel(sender, receivers, text: str) -> dict[str, list[dict]]:
    """`sender` says `text`; each receiver (and the sender) must get it.

    Returns, per client label, the events each received between the mark
    taken now and the sentinel: what it got in the meantime. The sentinel
    must be the first `message` each receives after the mark.
    """
    clients = [sender, *[r for r in receivers if r is not sender]]
    marks = {c.label: c.mark() for c in clients}
    sender.send(text)
    between = {}
    for client in clients:
        got = client.wait_for("message")
        assert got["text"] == text, (
            f"{client.label}: the first message after the mark is {got!r}, "
            f"not the sentinel {text!r}")
        between[client.label] = client.between(marks[client.label])
    return between


def free_port() -> int:
    """A loopback port with (very probably) nothing listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def assert_refused(client, code: str) -> None:
    """An `error` with `code`, then `closed` (reason refused) last, exit 1."""
    error = client.wait_for("error", timeout=60)    # several start at once: slow when loaded
    assert error["code"] == code, f"{client.label}: {error!r}"
    closed = client.wait_for("closed")
    assert closed["reason"] == "refused", f"{client.label}: {closed!r}"
    assert client.wait() == 1, f"{client.label}: exit status"
    events = client.seen()
    assert events[-1] == closed, f"{client.label}: `closed` is not last: {events!r}"
    assert not of_type(events, "ready", "message", "system"), events


# --- 1. chat --------------------------------------------------------------------------------------

def test_two_users_chat_message_fields(host, join):
    """`message` reaches everyone, the sender included, with from/text/ts/
    history/seq/id; `ready` has room, user, members in join order."""
    alice = join(host.port, "R", "alice")
    bob = join(host.port, "R", "bob")

    assert alice.ready["room"] == "R" and alice.ready["user"] == "alice"
    assert alice.ready["members"] == ["alice"]
    assert bob.ready["room"] == "R" and bob.ready["user"] == "bob"
    assert bob.ready["members"] == ["alice", "bob"]
    for field in ("host", "address", "port"):
        assert field in bob.ready, bob.ready
    assert bob.ready["port"] == host.port
    alice.wait_for(is_system("enter", "bob"))

    text = "hello 你好 👋"
    alice.send(text)
    copies = {}
    for client in (alice, bob):
        message = client.wait_for("message")
        copies[client.label] = message
        assert message["from"] == "alice"
        assert message["text"] == text
        assert message["history"] is False
        assert isinstance(message["ts"], (int, float)) and not isinstance(message["ts"], bool)
        assert abs(message["ts"] - time.time()) < 60, message
        assert type(message["seq"]) is int, message
        assert isinstance(message.get("id"), str) and message["id"], message
    assert copies["client alice"]["seq"] == copies["client bob"]["seq"]
    assert copies["client alice"]["id"] == copies["client bob"]["id"]

    bob.send("reply")
    assert alice.wait_for("message")["text"] == "reply"
    later = bob.wait_for("message")
    assert later["text"] == "reply" and later["seq"] > copies["client bob"]["seq"]

    for client in (alice, bob):
        bad = [e for e in client.seen() if e.get("type") == "<not json>"]
        assert not bad, f"{client.label}: stdout lines that are not JSON objects: {bad}"


# --- 2. notices and leaving -----------------------------------------------------------------------

def test_enter_and_leave_notices_and_quit(host, join):
    """`[SYSTEM] bob entered the room` / `left the room` as `system` events;
    /quit ends with `closed` quit and exit 0; so does end of input."""
    alice = join(host.port, "R", "alice")
    own = alice.wait_for("system")
    assert own["event"] == "enter" and own["user"] == "alice", own

    bob = join(host.port, "R", "bob")
    enter = alice.wait_for(is_system("enter", "bob"))
    assert enter["text"].startswith("[SYSTEM] "), enter
    assert "bob entered the room" in enter["text"], enter
    assert type(enter["seq"]) is int and abs(enter["ts"] - time.time()) < 60
    bob_own = bob.wait_for("system")
    assert (bob_own["event"], bob_own["user"]) == ("enter", "bob"), bob_own

    bob.send("/quit")
    closed = bob.wait_for("closed")
    assert closed["reason"] == "quit"
    assert bob.wait() == 0
    assert bob.seen()[-1] == closed, "`closed` must be the last event"
    leave = alice.wait_for(is_system("leave", "bob"))
    assert leave["text"].startswith("[SYSTEM] ") and "bob left the room" in leave["text"]

    carol = join(host.port, "R", "carol")
    alice.wait_for(is_system("enter", "carol"))
    carol.close_stdin()
    assert carol.wait_for("closed")["reason"] == "quit"
    assert carol.wait() == 0
    assert carol.seen()[-1]["type"] == "closed"
    alice.wait_for(is_system("leave", "carol"))

    # alice saw every event of the room since it opened: seq counts them.
    seqs = [e["seq"] for e in alice.seen() if e.get("type") in ("system", "message")]
    assert seqs == list(range(1, len(seqs) + 1)), seqs


# A shell starts `cmd &` with SIGINT ignored; `trap "" INT` does the same here.
IGNORING_SIGINT = ["/bin/sh", "-c", 'trap "" INT; exec "$0" "$@"', sys.executable,
                   str(CHATROOM)]


@pytest.mark.parametrize("signum,program", [
    (signal.SIGINT, None), (signal.SIGTERM, None), (signal.SIGINT, IGNORING_SIGINT)],
    ids=["ctrl-c", "sigterm", "ctrl-c-when-started-ignoring-it"])
def test_ctrl_c_leaves_with_status_0(host, join, signum, program):
    """Ctrl-C (SIGINT) or SIGTERM on a client: it leaves (`closed` quit),
    exit 0; the room is told it left, not that its connection was lost.
    Also when it was started with SIGINT ignored."""
    alice = join(host.port, "R", "alice")
    bob = join(host.port, "R", "bob", program=program)
    alice.wait_for(is_system("enter", "bob"))
    bob.proc.send_signal(signum)
    closed = bob.wait_for("closed")
    assert closed["reason"] == "quit"
    assert bob.wait() == 0
    assert bob.seen()[-1] == closed
    leave = alice.wait_for(is_system("leave", "bob"))
    assert leave["text"] == "[SYSTEM] bob left the room", leave


def test_invalid_utf8_on_stdin_does_not_hang_the_client(host, join):
    """A stdin line that is not UTF-8 must not wedge the client: later
    lines are still read, and end of input still leaves with status 0."""
    alice = join(host.port, "R", "alice")
    bob = join(host.port, "R", "bob")
    alice.wait_for(is_system("enter", "bob"))
    alice.send_bytes(b"caf\xe9 in latin-1\n")
    alice.send("after the bad line")
    alice.close_stdin()
    closed = alice.wait_for("closed")
    assert closed["reason"] == "quit", closed
    assert alice.wait() == 0
    texts = [e["text"] for e in of_type(bob.seen(), "message")]
    assert "after the bad line" in texts, texts


# --- 3. help --------------------------------------------------------------------------------------

def test_help_in_any_case_goes_to_sender_only(host, join):
    """`help` in any letter case: the help text to the sender alone."""
    alice = join(host.port, "R", "alice")
    bob = join(host.port, "R", "bob")
    alice.wait_for(is_system("enter", "bob"))
    alice_mark, bob_mark = alice.mark(), bob.mark()

    for spelling in ("help", "Help", "hElP"):
        alice.send(spelling)
        answer = alice.wait_for(lambda e: e.get("type") in ("help", "message", "error"))
        assert answer["type"] == "help", f"{spelling!r} -> {answer!r}"
        assert answer["text"].strip(), answer
        assert "/CHECK" in answer["text"] and "1 minute" in answer["text"], answer

    alice.send("after help")
    got = bob.wait_for("message")
    assert got["text"] == "after help", f"bob got {got!r} before the sentinel"
    assert not of_type(bob.between(bob_mark), "help", "message"), bob.between(bob_mark)
    mine = alice.wait_for("message")
    assert mine["text"] == "after help", f"alice's `help` was sent as a message: {mine!r}"
    assert len(of_type(alice.between(alice_mark), "help")) == 3


# --- 4. /who --------------------------------------------------------------------------------------

def test_who_lists_members_in_join_order(host, join):
    """/who answers `members`, in join order (also after someone leaves)."""
    alice = join(host.port, "R", "alice")
    bob = join(host.port, "R", "bob")
    carol = join(host.port, "R", "carol")
    bob.send("/who")
    assert bob.wait_for("members")["members"] == ["alice", "bob", "carol"]
    assert carol.ready["members"] == ["alice", "bob", "carol"]

    alice.send("/quit")
    assert alice.wait() == 0
    carol.wait_for(is_system("leave", "alice"))
    carol.send("/who")
    assert carol.wait_for("members")["members"] == ["bob", "carol"]
    dave = join(host.port, "r", "dave")
    assert dave.ready["members"] == ["bob", "carol", "dave"]


# --- 5. forged notices ----------------------------------------------------------------------------

def test_forged_system_text_is_a_user_message(host, join):
    """A text starting with `[SYSTEM]` is the user's `message`, never a
    `system` event, and a person sees it after the sender's name."""
    alice = join(host.port, "R", "alice")
    bob = join(host.port, "R", "bob")
    carol = join(host.port, "R", "carol", json_mode=False)
    carol.wait_for("Joined room")
    alice.wait_for(is_system("enter", "carol"))
    bob.wait_for(is_system("enter", "carol"))
    mark = alice.mark()

    forged = "[SYSTEM] alice left the room"
    bob.send(forged)
    got = alice.wait_for("message")
    assert got["type"] == "message" and got["from"] == "bob" and got["text"] == forged
    bob.send("sentinel")
    assert alice.wait_for("message")["text"] == "sentinel"
    assert not of_type(alice.between(mark), "system"), alice.between(mark)

    line = carol.wait_for("bob: [SYSTEM] alice left the room")
    assert re.match(r"^\[\d\d:\d\d:\d\d\] bob: \[SYSTEM\] alice left the room$", line), line
    carol.wait_for("bob: sentinel")
    fake = [l for l in carol.seen() if re.match(r"^(\[\d\d:\d\d:\d\d\] )?\[SYSTEM\] alice", l)]
    assert not fake, f"a line poses as a notice: {fake}"


# --- 6. IDs ---------------------------------------------------------------------------------------

SYSTEM_LOOKALIKES = ["SYSTEM", "system", "S.Y.S.T.E.M", "Ｓystem", "5Y5TEM",
                     "ЅУЅТЕМ", "systém"]


def test_system_and_lookalike_user_ids_refused(host, join):
    """`SYSTEM` in any case and its imitations: bad_user_id, `closed`, exit 1."""
    clients = [join(host.port, "R", name, ready=False) for name in SYSTEM_LOOKALIKES]
    for client in clients:
        assert_refused(client, "bad_user_id")


def test_malformed_user_ids_refused(host, join):
    """Spaces at either end, 33 characters, control, format and bidi
    characters: bad_user_id."""
    names = [" alice", "alice ", "x" * 33, "a\u202eb", "a\u200bb", "ali\x07ce", "a/b"]
    clients = [join(host.port, "R", name, ready=False) for name in names]
    for client in clients:
        assert_refused(client, "bad_user_id")


def test_over_long_ids_are_refused_by_the_client_and_by_the_host(host, join, raw_connect):
    """A 200-character User ID or Room ID is bad_user_id / bad_room_id, not
    bad_frame: the client says so before it connects (nothing listens on
    port 1), and the host says so to a peer that sends it anyway."""
    assert_refused(join(1, "R", "x" * 200, ready=False), "bad_user_id")
    assert_refused(join(1, "房" * 70, "bob", ready=False), "bad_room_id")
    for room, user, code in (("R", "x" * 200, "bad_user_id"), ("房" * 200, "bob", "bad_room_id"),
                             ("R", "x" * 33, "bad_user_id")):
        sock = raw_connect(host.port)
        sock.sendall(frame_json({"type": "hello", "version": 1, "room": room, "user": user}))
        reply = read_frame(sock)
        assert (reply["type"], reply["code"]) == ("error", code), reply
        assert "1 to 32 characters" in reply["message"], reply
        wait_closed(sock)


def test_ids_in_any_script(host, join):
    """Chinese, Devanagari (combining marks) and decomposed IDs work; IDs are
    NFC-normalised and shown as spelled."""
    zhang = join(host.port, "大厅", "张三")
    assert (zhang.ready["room"], zhang.ready["user"]) == ("大厅", "张三")
    hindi = join(host.port, "大厅", "सुनील")
    decomposed = join(host.port, "大厅", "Jose\u0301")
    assert decomposed.ready["user"] == "Jos\u00e9"
    assert decomposed.ready["members"] == ["张三", "सुनील", "Jos\u00e9"]
    exchange_sentinel(zhang, [hindi, decomposed], "你好")
    assert_refused(join(host.port, "大厅", "jos\u00c9", ready=False), "user_taken")


def test_bad_room_ids_refused(host, join):
    """A bidi override or a 40-character Room ID: bad_room_id, exit 1."""
    clients = [join(host.port, room, "alice", ready=False)
               for room in ("a\u202eb", "x" * 40)]
    for client in clients:
        assert_refused(client, "bad_room_id")


def test_taken_user_id_refused_first_user_undisturbed(host, join):
    """A taken ID (any case or width) is refused with user_taken; the first
    holder is not disturbed and nobody is told of the refused login."""
    alice = join(host.port, "R", "alice")
    bob = join(host.port, "R", "bob")
    alice.wait_for(is_system("enter", "bob"))
    bob.wait_for(is_system("enter", "bob"))
    alice_mark, bob_mark = alice.mark(), bob.mark()

    for name in ("alice", "Alice", "ａｌｉｃｅ"):
        assert_refused(join(host.port, "R", name, ready=False), "user_taken")
    assert_refused(join(host.port, "r", "ALICE", ready=False), "user_taken")

    bob.send("still there?")
    assert alice.wait_for("message")["text"] == "still there?"
    alice.send("yes")
    assert bob.wait_for(is_message("yes", "alice"))
    for client, mark in ((alice, alice_mark), (bob, bob_mark)):
        assert not of_type(client.between(mark), "system", "closed", "error"), \
            client.between(mark)
    alice.send("/who")
    assert alice.wait_for("members")["members"] == ["alice", "bob"]


def test_room_ids_are_case_insensitive(host, join):
    """`Lobby` and `lobby` are one room, shown as its first member spelled it."""
    alice = join(host.port, "Lobby", "alice")
    bob = join(host.port, "lobby", "bob")
    assert bob.ready["room"] == "Lobby"
    assert bob.ready["members"] == ["alice", "bob"]
    exchange_sentinel(bob, [alice], "same room")


# --- 7. rooms -------------------------------------------------------------------------------------

def test_rooms_are_isolated(host, join):
    """Nothing said in one room reaches another: messages, notices, members."""
    alice = join(host.port, "A", "alice")
    bob = join(host.port, "A", "bob")
    carol = join(host.port, "B", "carol")
    assert carol.ready["members"] == ["carol"]
    alice.wait_for(is_system("enter", "bob"))
    bob.wait_for(is_system("enter", "bob"))
    carol.wait_for(is_system("enter", "carol"))
    carol_mark, bob_mark = carol.mark(), bob.mark()

    # A message in A is delivered (confirmed) before carol's sentinel is sent,
    # so had it leaked into B, carol would see it before her sentinel.
    exchange_sentinel(alice, [bob], "only for A")
    exchange_sentinel(carol, [], "only for B")
    exchange_sentinel(alice, [bob], "A sentinel")

    carol_saw = carol.between(carol_mark)
    assert not of_type(carol_saw, "message", "system"), carol_saw
    assert all(e.get("user") not in ("alice", "bob") for e in carol.seen()
               if e.get("type") == "system"), carol.seen()
    bob_saw = [e for e in bob.seen()[bob_mark:] if e.get("type") == "message"]
    assert [e["text"] for e in bob_saw] == ["only for A", "A sentinel"], bob_saw
    assert not [e for e in alice.seen() + bob.seen() if e.get("user") == "carol"]

    alice.send("/who")
    carol.send("/who")
    assert alice.wait_for("members")["members"] == ["alice", "bob"]
    assert carol.wait_for("members")["members"] == ["carol"]

    bob.send("/quit")
    assert bob.wait() == 0
    alice.wait_for(is_system("leave", "bob"))
    exchange_sentinel(carol, [], "B after bob left A")
    assert not of_type(carol.seen(), "system") or all(
        e["user"] == "carol" for e in of_type(carol.seen(), "system")), carol.seen()


# --- 8. history -----------------------------------------------------------------------------------

def test_history_replayed_to_late_joiner_then_forgotten(start_host, join):
    """--history 3: a late joiner gets the last 3 messages, oldest first, with
    history true, right after `ready`; an emptied room is forgotten."""
    host = start_host("--history", "3")
    alice = join(host.port, "H", "alice")
    for n in range(1, 6):
        alice.send(f"m{n}")
    for n in range(1, 6):
        assert alice.wait_for("message")["text"] == f"m{n}"

    dave = join(host.port, "H", "dave")
    replay = [dave.next() for _ in range(3)]
    assert [(e["type"], e.get("text"), e.get("history")) for e in replay] == [
        ("message", "m3", True), ("message", "m4", True), ("message", "m5", True)], replay
    assert [e["seq"] for e in replay] == sorted(e["seq"] for e in replay)
    assert all(e["from"] == "alice" for e in replay)
    after = dave.next()
    assert after["type"] == "system" and after["event"] == "enter", after
    assert after["user"] == "dave"

    alice.send("live")
    live = dave.wait_for("message")
    assert live["text"] == "live" and live["history"] is False

    for client in (alice, dave):
        client.send("/quit")
        assert client.wait() == 0

    erin = join(host.port, "H", "erin")
    assert erin.ready["members"] == ["erin"]
    first = erin.next()
    assert first["type"] == "system" and first["user"] == "erin", \
        f"the forgotten room replayed something: {first!r}"
    erin.send("fresh")
    assert erin.wait_for("message")["text"] == "fresh"
    assert not [e for e in erin.seen() if e.get("history")], erin.seen()


# --- 9. message size ------------------------------------------------------------------------------

def test_message_too_long_refused_never_cut(host, join):
    """Over 16384 UTF-8 bytes: message_too_long to the sender, nothing sent;
    exactly 16384 bytes passes whole."""
    alice = join(host.port, "R", "alice")
    bob = join(host.port, "R", "bob")
    alice.wait_for(is_system("enter", "bob"))
    alice_mark, bob_mark = alice.mark(), bob.mark()

    too_long_ascii = "a" * 16385
    too_long_chinese = "中" * 5462           # 16386 bytes, 5462 characters
    assert len(too_long_chinese.encode()) > 16384 > len(too_long_chinese)
    for text in (too_long_ascii, too_long_chinese):
        alice.send(text)
        answer = alice.wait_for(lambda e: e.get("type") in ("error", "message"))
        assert answer["type"] == "error" and answer["code"] == "message_too_long", \
            {k: (v[:80] if isinstance(v, str) else v) for k, v in answer.items()}

    exact = "b" * 16378 + "中文"             # 16384 bytes
    assert len(exact.encode()) == 16384
    alice.send(exact)
    for client in (alice, bob):
        got = client.wait_for("message")
        assert got["text"] == exact, f"{client.label}: got {len(got['text'])} characters"
    assert not of_type(bob.between(bob_mark), "message", "error")
    assert not of_type(alice.between(alice_mark), "message")


def test_host_refuses_message_too_long(host, join):
    """The host checks the size too: a client allowing 100000 bytes sends
    16385; the host (16384) refuses it with message_too_long naming its id."""
    alice = join(host.port, "R", "alice")
    carol = join(host.port, "R", "carol", "--max-message-bytes", "100000")
    alice.wait_for(is_system("enter", "carol"))
    alice_mark = alice.mark()

    carol.send("c" * 16385)
    answer = carol.wait_for(lambda e: e.get("type") in ("error", "message"))
    assert answer["type"] == "error" and answer["code"] == "message_too_long", \
        {k: (v[:80] if isinstance(v, str) else v) for k, v in answer.items()}
    assert answer.get("id"), f"not the host's answer to a message: {answer!r}"

    carol.send("after the long one")
    assert alice.wait_for("message")["text"] == "after the long one"
    assert not of_type(alice.between(alice_mark), "message")
    assert carol.wait_for("message")["text"] == "after the long one"


# --- 10. unreachable ------------------------------------------------------------------------------

def test_unreachable_host(join):
    """Nothing listening: host_unreachable, `closed` unreachable, exit 1."""
    client = join(free_port(), "R", "alice", ready=False)
    error = client.wait_for("error")
    assert error["code"] == "host_unreachable", error
    closed = client.wait_for("closed")
    assert closed["reason"] == "unreachable"
    assert client.wait() == 1
    assert client.seen()[-1] == closed


def test_hosting_on_a_taken_port_says_port_taken_and_how_to_fix_it(host):
    """--host on a port another program listens on: port_taken, with the
    way out (--port), exit 1; not host_unreachable."""
    out = subprocess.run([sys.executable, str(CHATROOM), "--host", "--json", "--port",
                          str(host.port), "--interface", LOOPBACK, "--no-advertise"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out
    error = json.loads(out.stdout.splitlines()[0])
    assert (error["type"], error["code"]) == ("error", "port_taken"), error
    assert f"port {host.port}" in error["message"] and "--port" in error["message"], error


# --- 11. host shutdown ----------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM],
                         ids=["SIGINT", "SIGTERM"])
def test_host_shutdown_ends_every_client(host, join, signum):
    """Ctrl-C or SIGTERM on the host: every client that doesn't retry
    (--retry-for 0) gets `closed` host_shutdown and exits 3; the host exits
    0 and its last line is `closed`."""
    alice = join(host.port, "R", "alice", "--retry-for", "0")
    bob = join(host.port, "S", "bob", "--retry-for", "0")
    exchange_sentinel(alice, [], "before shutdown")

    assert host.stop(signum=signum) == 0
    assert host.seen()[-1].get("type") == "closed", host.seen()
    for client in (alice, bob):
        closed = client.wait_for("closed")
        assert closed["reason"] == "host_shutdown", closed
        assert client.wait() == 3
        assert client.seen()[-1] == closed


# --- 12. garbage ----------------------------------------------------------------------------------

GARBAGE = {
    "http request": b"GET / HTTP/1.1\r\n\r\n",
    "4 GiB length prefix": b"\xff\xff\xff\xff" + b"x" * 64,
    "invalid utf-8": frame(b'{"type":"hello","version":1,"room":"R","user":"\xff\xfe"}'),
    "not json": frame(b"{nope"),
    "json array": frame(b"[1,2]"),
    "binary frame before login": frame(b"\x00abc"),
    "empty frame": frame(b""),
    "unknown type": frame_json({"type": "frobnicate"}),
    "missing field": frame_json({"type": "hello", "version": 1, "room": "R"}),
    "say before hello": frame_json({"type": "say", "id": "x1", "text": "hi"}),
    "duplicate keys": frame(b'{"type":"hello","version":1,"version":1,'
                            b'"room":"R","user":"zed"}'),
    "NaN": frame(b'{"type":"hello","version":NaN,"room":"R","user":"zed"}'),
    "lone surrogate": frame(b'{"type":"hello","version":1,"room":"R","user":"\\ud800"}'),
    "wrong field type": frame_json({"type": "hello", "version": "1", "room": "R",
                                    "user": "zed"}),
}


def test_garbage_gets_bad_frame_and_room_goes_on(host, join, raw_connect, start_host):
    """Any broken stream gets one `error` bad_frame and is closed; the host
    and the room go on (a message sent afterwards still arrives). The
    garbage goes inside TLS; a half frame then the end of the stream (a
    half-close, which TLS here has not) goes to a host with --insecure."""
    alice = join(host.port, "R", "alice")
    bob = join(host.port, "R", "bob")
    exchange_sentinel(alice, [bob], "before garbage")
    bob_mark = bob.mark()

    problems = []
    for case, payload in GARBAGE.items():
        sock = raw_connect(host.port)
        try:
            sock.sendall(payload)
            answer = read_frame(sock)
            if (answer.get("type"), answer.get("code")) != ("error", "bad_frame"):
                problems.append(f"{case}: answered {answer!r}")
            wait_closed(sock)
        except (AssertionError, OSError, ValueError) as exc:
            problems.append(f"{case}: {exc}")
        exchange_sentinel(alice, [bob], f"after {case}")

    # A half frame, then end of stream (we still read the answer).
    sock = raw_connect(start_host("--insecure").port)
    sock.sendall(struct.pack(">I", 100) + b'{"type":"hel')
    sock.shutdown(socket.SHUT_WR)
    try:
        answer = read_frame(sock)
        if (answer.get("type"), answer.get("code")) != ("error", "bad_frame"):
            problems.append(f"half frame: answered {answer!r}")
        wait_closed(sock)
    except (AssertionError, OSError, ValueError) as exc:
        problems.append(f"half frame: {exc}")
    exchange_sentinel(bob, [alice], "after half frame")

    assert not problems, "\n".join(problems)
    assert not of_type(bob.seen()[bob_mark:], "system", "error", "closed")


def test_garbage_from_a_member_ends_only_that_member(host, join, raw_connect):
    """A logged-in peer that breaks the protocol gets bad_frame and is
    closed; the room is told it left, and goes on."""
    alice = join(host.port, "R", "alice")
    sock = raw_connect(host.port)
    raw_login(sock, "R", "mallory")
    alice.wait_for(is_system("enter", "mallory"))
    sock.sendall(frame(b"{broken"))
    answer, _ = read_frame_until(sock, lambda f: f.get("type") == "error")
    assert answer["code"] == "bad_frame", answer
    wait_closed(sock)
    leave = alice.wait_for(is_system("leave", "mallory"))
    assert leave["text"].startswith("[SYSTEM] mallory left the room"), leave
    bob = join(host.port, "R", "bob")
    assert bob.ready["members"] == ["alice", "bob"]
    exchange_sentinel(bob, [alice], "after mallory")


# --- 13. login timeout ----------------------------------------------------------------------------

def test_login_timeout_drops_silent_and_stalled_logins(start_host, join, raw_connect):
    """--login-timeout 1: a connection that says nothing, or stalls inside
    its first frame, gets `error` login_timeout and is closed."""
    host = start_host("--login-timeout", "1")
    alice = join(host.port, "R", "alice")
    bob = join(host.port, "R", "bob")

    silent = raw_connect(host.port)
    stalled = raw_connect(host.port)
    stalled.sendall(struct.pack(">I", 60) + b"{")
    for name, sock in (("silent", silent), ("stalled", stalled)):
        answer = read_frame(sock, timeout=10)
        assert (answer.get("type"), answer.get("code")) == ("error", "login_timeout"), \
            f"{name}: {answer!r}"
        wait_closed(sock, timeout=10)

    # Members logged in before the deadline passed are not affected by it.
    between = exchange_sentinel(alice, [bob], "still chatting")
    assert not of_type(between["client bob"], "closed", "error"), between


# --- 14. slow reader ------------------------------------------------------------------------------

def message_size_to_overflow(count: int) -> int:
    """Bytes per message so that `count` messages overflow a stopped reader.

    The kernel buffers what a stopped reader does not take before the host's
    outbox sees any of it: on loopback, up to the sender's tcp_wmem maximum
    (4 MiB by default) plus the receiver's buffer. 3000 messages of 200
    bytes (600 kB) would never reach the outbox limit, so the size is
    chosen to send about twice what the kernel can hold.
    """
    kernel = 4 * 2**20 + 2**17
    try:
        wmem = int(open("/proc/sys/net/ipv4/tcp_wmem").read().split()[2])
        rmem = int(open("/proc/sys/net/ipv4/tcp_rmem").read().split()[1])
        kernel = max(kernel, wmem + rmem)
    except (OSError, ValueError, IndexError):
        pass
    return max(200, min(16000, (2 * kernel + 2**20) // count))


def test_slow_reader_is_dropped_nobody_loses_messages(start_host, join):
    """--outbox-limit 65536: a stopped reader is disconnected as too slow
    and the room told; everyone else gets all 3000 messages, in order."""
    host = start_host("--outbox-limit", "65536", "--grace", "0.5",  # the drop shows soon,
                      "--rate-limit", "0")                          # 3000 lines at once
    alice = join(host.port, "R", "alice")
    bob = join(host.port, "R", "bob")
    slow = join(host.port, "R", "slow", "--retry-for", "0")     # dropped is the end here
    sender = join(host.port, "R", "sender")
    for client in (alice, bob, slow):
        client.wait_for(is_system("enter", "sender"))

    slow.proc.send_signal(signal.SIGSTOP)
    try:
        count = 3000
        size = message_size_to_overflow(count)
        texts = [f"message {n:04d} " + "x" * (size - 13) for n in range(count)]

        def pump() -> None:
            try:
                for text in texts:
                    sender.send(text)
            except OSError:             # the sender ended: the waits below say why
                pass

        feeder = threading.Thread(target=pump, daemon=True)
        feeder.start()
        for client in (bob, alice, sender):
            mark = client.mark()
            got = []
            for n in range(count):
                event = client.wait_for(lambda e: e.get("type") in ("message", "closed"),
                                        timeout=30)
                assert event["type"] == "message", (
                    f"{client.label} got {n} of {count} messages, then {event!r}")
                got.append(event)
            wrong = [(n, e["text"][:20]) for n, e in enumerate(got) if e["text"] != texts[n]]
            assert not wrong, f"{client.label}: out of order or altered: {wrong[:5]}"
            assert all(e["from"] == "sender" for e in got)
            seqs = [e["seq"] for e in got]
            assert seqs == sorted(seqs) and len(set(seqs)) == count
            leave = client.wait_for(is_system("leave", "slow"), timeout=30, since=mark)
            assert "too slow" in leave["text"], leave
        feeder.join(10)
        bob.send("/who")
        assert bob.wait_for("members")["members"] == ["alice", "bob", "sender"]
    finally:
        slow.proc.send_signal(signal.SIGCONT)

    closed = slow.wait_for("closed", timeout=30)
    assert closed["reason"] != "quit", closed
    assert slow.wait(30) == 3
    assert slow.seen()[-1] == closed


def test_burst_from_one_sender_does_not_cut_fast_readers(start_host, join, raw_connect):
    """--outbox-limit 65536: one sender's burst of 60 x 4000-byte messages
    (240 kB in one write) reaches every reader that keeps reading; nobody
    is disconnected as too slow (only a peer that does not take its bytes
    is, README "Host rules")."""
    host = start_host("--outbox-limit", "65536", "--rate-limit", "0")  # 60 lines at once
    alice = join(host.port, "R", "alice")
    bob = join(host.port, "R", "bob")
    sock = raw_connect(host.port)
    raw_login(sock, "R", "sender")
    for client in (alice, bob):
        client.wait_for(is_system("enter", "sender"))
    marks = {c.label: c.mark() for c in (alice, bob)}

    texts = [f"burst {n:02d} " + "y" * 3991 for n in range(60)]
    sock.sendall(b"".join(frame_json({"type": "say", "id": f"b-{n}", "text": text})
                          for n, text in enumerate(texts)))
    for client in (alice, bob):
        for n, text in enumerate(texts):
            got = client.wait_for(lambda e: e.get("type") in ("message", "closed"))
            assert got.get("text") == text, (
                f"{client.label} got {n} of {len(texts)} messages, then "
                f"{ {k: str(v)[:60] for k, v in got.items()} }")
        notices = [e for e in client.seen()[marks[client.label]:]
                   if e.get("type") == "system"]
        assert not notices, notices

    confirmed = []
    try:
        while len(confirmed) < len(texts):
            got, _ = read_frame_until(sock, lambda f: f.get("type") in ("message", "closing"))
            assert got["type"] == "message", got
            confirmed.append(got["text"])
    except (ConnectionError, AssertionError) as exc:
        pytest.fail(f"the sender was disconnected after {len(confirmed)} "
                    f"confirmations: {exc!r}")
    assert confirmed == texts


# --- 15/16. commands ------------------------------------------------------------------------------

def test_unknown_command_and_double_slash(host, join):
    """/frobnicate: unknown_command, nothing sent; //literal sends /literal."""
    alice = join(host.port, "R", "alice")
    bob = join(host.port, "R", "bob")
    alice.wait_for(is_system("enter", "bob"))
    alice.send("/frobnicate")
    assert alice.wait_for("error")["code"] == "unknown_command"
    between = exchange_sentinel(alice, [bob], "plain")
    assert not of_type(between["client bob"], "message")
    alice.send("//literal")
    for client in (alice, bob):
        got = client.wait_for("message")
        assert got["text"] == "/literal" and got["from"] == "alice", got


def test_check_in_any_case_invites_and_only_the_callee_hears(host, join):
    """/CHECK USER and /check USER both invite USER alone; a missing ID is a
    usage error and nothing is sent. (Calls themselves: test_calls_e2e.py.)"""
    alice = join(host.port, "R", "alice", "--camera", "none", "--audio", "null")
    bob = join(host.port, "R", "bob", "--camera", "none", "--audio", "null")
    carol = join(host.port, "R", "carol", "--camera", "none", "--audio", "null")
    alice.wait_for(is_system("enter", "carol"))
    for line in ("/CHECK bob", "/check bob"):
        alice.send(line)
        assert bob.wait_for("call_invite")["from"] == "alice"
    alice.send("/CHECK")
    assert alice.wait_for("error")["code"] == "no_such_user"
    between = exchange_sentinel(alice, [bob, carol], "after check")
    assert not of_type(between["client carol"], "call_invite", "message")
    assert not of_type(between["client bob"], "message", "system")


# --- 17. human output and control characters ------------------------------------------------------

def test_human_output_mode(host, join):
    """Without --json: "Joined room ..." and "[HH:MM:SS] alice: hi"."""
    alice = join(host.port, "R", "alice")
    carol = join(host.port, "R", "carol", json_mode=False)
    joined = carol.wait_for("Joined room")
    assert "Joined room R" in joined and "carol" in joined, joined
    alice.wait_for(is_system("enter", "carol"))
    alice.send("hi")
    line = carol.wait_for(lambda l: "alice: hi" in l)
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] alice: hi", line), line
    assert not [l for l in carol.seen() if l.lstrip().startswith("{")], carol.seen()
    carol.send("/quit")
    assert carol.wait() == 0


def test_control_characters_refused_with_bad_message(host, join, raw_connect):
    """An ANSI escape or a bidi override in a message: bad_message, nothing
    sent, whether the client or (for a raw peer) the host refuses it."""
    alice = join(host.port, "R", "alice")
    bob = join(host.port, "R", "bob")
    alice.wait_for(is_system("enter", "bob"))
    for text in ("\x1b[31mred", "abc\u202edef"):
        alice.send(text)
        answer = alice.wait_for(lambda e: e.get("type") in ("error", "message"))
        assert answer["type"] == "error" and answer["code"] == "bad_message", answer

    sock = raw_connect(host.port)
    raw_login(sock, "R", "mallory")
    bob.wait_for(is_system("enter", "mallory"))
    sock.sendall(frame_json({"type": "say", "id": "m1", "text": "\x1b[31mred"}))
    answer, _ = read_frame_until(sock, lambda f: f.get("type") in ("error", "message"))
    assert answer["type"] == "error" and answer["code"] == "bad_message", answer
    assert answer.get("id") == "m1", answer
    between = exchange_sentinel(alice, [bob], "after escapes")
    assert not of_type(between["client bob"], "message")


def test_resend_of_an_id_is_confirmed_not_shown_twice(host, join, raw_connect):
    """A resend of a remembered message id is confirmed again, never shown twice."""
    alice = join(host.port, "R", "alice")
    sock = raw_connect(host.port)
    raw_login(sock, "R", "mallory")
    alice.wait_for(is_system("enter", "mallory"))
    alice_mark = alice.mark()
    say = frame_json({"type": "say", "id": "r-1", "text": "once"})
    sock.sendall(say)
    first, _ = read_frame_until(sock, lambda f: f.get("type") == "message")
    sock.sendall(say)
    again, _ = read_frame_until(sock, lambda f: f.get("type") == "message")
    assert first["text"] == again["text"] == "once" and first["seq"] == again["seq"]
    alice.send("sentinel")
    alice.wait_for(is_message("sentinel", "alice"))
    assert [e["text"] for e in of_type(alice.between(alice_mark), "message")] == ["once"]


def test_multiline_message_cannot_pose_as_notice(host, join, raw_connect):
    """A message's later lines print indented behind `    | `, so a line of
    it can't pose as a `[SYSTEM]` notice; JSON keeps the text whole."""
    alice = join(host.port, "R", "alice")
    carol = join(host.port, "R", "carol", json_mode=False)
    carol.wait_for("Joined room")
    sock = raw_connect(host.port)
    raw_login(sock, "R", "mallory")
    carol.wait_for("mallory entered the room")
    text = "line one\n[SYSTEM] alice left the room\n\tindented"
    sock.sendall(frame_json({"type": "say", "id": "ml-1", "text": text}))
    got = alice.wait_for(is_message(sender="mallory"))
    assert got["text"] == text
    assert carol.wait_for("mallory: line one").endswith("mallory: line one")
    assert carol.next() == "    | [SYSTEM] alice left the room"
    assert carol.next() == "    | \tindented"
    assert not [line for line in carol.seen() if "alice left" in line
                and not line.startswith("    | ")], carol.seen()


def test_raw_protocol_version_mismatch_and_ping(host, raw_connect):
    """hello with another protocol version: `error` version_mismatch, closed.
    A `ping{n}` in a room is answered by `pong{n}`."""
    sock = raw_connect(host.port)
    sock.sendall(frame_json({"type": "hello", "version": 99, "room": "R", "user": "zed"}))
    answer = read_frame(sock)
    assert (answer["type"], answer["code"]) == ("error", "version_mismatch"), answer
    wait_closed(sock)

    sock = raw_connect(host.port)
    welcome = raw_login(sock, "R", "zed")
    assert welcome["members"] == ["zed"] and welcome["version"] == 1
    sock.sendall(frame_json({"type": "ping", "n": 41}))
    pong, _ = read_frame_until(sock, lambda f: f.get("type") == "pong")
    assert pong["n"] == 41
    sock.sendall(frame_json({"type": "bye"}))
    closing, _ = read_frame_until(sock, lambda f: f.get("type") == "closing")
    assert closing["reason"] == "bye"
    wait_closed(sock)


def test_max_sessions_refuses_with_host_full(start_host, join):
    """--max-sessions 2: a third connection is refused with host_full, exit 1;
    the two in the room go on."""
    host = start_host("--max-sessions", "2")
    alice = join(host.port, "R", "alice")
    bob = join(host.port, "R", "bob")
    assert_refused(join(host.port, "R", "carol", ready=False), "host_full")
    exchange_sentinel(alice, [bob], "still two")


# --- 18. flags ------------------------------------------------------------------------------------

def test_version_and_bad_flags():
    """--version prints "chatroom" and exits 0; --cli without --room exits 2."""
    version = subprocess.run([sys.executable, str(CHATROOM), "--version"],
                             capture_output=True, text=True, timeout=30)
    assert version.returncode == 0
    assert "chatroom" in version.stdout
    usage = subprocess.run([sys.executable, str(CHATROOM), "--cli", "--user", "alice",
                            "--server", f"{LOOPBACK}:1"],
                           capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2, usage
    assert usage.stderr.strip(), "argparse explains the error on stderr"
