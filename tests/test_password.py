"""Room passwords (issue 14): ROOMS' Lock and Guesses as plain calls, the
host's login with raw clients in this process, and the terminal client and
host as real processes on 127.0.0.1.

The rules (README.md, "Room passwords"): whoever opens a room may give it a
password; joining it then needs the password (`wrong_password`); the host
keeps only a salted scrypt hash, forgets it with the room, and hears an
address's next guess only after a wait that doubles with each wrong one
(`rate_limited` until then; the wait is each error's `retry_after`). A
resume with a valid token needs no password. No test here measures time:
waits are read from the errors, and the tests wait them out.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import os
import secrets
import threading
import time
import types
import unicodedata
from typing import Any

import pytest
from faults import FaultProxy
from test_gui import assert_exits_cleanly, start_gui, unique
from test_gui import procs as procs  # fixtures
from test_gui import x as x
from test_host import LOCAL, RawClient
from test_host import clients as clients  # a fixture

import chatroom
from chatroom import (
    Error,
    Guesses,
    Hello,
    Lock,
    Refused,
    Resumed,
    Rooms,
    Welcome,
    guesser,
    password_key,
)
from guidriver import Cli
from guidriver import Host as HostProc

V = chatroom.PROTOCOL_VERSION
T0 = 1_700_000_000.0
SALT = b"s" * chatroom.SALT_BYTES
DEADLINE_S = 30.0


def lock(password: str, salt: bytes = SALT) -> Lock:
    return Lock(salt, password_key(password, salt))


def refused(code: str, call, *args, **kwargs) -> Refused:
    with pytest.raises(Refused) as info:
        call(*args, **kwargs)
    assert info.value.code == code, info.value
    return info.value


# --- ROOMS: the rules, as plain calls ----------------------------------------

def test_the_first_joiner_sets_the_password_and_later_joiners_need_it():
    rooms = Rooms(host_name="h")
    assert rooms.door("R", True) is None            # no room yet: a password makes its lock
    rooms.join("a", "R", "alice", T0, lock=lock("s3cret"))
    assert rooms.locked("R") and rooms.locked("r")   # room IDs ignore case
    assert rooms.door("R", True) == lock("s3cret")   # what the next joiner hashes with
    deliveries = rooms.join("b", "R", "bob", T0, lock=lock("s3cret"))
    assert isinstance(deliveries[0][1], Welcome)
    refused("wrong_password", rooms.join, "c", "R", "carol", T0, lock=lock("S3cret"))
    refused("wrong_password", rooms.join, "c", "R", "carol", T0, lock=lock("s3cret", b"x" * 16))
    no_password = refused("wrong_password", rooms.door, "R", False)
    assert "needs its password" in no_password.message
    refused("wrong_password", rooms.join, "c", "R", "carol", T0)
    assert rooms.room_of("c") is None and rooms.who("a")[0][1].members == ("alice", "bob")


def test_a_password_for_an_open_room_is_refused_not_ignored():
    """Someone who gives a password believes the room is private: joining
    an open room silently would leave them chatting in the open."""
    rooms = Rooms(host_name="h")
    rooms.join("a", "lobby", "alice", T0)
    assert rooms.door("lobby", False) is None and not rooms.locked("lobby")
    refusal = refused("room_not_protected", rooms.door, "lobby", True)
    assert "open without a password" in refusal.message
    refused("room_not_protected", rooms.join, "b", "lobby", "bob", T0, lock=lock("x"))
    rooms.join("b", "lobby", "bob", T0)             # without one: in


def test_the_password_is_checked_before_who_is_inside_is_told():
    rooms = Rooms(host_name="h", max_members=2)
    rooms.join("a", "R", "alice", T0, lock=lock("pw"))
    refused("wrong_password", rooms.join, "x", "R", "alice", T0, lock=lock("guess"))
    refused("user_taken", rooms.join, "x", "R", "alice", T0, lock=lock("pw"))
    rooms.join("b", "R", "bob", T0, lock=lock("pw"))
    refused("wrong_password", rooms.join, "x", "R", "carol", T0, lock=lock("guess"))
    refused("room_full", rooms.join, "x", "R", "carol", T0, lock=lock("pw"))


def test_an_empty_room_is_forgotten_with_its_password():
    rooms = Rooms(host_name="h")
    rooms.join("a", "R", "alice", T0, lock=lock("pw"))
    rooms.join("b", "R", "bob", T0, lock=lock("pw"))
    rooms.leave("a", T0)
    assert rooms.locked("R")                        # bob is still in
    rooms.leave("b", T0)
    assert not rooms.locked("R") and rooms.door("R", False) is None
    rooms.join("c", "R", "carol", T0)               # a new room, open
    refused("room_not_protected", rooms.door, "R", True)


def test_a_lock_and_a_hello_never_show_their_secret():
    secret = "hunter2-" + secrets.token_hex(4)
    made = lock(secret)
    assert made.key.hex() not in repr(made) and secret not in repr(made)
    hello = Hello(V, "R", "alice", password=secret)
    assert secret not in repr(hello) and secret not in str(hello)


def test_the_key_is_scrypt_of_the_nfc_password_with_the_salt():
    composed = unicodedata.normalize("NFC", "café-密码")
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    assert password_key(composed, SALT) == password_key(decomposed, SALT)
    assert password_key(composed, SALT) != password_key(composed, b"t" * 16)
    assert password_key(composed, SALT) == __import__("hashlib").scrypt(
        composed.encode(), salt=SALT, n=2 ** 14, r=8, p=1, maxmem=64 << 20, dklen=32)


def test_each_wrong_guess_doubles_the_wait_up_to_the_cap():
    guesses = Guesses(first_s=1, max_s=30)
    assert guesses.wait("10.0.0.9", T0) == 0
    earned = []
    now = T0
    for _ in range(7):
        earned.append(guesses.wrong("10.0.0.9", now))
        assert guesses.wait("10.0.0.9", now) == earned[-1]
        assert guesses.wait("10.0.0.9", now + earned[-1] / 2) == earned[-1] / 2
        now += earned[-1]                           # waited it out
        assert guesses.wait("10.0.0.9", now) == 0
    assert earned == [1, 2, 4, 8, 16, 30, 30]
    assert guesses.wait("10.0.0.8", T0) == 0        # per address


def test_an_address_quiet_for_long_starts_afresh_and_few_are_remembered():
    guesses = Guesses(first_s=1, max_s=30, forget_s=600, max_addresses=3)
    for _ in range(4):
        guesses.wrong("a", T0)
    assert guesses.wrong("a", T0 + 601) == 1        # forgotten: the first wait again
    for n, address in enumerate(["b", "c", "d"]):
        guesses.wrong(address, T0 + 700 + n)
    assert len(guesses) == 3 and guesses.wait("a", T0 + 703) == 0   # the oldest went
    assert guesses.wait("d", T0 + 702) == 1
    guesses.wrong("e", T0 + 2000)                   # all the rest are long forgotten
    assert len(guesses) == 1


def test_guesses_count_against_an_ipv4_address_or_an_ipv6_64():
    assert guesser("192.168.1.7") == "192.168.1.7"
    assert guesser("::ffff:192.168.1.7") == "192.168.1.7"
    assert guesser("2001:db8:1:2:aaaa::1") == guesser("2001:db8:1:2:ffff::9") \
        == "2001:db8:1:2::/64"
    assert guesser("2001:db8:1:3::1") != guesser("2001:db8:1:2::1")
    assert guesser("fe80::1%eth0") == "fe80::/64"
    assert guesser("?") == "?"


def test_an_old_client_sends_no_password_and_an_error_may_say_when_to_retry():
    hello = chatroom.decode_body(json.dumps({"type": "hello", "version": 1, "room": "R",
                                             "user": "u"}).encode())
    assert hello == Hello(V, "R", "u") and hello.password == ""
    error = Error("rate_limited", "wait", retry_after=2.5)
    assert chatroom.decode_body(chatroom.encode(error)[4:]) == error
    assert chatroom.ui_event(error) == {"type": "error", "code": "rate_limited",
                                        "message": "wait", "retry_after": 2.5}
    assert "retry_after" not in chatroom.ui_event(Error("room_full", "full"))
    with pytest.raises(chatroom.RemoteError):
        chatroom.decode_body(json.dumps({"type": "hello", "version": 1, "room": "R",
                                         "user": "u", "password": "x" * 257}).encode())


# --- HOST: raw clients, in this process ---------------------------------------

async def knock(port: int, room: str, user: str, password: str = "", *,
                source: str = LOCAL, token: str = "") -> tuple[RawClient, chatroom.Event]:
    """A login from `source`: (client, its Welcome, Resumed or Error)."""
    reader, writer = await asyncio.open_connection(LOCAL, port, local_addr=(source, 0))
    client = RawClient(reader, writer)
    client.send(Hello(V, room, user, "", token, 0, password))
    answer = await client.until(lambda e: isinstance(e, (Welcome, Resumed, Error)))
    return client, answer


async def guess_until_heard(port: int, room: str, password: str) -> tuple[Any, list[Error]]:
    """Guess until the host hears it (waiting out each rate_limited's
    retry_after): (its answer, the rate_limited errors before it)."""
    early = []
    while True:
        client, answer = await knock(port, room, "mallory", password)
        await client.close()
        if not isinstance(answer, Error) or answer.code != "rate_limited":
            return answer, early
        early.append(answer)
        await asyncio.sleep(answer.retry_after)


async def test_wrong_guesses_are_answered_with_a_wait_that_doubles(make_host, clients):
    host = await make_host(password_delay_s=0.05, password_delay_max_s=0.2)
    alice, welcome = await knock(host.port, "R", "alice", "right")
    assert isinstance(welcome, Welcome)
    waits = []
    for n in range(5):
        answer, early = await guess_until_heard(host.port, "R", f"wrong {n}")
        assert answer.code == "wrong_password" and answer.retry_after > 0, answer
        # A guess before the wait is over is not heard: never longer than it.
        assert all(0 < e.retry_after <= (waits[-1] if waits else 0) for e in early), early
        waits.append(answer.retry_after)
    assert waits == [0.05, 0.1, 0.2, 0.2, 0.2]
    answer, _ = await guess_until_heard(host.port, "R", "right")
    assert isinstance(answer, Welcome), answer      # the right one gets in
    await alice.close()


async def test_a_guess_while_its_address_waits_is_not_heard(make_host, clients):
    host = await make_host(password_delay_s=60)
    alice, _ = await knock(host.port, "R", "alice", "right")
    _, wrong = await knock(host.port, "R", "mallory", "guess")
    assert isinstance(wrong, Error) and wrong.code == "wrong_password"
    assert wrong.retry_after == 60 and "60 s" in wrong.message
    hashed = []
    real_key = chatroom.password_key
    chatroom.password_key = lambda *a: hashed.append(a) or real_key(*a)
    try:                            # even the right password waits: no guess is heard
        _, early = await knock(host.port, "R", "mallory", "right")
        assert isinstance(early, Error) and early.code == "rate_limited", early
        assert 0 < early.retry_after <= 60 and not hashed
        # Another address is not held up; an empty password is no guess.
        other, welcome = await knock(host.port, "R", "bob", "right", source="127.0.0.2")
        assert isinstance(welcome, Welcome) and len(hashed) == 1
        _, none = await knock(host.port, "R", "carol")
        assert isinstance(none, Error) and none.code == "wrong_password"
        assert none.retry_after == 0 and "needs its password" in none.message
    finally:
        chatroom.password_key = real_key
    await alice.close()
    await other.close()


async def test_scrypt_runs_on_a_thread_never_on_the_loop(make_host, clients):
    host = await make_host()
    threads = []
    real_key = chatroom.password_key
    chatroom.password_key = lambda *a: threads.append(threading.current_thread()) \
        or real_key(*a)
    try:
        first, _ = await knock(host.port, "R", "alice", "pw")     # sets it
        second, _ = await knock(host.port, "R", "bob", "pw")      # checks it
        _, wrong = await knock(host.port, "R", "eve", "nope")
    finally:
        chatroom.password_key = real_key
    assert isinstance(wrong, Error) and wrong.code == "wrong_password"
    assert len(threads) == 3
    assert all(t is not threading.current_thread() and t.name.startswith("host-scrypt")
               for t in threads), threads
    await first.close()
    await second.close()


def _reachable(root) -> list:
    """Every object reachable from `root` through chatroom's own objects and
    plain containers (not modules, classes, functions or the event loop)."""
    seen: set[int] = set()
    found = []
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        found.append(obj)
        if isinstance(obj, (str, bytes, bytearray, memoryview, type, types.ModuleType,
                            types.FunctionType, types.BuiltinFunctionType,
                            asyncio.AbstractEventLoop)):
            continue
        if isinstance(obj, (dict, list, tuple, set, frozenset, collections.deque,
                            types.MethodType)) or type(obj).__module__ == "chatroom":
            stack.extend(gc.get_referents(obj))
    return found


async def test_the_host_never_keeps_the_plaintext(make_host, clients):
    host = await make_host(password_delay_s=0.01)
    secret = "pw-" + secrets.token_hex(8)
    alice, _ = await knock(host.port, "R", "alice", secret)
    bob, _ = await knock(host.port, "R", "bob", secret)
    _, wrong = await knock(host.port, "R", "eve", secret + "!")
    assert isinstance(wrong, Error) and wrong.code == "wrong_password"
    room = host.rooms.room_of(next(iter(host.seats.values())))
    assert room is not None and room.lock is not None
    assert room.lock.key == password_key(secret, room.lock.salt)    # a hash, salted:
    assert len(room.lock.salt) == 16 and room.lock.key != password_key(secret, SALT)
    held = _reachable(host)
    assert any(obj is room.lock for obj in held)    # the walk does reach the rooms
    leaks = [obj for obj in held if (isinstance(obj, str) and secret in obj)
             or (isinstance(obj, (bytes, bytearray)) and secret.encode() in obj)]
    assert not leaks, leaks
    await alice.close()
    await bob.close()


async def test_a_resume_with_a_valid_token_needs_no_password(make_host, clients):
    host = await make_host(grace_s=30)
    alice, welcome = await knock(host.port, "R", "alice", "pw")
    assert isinstance(welcome, Welcome) and welcome.resume
    alice.writer.transport.abort()                  # dropped
    async with asyncio.timeout(DEADLINE_S):
        while not any(seat.away_since is not None for seat in host.seats.values()):
            await asyncio.sleep(0.01)
    back, answer = await knock(host.port, "R", "alice", token=welcome.resume)
    assert isinstance(answer, Resumed), answer
    assert host.rooms.locked("R")
    # A token the host doesn't know is a fresh login, and that needs it.
    _, stranger = await knock(host.port, "R", "alice2", token="0" * 32)
    assert isinstance(stranger, Error) and stranger.code == "wrong_password"
    await back.close()


# --- End to end: the terminal client and the host as processes --------------

def test_a_wrong_password_is_refused_and_exits_with_status_1(start_host, join, monkeypatch):
    host = start_host()
    alice = join(host.port, "R", "alice", "--password", "s3cret")
    assert alice.ready["protected"] is True
    monkeypatch.setenv("CHATROOM_PASSWORD", "s3cret")   # the way that keeps it out of ps
    bob = join(host.port, "R", "bob")
    assert bob.ready["members"] == ["alice", "bob"] and bob.ready["protected"]
    monkeypatch.delenv("CHATROOM_PASSWORD")
    carol = join(host.port, "R", "carol", "--password", "S3CRET", ready=False)
    error = carol.wait_for("error")
    assert error["code"] == "wrong_password" and error["retry_after"] >= 1, error
    assert carol.wait_for("closed")["reason"] == "refused"
    assert carol.wait() == 1
    dave = join(host.port, "R", "dave", ready=False)            # an old habit: no password
    error = dave.wait_for("error")
    assert error["code"] == "wrong_password" and "needs its password" in error["message"]
    assert dave.wait() == 1
    erin = join(host.port, "lobby", "erin")                     # other rooms are open
    assert erin.ready["protected"] is False
    frank = join(host.port, "lobby", "frank", "--password", "x", ready=False)
    assert frank.wait_for("error")["code"] == "room_not_protected"
    assert frank.wait() == 1
    assert [e["user"] for e in alice.seen() if e.get("type") == "system"] == ["alice", "bob"]
    assert all(e.get("type") != "system" or e["user"] != "frank" for e in erin.seen())


def test_a_guess_while_the_address_waits_is_refused_rate_limited(start_host, join):
    host = start_host("--password-delay", "60")
    join(host.port, "R", "alice", "--password", "s3cret")
    carol = join(host.port, "R", "carol", "--password", "guess", ready=False)
    error = carol.wait_for("error")
    assert (error["code"], error["retry_after"]) == ("wrong_password", 60), error
    assert carol.wait() == 1
    again = join(host.port, "R", "carol", "--password", "s3cret", ready=False)
    early = again.wait_for("error")
    assert early["code"] == "rate_limited" and 0 < early["retry_after"] <= 60, early
    assert "try again in" in early["message"]
    assert again.wait() == 1


def test_a_room_left_empty_opens_again_without_a_password(start_host, join):
    host = start_host()
    alice = join(host.port, "R", "alice", "--password", "s3cret")
    alice.send("/quit")
    assert alice.wait_for("closed")["reason"] == "quit" and alice.wait() == 0
    bob = join(host.port, "R", "bob")               # a new room R, open
    assert bob.ready["members"] == ["bob"] and bob.ready["protected"] is False


def test_back_after_a_drop_and_after_the_host_forgot_the_seat(start_host, join):
    """A resume needs no password; a fresh login after the grace period
    does, and the client still has it (in memory)."""
    host = start_host("--grace", "1")
    proxy = FaultProxy(host.port)
    try:
        alice = join(proxy.port, "R", "alice", "--password", "s3cret")
        bob = join(host.port, "R", "bob", "--password", "s3cret")
        proxy.cut()
        assert alice.wait_for("resumed")["room"] == "R"
        alice.send("back once")
        bob.wait_for(lambda e: e.get("type") == "message" and e["text"] == "back once")
        proxy.refusing = True
        proxy.cut()
        bob.wait_for(lambda e: e.get("type") == "system" and e["event"] == "leave"
                     and e["user"] == "alice")      # the grace period passed
        proxy.refusing = False
        again = alice.wait_for(lambda e: e.get("type") in ("ready", "closed"))
        assert again["type"] == "ready" and again["protected"], again
        alice.send("back twice")
        bob.wait_for(lambda e: e.get("type") == "message" and e["text"] == "back twice")
        assert not [e for e in alice.seen() if e.get("type") == "error"]
    finally:
        proxy.close()


def test_the_password_never_reaches_the_disk(start_host, join, tmp_path):
    host = start_host("--grace", "30")
    secret = "pw-" + secrets.token_hex(8)
    alice = join(host.port, "R", "alice", "--password", secret, "--state-dir", str(tmp_path))
    deadline = time.monotonic() + DEADLINE_S        # the place is written within a second
    while not list(tmp_path.glob("places/*.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    (place,) = tmp_path.glob("places/*.json")
    assert "token" in json.loads(place.read_text())
    for root, _dirs, files in os.walk(tmp_path):
        for name in files:
            assert secret.encode() not in (tmp_path / root / name).read_bytes()
    alice.send("/quit")
    assert alice.wait() == 0


# --- The window: the launcher's password field, the chat window's lock --------

def test_the_launcher_joins_a_protected_room_with_its_password_field(x, tmp_path, procs):
    secret = "pw-" + secrets.token_hex(6)
    host = HostProc(unique("locked"), advertise=False, extra=["--password-delay", "0.2"])
    procs.append(host)
    alice = Cli(host.port, "R", "alice", extra=["--password", secret])
    procs.append(alice)
    assert alice.ready["type"] == "ready" and alice.ready["protected"]
    gui = start_gui(x, tmp_path, procs, "--server", f"{LOCAL}:{host.port}",
                    "--room", "R", "--user", "bob")

    def attempt(password: str | None) -> dict:
        """Type `password` (None: leave the field), click Join: the error
        shown, or the chat window's layout."""
        mark = gui.mark()
        if password is not None:
            gui.type_into("launcher", "password", password)
        gui.click("launcher", "join")
        return gui.wait_for(lambda e: (e.get("gui") == "launcher_status" and e["error"])
                            or (e.get("gui") == "window" and e["name"] == "chat"), 15, mark)

    assert "protected: type its password" in attempt(None)["text"]
    assert "wrong password" in attempt("guess")["text"].lower()
    gui.type_into("launcher", "password", secret)
    launcher = gui.window("launcher")
    assert "password" in launcher["elements"] and secret not in json.dumps(launcher)
    x.screenshot(tmp_path / "launcher-password.png", launcher["xid"])
    while (outcome := attempt(None)).get("gui") == "launcher_status":
        assert "try again" in outcome["text"], outcome          # the wait: try once more
    chat = gui.window("chat")
    assert chat["protected"] is True and chat["lock"][2] > 0
    x.screenshot(tmp_path / "chat-protected.png", chat["xid"])
    shot = tmp_path / "chat-protected.png"
    assert shot.stat().st_size > 0
    alice.wait_for(lambda e: e.get("type") == "system" and e["user"] == "bob")
    # Only whether a password was typed reaches the trace, and nothing reaches the disk.
    assert not [line for line in gui.lines if secret in json.dumps(line)]
    for root, _dirs, files in os.walk(tmp_path / "config"):
        for name in files:
            assert secret.encode() not in (tmp_path / "config" / root / name).read_bytes()
    gui.close("chat")
    assert_exits_cleanly(gui)
