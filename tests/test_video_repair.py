"""Video repair and adaptive rate end to end (issue 12): terminal clients
(`--cli --json --camera test --audio null`) in direct calls through the UDP
proxy of bench/media.py on 127.0.0.1, which loses packets at random, or is
capped like a slow link (a token bucket and a bounded queue that drops when
full).

What is checked is behaviour, read from the engine's own counters in
`media_stats`: frames repaired (`repaired`), frames given up (`video_lost`),
Nacks sent (`nacks`), fragments sent again (`resent`), and what the sender
sends now (`send_kbps`, `send_fps`, `send_width`, `send_height`). Every wait
is for an event, with a deadline that only catches a hang; nothing here
asserts how fast anything happens (bench/media.py measures that).
"""

from __future__ import annotations

from bench.media import Proxy
from conftest import free_udp_port

LOOPBACK = "127.0.0.1"
MEDIA = ("--camera", "test", "--audio", "null")
DEADLINE = 60.0                     # generous: the machine is shared and loaded
ADAPT_DEADLINE = 150.0              # a climb back to the full rate takes tens of seconds


def stats(client, peer: str, check=lambda e: True, timeout: float = DEADLINE) -> dict:
    """The next media_stats about `peer` that `check` accepts."""
    return client.wait_for(lambda e: e.get("type") == "media_stats" and e["peer"] == peer
                           and check(e), timeout)


def direct_call(alice, bob, proxy: Proxy | None = None) -> None:
    """alice and bob call each other directly, through `proxy` if given."""
    pa, pb = free_udp_port(), free_udp_port()
    if proxy is None:
        to_a, to_b = pa, pb
    else:
        proxy.route(to_a=pa, to_b=pb)
        to_b, to_a = proxy.port("a"), proxy.port("b")
    alice.send(f"/call {LOOPBACK} {pa} {to_b}")
    bob.send(f"/call {LOOPBACK} {pb} {to_a}")
    for one, other in ((alice, bob), (bob, alice)):
        one.wait_for(lambda e, p=other.user: e.get("type") == "call_connected"
                     and e["peer"] == p, DEADLINE)


def totals(client, peer: str, lines: int, check=lambda e: True) -> dict:
    """The sums of the next `lines` media_stats about `peer` (after `check` holds)."""
    seen = [stats(client, peer, check)]
    seen += [stats(client, peer) for _ in range(lines - 1)]
    return {key: sum(e[key] for e in seen)
            for key in ("repaired", "video_lost", "nacks", "resent", "keyframes", "video_fps")}


def test_at_five_percent_loss_video_flows_and_most_damaged_frames_are_repaired(host, join):
    alice = join(host.port, "r", "alice", *MEDIA)
    bob = join(host.port, "r", "bob", "--camera", "none", "--audio", "null")
    proxy = Proxy(loss=0.05)
    try:
        direct_call(alice, bob, proxy)
        seen = totals(bob, "alice", 8, lambda e: e["video_fps"] > 5)
        assert seen["video_fps"] > 8 * 5                    # flowing all along
        assert seen["repaired"] > 0 and seen["repaired"] > seen["video_lost"]
        assert proxy.take_dropped_pct() > 0
        # Parity rebuilds most; what it can't, bob asks for and alice sends again.
        sent_again = totals(alice, "bob", 8)["resent"]
        assert seen["nacks"] > 0 and sent_again > 0
    finally:
        proxy.stop()


def test_retransmission_alone_repairs_frames(host, join):
    alice = join(host.port, "r", "alice", *MEDIA, "--video-repair", "nack")
    bob = join(host.port, "r", "bob", "--camera", "none", "--audio", "null",
               "--video-repair", "nack")
    proxy = Proxy(loss=0.05)
    try:
        direct_call(alice, bob, proxy)
        seen = totals(bob, "alice", 8, lambda e: e["video_fps"] > 5)
        assert seen["nacks"] > 0 and seen["repaired"] > seen["video_lost"]
        assert totals(alice, "bob", 4, lambda e: e["resent"] > 0)["resent"] > 0
    finally:
        proxy.stop()


def test_without_repair_nothing_is_asked_again(host, join):
    alice = join(host.port, "r", "alice", *MEDIA, "--video-repair", "none")
    bob = join(host.port, "r", "bob", "--camera", "none", "--audio", "null",
               "--video-repair", "none")
    proxy = Proxy(loss=0.05)
    try:
        direct_call(alice, bob, proxy)
        seen = totals(bob, "alice", 6, lambda e: e["video_lost"] > 0)
        assert seen["nacks"] == 0 and seen["repaired"] == 0 and seen["keyframes"] > 0
    finally:
        proxy.stop()


def full_rate(e: dict) -> bool:
    return (e["send_kbps"], e["send_fps"], e["send_width"], e["send_height"]) == (
        1000, 30, 640, 480)


def test_under_a_cap_the_sender_lowers_its_rate_and_recovers_when_it_lifts(host, join):
    alice = join(host.port, "r", "alice", *MEDIA)
    bob = join(host.port, "r", "bob", "--camera", "none", "--audio", "null")
    proxy = Proxy()
    try:
        direct_call(alice, bob, proxy)
        stats(bob, "alice", lambda e: e["video_fps"] > 5)
        stats(alice, "bob", full_rate)
        proxy.set_cap(250, way=0)                           # alice -> bob: 250 kb/s
        low = stats(alice, "bob", lambda e: e["send_kbps"] <= 250, DEADLINE)
        assert low["send_fps"] <= 30 and low["send_width"] <= 640
        stats(bob, "alice", lambda e: e["video_fps"] > 0)   # a picture still comes
        proxy.set_cap(None)
        back = stats(alice, "bob", full_rate, ADAPT_DEADLINE)
        assert back["send_kbps"] == 1000
    finally:
        proxy.stop()


def test_a_congested_peer_slows_the_stream_but_never_freezes_the_others(host, join):
    # A call of three is a link between every two of them; direct calls let the
    # test put the capped proxy on one link (alice -> bob) and not the others.
    alice = join(host.port, "r", "alice", *MEDIA)
    bob = join(host.port, "r", "bob", "--camera", "none", "--audio", "null")
    carol = join(host.port, "r", "carol", "--camera", "none", "--audio", "null")
    proxy = Proxy()
    proxy.set_cap(100, way=0)                               # alice -> bob is very slow
    try:
        direct_call(alice, bob, proxy)
        direct_call(alice, carol)
        direct_call(bob, carol)
        low = stats(alice, "bob", lambda e: e["send_kbps"] < 1000, DEADLINE)
        assert low["send_kbps"] < 1000
        # Carol's video goes on, from the same (slower) encoder, every second,
        # while bob's way stays congested.
        stats(carol, "alice", lambda e: e["video_fps"] > 3)
        for _ in range(5):
            seen = stats(carol, "alice")
            assert seen["video_fps"] > 3 and seen["video_lost"] == 0
        assert stats(alice, "bob")["send_kbps"] < 1000
        assert proxy.overflow[0] > 0                        # bob's way really was full
    finally:
        proxy.stop()
