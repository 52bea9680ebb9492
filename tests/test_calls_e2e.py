"""Calls end to end: a host and terminal clients (`--cli --json`) as
subprocesses on 127.0.0.1, with stand-ins for devices this machine lacks:
`--camera test` (a moving pattern stamped with the user's ID and a frame
counter) and `--audio tone` (a 440 Hz sine) or `--audio null`. What a client
plays is checked through `--record DIR`: the stamped counters are read back
from the frames it wrote, and the tone is found in its WAV file by FFT.

Every wait is for an event, with a deadline that only catches a hang; no
test asserts how fast anything is (bench/media.py measures that).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import threading
import time
import wave
from pathlib import Path

import numpy as np

import chatroom
from conftest import free_udp_port

LOOPBACK = "127.0.0.1"
MEDIA = ("--camera", "test", "--audio", "tone")
CALL_DEADLINE = 30.0                # a call, its media and its stats: generous on a busy box


def stats(client, peer: str, check=lambda e: True, timeout: float = CALL_DEADLINE) -> dict:
    """The next media_stats about `peer` that `check` accepts."""
    return client.wait_for(lambda e: e.get("type") == "media_stats" and e["peer"] == peer
                           and check(e), timeout)


def connect(alice, bob) -> tuple[dict, dict]:
    """alice /CHECKs bob, bob calls back: both sides' call_connected."""
    alice.send(f"/CHECK {bob.user}")
    invite = bob.wait_for("call_invite")
    assert invite["from"] == alice.user
    bob.send(f"/CHECK {alice.user}")
    return (alice.wait_for(lambda e: e.get("type") == "call_connected"
                           and e["peer"] == bob.user, CALL_DEADLINE),
            bob.wait_for(lambda e: e.get("type") == "call_connected"
                         and e["peer"] == alice.user, CALL_DEADLINE))


def stamps(folder: Path, peer: str) -> list[int]:
    """The frame counters read back from the frames `--record` wrote."""
    import cv2
    found = []
    for png in sorted(folder.glob(f"{peer}-*.png"), key=lambda p: int(p.stem.rsplit("-", 1)[1])):
        frame = cv2.imread(str(png))
        if frame is not None and (n := chatroom.read_stamp(frame)) is not None:
            found.append(n)
    return found


def wait_for_files(folder: Path, pattern: str, count: int, timeout: float = CALL_DEADLINE):
    import time
    deadline = time.monotonic() + timeout
    while len(files := sorted(folder.glob(pattern))) < count:
        assert time.monotonic() < deadline, f"{count} x {pattern} in {folder}: {files}"
        time.sleep(0.2)                     # polling files another process writes
    return files


def tone_peak_hz(path: Path) -> float:
    with wave.open(str(path)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 48000)
        samples = np.frombuffer(wav.readframes(wav.getnframes()), np.int16).astype(float)
    samples = samples[-48000:]                  # the last second: playing steadily
    assert np.abs(samples).max() > 1000, "the recording is silent"
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / 48000)[spectrum.argmax()])


# --- /CHECK: the host arranges the call ---------------------------------------------

def test_check_call_back_connects_with_video_and_sound(host, join, tmp_path):
    record = tmp_path / "bob-plays"
    alice = join(host.port, "r", "alice", *MEDIA)
    bob = join(host.port, "r", "bob", *MEDIA, "--record", str(record))
    carol = join(host.port, "r", "carol", "--camera", "none", "--audio", "null")
    mark = carol.mark()
    on_alice, on_bob = connect(alice, bob)
    for event, peer in ((on_alice, "bob"), (on_bob, "alice")):
        assert event["peer"] == peer
        assert event["path"] == "direct" and event["safety_code"] is None
        assert (event["codec"], event["audio"]) == ("vp8", "opus")
        assert event["address"].startswith("127.0.0.1:")
    # Only bob was told; alice got no invitation, carol nothing at all.
    assert not [e for e in alice.seen() if e.get("type") == "call_invite"]
    carol.send("/who")
    carol.wait_for("members")
    assert not [e for e in carol.seen()[mark:] if str(e.get("type")).startswith("call")]
    # Media flows both ways, decoded: frames and audio in the stats.
    stats(bob, "alice", lambda e: e["video_fps"] > 5 and e["audio_frames"] > 10)
    stats(alice, "bob", lambda e: e["video_fps"] > 5 and e["audio_frames"] > 10)
    # What bob plays: alice's test pattern (counters read back, rising) and her tone.
    wait_for_files(record, "alice-*.png", 3)
    counters = stamps(record, "alice")
    assert len(counters) >= 2 and counters == sorted(counters) and counters[-1] > counters[0]
    assert abs(tone_peak_hz(record / "alice.wav") - 440) < 5


def test_jpeg_is_agreed_per_link_when_one_side_offers_only_it(host, join, tmp_path):
    """The fallback for a side without PyAV, negotiated per link: in one
    group, alice (JPEG only) gets JPEG both ways with bob and carol, while
    bob and carol keep VP8 between them; alice's pictures still decode to
    her rising test-pattern counters."""
    record = tmp_path / "bob-plays"
    alice = join(host.port, "r", "alice", *MEDIA, "--video-codec", "jpeg")
    bob = join(host.port, "r", "bob", *MEDIA, "--record", str(record))
    carol = join(host.port, "r", "carol", *MEDIA)
    on_alice, on_bob = connect(alice, bob)
    assert on_alice["codec"] == on_bob["codec"] == "jpeg"
    marks = alice.mark(), carol.mark()
    carol.send("/CHECK bob")                # bob is in a call: carol joins it
    bob.wait_for("call_invite")
    bob.send("/CHECK carol")
    codecs = {p: carol.wait_for(lambda e, p=p: e.get("type") == "call_connected"
                                and e["peer"] == p, CALL_DEADLINE, since=marks[1])["codec"]
              for p in ("alice", "bob")}
    assert codecs == {"alice": "jpeg", "bob": "vp8"}
    assert alice.wait_for(lambda e: e.get("type") == "call_connected" and e["peer"] == "carol",
                          CALL_DEADLINE, since=marks[0])["codec"] == "jpeg"
    stats(bob, "alice", lambda e: e["video_fps"] > 5)
    stats(carol, "bob", lambda e: e["video_fps"] > 5)
    wait_for_files(record, "alice-*.png", 3)
    counters = stamps(record, "alice")
    assert len(counters) >= 2 and counters == sorted(counters) and counters[-1] > counters[0]


def test_an_unanswered_call_fails_busy_after_the_call_timeout(start_host, join):
    host = start_host("--call-timeout", "1")
    alice = join(host.port, "r", "alice", *MEDIA)
    bob = join(host.port, "r", "bob", *MEDIA)
    alice.send("/CHECK bob")
    assert bob.wait_for("call_invite")["from"] == "alice"
    failed = alice.wait_for("call_failed")
    assert (failed["peer"], failed["reason"]) == ("bob", "busy")
    assert bob.wait_for("call_missed")["from"] == "alice"
    # bob's /CHECK alice is now a new invitation: alice is the one invited.
    bob.send("/CHECK alice")
    assert alice.wait_for("call_invite")["from"] == "bob"


def test_decline_and_refusals(host, join):
    alice = join(host.port, "r", "alice", *MEDIA)
    bob = join(host.port, "r", "bob", *MEDIA)
    alice.send("/CHECK bob")
    bob.wait_for("call_invite")
    bob.send("/decline alice")
    failed = alice.wait_for("call_failed")
    assert (failed["peer"], failed["reason"]) == ("bob", "declined")
    for line, code in (("/CHECK alice", "call_self"), ("/CHECK nobody", "no_such_user"),
                       ("/call 300.1.1.1 5000 5001", "bad_call_address"),
                       ("/call 127.0.0.1 5000", "bad_call_address"),
                       ("/hangup bob", "not_in_call")):
        alice.send(line)
        assert alice.wait_for("error")["code"] == code, line
    connect(alice, bob)
    alice.send("/CHECK bob")
    assert alice.wait_for("error")["code"] == "already_in_call"


def test_three_people_then_a_fourth_and_hanging_up(host, join):
    people = [join(host.port, "r", name, "--camera", "test", "--audio", "null")
              for name in ("alice", "bob", "carol", "dave")]
    alice, bob, carol, dave = people
    connect(alice, bob)
    connect(carol, alice)               # carol joins the call in progress
    bob.wait_for(lambda e: e.get("type") == "call_connected" and e["peer"] == "carol")
    connect(dave, bob)                  # and dave, through bob: linked with everyone
    for one in (alice, carol):
        one.wait_for(lambda e: e.get("type") == "call_connected" and e["peer"] == "dave")
    for one in people:                  # everyone sees everyone
        for other in people:
            if other is not one:
                stats(one, other.user, lambda e: e["video_fps"] > 0)
    alice.send("/hangup bob")           # ESC on bob's video: that link only
    ended = bob.wait_for("call_ended")
    assert (ended["peer"], ended["reason"]) == ("alice", "hangup")
    assert alice.wait_for("call_ended")["peer"] == "bob"
    stats(alice, "carol", lambda e: e["video_fps"] > 0)       # the rest goes on
    carol.send("/hangup")               # Backspace on her own video: every call
    for one in (alice, bob, dave):
        one.wait_for(lambda e: e.get("type") == "call_ended" and e["peer"] == "carol")


def test_a_full_call_refuses_one_more(start_host, join):
    host = start_host("--max-call-size", "2")
    alice, bob, carol = (join(host.port, "r", n, "--camera", "none", "--audio", "null")
                         for n in ("alice", "bob", "carol"))
    connect(alice, bob)
    carol.send("/CHECK alice")
    alice.wait_for("call_invite")
    alice.send("/CHECK carol")
    assert alice.wait_for("call_failed")["reason"] == "call_full"
    assert carol.wait_for("call_failed")["reason"] == "call_full"


def test_chat_and_a_file_keep_flowing_during_a_call(host, join, tmp_path):
    alice = join(host.port, "r", "alice", *MEDIA)
    bob = join(host.port, "r", "bob", *MEDIA, "--downloads", str(tmp_path / "dl"))
    connect(alice, bob)
    stats(bob, "alice", lambda e: e["video_fps"] > 5)
    data = os.urandom(8 * 1024 * 1024)
    (tmp_path / "during.bin").write_bytes(data)
    alice.send(f"/send {tmp_path / 'during.bin'}")
    alice.send("你好, still chatting")
    assert bob.wait_for(lambda e: e.get("type") == "message" and e["from"] == "alice")[
        "text"] == "你好, still chatting"
    got = bob.wait_for("file_received", CALL_DEADLINE)
    assert Path(got["path"]).read_bytes() == data
    stats(bob, "alice", lambda e: e["video_fps"] > 5)            # and the call goes on


def test_video_off_and_on_and_mute_keep_the_call(host, join):
    """/video off stops the video bob sees and /video on brings it back;
    /mute stops the sound, /unmute brings it back. Each answers media_state,
    and the link stays up throughout (keepalives and the other medium)."""
    alice = join(host.port, "r", "alice", *MEDIA)
    bob = join(host.port, "r", "bob", *MEDIA)
    connect(alice, bob)
    stats(bob, "alice", lambda e: e["video_fps"] > 0 and e["audio_frames"] > 0)

    def state(muted: bool, video: bool) -> None:
        alice.wait_for(lambda e: e.get("type") == "media_state"
                       and (e["muted"], e["video"]) == (muted, video))

    alice.send("/video off")
    state(muted=False, video=False)
    stats(bob, "alice", lambda e: e["video_fps"] == 0)
    for _ in range(2):                      # and it stays off: a second with no frame
        assert stats(bob, "alice")["video_fps"] == 0
    alice.send("/video on")
    state(muted=False, video=True)
    stats(bob, "alice", lambda e: e["video_fps"] > 0)
    alice.send("/mute")
    state(muted=True, video=True)
    stats(bob, "alice", lambda e: e["audio_frames"] == 0)
    for _ in range(2):
        assert stats(bob, "alice")["audio_frames"] == 0
    stats(bob, "alice", lambda e: e["video_fps"] > 0)          # the video goes on
    alice.send("/unmute")
    state(muted=False, video=True)
    stats(bob, "alice", lambda e: e["audio_frames"] > 0)
    stats(alice, "bob", lambda e: e["video_fps"] > 0)          # bob's side never changed
    for me in (alice, bob):
        assert not [e for e in me.seen() if e.get("type") in ("call_ended", "closed")]


def test_a_call_as_a_person_sees_it(host, join):
    """Without --json: the callee is told `[SYSTEM] <alice> CALL YOU`, gets
    one line when the call connects, and then a status line now and then
    (at most one every STATS_LINE_EVERY_S), not one a second."""
    alice = join(host.port, "r", "alice", *MEDIA)
    bob = join(host.port, "r", "bob", *MEDIA, json_mode=False)
    bob.wait_for("Joined room")
    alice.wait_for(lambda e: e.get("type") == "system" and e["user"] == "bob")
    alice.send("/CHECK bob")
    invite = bob.wait_for("CALL YOU")
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] \[SYSTEM\] <alice> CALL YOU  "
                        r"\(/CHECK alice to answer, /decline alice to refuse\)", invite), invite
    bob.send("/CHECK alice")
    alice.wait_for(lambda e: e.get("type") == "call_connected" and e["peer"] == "bob",
                   CALL_DEADLINE)
    connected = bob.wait_for("In a call with alice", CALL_DEADLINE)
    assert re.match(r"\[\d\d:\d\d:\d\d\] In a call with alice \(127\.0\.0\.1:\d+, "
                    r"direct, vp8/opus\)$", connected), connected
    since = time.monotonic()
    for _ in range(6):                      # some seconds of the call, by alice's stats
        stats(alice, "bob", lambda e: e["video_fps"] > 0)
    bob.send("/who")                        # a sentinel: bob's lines so far are all read
    bob.wait_for("In the room (2)")
    lasted = time.monotonic() - since
    lines = bob.seen()
    status = [line for line in lines if line.startswith("  ~ alice: ")]
    assert status and len(status) <= 2 + lasted / chatroom.STATS_LINE_EVERY_S, (lasted, status)
    assert re.match(r"  ~ alice: [\d.]+ fps, \d+ audio frames/s, [\d.]+% lost, ", status[0])
    assert [line for line in lines if "In a call with" in line] == [connected]
    assert len([line for line in lines if "CALL YOU" in line]) == 1


def test_kill_9_of_a_peer_ends_its_links(host, join):
    alice = join(host.port, "r", "alice", "--camera", "test", "--audio", "null")
    bob = join(host.port, "r", "bob", "--camera", "test", "--audio", "null")
    connect(alice, bob)
    stats(alice, "bob", lambda e: e["video_fps"] > 0)
    bob.proc.send_signal(signal.SIGKILL)
    ended = alice.wait_for("call_ended", CALL_DEADLINE)
    assert (ended["peer"], ended["reason"]) == ("bob", "lost")


def test_devices_that_cant_open_are_reported_and_the_call_goes_on(host, join):
    alice = join(host.port, "r", "alice", "--camera", "7", "--audio", "99")
    bob = join(host.port, "r", "bob", *MEDIA)
    connect(alice, bob)
    codes = set()
    while codes != {"no_camera", "no_audio_device"}:
        codes.add(alice.wait_for("error", CALL_DEADLINE)["code"])
    stats(alice, "bob", lambda e: e["video_fps"] > 0)            # she still sees bob


def test_pyaudio_opens_alsas_null_device(host, join, tmp_path):
    """The real device path, up to a device: PyAudio against ALSA's null PCM
    (no sound card here). It is not clocked: the client paces itself."""
    conf = tmp_path / "alsa.conf"
    conf.write_text("pcm.!default {\n    type null\n}\n")
    env_before = os.environ.get("ALSA_CONFIG_PATH")
    os.environ["ALSA_CONFIG_PATH"] = str(conf)      # inherited by the clients
    try:
        alice = join(host.port, "r", "alice", "--camera", "none", "--audio", "default")
        bob = join(host.port, "r", "bob", "--camera", "none", "--audio", "default")
    finally:
        if env_before is None:
            del os.environ["ALSA_CONFIG_PATH"]
        else:
            os.environ["ALSA_CONFIG_PATH"] = env_before
    connect(alice, bob)
    got = stats(bob, "alice", lambda e: e["audio_frames"] > 10)
    assert got["audio_frames"] < 150, "an unclocked device must not flood the link"
    assert not [e for e in alice.seen() + bob.seen()
                if e.get("type") == "error" and e["code"] == "no_audio_device"]


# --- paths: relay, fallback, garbage --------------------------------------------------

def test_media_through_the_hosts_relay(host, join, tmp_path):
    record = tmp_path / "rec"
    alice = join(host.port, "r", "alice", *MEDIA, "--media-path", "relay")
    bob = join(host.port, "r", "bob", *MEDIA, "--record", str(record))
    on_alice, _ = connect(alice, bob)
    assert on_alice["path"] == "relay"
    assert stats(bob, "alice", lambda e: e["video_fps"] > 5)["path"] == "relay"
    wait_for_files(record, "alice-*.png", 2)
    assert stamps(record, "alice")


def test_no_udp_from_the_peer_falls_back_to_the_relay(host, join):
    # A firewall stand-in on loopback: bob's media socket listens on 127.0.0.2,
    # but the host tells alice his address as it sees it, 127.0.0.1, so
    # nothing alice sends over UDP reaches him. He asks for the relay.
    alice = join(host.port, "r", "alice", "--camera", "test", "--audio", "null")
    bob = join(host.port, "r", "bob", "--camera", "test", "--audio", "null",
               "--interface", "127.0.0.2")
    connect(alice, bob)
    got = stats(bob, "alice", lambda e: e["path"] == "relay" and e["video_fps"] > 5)
    assert got["video_fps"] > 5
    stats(alice, "bob", lambda e: e["video_fps"] > 5)            # his UDP reaches her


def test_garbage_to_a_media_port_is_dropped_and_counted(host, join):
    alice = join(host.port, "r", "alice", "--camera", "test", "--audio", "null")
    bob = join(host.port, "r", "bob", "--camera", "test", "--audio", "null")
    on_alice, _ = connect(alice, bob)
    stats(alice, "bob", lambda e: e["video_fps"] > 0)
    port = int(on_alice["address"].rsplit(":", 1)[1])          # bob's media port
    rng = random.Random(7)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
        for n in range(300):
            junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 1300)))
            if n % 3 == 0:                  # looks like ours: magic, a kind, a link id
                junk = bytes([0xC1, 1]) + junk
            attacker.sendto(junk, (LOOPBACK, port))
    got = stats(bob, "alice", lambda e: e["dropped"] >= 300 and e["video_fps"] > 0)
    assert got["video_fps"] > 0


# --- direct calls: "ip port1 port2" ---------------------------------------------------

class LossyProxy:
    """Forwards UDP between two direct-call peers on loopback, dropping a
    share of the packets (the kernel here has no netem)."""

    def __init__(self, to_a: int, to_b: int, loss: float, seed: int = 1) -> None:
        self.a_side = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)   # a sends here
        self.b_side = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)   # b sends here
        for sock in (self.a_side, self.b_side):
            sock.bind((LOOPBACK, 0))
            sock.settimeout(0.2)
        self.routes = ((self.a_side, (LOOPBACK, to_b)), (self.b_side, (LOOPBACK, to_a)))
        self.loss = loss
        self.random = random.Random(seed)
        self.forwarded = self.dropped = 0
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=route, daemon=True)
                        for route in self.routes]
        for thread in self.threads:
            thread.start()

    def port(self, side: str) -> int:
        return (self.a_side if side == "a" else self.b_side).getsockname()[1]

    def run(self, sock: socket.socket, target: tuple) -> None:
        while not self.stopping.is_set():
            try:
                data, _ = sock.recvfrom(65536)
            except (TimeoutError, OSError):
                continue
            if self.random.random() < self.loss:
                self.dropped += 1
            else:
                self.forwarded += 1
                sock.sendto(data, target)

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(2)
        self.a_side.close()
        self.b_side.close()


def test_a_direct_call_connects_with_equal_safety_codes(host, join, tmp_path):
    record = tmp_path / "rec"
    alice = join(host.port, "r", "alice", *MEDIA)
    bob = join(host.port, "other-room", "bob", *MEDIA, "--record", str(record))
    pa, pb = free_udp_port(), free_udp_port()
    alice.send(f"/call {LOOPBACK} {pa} {pb}")
    bob.send(f"/call {LOOPBACK} {pb} {pa}")
    on_alice = alice.wait_for("call_connected", CALL_DEADLINE)
    on_bob = bob.wait_for("call_connected", CALL_DEADLINE)
    assert on_alice["safety_code"] == on_bob["safety_code"]
    assert len(on_alice["safety_code"].replace(" ", "")) == 6
    assert (on_alice["peer"], on_bob["peer"]) == ("bob", "alice")
    assert on_alice["path"] == on_bob["path"] == "direct"
    stats(bob, "alice", lambda e: e["video_fps"] > 5 and e["audio_frames"] > 10)
    wait_for_files(record, "alice-*.png", 2)
    assert stamps(record, "alice")
    assert abs(tone_peak_hz(record / "alice.wav") - 440) < 5
    alice.send("/hangup bob")               # a sealed bye tells bob at once: no host
    ended = bob.wait_for("call_ended", CALL_DEADLINE)   # here, and no 5 s of silence
    assert (ended["peer"], ended["reason"]) == ("alice", "hangup")
    assert alice.wait_for("call_ended", CALL_DEADLINE)["peer"] == "bob"
    alice.send("/who")                      # and once: the other byes change nothing
    bob.send("/who")
    for me in (alice, bob):
        me.wait_for("members")
        assert len([e for e in me.seen() if e.get("type") == "call_ended"]) == 1


def test_a_direct_call_goes_on_when_the_host_dies(start_host, join):
    """Direct calls work with no help from the host: with the host killed
    mid-call (both clients trying to get back to it), media_stats keep
    coming on both sides, and a /hangup still reaches the peer."""
    host = start_host()
    alice = join(host.port, "r", "alice", *MEDIA)
    bob = join(host.port, "r", "bob", *MEDIA)
    pa, pb = free_udp_port(), free_udp_port()
    alice.send(f"/call {LOOPBACK} {pa} {pb}")
    bob.send(f"/call {LOOPBACK} {pb} {pa}")
    for me in (alice, bob):
        me.wait_for("call_connected", CALL_DEADLINE)
    host.proc.kill()                        # kill -9: no goodbye to anyone
    host.proc.wait(CALL_DEADLINE)
    for me, peer in ((alice, "bob"), (bob, "alice")):
        me.wait_for("reconnecting", CALL_DEADLINE)
        for _ in range(3):                  # the calls' clock runs on, and media flows
            stats(me, peer, lambda e: e["video_fps"] > 0 and e["audio_frames"] > 0)
    alice.send("/hangup bob")
    ended = bob.wait_for("call_ended", 20)
    assert (ended["peer"], ended["reason"]) == ("alice", "hangup")
    assert alice.wait_for("call_ended", CALL_DEADLINE)["peer"] == "bob"
    for me in (alice, bob):
        assert not [e for e in me.seen() if e.get("type") == "closed"]


def test_quitting_in_a_direct_call_hangs_up(host, join):
    """/quit says bye to a direct peer too: it hears `hangup` at once, not
    `lost` after seconds of silence."""
    alice = join(host.port, "r", "alice", "--camera", "none", "--audio", "tone")
    bob = join(host.port, "r", "bob", "--camera", "none", "--audio", "tone")
    pa, pb = free_udp_port(), free_udp_port()
    alice.send(f"/call {LOOPBACK} {pa} {pb}")
    bob.send(f"/call {LOOPBACK} {pb} {pa}")
    alice.wait_for("call_connected", CALL_DEADLINE)
    stats(bob, "alice", lambda e: e["audio_frames"] > 0)
    alice.send("/quit")
    assert alice.wait() == 0
    ended = bob.wait_for("call_ended", CALL_DEADLINE)
    assert (ended["peer"], ended["reason"]) == ("alice", "hangup")


def test_a_direct_call_nobody_answers_fails(start_host, join):
    host = start_host()
    alice = join(host.port, "r", "alice", "--camera", "none", "--audio", "null",
                 "--call-timeout", "1")
    alice.send(f"/call {LOOPBACK} {free_udp_port()} {free_udp_port()}")
    failed = alice.wait_for("call_failed", CALL_DEADLINE)
    assert failed["reason"] == "busy"


def test_video_survives_five_percent_loss(host, join, tmp_path):
    record = tmp_path / "rec"
    alice = join(host.port, "r", "alice", "--camera", "test", "--audio", "null")
    bob = join(host.port, "r", "bob", "--camera", "none", "--audio", "null",
               "--record", str(record))
    pa, pb = free_udp_port(), free_udp_port()
    proxy = LossyProxy(to_a=pa, to_b=pb, loss=0.05)
    try:
        alice.send(f"/call {LOOPBACK} {pa} {proxy.port('a')}")
        bob.send(f"/call {LOOPBACK} {pb} {proxy.port('b')}")
        alice.wait_for("call_connected", CALL_DEADLINE)
        got = stats(bob, "alice", lambda e: e["video_fps"] > 5 and e["loss"] > 0)
        assert got["loss"] < 0.2
        wait_for_files(record, "alice-*.png", 3)
        assert len(stamps(record, "alice")) >= 2
        assert proxy.dropped > 0
    finally:
        proxy.stop()


def test_list_devices_never_fails(tmp_path):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, chatroom.__file__, "--list-devices", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert found["type"] == "devices" and isinstance(found["cameras"], list)


def test_a_direct_call_hung_up_as_its_first_packet_comes_never_connects():
    """The first packet's "connected" is queued from a receiving thread; a
    /hangup (or the timeout) that ran first has already said call_failed
    and forgotten the link, so the queued news must not say call_connected
    after it (one outcome per call, never both)."""
    import asyncio

    class Sock:
        closed = False

        def close(self, wait=False):
            self.closed = True

    loop = asyncio.new_event_loop()
    try:
        events: list[dict] = []
        calls = chatroom.ClientCalls(chatroom.Limits(),
                                     chatroom.MediaOptions(camera="none", audio="null"),
                                     events.append, lambda event: True, loop)
        keys = chatroom.KeyExchange()
        agreed = keys.agree(chatroom.KeyExchange().public)
        sock = Sock()
        link = chatroom.PeerLink("bob", agreed.link_id, agreed.link_key, agreed.i_am_a, "vp8",
                                 "opus", sock, ("127.0.0.1", 9), True, agreed.safety_code)
        call = chatroom.DirectCall("127.0.0.1:9", ("127.0.0.1", 9), sock, keys, 0.0, link)
        calls._direct.append(call)
        calls._drop_direct(call, "cancelled")       # /hangup, on the loop, first
        calls._direct_connected(link)               # then the receiving thread's news
        assert [e["type"] for e in events] == ["call_failed"] and sock.closed
        calls.media.close()
    finally:
        loop.close()


def test_a_media_thread_outliving_the_loop_drops_its_news_quietly():
    """The core's loop closes before the media threads are joined; a packet
    to relay or an error to say in between must not kill the thread."""
    import asyncio
    loop = asyncio.new_event_loop()
    said: list[str] = []
    chatroom.call_soon(loop, said.append, "before")
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    chatroom.call_soon(loop, said.append, "after")       # no RuntimeError
    assert said == ["before"]
