"""Voice in chatroom.py: echo cancelling, noise suppression and gain (the
VoiceProcessor around livekit's WebRTC audio processing), WAV files as a
microphone (--audio FILE.wav), loss repair (Opus FEC and concealment through
the jitter buffer and Playout), and the levels behind the speaking indicator.

The speech in tests/data was made with espeak-ng 1.51 and sox, so no test
needs them:

    espeak-ng -v en-us -s 160 -w a.wav "The quick brown fox ... their own voice."
    espeak-ng -v en+f3 -p 70 -s 150 -w b.wav "Hello, this is the laptop ... now?"
    sox a.wav -r 16000 -b 16 -c 1 speech-bob.wav    (and b.wav: speech-alice.wav)

Nothing here asserts how fast anything is (bench/voice.py measures that);
threads are waited for on conditions with deadlines, never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import subprocess
import sys
import threading
import wave
from pathlib import Path

import numpy as np
import pytest
from pulse import pulse_server
from test_calls_e2e import CALL_DEADLINE, free_udp_port, stats

import chatroom

DATA = Path(__file__).resolve().parent / "data"
BOB, ALICE = DATA / "speech-bob.wav", DATA / "speech-alice.wav"
RATE = chatroom.SAMPLE_RATE
N = chatroom.FRAME_SAMPLES
WAIT_LIMIT_S = 20.0                 # a clock thread that can't deliver in this is broken


def db(x: np.ndarray) -> float:
    """Mean power in dB against a full-scale sine (as LevelMeter counts)."""
    return 10 * np.log10(np.mean(np.asarray(x, float) ** 2) / (32767 ** 2 / 2) + 1e-12)


def frames_of(signal: np.ndarray) -> list[bytes]:
    whole = np.clip(np.round(signal), -32768, 32767).astype("<i2")
    return [whole[i:i + N].tobytes() for i in range(0, len(whole) - N + 1, N)]


def join(frames: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(frames), "<i2").astype(float)


def write_wav(path: Path, samples: np.ndarray, rate: int, width: int = 2,
              channels: int = 1) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(width)
        out.setframerate(rate)
        out.writeframes(samples.tobytes())
    return path


# --- Echo cancelling, noise suppression, gain -------------------------------------

def laptop_echo(far: np.ndarray, seed: int = 5) -> np.ndarray:
    """What a laptop's microphone hears of `far` from its speakers: 150 ms
    late, with a 150 ms decaying tail (MEDIA-NOTES.md's case B), -6 dB."""
    rng = np.random.default_rng(seed)
    tail = int(0.150 * RATE)
    response = rng.standard_normal(tail) * np.exp(-np.arange(tail) / (tail / 5))
    response *= 0.5 / np.sqrt(np.sum(response ** 2))
    echo = np.convolve(far, response)[:len(far)]
    return np.concatenate([np.zeros(int(0.150 * RATE)), echo])[:len(far)]


def run_processor(processor, far: np.ndarray, mic: np.ndarray) -> np.ndarray:
    """Each 20 ms: the speaker plays a frame of `far`, the microphone hears one of `mic`."""
    out = []
    for played, heard in zip(frames_of(far), frames_of(mic)):
        processor.play(played)
        out.append(processor.capture(heard))
    return join(out)


@pytest.fixture(scope="module")
def speech() -> tuple[np.ndarray, np.ndarray]:
    """(far-end speech, near-end speech), 48 kHz floats, 14 s each (looped)."""
    far, near = (chatroom.load_wav(str(path)).astype(float) for path in (BOB, ALICE))
    return np.resize(far, 14 * RATE) * 0.6, np.resize(near, 14 * RATE) * 0.5


def test_echo_is_cancelled_and_the_near_end_goes_through(speech):
    far, near = speech
    echo = laptop_echo(far)
    near[:7 * RATE] = 0                         # 7 s of echo alone, then both talk
    out = run_processor(chatroom.VoiceProcessor(), far, echo + near)
    alone, both = slice(3 * RATE, 7 * RATE), slice(8 * RATE, 14 * RATE)
    # Without processing the microphone goes out as it is: the echo at its level.
    removed = db(echo[alone]) - db(out[alone])
    assert removed >= 15, f"only {removed:.1f} dB of the echo removed"
    # While both talk, the near end keeps most of its level (gain may lift it).
    change = db(out[both]) - db(near[both])
    assert change > -10, f"the near end lost {-change:.1f} dB while both talked"


def test_a_quiet_microphone_is_lifted_and_steady_noise_lowered(speech):
    _, near = speech
    quiet = near * 10 ** (-30 / 20)             # 30 dB too quiet
    silent_far = np.zeros_like(quiet)
    out = run_processor(chatroom.VoiceProcessor(), silent_far, quiet)
    later = slice(6 * RATE, 14 * RATE)          # the gain controller adapts over seconds
    assert db(out[later]) > db(quiet[later]) + 10
    noise = np.random.default_rng(2).standard_normal(len(near)) * 300   # about -40 dBFS
    out = run_processor(chatroom.VoiceProcessor(), silent_far, noise)
    assert db(out[later]) < db(noise[later]) - 6


def test_processor_frames_keep_their_size_and_silence_stays_silent():
    processor = chatroom.VoiceProcessor()
    processor.play(chatroom.SILENCE)
    assert processor.capture(chatroom.SILENCE) == chatroom.SILENCE
    assert len(processor.capture(b"\1\0" * 100)) == chatroom.FRAME_BYTES   # short: padded
    processor.close()
    processor.close()                           # twice is harmless
    assert processor.capture(b"\1\0" * 960) == b"\1\0" * 960    # closed: as it is


def test_a_missing_livekit_is_a_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "livekit", None)     # `import livekit` now fails
    with pytest.raises(chatroom.DeviceError) as caught:
        chatroom.VoiceProcessor()
    assert caught.value.code == "missing_package" and "livekit" in caught.value.message


def test_a_module_that_fails_mid_call_hands_the_microphone_on(caplog):
    processor = chatroom.VoiceProcessor()

    class Broken:
        def set_stream_delay_ms(self, ms):
            pass

        def process_stream(self, frame):
            raise RuntimeError("native failure")

    processor._apm = Broken()
    frame = np.arange(N, dtype="<i2").tobytes()
    assert processor.capture(frame) == frame and processor.capture(frame) == frame
    assert not processor.working
    assert len([r for r in caplog.records if "echo cancelling failed" in r.message]) == 1


def test_the_package_check_does_not_import_it():
    assert chatroom.echo_canceller_available() is True    # installed by requirements.txt


# --- WAV files as a microphone -------------------------------------------------------

def test_a_wav_converts_to_48_khz_mono(tmp_path):
    t = np.arange(22050) / 22050                        # 1 s at 22.05 kHz
    left = np.round(8000 * np.sin(2 * np.pi * 300 * t)).astype("<i2")
    stereo = np.stack([left, left], axis=1)             # both channels alike
    got = chatroom.load_wav(str(write_wav(tmp_path / "s.wav", stereo, 22050, channels=2)))
    assert got.dtype == np.dtype("<i2") and abs(len(got) - RATE) <= 2
    spectrum = np.abs(np.fft.rfft(got * np.hanning(len(got))))
    assert abs(np.argmax(spectrum) * RATE / len(got) - 300) < 3
    assert 7500 < np.abs(got).max() <= 8000
    # 8-bit (unsigned) and 24-bit files read as the same sound.
    eight = (left // 256 + 128).astype(np.uint8)
    got8 = chatroom.load_wav(str(write_wav(tmp_path / "8.wav", eight, 22050, width=1)))
    assert np.abs(got8.astype(float) - got).max() < 300
    packed = left.astype("<i4") * 256
    raw24 = np.frombuffer(packed.tobytes(), np.uint8).reshape(-1, 4)[:, :3].copy()
    got24 = chatroom.load_wav(str(write_wav(tmp_path / "24.wav", raw24, 22050, width=3)))
    assert np.abs(got24.astype(float) - got).max() <= 1


def test_a_wav_source_loops_in_real_time(tmp_path):
    # 50 ms of a ramp: the 20 ms frames that wrap must carry the start again.
    ramp = np.arange(int(0.05 * RATE), dtype="<i2")
    path = write_wav(tmp_path / "ramp.wav", ramp, RATE)
    source = chatroom.open_audio_source(str(path))
    frames: list[bytes] = []
    enough = threading.Condition()

    def on_frame(pcm: bytes) -> None:
        with enough:
            frames.append(pcm)
            enough.notify_all()
    source.start(on_frame)
    try:
        with enough:
            assert enough.wait_for(lambda: len(frames) >= 10, WAIT_LIMIT_S)
    finally:
        source.stop()
    played = join(frames[:10]).astype(int)
    assert played.tolist() == np.resize(ramp, 10 * N).tolist()
    sink = chatroom.open_audio_sink(str(path))          # no device: a clock that drops
    pulled = threading.Event()
    sink.start(lambda: pulled.set() or chatroom.SILENCE)
    try:
        assert pulled.wait(WAIT_LIMIT_S)
    finally:
        sink.stop()


def hostile_wavs(tmp_path: Path) -> dict[str, Path]:
    good = write_wav(tmp_path / "good.wav", np.zeros(1000, "<i2"), 16000).read_bytes()
    rng = random.Random(9)
    files = {
        "missing": tmp_path / "nope.wav",
        "a folder": tmp_path / "folder.wav",
        "empty": tmp_path / "empty.wav",
        "random bytes": tmp_path / "random.wav",
        "cut in the header": tmp_path / "cut.wav",
        "no samples": write_wav(tmp_path / "none.wav", np.zeros(0, "<i2"), 16000),
        "1 Hz": write_wav(tmp_path / "slow.wav", np.zeros(100, "<i2"), 1),
        "a chunk longer than the file": tmp_path / "long.wav",
        "float samples": tmp_path / "float.wav",
    }
    (tmp_path / "folder.wav").mkdir()
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "random.wav").write_bytes(bytes(rng.randrange(256) for _ in range(5000)))
    (tmp_path / "cut.wav").write_bytes(good[:30])
    long = bytearray(good)
    long[16:20] = (1 << 30).to_bytes(4, "little")       # the fmt chunk claims 1 GiB
    (tmp_path / "long.wav").write_bytes(bytes(long))
    float_fmt = bytearray(good)
    float_fmt[20:22] = (3).to_bytes(2, "little")        # WAVE_FORMAT_IEEE_FLOAT
    (tmp_path / "float.wav").write_bytes(bytes(float_fmt))
    return files


def test_broken_and_hostile_wavs_are_no_audio_device(tmp_path):
    for what, path in hostile_wavs(tmp_path).items():
        with pytest.raises(chatroom.DeviceError) as caught:
            chatroom.open_audio_source(str(path))
        assert caught.value.code == "no_audio_device", what
        assert str(path) in caught.value.message, what      # it says which file


def test_a_wav_header_claiming_more_than_it_holds_reads_what_is_there(tmp_path):
    path = write_wav(tmp_path / "short.wav", np.full(1600, 1000, "<i2"), 16000)
    data = bytearray(path.read_bytes())
    data[40:44] = (0x7FFFFFF0).to_bytes(4, "little")    # the data chunk claims 2 GiB
    path.write_bytes(bytes(data))
    got = chatroom.load_wav(str(path))
    assert abs(len(got) - 4800) <= 3 and np.abs(got).max() == 1000


def test_wav_fuzz_gives_sound_or_no_audio_device(tmp_path):
    good = write_wav(tmp_path / "g.wav", np.arange(2000, dtype="<i2"), 22050, channels=2)
    original = good.read_bytes()
    rng = random.Random(4)
    path = tmp_path / "f.wav"
    outcomes = set()
    for _ in range(400):
        data = bytearray(original)
        for _ in range(rng.randrange(1, 5)):
            data[rng.randrange(60)] = rng.randrange(256)
        path.write_bytes(bytes(data[:rng.randrange(20, len(data) + 1)]))
        try:
            got = chatroom.load_wav(str(path))
            assert got.dtype == np.dtype("<i2") and len(got) > 0
            outcomes.add("sound")
        except chatroom.DeviceError as exc:
            assert exc.code == "no_audio_device"
            outcomes.add("refused")
    assert outcomes == {"sound", "refused"}


# --- Loss: FEC, concealment, no clicks ---------------------------------------------

@dataclasses.dataclass
class Heard:
    """What a sink played of a stream through a lossy network."""
    signal: np.ndarray              # the samples, frame after frame
    played: list[int | None]        # per frame: the sequence number (None: buffering)
    missing: int                    # packets the network lost


def through_the_network(frames: list[bytes], loss: float, seed: int, how: str) -> Heard:
    """Opus packets of `frames` over a LAN (sent every 20 ms, each 1-3 ms on
    the way), `loss` of them lost at random, into a jitter buffer that the
    sink's own clock (7 ms out of phase) pops every 20 ms through Playout.
    `how`: "fec", "plc" (concealment only) or "silence" (a frame that didn't
    come plays as silence)."""
    encoder, decoder = chatroom.OpusEncoder(), chatroom.OpusDecoder()
    buffer = chatroom.JitterBuffer(repair_frames=1 if how == "fec" else 0)
    playout = chatroom.Playout(chatroom.SILENCE)
    rng = random.Random(seed)
    packets = [encoder.encode(frame) for frame in frames]   # every one: the encoder's state
    arrivals = [(seq * 20.0 + rng.uniform(1, 3), seq, packet)
                for seq, packet in enumerate(packets, 1)
                if seq <= 3 or rng.random() >= loss]    # the first come: playing starts
    out, played, missing = [], [], len(frames) - len(arrivals)
    for tick in range(len(frames) + 5):
        now = 20.0 * tick + 7
        while arrivals and arrivals[0][0] <= now:
            arrived, seq, packet = arrivals.pop(0)
            buffer.push(seq, packet, arrived)
        status, payload = buffer.pop(fec=how == "fec")
        # The buffer's playout point (private) says which frame this one stands for.
        played.append(None if status == "empty" else buffer._next - 1)
        if how == "silence" and status != "frame":
            out.append(chatroom.SILENCE)
        else:
            out.append(playout.render(status, payload, decoder))
    return Heard(join(out), played, missing)


def snr(frames: list[bytes], loss: float, how: str) -> float:
    """What played at `loss` against the same frames decoded with no loss, frame
    by frame as the jitter buffer lined them up (its delay may change), in dB."""
    clean = through_the_network(frames, 0.0, 1, "plc")
    reference = dict(zip(clean.played, np.split(clean.signal, len(clean.played))))
    got = through_the_network(frames, loss, 7, how)
    pairs = [(reference[seq], frame)
             for seq, frame in zip(got.played, np.split(got.signal, len(got.played)))
             if seq is not None and seq in reference]
    wanted = np.concatenate([want for want, _ in pairs])
    error = np.concatenate([frame - want for want, frame in pairs])
    return db(wanted) - db(error)


def clicks(signal: np.ndarray) -> int:
    """Frame edges where the signal jumps: a step between the two samples
    across the edge more than twice the largest step inside the frames on
    either side (plus 50, so near silence doesn't count)."""
    steps = np.abs(np.diff(signal))
    found = 0
    for edge in range(N, len(signal) - N, N):
        inside = max(steps[edge - N:edge - 2].max(), steps[edge:edge + N - 1].max())
        found += steps[edge - 1] > 2 * inside + 50
    return found


@pytest.mark.parametrize("loss", [0.05, 0.10])
def test_fec_and_concealment_play_lost_frames_without_clicks(loss, speech):
    far, _ = speech
    frames = frames_of(far[:8 * RATE])
    for how in ("fec", "plc"):
        got = through_the_network(frames, loss, 7, how)
        assert got.missing > 10 and clicks(got.signal) == 0, how
    # Silence-filling clicks: the test would catch a repair that doesn't repair.
    assert clicks(through_the_network(frames, loss, 7, "silence").signal) > 3


def test_fec_rebuilds_better_than_concealment(speech):
    far, _ = speech
    frames = frames_of(far[:8 * RATE])
    fec, plc, silence = (snr(frames, 0.10, how) for how in ("fec", "plc", "silence"))
    assert fec > plc + 3 and plc > silence, (fec, plc, silence)


def test_pop_with_fec_hands_over_the_successor_and_keeps_it():
    buffer = chatroom.JitterBuffer()
    for seq in (1, 2, 4, 5):                    # 3 is lost; 4 carries its FEC
        buffer.push(seq, f"p{seq}".encode(), seq * 20.0)
    assert [buffer.pop(fec=True) for _ in range(5)] == [
        ("frame", b"p1"), ("frame", b"p2"), ("fec", b"p4"), ("frame", b"p4"),
        ("frame", b"p5")]
    assert (buffer.concealed, buffer.recovered) == (1, 1)
    buffer = chatroom.JitterBuffer()
    for seq in (1, 2, 5):                       # 3 and 4 lost: 3 has no successor here
        buffer.push(seq, b"x", seq * 20.0)
    assert [buffer.pop(fec=True)[0] for _ in range(5)] == [
        "frame", "frame", "lost", "fec", "frame"]
    assert (buffer.concealed, buffer.recovered) == (2, 1)


def test_playout_fades_a_voice_that_stops_then_plays_silence():
    encoder, decoder = chatroom.OpusEncoder(), chatroom.OpusDecoder()
    playout = chatroom.Playout(chatroom.SILENCE, fade_frames=3)
    assert playout.render("empty", None, decoder) == chatroom.SILENCE     # nothing yet
    t = np.arange(20 * N)
    tone = frames_of(8000 * np.sin(2 * np.pi * 440 * t / RATE))
    for frame in tone:
        playout.render("frame", encoder.encode(frame), decoder)
    faded = [playout.render("empty", None, decoder) for _ in range(3)]
    assert np.abs(np.frombuffer(faded[0], "<i2")).max() > 1000          # not cut dead
    assert playout.render("empty", None, decoder) == chatroom.SILENCE
    assert playout.render("lost", None, decoder) != b""                   # lost: concealed


# --- Levels for the speaking indicator ------------------------------------------------

def test_level_meter_reads_dbfs_of_the_last_200_ms():
    meter = chatroom.LevelMeter()
    assert meter.dbfs == chatroom.LEVEL_FLOOR_DBFS
    t = np.arange(20 * N)
    amplitude = 32767 * 10 ** (-12 / 20)
    for frame in frames_of(amplitude * np.sin(2 * np.pi * 441 * t / RATE)):
        level = meter.add(frame)
    assert abs(level - (-12)) < 0.5 and meter.dbfs == level
    assert level > chatroom.SPEAKING_DBFS
    for _ in range(chatroom.LEVEL_WINDOW_FRAMES):
        meter.add(chatroom.SILENCE)
    assert meter.dbfs == chatroom.LEVEL_FLOOR_DBFS      # 200 ms later: quiet again
    assert meter.add(b"") == chatroom.LEVEL_FLOOR_DBFS   # an empty frame is silence


def test_a_gap_in_the_sequence_adds_the_repair_delay_for_a_while():
    buffer = chatroom.JitterBuffer(repair_frames=1, repair_hold_ms=1000)
    for seq in range(1, 5):                     # a steady LAN: one frame of delay
        buffer.push(seq, b"x", seq * 20.0)
    assert buffer.target_ms == 20
    buffer.push(6, b"x", 120.0)                 # 5 went missing: room for its FEC
    assert buffer.target_ms == 40
    for seq in range(7, 7 + 49):                # the rest of that second: still lossy
        buffer.push(seq, b"x", seq * 20.0)
    assert buffer.target_ms == 40
    buffer.push(56, b"x", 56 * 20.0)            # a second with no gap: back to one frame
    assert buffer.target_ms == 20
    plain = chatroom.JitterBuffer()             # PCM has no FEC: no repair delay
    for seq in (1, 2, 4):
        plain.push(seq, b"x", seq * 20.0)
    assert plain.target_ms == 20


# --- The media engine: levels and the echo canceller's flag -------------------------

def test_levels_and_echo_cancelling_from_the_media_engine():
    loop = asyncio.new_event_loop()             # the engine only posts to it: not run
    options = chatroom.MediaOptions(camera="none", audio="tone", echo_cancel=False)
    engine = chatroom.MediaEngine(options, lambda event: None, lambda packet: None, loop)
    engine.user = "me"
    assert engine.levels() == {"me": chatroom.LEVEL_FLOOR_DBFS}
    assert engine.echo_cancelling is False      # --no-echo-cancel
    loud = threading.Condition()

    class Watched(chatroom.LevelMeter):
        def add(self, pcm: bytes) -> float:
            level = super().add(pcm)
            with loud:
                loud.notify_all()
            return level
    engine._my_level = Watched()
    link = chatroom.PeerLink("bob", bytes(4), bytes(32), True, "", "opus", None, None, False)
    engine.add(link)                            # the devices open: our tone is the microphone
    try:
        with loud:
            assert loud.wait_for(lambda: engine.levels()["me"] > chatroom.SPEAKING_DBFS,
                                 WAIT_LIMIT_S)
        levels = engine.levels()
        assert abs(levels["me"] - chatroom.TONE_DBFS) < 1         # the tone, as sent
        assert levels["bob"] == chatroom.LEVEL_FLOOR_DBFS         # bob sent nothing
        engine.set_muted(True)
        with loud:
            assert loud.wait_for(lambda: engine.levels()["me"] == chatroom.LEVEL_FLOOR_DBFS,
                                 WAIT_LIMIT_S)
    finally:
        engine.close()
        loop.close()
    on = chatroom.MediaEngine(chatroom.MediaOptions(), lambda e: None, lambda p: None, loop)
    assert on.echo_cancelling is True           # livekit is installed: it would run
    tone = chatroom.MediaEngine(chatroom.MediaOptions(audio="tone"), lambda e: None,
                                lambda p: None, loop)
    assert tone.echo_cancelling is False        # a stand-in plays into no room


def test_headphones_are_suggested_for_a_real_microphone_without_a_canceller(monkeypatch):
    loop = asyncio.new_event_loop()             # the engines only post to it: not run

    def engine(**options) -> chatroom.MediaEngine:
        return chatroom.MediaEngine(chatroom.MediaOptions(camera="none", **options),
                                    lambda event: None, lambda packet: None, loop)
    try:
        assert not engine().needs_headphones                    # livekit here: it cancels
        assert engine(echo_cancel=False).needs_headphones       # --no-echo-cancel
        assert not engine(audio="tone", echo_cancel=False).needs_headphones  # no room
        assert not engine(audio=str(BOB)).needs_headphones      # a WAV file neither
        with monkeypatch.context() as patch:                    # livekit not installed
            patch.setattr(chatroom, "echo_canceller_available", lambda: False)
            assert engine().needs_headphones
        # Installed, but its native library won't load: found when the sound opens.

        def broken() -> chatroom.VoiceProcessor:
            raise chatroom.DeviceError("missing_package", "echo cancelling needs livekit")
        monkeypatch.setattr(chatroom, "VoiceProcessor", broken)
        failing = engine()
        assert failing.echo_cancelling and not failing.needs_headphones   # it would, yet
        assert failing._open_voice("default") is None
        assert not failing.echo_cancelling and failing.needs_headphones
    finally:
        loop.close()


# --- A laptop on a table: the echo its peer hears, end to end -----------------------------
# PulseAudio with null sinks stands in for a laptop's speakers and microphone:
# a client plays into a sink and its microphone is that sink's monitor, so
# everything it plays comes straight back into it (a perfect, loud echo). Bob
# speaks from a WAV file to two such laptops at once, alice (echo cancelling)
# and carol (--no-echo-cancel), and records what each sends back. Then both
# laptops' owners speak (paplay plays their voice into the sink) while bob goes on.

@pytest.fixture
def pulse(tmp_path):
    """tests/pulse.py's server, with two null sinks: laptop_a and laptop_b."""
    with pulse_server(tmp_path) as env:
        yield env


def recorded(path: Path) -> np.ndarray:
    """The samples --record has written so far (the header may lag the data)."""
    data = path.read_bytes()[44:] if path.exists() else b""
    return np.frombuffer(data[:len(data) // 2 * 2], "<i2").astype(float)


def test_a_laptop_on_a_table_sends_back_no_echo_yet_its_voice(pulse, host, join, tmp_path,
                                                                monkeypatch):
    laptop_on_a_table(pulse, host.port, join, tmp_path, monkeypatch)


def laptop_on_a_table(pulse: dict, port: int, join, tmp_path: Path, monkeypatch,
                      program: list[str] | None = None) -> None:
    """The test above, for the clients `program` runs (chatroom.py when None;
    tests/test_binary.py runs it with the executable)."""
    for name, value in pulse.items():
        monkeypatch.setenv(name, value)         # inherited by the clients started below
    record = tmp_path / "bob-plays"
    bob = join(port, "r", "bob", "--camera", "none", "--audio", str(BOB),
               "--record", str(record), program=program)
    laptops = {}
    for user, sink, flags in (("alice", "laptop_a", ()), ("carol", "laptop_b",
                                                           ("--no-echo-cancel",))):
        monkeypatch.setenv("PULSE_SINK", sink)
        monkeypatch.setenv("PULSE_SOURCE", f"{sink}.monitor")
        laptops[user] = (join(port, user, user, "--camera", "none", "--audio", "default",
                              *flags, program=program), sink)
    for user, (laptop, _) in laptops.items():   # direct calls: two calls, not one group
        mine, theirs = free_udp_port(), free_udp_port()
        bob.send(f"/call 127.0.0.1 {mine} {theirs}")
        laptop.send(f"/call 127.0.0.1 {theirs} {mine}")
        bob.wait_for(lambda e, u=user: e.get("type") == "call_connected" and e["peer"] == u,
                     CALL_DEADLINE)
        assert not [e for e in laptop.seen() if e.get("type") == "error"], laptop.seen()

    def flowing(e: dict) -> bool:
        return e["audio_frames"] >= 40

    def last(user: str, seconds: float) -> np.ndarray:
        return recorded(record / f"{user}.wav")[-int(seconds * RATE):]
    # The canceller needs a few seconds of bob's voice to find the echo, more on a
    # busy machine: wait (a second at a time, as bob's stats come) until the last
    # 2 s alice sent back hold an echo 20 dB below carol's, or the deadline passes.
    levels = []
    for _ in range(int(CALL_DEADLINE)):
        for user in laptops:
            got = stats(bob, user, flowing, CALL_DEADLINE)
        levels.append({user: round(db(last(user, 2)), 1) for user in laptops})
        if len(levels) >= 3 and levels[-1]["alice"] <= levels[-1]["carol"] - 20:
            break
    echo = levels[-1]
    assert echo["alice"] <= echo["carol"] - 20, f"echo left, alice vs carol: {levels}"
    assert echo["carol"] > -40, f"no echo to cancel: {levels}"
    assert got["jitter_ms"] >= 20 and got["fec"] >= 0          # media_stats carry them
    # Now alice and carol speak into their laptops while bob goes on.
    start = {user: len(recorded(record / f"{user}.wav")) for user in laptops}
    voices = [subprocess.Popen(["paplay", "-d", sink, str(ALICE)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE) for _, sink in laptops.values()]
    for voice in voices:
        _, err = voice.communicate(timeout=CALL_DEADLINE)
        assert voice.returncode == 0, err
    for _ in range(2):                          # the last of it through the call
        for user in laptops:
            stats(bob, user, flowing, CALL_DEADLINE)
    voice = {user: db(recorded(record / f"{user}.wav")[start[user]:]) for user in laptops}
    summary = f"echo {echo}, voice {voice} (dBFS)"
    assert voice["alice"] >= echo["alice"] + 20, summary        # her voice stands clear
    assert voice["alice"] >= voice["carol"] - 10, summary       # and is not eaten
