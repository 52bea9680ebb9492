"""Terminal clients that get back after a drop (chatroom.py: CLIENT CORE's
_reconnect, the host's seats), driven as a person or a script would: a
host, clients with --cli --json, and a FaultProxy (tests/faults.py) between
a client and the host that cuts, resets and stalls connections. Everything
is on 127.0.0.1.

The bar (issue "never lose a message"): after any number of drops, every
message sent is delivered exactly once and in order, nobody sees a member
leave and come back for a drop shorter than the grace period, and what a
person typed while away is sent once they are back.
"""

from __future__ import annotations

import random
import threading


def messages_from(client, sender: str) -> list[dict]:
    return [e for e in client.seen() if e.get("type") == "message" and e["from"] == sender
            and not e.get("history")]


def test_a_cut_connection_comes_back_with_what_it_missed(start_host, join, faulty):
    host = start_host("--grace", "30")
    proxy = faulty(host.port)
    alice = join(proxy.port, "R", "alice")
    bob = join(host.port, "R", "bob")
    alice.wait_for(lambda e: e.get("type") == "system" and e["user"] == "bob")
    proxy.cut()
    trying = alice.wait_for("reconnecting", timeout=30)
    assert trying["attempt"] == 1 and trying["reason"] == "connection_lost", trying
    for n in range(5):
        bob.send(f"while alice was away {n}")
    alice.send("typed while away")
    back = alice.wait_for("resumed", timeout=30)
    assert back["lost"] == 0 and back["room"] == "R"
    bob.wait_for(lambda e: e.get("type") == "message" and e["text"] == "typed while away")
    bob.send("sentinel")
    alice.wait_for(lambda e: e.get("type") == "message" and e["text"] == "sentinel")
    got = [e["text"] for e in messages_from(alice, "bob")]
    assert got == [f"while alice was away {n}" for n in range(5)] + ["sentinel"], got
    assert [e["text"] for e in messages_from(bob, "alice")] == ["typed while away"]
    assert not [e for e in bob.seen() if e.get("type") == "system" and e["user"] == "alice"
                and e["event"] == "leave"], "bob saw alice leave for a short drop"
    assert not [e for e in alice.seen() if e.get("type") == "closed"]


def test_a_killed_host_that_restarts_gets_everyone_back(start_host, join):
    host = start_host()
    alice = join(host.port, "R", "alice")
    bob = join(host.port, "R", "bob")
    alice.wait_for(lambda e: e.get("type") == "system" and e["user"] == "bob")
    port = host.port
    host.proc.kill()                        # kill -9: no goodbye
    host.proc.wait(10)
    for client in (alice, bob):
        client.wait_for("reconnecting", timeout=30)
    alice.send("said while the host was down")
    again = start_host("--port", str(port))
    assert again.port == port
    for client in (alice, bob):
        ready = client.wait_for("ready", timeout=60)    # a fresh login: it forgot us
        assert ready["room"] == "R"
    bob.wait_for(lambda e: e.get("type") == "message"
                 and e["text"] == "said while the host was down", timeout=30)
    alice.send("/quit")
    assert alice.wait() == 0


def test_it_gives_up_after_retry_for(start_host, join):
    host = start_host()
    alice = join(host.port, "R", "alice", "--retry-for", "2")
    host.proc.kill()
    host.proc.wait(10)
    alice.wait_for("reconnecting", timeout=30)
    closed = alice.wait_for("closed", timeout=60)
    assert closed["reason"] == "connection_lost", closed
    assert alice.wait() == 3
    assert alice.seen()[-1] == closed


def test_quitting_while_away_is_leaving(start_host, join):
    host = start_host()
    alice = join(host.port, "R", "alice")
    host.proc.kill()
    host.proc.wait(10)
    alice.wait_for("reconnecting", timeout=30)
    alice.send("/quit")
    closed = alice.wait_for("closed", timeout=30)
    assert closed["reason"] == "quit" and alice.wait() == 0


def test_nothing_lost_or_doubled_through_random_faults(start_host, join, faulty):
    """Cuts, resets and stalls at random moments while both sides talk:
    once it settles, each gets every line of the other exactly once, in
    order."""
    host = start_host("--grace", "60", "--rate-limit", "0")   # 100 lines a second each
    proxy = faulty(host.port)
    alice = join(proxy.port, "R", "alice")
    bob = join(host.port, "R", "bob")
    alice.wait_for(lambda e: e.get("type") == "system" and e["user"] == "bob")
    count = 120
    rng = random.Random(20261201)
    stop = threading.Event()

    def chaos() -> None:
        for _ in range(12):                 # bounded: twelve faults, then calm
            if stop.wait(rng.uniform(0.2, 0.8)):
                return
            rng.choice([proxy.cut, proxy.reset, lambda: proxy.pause(rng.uniform(0.1, 0.6))])()

    breaker = threading.Thread(target=chaos, daemon=True)
    breaker.start()
    for n in range(count):
        alice.send(f"a{n:03d}")
        bob.send(f"b{n:03d}")
        if n % 10 == 9:
            stop.wait(0.1)                  # a person's pace, roughly
    breaker.join(30)
    stop.set()
    alice.send("a-end")
    bob.send("b-end")
    alice.wait_for(lambda e: e.get("type") == "message" and e["text"] == "b-end", timeout=120)
    bob.wait_for(lambda e: e.get("type") == "message" and e["text"] == "a-end", timeout=120)
    assert [e["text"] for e in messages_from(alice, "bob")] == \
        [f"b{n:03d}" for n in range(count)] + ["b-end"]
    assert [e["text"] for e in messages_from(bob, "alice")] == \
        [f"a{n:03d}" for n in range(count)] + ["a-end"]
    assert proxy.faults >= 12 and proxy.accepted > 1, (proxy.faults, proxy.accepted)
    assert not [e for e in alice.seen() if e.get("type") == "closed"]


def test_a_call_goes_on_through_a_short_drop_of_the_chat_connection(start_host, join,
                                                                   faulty):
    """Call media goes peer to peer over UDP, not through the connection to
    the host: a cut of alice's connection to the host ends nothing, and
    video keeps arriving both ways after she is back."""
    host = start_host("--grace", "30")
    proxy = faulty(host.port)
    media = ("--camera", "test", "--audio", "null")
    alice = join(proxy.port, "R", "alice", *media)
    bob = join(host.port, "R", "bob", *media)
    alice.wait_for(lambda e: e.get("type") == "system" and e["user"] == "bob")
    alice.send("/CHECK bob")
    bob.wait_for("call_invite", timeout=30)
    bob.send("/CHECK alice")
    for me, peer in ((alice, "bob"), (bob, "alice")):
        me.wait_for(lambda e, p=peer: e.get("type") == "call_connected" and e["peer"] == p,
                    timeout=30)
    proxy.cut()
    alice.wait_for("reconnecting", timeout=30)
    alice.wait_for("resumed", timeout=30)
    marks = [(alice, "bob", len(alice.seen())), (bob, "alice", len(bob.seen()))]
    for me, peer, mark in marks:            # frames still arrive, after the drop
        me.wait_for(lambda e, p=peer: e.get("type") == "media_stats" and e["peer"] == p
                    and e["video_fps"] > 0, timeout=30, since=mark)
    for me in (alice, bob):
        assert not [e for e in me.seen() if e.get("type") == "call_ended"], me.seen()
