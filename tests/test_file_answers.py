"""Asking before a big file, declining it, cancelling a transfer in flight.

`--ask-above SIZE` makes a file larger than SIZE wait for `/accept N` or
`/decline N` (its `file_offer` says `ask: true`); `/cancel N` stops a file
either way, and the other side is told at once. Every client here is a
real `--cli --json` process on 127.0.0.1 (the terminal contract), through a
real host; "mid-transfer" is made certain by test_files' FrameProxy, which
holds the data after two chunks, never by timing. Nothing on disk is shown
by listing the downloads folder once a later event has arrived.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from faults import FaultProxy
from test_files import (  # noqa: F401 (fixtures are found by name)
    ROOM,
    KiB,
    MiB,
    check_received,
    ev,
    exchange,
    listing,
    member,
    part_files,
    plain_tcp,
    proxy,
    room_host,
    spool,
    spool_files,
    wait_until,
    write_big,
    write_file,
)

import chatroom

SECONDS = 30.0                  # a failure deadline, never a promise


def json_only(body: bytes) -> bool:
    """release(keep=): let events through, drop the held file data."""
    return body[:1] == b"{"


def no_file_rest(body: bytes) -> bool:
    """release(keep=): events but the file's data and file_end (the rest of
    a file that was cancelled behind them, whatever had been queued)."""
    return json_only(body) and json.loads(body).get("type") != "file_end"


def sent_number(client) -> int:
    """The transfer number of the file `client` just began to send."""
    return client.wait_for(ev("file_progress", direction="send"))["transfer"]


# --- asking first ------------------------------------------------------------

def test_big_file_waits_for_accept_then_arrives_verified(room_host, member, tmp_path):  # noqa: F811
    """bob asks above 1 MiB: a 2 MiB room file waits for him (ask: true, no
    .part), while carol, who never asks, gets it at once; /accept brings it,
    verified. A file under his limit comes without a question (ask: false)."""
    alice = member(room_host.port, "alice")
    bob = member(room_host.port, "bob", "--ask-above", "1M")
    carol = member(room_host.port, "carol")
    source = tmp_path / "src" / "big.bin"
    digest = write_file(source, os.urandom(2 * MiB + 3))

    alice.send(f"/send {source}")
    offer = bob.wait_for(ev("file_offer", name="big.bin"))
    assert offer["ask"] is True and offer["size"] == 2 * MiB + 3, offer
    assert carol.wait_for(ev("file_offer", name="big.bin"))["ask"] is False
    check_received(carol.wait_for("file_received", timeout=SECONDS), carol.downloads,
                   2 * MiB + 3, digest, source)
    alice.wait_for(ev("file_delivered", user="carol"), timeout=SECONDS)
    exchange(alice, [bob, carol], "while bob thinks")
    assert listing(bob.downloads) == [], "a file that waits for an answer touched the disk"

    bob.send(f"/accept {offer['transfer']}")
    got = bob.wait_for("file_received", timeout=SECONDS)
    check_received(got, bob.downloads, 2 * MiB + 3, digest, source)
    alice.wait_for(ev("file_delivered", user="bob"), timeout=SECONDS, since=0)

    small = tmp_path / "src" / "small.txt"
    small_digest = write_file(small, b"under the limit")
    alice.send(f"/send {small}")
    offer = bob.wait_for(ev("file_offer", name="small.txt"))
    assert offer["ask"] is False, offer
    check_received(bob.wait_for(ev("file_received", name="small.txt"), timeout=SECONDS),
                   bob.downloads, len(b"under the limit"), small_digest, small)


def test_decline_leaves_nothing_tells_the_sender_and_others_still_get_it(
        room_host, member, tmp_path, spool):  # noqa: F811
    """bob declines a room file: nothing of it in his folder, alice gets
    file_failed{code: declined, user: bob}, carol gets the file verified,
    and the host's spool ends empty."""
    alice = member(room_host.port, "alice")
    bob = member(room_host.port, "bob", "--ask-above", "100K")
    carol = member(room_host.port, "carol")
    source = tmp_path / "src" / "photos.zip"
    digest = write_big(source, 6 * MiB)

    alice.send(f"/send {source}")
    offer = bob.wait_for(ev("file_offer", name="photos.zip"))
    assert offer["ask"] is True, offer
    bob.send(f"/decline {offer['transfer']}")
    mine = bob.wait_for("file_failed")
    assert mine["code"] == "declined" and mine["direction"] == "receive", mine
    assert mine["by"] == "bob" and mine["transfer"] == offer["transfer"], mine
    told = alice.wait_for(ev("file_failed", user="bob"), timeout=SECONDS)
    assert told["code"] == "declined" and told["direction"] == "send", told
    check_received(carol.wait_for("file_received", timeout=SECONDS), carol.downloads,
                   6 * MiB, digest, source)
    alice.wait_for(ev("file_delivered", user="carol"), timeout=SECONDS, since=0)
    exchange(alice, [bob, carol], "after the decline")
    assert listing(bob.downloads) == []
    assert not [e for e in bob.seen() if e["type"] == "file_received"]
    wait_until(lambda: not spool_files(spool), "the host's spool is empty")
    # A later answer to the same file is refused: it no longer waits.
    bob.send(f"/accept {offer['transfer']}")
    assert bob.wait_for("error")["code"] == "no_such_transfer"
    # /decline of a number no file waits under is /decline USER, as before
    # (a User ID may be a number): the host has no "3" in the room.
    bob.send(f"/decline {offer['transfer']}")
    assert bob.wait_for("error")["code"] == "no_such_user"


def test_an_unanswered_file_waits_in_the_spool_and_its_sender_can_cancel(
        room_host, member, tmp_path, spool):  # noqa: F811
    """A 40 MiB one-to-one file nobody answers yet: the host takes it all
    into its spool (file_sent) rather than stop reading alice, so her chat
    still gets through; her /cancel then reaches bob (file_failed
    cancelled, by alice), who keeps nothing, and the spool empties.

    Regression: with the sender paused for a recipient who had not
    answered, the host stopped reading alice: her chat and her /cancel
    waited behind her file for ever."""
    alice = member(room_host.port, "alice")
    bob = member(room_host.port, "bob", "--ask-above", "1M")
    source = tmp_path / "src" / "movie.mkv"
    write_big(source, 40 * MiB)         # past the host's largest window (16 MiB)

    alice.send(f"/send {source} @bob")
    number = sent_number(alice)
    offer = bob.wait_for(ev("file_offer", name="movie.mkv"))
    assert offer["ask"] is True and offer["to"] == "bob", offer
    alice.wait_for("file_sent", timeout=SECONDS)
    assert spool_files(spool), "the host kept the unanswered file nowhere"
    exchange(alice, [bob], "still waiting")
    alice.send(f"/cancel {number}")
    mine = alice.wait_for("file_failed")
    assert mine["code"] == "cancelled" and mine["by"] == "alice", mine
    told = bob.wait_for("file_failed", timeout=SECONDS)
    assert told["code"] == "cancelled" and told["by"] == "alice", told
    assert told["transfer"] == offer["transfer"], told
    exchange(alice, [bob], "after the cancel")
    assert listing(bob.downloads) == []
    wait_until(lambda: not spool_files(spool), f"spool empty: {spool_files(spool)}")
    bob.send(f"/accept {offer['transfer']}")
    assert bob.wait_for("error")["code"] == "no_such_transfer"


def test_a_question_open_across_a_drop_is_answered_after_it(start_host, join, tmp_path):
    """bob's connection drops while a file waits for his answer: back in his
    seat, it still waits (nothing on disk), and /accept then brings it."""
    host = start_host("--grace", "60")
    gate = FaultProxy(host.port)
    try:
        alice = join(host.port, ROOM, "alice", "--downloads", str(tmp_path / "dl-alice"))
        bob = join(gate.port, ROOM, "bob", "--downloads", str(tmp_path / "dl-bob"),
                   "--ask-above", "1M")
        source = tmp_path / "src" / "later.bin"
        digest = write_big(source, 3 * MiB)
        alice.send(f"/send {source} @bob")
        offer = bob.wait_for(ev("file_offer", name="later.bin"))
        assert offer["ask"] is True, offer
        gate.cut()
        bob.wait_for("resumed", timeout=SECONDS)
        exchange(alice, [bob], "back again")
        assert listing(tmp_path / "dl-bob") == []
        bob.send(f"/accept {offer['transfer']}")
        got = bob.wait_for("file_received", timeout=SECONDS)
        check_received(got, tmp_path / "dl-bob", 3 * MiB, digest, source)
        alice.wait_for(ev("file_delivered", user="bob"), timeout=SECONDS)
    finally:
        gate.close()


# --- cancelling in flight ----------------------------------------------------

def test_sender_cancels_mid_transfer(room_host, member, proxy, tmp_path):  # noqa: F811
    """alice cancels while her file is certainly unfinished (a proxy holds
    her data after two chunks, her events go on): bob and carol get
    file_failed{code: cancelled, by: alice} and keep no .part."""
    gate = proxy(room_host.port, hold="up", hold_after=2)
    alice = member(gate.port, "alice")
    bob = member(room_host.port, "bob")
    carol = member(room_host.port, "carol")
    source = tmp_path / "src" / "eight.bin"
    write_big(source, 8 * MiB)

    alice.send(f"/send {source}")
    number = sent_number(alice)
    assert gate.holding.wait(SECONDS), "alice's data never reached the proxy"
    for client in (bob, carol):
        client.wait_for(ev("file_offer", name="eight.bin"))
    wait_until(lambda: part_files(bob.downloads), "bob's .part exists")
    alice.send(f"/cancel {number}")
    gate.release(keep=no_file_rest)         # the cancel goes up; the rest never does
    mine = alice.wait_for("file_failed")
    assert (mine["code"], mine["direction"], mine["by"]) == ("cancelled", "send", "alice")
    for client in (bob, carol):
        told = client.wait_for("file_failed", timeout=SECONDS)
        assert told["code"] == "cancelled" and told["by"] == "alice", told
        assert told["direction"] == "receive", told
    exchange(alice, [bob, carol], "after the cancel")
    for client in (bob, carol):
        wait_until(lambda c=client: listing(c.downloads) == [],
                   f"{client.label}: nothing left: {listing(client.downloads)}")
        assert not [e for e in client.seen() if e["type"] == "file_received"]


def test_recipient_cancels_mid_transfer_others_continue(room_host, member, proxy, tmp_path):  # noqa: F811
    """bob cancels a room file while it certainly comes to him (a proxy
    holds the rest): alice gets file_failed{user: bob, code: cancelled, by:
    bob}, carol still gets the file, bob's folder is empty."""
    gate = proxy(room_host.port, hold="down", hold_after=2)
    alice = member(room_host.port, "alice")
    bob = member(gate.port, "bob")
    carol = member(room_host.port, "carol")
    source = tmp_path / "src" / "eight.bin"
    digest = write_big(source, 8 * MiB)

    alice.send(f"/send {source}")
    offer = bob.wait_for(ev("file_offer", name="eight.bin"))
    assert gate.holding.wait(SECONDS), "no file data reached bob's proxy"
    wait_until(lambda: part_files(bob.downloads), "bob's .part exists")
    bob.send(f"/cancel receive {offer['transfer']}")
    mine = bob.wait_for("file_failed")
    assert (mine["code"], mine["by"]) == ("cancelled", "bob"), mine
    told = alice.wait_for(ev("file_failed", user="bob"), timeout=SECONDS)
    assert told["code"] == "cancelled" and told["by"] == "bob", told
    check_received(carol.wait_for("file_received", timeout=SECONDS), carol.downloads,
                   8 * MiB, digest, source)
    alice.wait_for(ev("file_delivered", user="carol"), timeout=SECONDS, since=0)
    gate.release()                          # what was held comes late: ignored
    exchange(alice, [bob, carol], "after bob's cancel")
    wait_until(lambda: listing(bob.downloads) == [],
               f"bob: nothing left: {listing(bob.downloads)}")
    assert not [e for e in bob.seen() if e["type"] == "file_received"]


def test_sender_cancels_after_the_host_has_it_all(room_host, member, proxy, tmp_path):  # noqa: F811
    """The host holds every byte (file_sent) while bob's copy is held up:
    alice's /cancel still stops it, bob is told, and keeps nothing (the
    held data and file_end never reach him)."""
    gate = proxy(room_host.port, hold="down", hold_after=2)
    alice = member(room_host.port, "alice")
    bob = member(gate.port, "bob")
    source = tmp_path / "src" / "four.bin"
    write_big(source, 3 * MiB)

    alice.send(f"/send {source} @bob")
    number = sent_number(alice)
    alice.wait_for("file_sent", timeout=SECONDS)
    assert gate.holding.wait(SECONDS), "no file data reached bob's proxy"
    alice.send(f"/cancel send {number}")
    assert alice.wait_for("file_failed")["code"] == "cancelled"
    gate.release(keep=no_file_rest)
    told = bob.wait_for("file_failed", timeout=SECONDS)
    assert told["code"] == "cancelled" and told["by"] == "alice", told
    wait_until(lambda: listing(bob.downloads) == [],
               f"bob: nothing left: {listing(bob.downloads)}")


# --- bad input ---------------------------------------------------------------

def test_unknown_or_malformed_transfer_is_a_clear_error(room_host, member):  # noqa: F811
    """/accept, /cancel of a number no file has, or without a number, get
    error{code: no_such_transfer} with a sentence; nothing else happens."""
    bob = member(room_host.port, "bob", "--ask-above", "1M")
    for line in ("/accept 42", "/cancel 42", "/cancel send 42", "/cancel receive 42",
                 "/accept", "/accept x", "/cancel", "/cancel sideways 3", "/cancel 0"):
        bob.send(line)
        error = bob.wait_for("error")
        assert error["code"] == "no_such_transfer", (line, error)
        assert error["message"], (line, error)


def test_parse_file_answers():
    """The one parser: /accept N, /decline N (a number), /cancel [send|receive] N;
    /decline of a name stays the call command."""
    parse = chatroom.parse_command
    assert parse("/accept 3") == chatroom.AnswerFile("/accept 3", 3, True, "3")
    assert parse("/decline 3") == chatroom.AnswerFile("/decline 3", 3, False, "3")
    assert parse("/decline bob") == chatroom.DeclineCall("/decline bob", "bob")
    assert parse("/cancel 7") == chatroom.CancelFile("/cancel 7", 7, None)
    assert parse("/CANCEL Send 7") == chatroom.CancelFile("/CANCEL Send 7", 7, "send")
    assert isinstance(parse("/accept ３"), chatroom.Mistyped)   # digits, but not ASCII


def test_wire_ask_fields_round_trip():
    """hello{ask}, file{ask} and a client's file_accept travel; an older
    peer's frames without `ask` still decode (ask false)."""
    for event in (chatroom.Hello(chatroom.PROTOCOL_VERSION, ROOM, "bob", ask=True),
                  chatroom.FileAnnounce(3, "alice", "a.bin", 5 * KiB, "", True)):
        body = chatroom.encode(event)[4:]
        assert chatroom.decode_body(body) == event
    old = json.dumps({"type": "file", "transfer": 3, "from": "alice", "name": "a",
                      "size": 1, "to": ""}).encode()
    assert chatroom.decode_body(old).ask is False
    assert (chatroom.State.READY, chatroom.FileAccept, chatroom.Role.CLIENT) \
        in chatroom.TRANSITIONS


def test_a_bad_ask_above_size_is_refused_with_a_sentence():
    """--ask-above takes --max-file-size's sizes; anything else exits 2 and
    says why on stderr, before any connection."""
    done = subprocess.run([sys.executable, chatroom.__file__, "--cli", "--room", ROOM,
                           "--user", "bob", "--server", "127.0.0.1:1", "--ask-above",
                           "lots"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done
    assert "--ask-above" in done.stderr and "not a size: 'lots'" in done.stderr, done.stderr


def test_the_windows_limit_comes_from_the_flag_else_the_setting_else_100_mib(tmp_path):
    """--ask-above wins; settings.json's ask_above ("2G", "never") comes
    next, kept by load_settings; anything else is the 100 MiB default."""
    pick = chatroom.window_ask_above
    assert pick(5 * KiB, "2G") == 5 * KiB
    assert pick(None, "2G") == 2 * 1024 * MiB
    assert pick(None, " Never ") >= 2 ** 62
    assert pick(None, "") == pick(None, "lots") == 100 * MiB == chatroom.GUI_ASK_ABOVE
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"room": "r", "ask_above": "250M", "other": "x"}))
    assert chatroom.load_settings(settings) == {"room": "r", "ask_above": "250M"}
