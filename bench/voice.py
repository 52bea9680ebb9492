#!/usr/bin/env python3
"""bench/voice.py -- how clean, how whole and how quick is a call's voice?

Everything runs through chatroom.py's own code, in this process:

1. Echo: speech (tests/data, espeak-ng) played by a laptop's speaker comes
   back into its microphone late, with a decaying tail: A 60 ms late with a
   50 ms tail, B (a loud laptop, MEDIA-NOTES.md) 150 ms with 150 ms. The
   microphone goes through VoiceProcessor (WebRTC's AEC3, noise suppression,
   high-pass and gain, via livekit), the speaker's frames are its far end.
   Baseline, same run: the microphone unprocessed (what --no-echo-cancel
   sends). Reported: echo removed; the near end's level change while both
   talk; steady noise removed; a quiet voice lifted.
2. Cost: VoiceProcessor per 10 ms (both directions), against Opus encoding
   and decoding 10 ms in the same run.
3. Loss: speech through Opus, a network that loses 0, 5 and 10% of the
   packets at random (1-3 ms on the way), the jitter buffer and Playout, as
   the sink's clock pops them: silence for a lost frame, Opus concealment
   (PLC), and Opus FEC with concealment; SNR against the same speech with
   no loss, frame by frame as the jitter buffer lined them up. 5 seeds each.
4. Delay: two MediaEngines in this process, a real call over loopback UDP
   (sealed packets, receiving threads, jitter buffer, clock threads for the
   devices: `--audio FILE.wav` clicks on one side, a null speaker on the
   other; stand-ins, so no echo canceller runs: its own delay is measured
   apart, by cross-correlation). From the moment a click's frame is handed
   over by the microphone's clock to the moment the speaker's clock pulls
   it, plus the click's place in its frame (its first sample waited for the
   frame to fill, its last is played last): capture to playback, no device
   buffers.

    .venv/bin/python bench/voice.py             # about a minute
    .venv/bin/python bench/voice.py --json

Numbers, never a verdict: exit 1 only if the setup broke.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import wave
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import chatroom  # noqa: E402

RATE, N = chatroom.SAMPLE_RATE, chatroom.FRAME_SAMPLES
DATA = ROOT / "tests" / "data"
FULL_SCALE = 32767 ** 2 / 2           # a full-scale sine's power: 0 dBFS


def db(x: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(np.asarray(x, float) ** 2) / FULL_SCALE + 1e-12))


def frames_of(signal: np.ndarray) -> list[bytes]:
    whole = np.clip(np.round(signal), -32768, 32767).astype("<i2")
    return [whole[i:i + N].tobytes() for i in range(0, len(whole) - N + 1, N)]


def join(frames: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(frames), "<i2").astype(float)


def speech(seconds: int) -> tuple[np.ndarray, np.ndarray]:
    """(far-end, near-end) speech at 48 kHz, looped to `seconds`."""
    far, near = (chatroom.load_wav(str(DATA / name)).astype(float)
                 for name in ("speech-bob.wav", "speech-alice.wav"))
    return np.resize(far, seconds * RATE) * 0.6, np.resize(near, seconds * RATE) * 0.5


def echo_of(far: np.ndarray, late_ms: int, tail_ms: int, seed: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tail = int(tail_ms * RATE / 1000)
    response = rng.standard_normal(tail) * np.exp(-np.arange(tail) / (tail / 5))
    response *= 0.5 / np.sqrt(np.sum(response ** 2))           # -6 dB, a loud laptop
    echo = np.convolve(far, response)[:len(far)]
    return np.concatenate([np.zeros(int(late_ms * RATE / 1000)), echo])[:len(far)]


def process(far: np.ndarray, mic: np.ndarray) -> tuple[np.ndarray, float]:
    """`mic` through a new VoiceProcessor with `far` as what the speaker plays;
    also the processor's time per 10 ms (both directions), in ms."""
    processor, out, spent = chatroom.VoiceProcessor(), [], 0.0
    for played, heard in zip(frames_of(far), frames_of(mic)):
        t0 = time.perf_counter()
        processor.play(played)
        out.append(processor.capture(heard))
        spent += time.perf_counter() - t0
    processor.close()
    return join(out), 1000 * spent / (2 * len(out))


def echo_rows() -> tuple[list[dict], list[float]]:
    far, near = speech(14)
    talking = near.copy()
    talking[:7 * RATE] = 0                      # 7 s of echo alone, then both talk
    alone, both = slice(3 * RATE, 7 * RATE), slice(8 * RATE, 14 * RATE)
    rows, costs = [], []
    for case, late, tail in (("A", 60, 50), ("B", 150, 150)):
        echo = echo_of(far, late, tail)
        out, cost = process(far, echo + talking)
        costs.append(cost)
        rows.append({"type": "echo", "case": case, "late_ms": late, "tail_ms": tail,
                     "echo_in_dbfs": round(db(echo[alone]), 1),
                     "echo_out_dbfs": round(db(out[alone]), 1),
                     "echo_removed_db": round(db(echo[alone]) - db(out[alone]), 1),
                     "near_change_db": round(db(out[both]) - db(talking[both]), 1)})
    silent = np.zeros_like(far)
    noise = np.random.default_rng(2).standard_normal(len(far)) * 300    # about -40 dBFS
    out, cost = process(silent, noise + talking)
    costs.append(cost)
    rows.append({"type": "noise", "noise_in_dbfs": round(db(noise[alone]), 1),
                 "noise_removed_db": round(db(noise[alone]) - db(out[alone]), 1),
                 "speech_change_db": round(db(out[both]) - db(talking[both] + noise[both]), 1)})
    quiet = near * 10 ** (-30 / 20)
    out, cost = process(silent, quiet)
    costs.append(cost)
    later = slice(6 * RATE, 14 * RATE)
    rows.append({"type": "gain", "voice_in_dbfs": round(db(quiet[later]), 1),
                 "voice_out_dbfs": round(db(out[later]), 1),
                 "lifted_db": round(db(out[later]) - db(quiet[later]), 1)})
    return rows, costs


def opus_cost_ms() -> float:
    """Opus encode + decode of 10 ms (the baseline for the processor's cost)."""
    far, _ = speech(10)
    frames = frames_of(far)
    encoder, decoder = chatroom.OpusEncoder(), chatroom.OpusDecoder()
    t0 = time.perf_counter()
    for frame in frames:
        decoder.decode(encoder.encode(frame))
    return 1000 * (time.perf_counter() - t0) / (2 * len(frames))


# --- loss ----------------------------------------------------------------------------

def through_the_network(packets: list[bytes], loss: float, seed: int,
                        how: str) -> tuple[np.ndarray, list[int | None]]:
    """What a sink plays of `packets` (sent every 20 ms, 1-3 ms on the way,
    `loss` lost), and which sequence number each frame stands for."""
    decoder = chatroom.OpusDecoder()
    buffer = chatroom.JitterBuffer(repair_frames=1 if how == "fec" else 0)
    playout, rng = chatroom.Playout(chatroom.SILENCE), random.Random(seed)
    arrivals = [(seq * 20.0 + rng.uniform(1, 3), seq, packet)
                for seq, packet in enumerate(packets, 1) if seq <= 3 or rng.random() >= loss]
    out, played = [], []
    for tick in range(len(packets) + 5):
        now = 20.0 * tick + 7                   # the sink's clock, out of phase
        while arrivals and arrivals[0][0] <= now:
            arrived, seq, packet = arrivals.pop(0)
            buffer.push(seq, packet, arrived)
        status, payload = buffer.pop(fec=how == "fec")
        played.append(None if status == "empty" else buffer._next - 1)  # its playout point
        out.append(chatroom.SILENCE if how == "silence" and status != "frame"
                   else playout.render(status, payload, decoder))
    return join(out), played


def loss_rows(seeds: int) -> list[dict]:
    far, _ = speech(10)
    encoder = chatroom.OpusEncoder()
    packets = [encoder.encode(frame) for frame in frames_of(far)]
    clean, order = through_the_network(packets, 0.0, 0, "plc")
    reference = dict(zip(order, np.split(clean, len(order))))
    rows = []
    for loss in (0.0, 0.05, 0.10):
        row: dict = {"type": "loss", "loss_pct": round(100 * loss)}
        for how in ("silence", "plc", "fec"):
            snrs = []
            for seed in range(1, seeds + 1):
                got, played = through_the_network(packets, loss, seed, how)
                pairs = [(reference[s], f) for s, f in zip(played, np.split(got, len(played)))
                         if s is not None and s in reference]
                want = np.concatenate([w for w, _ in pairs])
                error = np.concatenate([f - w for w, f in pairs])
                snrs.append(min(99.0, db(want) - db(error)))
            row[f"{how}_snr_db"] = round(statistics.mean(snrs), 1)
        rows.append(row)
    return rows


# --- delay -----------------------------------------------------------------------------

CLICK_EVERY_S = 0.5
CLICK_MS = 10


def click_wav(folder: Path) -> Path:
    """A click (10 ms of a 1 kHz burst at -6 dBFS) every 0.5 s, at an odd place
    in its 20 ms frame, so the delay isn't a whole number of frames by luck."""
    period = int(CLICK_EVERY_S * RATE)
    t = np.arange(int(CLICK_MS * RATE / 1000))
    burst = 16000 * np.sin(2 * np.pi * 1000 * t / RATE) * np.hanning(len(t))
    signal = np.zeros(period)
    start = 7 * N + 333
    signal[start:start + len(burst)] = burst
    path = folder / "clicks.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(RATE)
        out.writeframes(np.round(signal).astype("<i2").tobytes())
    return path


def onset(pcm: bytes, threshold: float = 3000.0) -> int | None:
    """Index of the first sample louder than `threshold`, or None."""
    loud = np.flatnonzero(np.abs(np.frombuffer(pcm, "<i2")) > threshold)
    return int(loud[0]) if len(loud) else None


def delay_rows(seconds: float) -> dict:
    """A call between two engines over loopback UDP; capture-to-playback delays."""
    folder = Path(tempfile.mkdtemp(prefix="chatroom-voice-"))
    loop = asyncio.new_event_loop()             # the engines only post to it (errors)
    errors: list[dict] = []
    speaker = chatroom.MediaEngine(chatroom.MediaOptions(
        camera="none", audio=str(click_wav(folder))),
        errors.append, lambda packet: None, loop)
    listener = chatroom.MediaEngine(chatroom.MediaOptions(
        camera="none", audio="null"),
        errors.append, lambda packet: None, loop)
    sent: list[float] = []                      # when each click's frame was handed over
    heard: list[float] = []                     # when the speaker's clock pulled it
    depths: list[int] = []                      # frames the jitter buffer held at each pull
    lock = threading.Lock()
    on_audio, pull = speaker._on_audio, listener._pull_audio

    def timed_on_audio(pcm: bytes, encoders: dict) -> None:
        at = onset(pcm)
        if at is not None and (not sent or time.monotonic() - sent[-1] > CLICK_EVERY_S / 2):
            with lock:                          # its first sample waited (N - at) samples
                sent.append(time.monotonic() - (N - at) / RATE)
        on_audio(pcm, encoders)

    def timed_pull() -> bytes:
        link = listener.link("speaker")
        if link is not None:
            depths.append(link.jitter.depth)
        pcm = pull()
        at = onset(pcm)
        if at is not None and (not heard or time.monotonic() - heard[-1] > CLICK_EVERY_S / 2):
            with lock:                          # ... and plays `at` samples into its frame
                heard.append(time.monotonic() + at / RATE)
        return pcm
    speaker._on_audio, listener._pull_audio = timed_on_audio, timed_pull
    sockets = []
    try:
        key, link_id = os.urandom(32), os.urandom(4)
        for engine in (speaker, listener):
            sockets.append(chatroom.UdpSocket("127.0.0.1", 0, lambda data, source, e=engine:
                                              e.on_packet(data, "udp"), "bench"))
        for engine, sock, other, a_side, name in (
                (speaker, sockets[0], sockets[1], True, "listener"),
                (listener, sockets[1], sockets[0], False, "speaker")):
            engine.user = "speaker" if a_side else "listener"
            engine.add(chatroom.PeerLink(name, link_id, key, a_side, "", "opus", sock,
                                         ("127.0.0.1", other.port), False))
        deadline = time.monotonic() + seconds + 20
        while time.monotonic() < deadline:
            with lock:
                if len(heard) >= seconds / CLICK_EVERY_S:
                    break
            time.sleep(0.2)                     # the threads run the call; we wait it out
        link = listener.link("speaker")
        target = link.jitter.target_ms if link is not None else None
        counts = {name: getattr(link.jitter, name) for name in (
            "played", "concealed", "recovered", "late", "dropped", "underruns")} if link else {}
    finally:
        for engine in (speaker, listener):
            engine.close()
        for sock in sockets:
            sock.close(wait=True)
        loop.close()
    if errors or len(heard) < 4:
        raise RuntimeError(f"the loopback call broke: {errors or 'no clicks heard'}")
    # Pair each click heard with the last one sent before it (they are 500 ms apart).
    delays = []
    for when in heard[2:]:                      # the first: the jitter buffer filling
        before = [s for s in sent if s < when]
        if before and when - before[-1] < CLICK_EVERY_S:
            delays.append(1000 * (when - before[-1]))
    delays.sort()
    return {"type": "delay", "clicks": len(delays),
            "p50_ms": round(statistics.median(delays), 1),
            "p95_ms": round(delays[int(0.95 * (len(delays) - 1))], 1),
            "min_ms": round(delays[0], 1), "jitter_target_ms": target,
            "jitter_held_ms": round(20 * statistics.mean(depths[len(depths) // 2:]), 1),
            "jitter_counts": counts}


def lag_ms(before: np.ndarray, after: np.ndarray) -> float:
    """How late `after` follows `before` (-10 to 50 ms), by normalised
    cross-correlation over seconds 1 to 3."""
    base = before[RATE:3 * RATE]

    def score(lag: int) -> float:
        part = after[RATE + lag:3 * RATE + lag]
        return float(np.dot(part, base) / (np.sqrt(np.dot(part, part) * np.dot(base, base))
                                           + 1e-9))
    lags = range(-RATE // 100, RATE // 20)
    return round(1000 * max(lags, key=score) / RATE, 1)


def opus_lookahead_ms() -> float:
    """Opus's own delay: the lag of the decoded signal behind the input."""
    far, _ = speech(4)
    encoder, decoder = chatroom.OpusEncoder(), chatroom.OpusDecoder()
    return lag_ms(far, join([decoder.decode(encoder.encode(f)) for f in frames_of(far)]))


def processor_delay_ms() -> float:
    """VoiceProcessor's own delay: its output's lag behind the microphone."""
    _, near = speech(4)
    out, _ = process(np.zeros_like(near), near)
    return lag_ms(near, out)


# --- report ---------------------------------------------------------------------------

def report(rows: list[dict]) -> None:
    by = {}
    for row in rows:
        by.setdefault(row["type"], []).append(row)
    print("Echo (48 kHz speech, the microphone through VoiceProcessor; baseline: unprocessed):")
    for r in by["echo"]:
        print(f"  {r['case']}: {r['late_ms']} ms late, {r['tail_ms']} ms tail: echo "
              f"{r['echo_in_dbfs']} -> {r['echo_out_dbfs']} dBFS, removed "
              f"{r['echo_removed_db']} dB; near end while both talk {r['near_change_db']:+} dB")
    n, g = by["noise"][0], by["gain"][0]
    print(f"  steady noise at {n['noise_in_dbfs']} dBFS: {n['noise_removed_db']} dB removed; "
          f"speech over it {n['speech_change_db']:+} dB")
    print(f"  a quiet voice at {g['voice_in_dbfs']} dBFS: {g['voice_out_dbfs']} dBFS after "
          f"the gain control ({g['lifted_db']:+} dB)")
    c = by["cost"][0]
    print(f"\nCost: {c['processor_ms_per_10ms']} ms per 10 ms ({c['processor_pct_core']}% of a "
          f"core); Opus encode + decode {c['opus_ms_per_10ms']} ms per 10 ms: "
          f"x{c['processor_vs_opus']}. Native library: {c['library_mb']} MB.")
    print("\nLoss (Opus 24 kb/s, SNR against the same speech with no loss, mean of "
          f"{by['loss'][0].get('seeds', '')} seeds):")
    print(f"  {'loss':>5} {'silence':>9} {'PLC':>7} {'FEC':>7}  FEC - silence")
    for r in by["loss"]:
        print(f"  {r['loss_pct']:>4}% {r['silence_snr_db']:>8.1f} {r['plc_snr_db']:>7.1f} "
              f"{r['fec_snr_db']:>7.1f}  {r['fec_snr_db'] - r['silence_snr_db']:+.1f} dB")
    la, pd = by["lookahead"][0]["ms"], by["lookahead"][0]["processor_ms"]
    print(f"\nDelay, capture to playback without device buffers (two engines, loopback UDP; "
          f"a 20 ms frame, Opus look-ahead {la} ms; the echo canceller, which runs on real "
          f"devices only, adds {pd} ms):")
    for r in by["delay"]:
        print(f"  p50 {r['p50_ms']} ms, "
              f"p95 {r['p95_ms']} ms, min {r['min_ms']} ms over {r['clicks']} clicks "
              f"(jitter buffer: target {r['jitter_target_ms']} ms, held "
              f"{r['jitter_held_ms']} ms on average before a pull)")
    print("\nThe frame (20 ms) + Opus look-ahead + the jitter buffer's target is the floor;"
          "\nthe rest is where the speaker's clock stands against the microphone's (0-20 ms).")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0,
                        help="length of the delay measurement (default 15)")
    parser.add_argument("--seeds", type=int, default=5, help="loss patterns per row (default 5)")
    parser.add_argument("--json", action="store_true", help="JSON lines instead of the text")
    args = parser.parse_args()
    try:
        echo, costs = echo_rows()
        opus = opus_cost_ms()
        library = Path(__import__("livekit.rtc", fromlist=["rtc"]).__file__).parent / \
            "resources"
        size = sum(f.stat().st_size for f in library.glob("*livekit_ffi*"))
        cost = statistics.mean(costs)
        rows = echo + [{"type": "cost", "processor_ms_per_10ms": round(cost, 3),
                        "processor_pct_core": round(cost / 10 * 100, 1),
                        "opus_ms_per_10ms": round(opus, 3),
                        "processor_vs_opus": round(cost / opus, 1),
                        "library_mb": round(size / 2 ** 20, 1)}]
        rows += [dict(row, seeds=args.seeds) for row in loss_rows(args.seeds)]
        rows.append({"type": "lookahead", "ms": opus_lookahead_ms(),
                     "processor_ms": processor_delay_ms()})
        rows.append(delay_rows(args.seconds))
    except (chatroom.ChatError, RuntimeError, OSError) as exc:
        print(f"bench/voice.py: the setup broke: {exc}", file=sys.stderr)
        return 1
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        report(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
