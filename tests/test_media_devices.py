"""VIDEO DEVICES and SOUND DEVICES in chatroom.py. No camera, microphone or
speaker is needed: the test pattern, a video file and clock threads stand in
for them, and PyAudio runs against ALSA's null PCM in a subprocess (ALSA
reads ALSA_CONFIG_PATH once per process, and an empty file makes PortAudio
abort: it must define `pcm.!default { type null }`).

Timing rule: nothing here asserts how fast something is. Rates are checked
by counting what a thread delivered within a span of monotonic time that the
test waits out on a condition with a deadline, never by a fixed sleep.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import wave
from pathlib import Path

import cv2
import numpy as np
import pytest

import chatroom as md

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ALSA_NULL = "pcm.!default {\n    type null\n}\n"
RATE_SPAN_S = 2.0                   # how long rate tests watch a stream
WAIT_LIMIT_S = 20.0                 # a stream that can't show RATE_SPAN_S in this is broken


def tone(frames: int, hz: float = 440.0, amplitude: float = 8000.0) -> list[bytes]:
    k = np.arange(frames * md.FRAME_SAMPLES)
    samples = np.round(amplitude * np.sin(2 * np.pi * hz * k / md.SAMPLE_RATE)).astype("<i2")
    return [samples[i * 960:(i + 1) * 960].tobytes() for i in range(frames)]


def peak_hz(pcm: bytes) -> float:
    samples = np.frombuffer(pcm, "<i2").astype(np.float64)
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.argmax(spectrum) * md.SAMPLE_RATE / len(samples))


def allowed(span_s: float) -> tuple[float, float]:
    """The frame counts a 50/s stream may show in span_s: within 10% + 3."""
    expected = span_s / md.FRAME_S
    return expected * 0.9 - 3, expected * 1.1 + 3


class Counter:
    """Timestamps calls on the monotonic clock; lets a test wait until a
    call has been seen `span_s` after start() without sleeping."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.items: list = []
        self.condition = threading.Condition()
        self.t0 = 0.0

    def start(self) -> None:
        self.t0 = time.monotonic()

    def seen(self, item=None) -> None:
        with self.condition:
            self.times.append(time.monotonic())
            self.items.append(item)
            self.condition.notify_all()

    def wait_span(self, span_s: float) -> int:
        """Frames seen in [t0, t0 + span_s], once a later one proves the span is over."""
        with self.condition:
            done = self.condition.wait_for(
                lambda: self.times and self.times[-1] >= self.t0 + span_s, WAIT_LIMIT_S)
        assert done, f"only {len(self.times)} calls in {WAIT_LIMIT_S} s"
        return sum(1 for t in self.times if t <= self.t0 + span_s)


# --- Test pattern and stamp ----------------------------------------------------

def test_pattern_frames_move_and_carry_their_number():
    pattern = md.TestPattern("alice")
    first, second = pattern.frame(0), pattern.frame(1)
    assert first.shape == (480, 640, 3) and first.dtype == np.uint8
    assert np.mean(np.abs(first.astype(int) - second.astype(int))) > 5   # it pans
    assert np.array_equal(pattern.frame(7), pattern.frame(7))             # pure
    for n in (0, 1, 2, 255, 4096, 123456, 2 ** 24 - 1):
        assert md.read_stamp(pattern.frame(n)) == n
    assert md.read_stamp(pattern.frame(2 ** 24 + 5)) == 5                # 24 bits wrap


def test_pattern_label_is_ascii():
    assert md.TestPattern("Zoë 你好").label == "Zoe U+4F60 U+597D"
    assert md.TestPattern("小明").label == "U+5C0F U+660E"


def test_read_stamp_rejects_frames_without_a_stamp():
    rng = np.random.default_rng(1)
    assert md.read_stamp(np.zeros((480, 640, 3), np.uint8)) is None
    assert md.read_stamp(np.full((480, 640, 3), 255, np.uint8)) is None
    assert md.read_stamp(rng.integers(0, 256, (480, 640, 3), np.uint8)) is None
    assert md.read_stamp(np.zeros((480, 640), np.uint8)) is None
    damaged = md.TestPattern("bob").frame(77)
    cell, x0, y0 = md._stamp_geometry(640, 480)
    damaged[y0:y0 + cell, x0 + 10 * cell:x0 + 11 * cell] ^= 255          # one bit flipped
    assert md.read_stamp(damaged) is None


def test_stamp_survives_vp8_at_1_mbps():
    pattern = md.TestPattern("carol")
    encoder, decoder = md.make_video_encoder("vp8", 1_000_000), md.make_video_decoder("vp8")
    for n in range(1000, 1060):
        data, _ = encoder.encode(pattern.frame(n))
        decoded = decoder.decode(data)
        assert decoded.shape == (480, 640, 3)
        assert md.read_stamp(decoded) == n


@pytest.mark.parametrize("quality", [60, 70, 75])
def test_stamp_survives_jpeg(quality):
    pattern = md.TestPattern("dave")
    encoder, decoder = md.JpegEncoder(quality), md.make_video_decoder("jpeg")
    rng = np.random.default_rng(quality)
    for n in rng.integers(0, 2 ** 24, 60):
        data, keyframe = encoder.encode(pattern.frame(int(n)))
        assert keyframe
        assert md.read_stamp(decoder.decode(data)) == n


def test_stamp_survives_resizing_back():
    frame = md.TestPattern("erin").frame(4242)
    small = cv2.resize(frame, (320, 240), interpolation=cv2.INTER_AREA)
    assert md.read_stamp(cv2.resize(small, (640, 480))) == 4242


# --- Video codecs ----------------------------------------------------------------

def test_vp8_keyframes_first_on_request_and_every_60_frames():
    pattern = md.TestPattern("frank")
    encoder = md.make_video_encoder("vp8")
    assert (encoder.codec_id, encoder.name) == (1, "vp8")
    keyframes = []
    for n in range(200):
        result = encoder.encode(pattern.frame(n), keyframe=n in (30, 31, 100))
        assert result is not None
        if result[1]:
            keyframes.append(n)
    assert keyframes[0] == 0
    assert {30, 31, 100} <= set(keyframes)
    gaps = np.diff(keyframes + [200])
    assert max(gaps) <= 60, keyframes


def test_vp8_encoder_scales_other_sizes():
    encoder, decoder = md.make_video_encoder("vp8"), md.make_video_decoder("vp8")
    data, keyframe = encoder.encode(np.zeros((240, 320, 3), np.uint8))
    assert keyframe and decoder.decode(data).shape == (480, 640, 3)


def test_decoders_return_none_for_garbage_and_keep_working():
    rng = np.random.default_rng(7)
    pattern = md.TestPattern("gina")
    for name in ("vp8", "jpeg"):
        decoder = md.make_video_decoder(name)
        garbage = [b"", b"\x00", b"\xff\xd8", b"\x9d\x01\x2a" * 3,
                   *(rng.integers(0, 256, size, np.uint8).tobytes() for size in (5, 100, 5000))]
        for data in garbage:
            assert decoder.decode(data) is None
        data, _ = md.make_video_encoder(name).encode(pattern.frame(9), keyframe=True)
        assert md.read_stamp(decoder.decode(data)) == 9       # still decodes real data
        decoder.decode(data[:len(data) // 3])     # None or a damaged picture, never raises


def test_decoders_refuse_headers_claiming_huge_pictures():
    pattern = md.TestPattern("hal")
    jpeg, _ = md.JpegEncoder().encode(pattern.frame(1))
    sof = jpeg.index(b"\xff\xc0")
    bomb = jpeg[:sof + 5] + (30000).to_bytes(2, "big") * 2 + jpeg[sof + 9:]
    assert md._jpeg_pixels(jpeg) == 640 * 480
    assert md.JpegDecoder().decode(bomb) is None
    vp8, _ = md.Vp8Encoder().encode(pattern.frame(1), keyframe=True)
    assert md._vp8_pixels(vp8) == 640 * 480
    bomb = vp8[:6] + (16000).to_bytes(2, "little") * 2 + vp8[10:]
    assert md.Vp8Decoder().decode(bomb) is None


def test_codec_lists_and_factories():
    assert md.available_video_codecs() == ["vp8", "jpeg"]
    assert md.available_audio_codecs() == ["opus", "pcm"]
    assert md.make_video_encoder("jpeg").codec_id == 2
    with pytest.raises(ValueError):
        md.make_video_encoder("h264")
    with pytest.raises(ValueError):
        md.make_audio_decoder("mp3")


# --- Video sources ---------------------------------------------------------------

def write_video(path: Path, frames: list) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (640, 480))
    assert writer.isOpened()
    for frame in frames:
        writer.write(frame)
    writer.release()


def test_file_source_loops(tmp_path):
    pattern = md.TestPattern("ivan")
    path = tmp_path / "clip.avi"
    write_video(path, [pattern.frame(n) for n in range(10)])
    source = md.open_video_source(str(path), "ivan", fps=1000)
    try:
        stamps = [md.read_stamp(source.read()) for _ in range(25)]
    finally:
        source.close()
    assert stamps == [n % 10 for n in range(25)]
    assert source.read() is None                                # closed


def test_file_source_resizes(tmp_path):
    path = tmp_path / "small.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (320, 240))
    for _ in range(3):
        writer.write(np.full((240, 320, 3), 200, np.uint8))
    writer.release()
    source = md.open_video_source(str(path), "x", fps=1000, width=160, height=120)
    assert source.read().shape == (120, 160, 3)
    source.close()
    source.close()                                              # twice is harmless


def test_missing_camera_and_file_raise_no_camera(tmp_path):
    for spec in ("7", str(tmp_path / "nothing.avi")):
        with pytest.raises(md.DeviceError) as caught:
            md.open_video_source(spec, "u")
        assert caught.value.code == "no_camera"
    (tmp_path / "junk.avi").write_bytes(b"not a video" * 100)
    with pytest.raises(md.DeviceError):
        md.open_video_source(str(tmp_path / "junk.avi"), "u")


def test_test_source_paces_itself():
    source = md.open_video_source("test", "judy", fps=50)
    start = time.monotonic()
    stamps = [md.read_stamp(source.read()) for _ in range(26)]
    elapsed = time.monotonic() - start
    source.close()
    assert stamps == list(range(26))
    # Pacing is the behaviour under test; only a lower bound, which load can't break.
    assert elapsed >= 25 / 50 * 0.99


def test_close_wakes_a_waiting_read():
    source = md.open_video_source("test", "kim", fps=1)
    source._schedule.period_s = 3600        # the second read is due in an hour
    source.read()
    result = []
    reader = threading.Thread(target=lambda: result.append(source.read()))
    reader.start()
    source.close()
    reader.join(WAIT_LIMIT_S)
    assert result == [None]


# --- Audio codecs ----------------------------------------------------------------

def test_opus_round_trip_keeps_440_hz():
    encoder, decoder = md.make_audio_encoder("opus"), md.make_audio_decoder("opus")
    packets = [encoder.encode(frame) for frame in tone(50)]
    assert all(0 < len(p) < 200 for p in packets)
    decoded = b"".join(decoder.decode(p) for p in packets)
    assert len(decoded) == 50 * md.FRAME_BYTES
    assert abs(peak_hz(decoded[10 * md.FRAME_BYTES:]) - 440) < 3
    encoder.close()
    encoder.close()
    decoder.close()


def test_opus_conceal_and_fec_give_whole_frames():
    encoder, decoder = md.OpusEncoder(), md.OpusDecoder()
    packets = [encoder.encode(frame) for frame in tone(30)]
    for packet in packets[:20]:
        decoder.decode(packet)
    concealed = decoder.conceal()
    rebuilt = decoder.decode_fec(packets[21])                 # packet 20 was lost
    assert len(concealed) == len(rebuilt) == md.FRAME_BYTES
    assert np.abs(np.frombuffer(rebuilt, "<i2")).max() > 1000  # sound, not silence
    assert len(decoder.decode(packets[21])) == md.FRAME_BYTES


def test_opus_decoder_turns_garbage_into_concealment():
    decoder = md.OpusDecoder()
    rng = np.random.default_rng(3)
    for data in (b"", b"\xff" * 5000, *(rng.integers(0, 256, n, np.uint8).tobytes()
                                       for n in (1, 3, 50, 1275))):
        assert len(decoder.decode(data)) == md.FRAME_BYTES
    with pytest.raises(ValueError):
        md.OpusEncoder().encode(b"\0" * 100)


def test_pcm_round_trip_and_conceal():
    codec = md.make_audio_encoder("pcm")
    frames = tone(10)
    wire = [codec.encode(f) for f in frames]
    assert all(len(w) == 640 for w in wire)
    decoder = md.make_audio_decoder("pcm")
    decoded = b"".join(decoder.decode(w) for w in wire)
    assert abs(peak_hz(decoded) - 440) < 3
    error = np.frombuffer(decoded, "<i2").astype(float) - np.frombuffer(b"".join(frames), "<i2")
    assert np.sqrt(np.mean(error ** 2)) < 100                 # 8000 peak: > 35 dB SNR
    levels = [np.abs(np.frombuffer(decoder.conceal(), "<i2")).max() for _ in range(3)]
    assert levels[0] > levels[1] > levels[2]                  # fades out
    assert len(decoder.decode(b"odd")) == md.FRAME_BYTES
    assert md.PcmCodec().conceal() == md.SILENCE


# --- Audio I/O -------------------------------------------------------------------

def test_mix_sums_and_clips():
    a = np.array([1000, 30000, -30000, 5], "<i2").tobytes()
    b = np.array([2000, 10000, -10000], "<i2").tobytes()
    assert np.frombuffer(md.mix([a, b]), "<i2").tolist() == [3000, 32767, -32768, 5]
    assert md.mix([]) == md.SILENCE


def test_tone_source_runs_at_50_frames_a_second():
    source = md.open_audio_source("tone")
    counter = Counter()
    counter.start()
    source.start(counter.seen)
    try:
        count = counter.wait_span(RATE_SPAN_S)
    finally:
        source.stop()
    low, high = allowed(RATE_SPAN_S)
    assert low <= count <= high
    frames = counter.items[:count]
    assert all(len(f) == md.FRAME_BYTES for f in frames)
    joined = np.frombuffer(b"".join(frames), "<i2").astype(int)
    assert abs(peak_hz(b"".join(frames)) - 440) < 3
    assert np.abs(np.diff(joined)).max() < 600                # continuous across frames
    assert 7500 < np.abs(joined).max() < 8500                 # about -12 dBFS


def test_muted_source_delivers_silence():
    source = md.open_audio_source("tone")
    source.muted = True
    counter = Counter()
    counter.start()
    source.start(counter.seen)
    counter.wait_span(0.1)
    source.stop()
    assert set(counter.items) == {md.SILENCE}


def test_null_sink_pulls_in_real_time_and_survives_errors():
    sink = md.open_audio_sink("null")
    counter = Counter()

    def pull():
        counter.seen()
        if len(counter.times) == 3:
            raise RuntimeError("a bug in the caller")       # logged, the clock goes on
        return md.SILENCE

    counter.start()
    sink.start(pull)
    try:
        count = counter.wait_span(RATE_SPAN_S)
    finally:
        sink.stop()
    low, high = allowed(RATE_SPAN_S)
    assert low <= count <= high
    assert not sink._thread.is_alive()      # stop() ended the clock: no pull after it
    sink.stop()                             # twice is harmless


def test_bad_audio_specs_raise_no_audio_device():
    for spec in ("speakers", "999"):
        for opener in (md.open_audio_source, md.open_audio_sink):
            with pytest.raises(md.DeviceError) as caught:
                opener(spec)
            assert caught.value.code == "no_audio_device"


PYAUDIO_SCRIPT = textwrap.dedent("""
    import json, sys, threading, time
    sys.path.insert(0, sys.argv[1])
    sys.path[:0] = [sys.argv[3], sys.argv[1]]
    import test_media_devices as t, chatroom as md
    span_s = float(sys.argv[2])
    report = {"devices": md.list_devices()}
    callbacks = {"source": 0, "sink": 0}
    for kind, cls in (("source", md.AudioSource), ("sink", md.AudioSink)):
        def counting(self, *args, inner=cls._callback, kind=kind):
            callbacks[kind] += 1                      # every call PortAudio makes
            return inner(self, *args)
        cls._callback = counting
    for kind, opener in (("source", md.open_audio_source), ("sink", md.open_audio_sink)):
        stream = opener("default")
        counter = t.Counter()
        counter.start()
        if kind == "source":
            stream.start(counter.seen)
        else:
            stream.start(lambda: counter.seen() or md.SILENCE)
        report[kind] = counter.wait_span(span_s)
        stream.stop()
        report[kind + "_frame_sizes"] = sorted({len(i) for i in counter.items if i})
    report["callbacks"] = callbacks
    md.open_audio_source("default").stop()             # stop before start is harmless
    print(json.dumps(report))
""")


def test_pyaudio_against_alsa_null_pcm_is_rate_limited(tmp_path):
    (tmp_path / "alsa.conf").write_text(ALSA_NULL)
    env = dict(os.environ, ALSA_CONFIG_PATH=str(tmp_path / "alsa.conf"))
    result = subprocess.run([sys.executable, "-c", PYAUDIO_SCRIPT, str(HERE), str(RATE_SPAN_S),
                             str(ROOT)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""                              # PortAudio's noise is silenced
    report = json.loads(result.stdout)
    assert report["devices"]["audio_inputs"] and report["devices"]["audio_outputs"]
    low, high = allowed(RATE_SPAN_S)
    assert low <= report["source"] <= high, report
    assert low <= report["sink"] <= high, report
    assert report["source_frame_sizes"] == [md.FRAME_BYTES]
    # The null PCM calls back faster than real time; the token bucket passed on only 50/s.
    assert report["callbacks"]["source"] > report["source"]
    assert report["callbacks"]["sink"] > report["sink"]


def test_list_devices_never_raises():
    found = md.list_devices()
    assert set(found) == {"cameras", "audio_inputs", "audio_outputs", "video_codecs",
                          "audio_codecs", "echo_cancel"}
    assert found["video_codecs"] == ["vp8", "jpeg"] and found["audio_codecs"] == ["opus", "pcm"]
    assert found["cameras"] == []                           # no camera on this machine
    assert found["echo_cancel"] == {"works": True, "why": ""}   # livekit is installed


def test_list_devices_says_when_echo_cancelling_will_not_load(monkeypatch):
    def broken() -> md.VoiceProcessor:
        raise md.DeviceError("missing_package", "echo cancelling needs livekit: pip install "
                             "livekit (No module named 'livekit')")
    monkeypatch.setattr(md, "VoiceProcessor", broken)
    assert md.list_devices()["echo_cancel"] == {
        "works": False, "why": "echo cancelling needs livekit: pip install livekit (No "
        "module named 'livekit')"}


# --- Recording -------------------------------------------------------------------

def test_recorder_wav_and_pictures(tmp_path):
    recorder = md.Recorder(tmp_path / "call")
    for frame in tone(50):
        recorder.audio("alice", frame)
    picture = md.TestPattern("alice").frame(0)
    for now_s in (10.0, 10.3, 10.99, 11.0, 11.5, 12.2, 12.9):
        recorder.frame("alice", picture, now_s)
    recorder.close()
    recorder.close()
    with wave.open(str(tmp_path / "call" / "alice.wav")) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 48000)
        assert wav.getnframes() == 50 * 960
        assert abs(peak_hz(wav.readframes(wav.getnframes())) - 440) < 3
    pictures = sorted(p.name for p in (tmp_path / "call").glob("*.png"))
    assert pictures == ["alice-1.png", "alice-2.png", "alice-3.png"]
    assert md.read_stamp(cv2.imread(str(tmp_path / "call" / "alice-1.png"))) == 0


def test_recorder_cleans_untrusted_names(tmp_path):
    recorder = md.Recorder(tmp_path)
    for peer in ("../evil", "", ".hidden", "a/b", "a?b", "CON", "名字"):
        recorder.audio(peer, md.SILENCE)
    recorder.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    # ROOMS' safe_filename: the last path part, no hidden files, no devices;
    # names that clean up alike get numbers.
    assert names == sorted(["evil.wav", "file.wav", "hidden.wav", "b.wav", "a_b.wav",
                            "_CON.wav", "名字.wav"])
    assert all(p.parent == tmp_path for p in tmp_path.iterdir())


def test_killed_recorder_leaves_a_readable_wav(tmp_path):
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        import chatroom as md
        recorder = md.Recorder({str(tmp_path)!r}, flush_s=0.0)   # flush every write
        for _ in range(25):
            recorder.audio("bob", b"\\x10\\x00" * 960)
        os._exit(0)                         # no close(), no atexit, no buffers flushed
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    with wave.open(str(tmp_path / "bob.wav")) as wav:
        assert wav.getnframes() == 25 * 960


def test_device_error_codes_are_checked():
    error = md.DeviceError("no_camera", "none here")
    assert (error.code, error.message) == ("no_camera", "none here")
    with pytest.raises(ValueError):
        md.DeviceError("oops", "undocumented")
