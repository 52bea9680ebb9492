#!/usr/bin/env python3
"""bench/video_sim.py -- which video repair keeps the most frames for the least bandwidth?

A deterministic simulation of one video stream built from chatroom.py's own pure
code: `fragment` cuts the frames, a `VideoReceiver` (Reassembler, KeyframeGate,
Nacks) takes them in, a `FragmentCache` and a `Retransmitter` answer its Nacks,
and every control message crosses as the bytes `pack_control` makes and
`unpack_control` reads. Nothing else is real: no sockets, no codec, no clock.
Packets are lost at random each way (a seeded generator), take a fixed one-way
delay (half the round trip) plus a little seeded jitter, and frames have the
sizes libvpx gives the test pattern at 1 Mb/s (measured once, in this process;
`--synthetic` uses fixed sizes and needs no PyAV). A keyframe request makes the
next frame a keyframe of the size the encoder's keyframes have.

Four ways to repair, as `--video-repair` offers them:
  none    no parity, no Nacks: a lost packet costs its frame, then a keyframe
  parity  one XOR parity fragment per FEC_GROUP data fragments (until issue 12)
  nack    no parity; the receiver asks once for what is missing (a Nack)
  both    parity, and a Nack for what parity can't rebuild

    .venv/bin/python bench/video_sim.py                 # a few seconds
    .venv/bin/python bench/video_sim.py --loss 2,5,10 --rtt 2,20 --json

Figures: shown (frames the gate let through to the decoder, of those captured),
kb/s on the wire (video, parity, resent fragments, with the 30 bytes of header
and tag per packet), the same back (Nacks, keyframe requests), overhead against
`none` at the same loss, keyframes asked for, and the delay a frame waited
beyond its one-way trip (p50 / p99 of frames shown). A burst row cuts the link
for --burst-ms and says how long after its end the picture moved again.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import chatroom  # noqa: E402

MODES = ("none", "parity", "nack", "both")
FPS = chatroom.VIDEO_FPS
FRAME_MS = 1000 / FPS
POLL_MS = 10.0              # the receiver's timer (the engine polls on every packet too)
SEND_GAP_MS = 0.05          # between two packets of one frame, as the pacing sends them
JITTER_MS = 0.5             # each packet's delay varies up to this


def vp8_sizes(frames: int = 300) -> tuple[list[int], int]:
    """(sizes of the delta frames, size of a keyframe) libvpx gives the 640x480 test
    pattern at VIDEO_BITRATE: the first frame is the keyframe."""
    pattern = chatroom.TestPattern("sim")
    encoder = chatroom.make_video_encoder("vp8")
    out = [encoder.encode(pattern.frame(n), keyframe=n == 0) for n in range(frames)]
    encoder.close()
    sizes = [(len(data), key) for data, key in filter(None, out)]
    keys = [size for size, key in sizes if key]
    return [size for size, key in sizes if not key], round(statistics.mean(keys))


SYNTHETIC = ([4200] * 10, 9400)     # about what vp8_sizes measures


class Channel:
    """One direction of the link: loses `loss` of the packets at random (and every
    packet sent during the burst), delays the others."""

    def __init__(self, sim: Sim, rng: random.Random, loss: float, delay_ms: float,
                 burst: tuple[float, float] | None) -> None:
        self.sim, self.rng, self.loss, self.delay_ms, self.burst = sim, rng, loss, delay_ms, burst
        self.sent_bytes = self.packets = self.lost = 0
        self.last_arrival = 0.0         # a LAN path keeps the order packets were sent in

    def send(self, now: float, inner: bytes, deliver) -> None:
        self.packets += 1
        self.sent_bytes += len(inner) + chatroom.PACKET_OVERHEAD_BYTES
        cut = self.burst is not None and self.burst[0] <= now < self.burst[1]
        if cut or self.rng.random() < self.loss:
            self.lost += 1
            return
        arrival = max(self.last_arrival, now + self.delay_ms + self.rng.uniform(0, JITTER_MS))
        self.last_arrival = arrival
        self.sim.at(arrival, deliver, inner)


class Sim:
    """Sender and receiver of one stream, as the engine joins chatroom.py's pieces."""

    def __init__(self, mode: str, loss: float, seed: int, seconds: float, rtt_ms: float,
                 sizes: tuple[list[int], int], burst: tuple[float, float] | None = None,
                 wait_ms: float = chatroom.REPAIR_WAIT_MS) -> None:
        self.queue: list = []
        self.order = itertools.count()
        rng = random.Random(seed)
        self.forward = Channel(self, random.Random(rng.random()), loss, rtt_ms / 2, burst)
        self.back = Channel(self, random.Random(rng.random()), loss, rtt_ms / 2, burst)
        self.parity = mode in ("parity", "both")
        self.receiver = chatroom.VideoReceiver(repair=mode in ("nack", "both"), wait_ms=wait_ms)
        self.cache = chatroom.FragmentCache()
        self.resender = chatroom.Retransmitter(self.cache)
        self.deltas, self.key_size = sizes
        self.frames = round(seconds * FPS)
        self.seconds, self.one_way = seconds, rtt_ms / 2
        self.want_key = False
        self.keyframes = 0
        self.video_bytes = 0
        self.captured: dict[int, float] = {}    # frame_id -> capture time
        self.shown: list[tuple[float, int]] = []   # (time, frame_id)

    def at(self, when: float, action, arg=None) -> None:
        heapq.heappush(self.queue, (when, next(self.order), action, arg))

    def run(self) -> Sim:
        for n in range(self.frames):
            self.at(n * FRAME_MS, self.capture, n)
        for k in range(int(self.seconds * 1000 / POLL_MS) + 100):
            self.at(k * POLL_MS, self.poll)
        while self.queue:
            self.now, _, action, arg = heapq.heappop(self.queue)
            action(arg)
        return self

    # --- the sender ---

    def capture(self, n: int) -> None:
        frame_id = n + 1
        key = n % chatroom.VP8_KEYFRAME_FRAMES == 0 or self.want_key
        self.keyframes += self.want_key
        self.want_key = False
        size = self.key_size if key else self.deltas[n % len(self.deltas)]
        self.video_bytes += size
        inners = chatroom.fragment(frame_id, bytes(size), round(self.now), key,
                                   chatroom.CODEC_VP8, parity=self.parity)
        self.cache.add(frame_id, inners)
        self.captured[frame_id] = self.now
        for i, inner in enumerate(inners):
            self.forward.send(self.now + i * SEND_GAP_MS, inner, self.at_receiver)

    def at_sender(self, inner: bytes) -> None:
        control = chatroom.unpack_control(inner)
        if isinstance(control, chatroom.Nack):
            for again in self.resender.answer(control, self.now):
                self.forward.send(self.now, again, self.at_receiver)
        elif control is not None and control.type == chatroom.CONTROL_KEYFRAME:
            self.want_key = True

    # --- the receiver ---

    def at_receiver(self, inner: bytes) -> None:
        self.handle(*self.receiver.packet(inner, self.now))

    def poll(self, _arg=None) -> None:
        self.handle(*self.receiver.poll(self.now))

    def handle(self, frames, controls) -> None:
        self.shown += [(self.now, frame.frame_id) for frame in frames]
        for inner in controls:
            self.back.send(self.now, inner, self.at_sender)

    # --- figures ---

    def figures(self) -> dict:
        waited = sorted(t - self.captured[i] - self.one_way for t, i in self.shown)
        times = [t for t, _ in self.shown]
        r = self.receiver
        return {
            "shown_pct": 100 * len(self.shown) / self.frames,
            "kbps": self.forward.sent_bytes * 8 / self.seconds / 1000,
            "back_kbps": self.back.sent_bytes * 8 / self.seconds / 1000,
            "video_kbps": self.video_bytes * 8 / self.seconds / 1000,
            "keyframes_asked": self.keyframes, "nacks": r.nacks,
            "resent": self.resender.resent, "recovered": r.reassembler.recovered,
            "parity_repaired": r.reassembler.repaired,
            "given_up": r.reassembler.incomplete,
            "lost_pct": 100 * self.forward.lost / max(1, self.forward.packets),
            "wait_p50_ms": waited[len(waited) // 2] if waited else None,
            "wait_p99_ms": waited[int(0.99 * (len(waited) - 1))] if waited else None,
            "freeze_ms": max((b - a for a, b in itertools.pairwise(times)), default=None)}

    def recovery_ms(self, burst_end: float) -> float | None:
        """From the burst's end until a frame captured after it is shown."""
        after = [t for t, i in self.shown if self.captured[i] >= burst_end]
        return min(after) - burst_end if after else None


def simulate(mode: str, loss: float, seed: int = 1, seconds: float = 60.0,
             rtt_ms: float = 2.0, sizes: tuple[list[int], int] = SYNTHETIC,
             burst: tuple[float, float] | None = None,
             wait_ms: float = chatroom.REPAIR_WAIT_MS) -> dict:
    """One run: the figures of `Sim.figures`, plus recover_ms when there is a burst."""
    sim = Sim(mode, loss, seed, seconds, rtt_ms, sizes, burst, wait_ms).run()
    out = {"mode": mode, "loss_pct": 100 * loss, "rtt_ms": rtt_ms, "seed": seed, **sim.figures()}
    if burst is not None:
        out["burst_ms"] = burst[1] - burst[0]
        out["recover_ms"] = sim.recovery_ms(burst[1])
    return out


def averaged(mode: str, loss: float, seeds: int, **kw) -> dict:
    runs = [simulate(mode, loss, seed, **kw) for seed in range(1, seeds + 1)]
    out = dict(runs[0])
    for key, value in runs[0].items():
        if key in ("mode", "loss_pct", "rtt_ms", "seed", "burst_ms"):
            continue
        if isinstance(value, float):
            values = [r[key] for r in runs if r[key] is not None]
            out[key] = statistics.mean(values) if values else None
        elif isinstance(value, int):
            out[key] = sum(r[key] for r in runs)
    out["seed"] = f"1..{seeds}"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    listed = lambda kind: (lambda text: [kind(x) for x in text.split(",") if x])  # noqa: E731
    parser.add_argument("--loss", type=listed(float), default=[0.0, 2.0, 5.0],
                        help="percent lost each way (default 0,2,5)")
    parser.add_argument("--rtt", type=listed(float), default=[2.0, 20.0],
                        help="round trips in ms (default 2,20: a LAN, a busy Wi-Fi)")
    parser.add_argument("--seconds", type=float, default=60.0, help="per run (default 60)")
    parser.add_argument("--seeds", type=int, default=5, help="runs averaged (default 5)")
    parser.add_argument("--burst-ms", type=listed(float), default=[100.0, 300.0, 1000.0],
                        help="burst losses to recover from (default 100,300,1000)")
    parser.add_argument("--synthetic", action="store_true",
                        help="fixed frame sizes instead of measuring libvpx")
    parser.add_argument("--json", action="store_true", help="JSON lines instead of tables")
    args = parser.parse_args()
    sizes = SYNTHETIC if args.synthetic else vp8_sizes()
    rows, bursts = [], []
    for rtt in args.rtt:
        for loss in args.loss:
            for mode in MODES:
                rows.append(averaged(mode, loss / 100, args.seeds, seconds=args.seconds,
                                     rtt_ms=rtt, sizes=sizes))
        for length in args.burst_ms:
            start = 4000.0
            for mode in MODES:
                bursts.append(averaged(mode, 0.0, args.seeds, seconds=10,
                                       rtt_ms=rtt, sizes=sizes, burst=(start, start + length)))
    if args.json:
        for row in rows + bursts:
            print(json.dumps(row))
        return 0
    base = {(r["rtt_ms"], r["loss_pct"]): r for r in rows if r["mode"] == "none"}
    print(f"frames: {len(sizes[0])} delta sizes, mean {statistics.mean(sizes[0]):.0f} bytes; "
          f"keyframe {sizes[1]} bytes; {FPS} fps; {args.seeds} seeds x {args.seconds:g} s; "
          f"repair wait {chatroom.REPAIR_WAIT_MS} ms")
    print(f"\n{'rtt':>4} {'loss':>5} {'mode':<7}|{'shown':>8}{'kb/s':>7}{'back':>6}"
          f"{'x none':>8} |{'keys':>5}{'nacks':>6}{'resent':>7}{'recov':>6}{'parity':>7}"
          f"{'gave up':>8} |{'wait p50':>9}{'p99 ms':>7}")
    for r in rows:
        b = base[(r["rtt_ms"], r["loss_pct"])]
        ratio = (r["kbps"] + r["back_kbps"]) / (b["kbps"] + b["back_kbps"])
        print(f"{r['rtt_ms']:>4g} {r['loss_pct']:>4g}% {r['mode']:<7}|"
              f"{r['shown_pct']:>7.2f}%{r['kbps']:>7.0f}{r['back_kbps']:>6.1f}{ratio:>8.3f} |"
              f"{r['keyframes_asked']:>5}{r['nacks']:>6}{r['resent']:>7}{r['recovered']:>6}"
              f"{r['parity_repaired']:>7}{r['given_up']:>8} |"
              f"{r['wait_p50_ms']:>9.1f}{r['wait_p99_ms']:>7.1f}")
    print(f"\n{'rtt':>4} {'burst':>7} {'mode':<7}| {'moving again after':>19} |"
          f" {'longest freeze':>14} | {'shown':>6} | keys")
    for r in bursts:
        rec = "never" if r["recover_ms"] is None else f"{r['recover_ms']:.0f} ms"
        print(f"{r['rtt_ms']:>4g} {r['burst_ms']:>5g}ms {r['mode']:<7}| {rec:>19} |"
              f" {r['freeze_ms']:>11.0f} ms | {r['shown_pct']:>5.1f}% | {r['keyframes_asked']}")
    print("""
shown: frames passed to the decoder / frames captured. kb/s: sent on the wire, video way
  (headers and tags included); back: Nacks and keyframe requests. x none: both ways, over
  `none` at the same loss and round trip. keys: keyframes asked for (each a bigger frame).
recov: frames completed thanks to resent fragments; parity: rebuilt by parity; gave up:
  frames dropped incomplete. wait: how long frames shown waited beyond the one-way trip.
burst rows: the link is cut for that long, 4 s into a 10 s run (no random loss): the
  time from the burst's end until a frame captured after it is shown, and the longest
  time the picture stood still (33 ms: never).""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
