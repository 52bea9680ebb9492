"""Lip sync (issue 12): a peer's sound and picture play within ITU-R BT.1359's
range (audio at most 45 ms ahead of its video, at most 125 ms behind), from
the capture times both carry.

The scheduling is PLAYOUT's LipSync, pure: the first tests drive it, with the
real JitterBuffer, through a simulated clock in which one side's video comes
late or early. The last two run terminal clients on loopback: alice's video
reaches bob and carol through UDP proxies that hold her video (or her sound)
back 300 ms; bob plays in sync, carol (--no-lip-sync) is the baseline of the
same run, and each says the skew it measures in media_stats' av_skew_ms
(positive: the sound came first). Waits are for events, with deadlines that
only catch a hang.
"""

from __future__ import annotations

import test_video_repair as vr

from bench.media import Proxy
from chatroom import (
    AV_AHEAD_MS,
    AV_BEHIND_MS,
    AV_MAX_AUDIO_DELAY_MS,
    AV_MAX_HOLD_MS,
    KIND_AUDIO,
    KIND_VIDEO,
    JitterBuffer,
    LipSync,
)


def in_range(skew: float | None) -> bool:
    return skew is not None and -AV_BEHIND_MS <= skew <= AV_AHEAD_MS


def simulate(video_late_ms: float, audio_late_ms: float, synced: bool = True,
             seconds: int = 8) -> tuple[LipSync, float | None]:
    """One peer's media through a simulated clock (1 ms steps; their clock = ours):
    sound in 20 ms frames through a JitterBuffer and LipSync.delay_audio to a
    playback tick, video at 30 fps shown when video_due says (synced) or as it
    comes. Each way takes 10 ms plus its lateness. Returns the LipSync and the
    skew of the last two seconds."""
    sync, jitter = LipSync(), JitterBuffer()
    audio_in: list[tuple[float, int]] = []         # (arrival, seq)
    video_in: list[tuple[float, float]] = []       # (arrival, capture)
    waiting: list[tuple[float, float]] = []        # (due, capture)
    skew = None
    for now in range(seconds * 1000):
        if now % 20 == 0:
            audio_in.append((now + 10 + audio_late_ms, now // 20))
        if now % 33 == 0:
            video_in.append((now + 10 + video_late_ms, now))
        while audio_in and audio_in[0][0] <= now:
            seq = audio_in.pop(0)[1]
            jitter.push(seq, b"voice", now)
            sync.audio_arrived(seq, seq * 20)
        while video_in and video_in[0][0] <= now:
            capture = video_in.pop(0)[1]
            due = sync.video_due(capture, now)
            waiting.append((due if synced else now, capture))
        for due, capture in [w for w in waiting if w[0] <= now]:
            waiting.remove((due, capture))
            sync.video_shown(capture, now)
        if now % 20 == 5:                           # the playback clock
            status, payload = jitter.pop()
            seq = jitter.last_seq if status != "empty" else None
            if synced:
                status, payload, seq = sync.delay_audio(status, payload, seq)
            sync.audio_played(seq, now)
        if now == (seconds - 2) * 1000:
            sync.skew()                             # the last two seconds only
    skew = sync.skew()
    return sync, skew


def test_video_earlier_than_its_sound_waits_for_it():
    sync, skew = simulate(video_late_ms=0, audio_late_ms=300)
    assert in_range(skew)
    assert sync.audio_delay_ms == 0                 # the sound is never held for it
    _, unsynced = simulate(video_late_ms=0, audio_late_ms=300, synced=False)
    assert unsynced is not None and unsynced < -AV_BEHIND_MS


def test_video_later_than_its_sound_holds_the_sound_back():
    sync, skew = simulate(video_late_ms=300, audio_late_ms=0)
    assert in_range(skew)
    assert 0 < sync.audio_delay_ms <= AV_MAX_AUDIO_DELAY_MS
    _, unsynced = simulate(video_late_ms=300, audio_late_ms=0, synced=False)
    assert unsynced is not None and unsynced > AV_AHEAD_MS


def test_in_step_media_is_left_alone():
    sync, skew = simulate(video_late_ms=0, audio_late_ms=0)
    assert in_range(skew) and sync.audio_delay_ms == 0


def test_the_sound_delay_comes_back_down_when_the_video_catches_up():
    sync = LipSync()
    sync.audio_delay_ms = 200
    for n in range(10):                             # the delay line fills: gaps first
        assert sync.delay_audio("frame", b"%d" % n, n) == (
            ("empty", None, None) if n < 10 else ("frame", b"0", 0))
    assert sync.delay_audio("frame", b"10", 10) == ("frame", b"0", 0)
    sync.audio_delay_ms = 100                       # shorter: the oldest are dropped
    assert sync.delay_audio("frame", b"11", 11) == ("frame", b"6", 6)


def test_without_sound_video_shows_at_once_and_never_waits_too_long():
    sync = LipSync()
    assert sync.video_due(1000, 5000) == 5000       # no sound ever played
    sync.audio_arrived(1, 1000)
    sync.audio_played(1, 5000)                      # their 1000 plays at our 5000
    assert sync.video_due(1000, 4990) == 5000       # with its sound
    assert sync.video_due(2000, 5010) == 5010 + AV_MAX_HOLD_MS      # held, not for ever
    assert sync.video_due(1100, 5000 + 10_000) == 15_000    # the sound stopped long ago
    assert sync.skew() is None


def test_unknown_or_concealed_sound_moves_no_clock():
    sync = LipSync()
    sync.audio_played(None, 100)                    # a gap, concealment
    sync.audio_played(7, 100)                       # a frame whose arrival we never saw
    assert sync.video_due(50, 100) == 100


# --- end to end: terminal clients, one way's video or sound held back -------------------

HELD_MS = 300


def sync_run(host, join, kind: int) -> tuple[list[float], list[float]]:
    """alice sends to bob (lip sync on) and carol (off), each through a proxy that
    holds alice's packets of `kind` back HELD_MS. Returns the av_skew_ms bob and
    carol say over 4 lines each, once bob's has been in range and video flows."""
    alice = join(host.port, "r", "alice", *vr.MEDIA)
    bob = join(host.port, "r", "bob", "--camera", "none", "--audio", "null")
    carol = join(host.port, "r", "carol", "--camera", "none", "--audio", "null",
                 "--no-lip-sync")
    proxies = [Proxy(), Proxy()]
    try:
        for proxy, peer in zip(proxies, (bob, carol)):
            proxy.delay_s[(0, kind)] = HELD_MS / 1000
            vr.direct_call(alice, peer, proxy)
        vr.stats(bob, "alice", lambda e: e["video_fps"] > 5 and in_range(e["av_skew_ms"]),
                 vr.DEADLINE)
        bob_skews = [vr.stats(bob, "alice")["av_skew_ms"] for _ in range(4)]
        vr.stats(carol, "alice", lambda e: e["video_fps"] > 5 and e["av_skew_ms"] is not None)
        carol_skews = [vr.stats(carol, "alice")["av_skew_ms"] for _ in range(4)]
        return bob_skews, carol_skews
    finally:
        for proxy in proxies:
            proxy.stop()


def test_late_video_plays_in_sync_with_its_sound(host, join):
    synced, unsynced = sync_run(host, join, KIND_VIDEO)
    assert all(in_range(skew) for skew in synced), synced
    assert all(skew is not None and skew > AV_AHEAD_MS for skew in unsynced), unsynced


def test_early_video_waits_for_its_late_sound(host, join):
    synced, unsynced = sync_run(host, join, KIND_AUDIO)
    assert all(in_range(skew) for skew in synced), synced
    assert all(skew is not None and skew < -AV_BEHIND_MS for skew in unsynced), unsynced
