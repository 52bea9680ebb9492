#!/usr/bin/env python3
"""bench/media.py -- what does a video call cost, and how well does it hold up?

VP8 and JPEG side by side in one run, every client a real `chatroom.py --cli
--json --camera test --audio tone` (640x480 at 30 fps, a 440 Hz tone) on
127.0.0.1 through one `--host`: 1, then 3 simultaneous /CHECK calls, then one
direct call (`/call`) through a UDP proxy in this process that drops 0, 2 and
5% of the packets each way (random, fixed seed: the kernel here has no netem).
Each row is a window of --seconds, once every stream has shown video for a
whole second: fps, latency, kb/s and audio from the media_stats lines the
receivers print every second, CPU from /proc, frames captured from the
counters stamped in the pictures `--record` keeps. Baseline, same run: the
codec alone in this process. The legend under the table says how each
figure is computed; the targets are the issue's.

    .venv/bin/python bench/media.py                   # about 3 minutes
    .venv/bin/python bench/media.py --seconds 5 --calls 1 --loss 2 --codecs vp8 --json
    .venv/bin/python bench/media.py --phases chat --codecs vp8 --pin   # chat during calls

Loopback only; every process it starts, it stops. Exit 1 only if the setup
broke: a number that misses its target is reported, never failed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import heapq
import itertools
import json
import math
import os
import random
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import chatroom  # noqa: E402  (the real codecs and test pattern, for the baseline)

LOOPBACK = "127.0.0.1"
FPS, AUDIO_FPS = chatroom.VIDEO_FPS, 50         # what the test pattern and the tone send
TARGET_FPS, TARGET_P50_MS, TARGET_KBPS, TARGET_SHOWN = 0.95 * FPS, 50, 1500, 95
CHAT_EVERY_S = 0.15         # the chat rows type a line this often, under the rate limit
DEADLINE_S = 45.0           # start-up, a call or a warm-up taking longer: the setup broke


class SetupError(Exception):
    """The benchmark itself could not run (never a slow number): exit 1."""


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds every core has been busy since boot (/proc/stat; idle and iowait aren't)."""
    with open("/proc/stat") as stat:
        ticks = [int(x) for x in stat.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def is_stats(event: dict, peer: str) -> bool:
    return event.get("type") == "media_stats" and event.get("peer") == peer


class Proc:
    """A chatroom.py process; threads keep its stdout events, with their arrival
    times, and the tail of its stderr, to say why it died."""

    def __init__(self, name: str, args: list[str], cpus: set[int] | None = None) -> None:
        self.name, self.events, self.eof = name, [], False
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "chatroom.py"), *args], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus))
        self.stderr: collections.deque[str] = collections.deque(maxlen=15)
        self.cond = threading.Condition()
        threading.Thread(target=self._read_out, daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()

    def _read_out(self) -> None:
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError, TypeError), self.cond:   # JSON objects only
                self.events.append((time.monotonic(), dict(json.loads(line))))
                self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def failure(self, why: str) -> str:
        tail = "".join(f"  {line}" for line in self.stderr) or "  (empty)"
        return f"{self.name}: {why}; exit status {self.proc.poll()}; stderr tail:\n{tail}"

    def wait_for(self, match, since: int = 0, timeout: float = DEADLINE_S) -> int:
        """Index of the first event at or after `since` that `match` accepts."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for index in range(since, len(self.events)):
                    if match(self.events[index][1]):
                        return index
                since, left = len(self.events), deadline - time.monotonic()
                if self.eof or left <= 0:
                    raise SetupError(self.failure("its output ended" if self.eof
                                                  else f"no awaited event in {timeout:g} s"))
                self.cond.wait(min(left, 1.0))

    def send(self, line: str) -> None:
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise SetupError(self.failure(f"can't type {line!r}: {exc}")) from None

    def stats(self, peer: str, start: float, end: float) -> list[dict]:
        with self.cond:
            return [e for t, e in self.events if start < t <= end and is_stats(e, peer)]

    def stop(self) -> None:
        self.proc.terminate()           # by PID, through Popen; a no-op once it has ended
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        with contextlib.suppress(OSError):      # the pipe broke when it ended
            self.proc.stdin.close()


class Proxy:
    """Forwards a direct call's UDP between its sides (one thread, both directions),
    as a link that loses and, when capped, is slow. Each way: `loss` (0..1) of the
    packets dropped at random (a fixed seed), and `cut` drops everything (a burst);
    with cap_kbps[way] set, packets leave through a token bucket of that rate
    (bursts up to BURST_BYTES) from a queue of at most QUEUE_S of it (at least
    QUEUE_MIN_BYTES); what finds the queue full is dropped, as a router would.
    `delay_s[(way, kind)]` holds the packets of one kind (chatroom.KIND_VIDEO,
    KIND_AUDIO: the kind is in a sealed packet's clear header) that long before
    they go on, to put one way's video and sound out of step.
    Way 0 is a -> b, way 1 is b -> a."""

    BURST_BYTES = 6000
    QUEUE_S = 0.25
    QUEUE_MIN_BYTES = 16_000

    def __init__(self, to_a: int = 0, to_b: int = 0, seed: int = 1, loss: float = 0.0) -> None:
        self.loss, self.cut, self.random = loss, False, random.Random(seed)
        self.cap_kbps: list[float | None] = [None, None]
        self.counts = [0, 0]            # forwarded, dropped (lost, cut or overflowing)
        self.overflow = [0, 0]          # of the dropped: the queue was full, per way
        self.socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in "ab"]
        for sock in self.socks:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # no unplanned loss
            sock.bind((LOOPBACK, 0))
        self.port_a, self.port_b = (s.getsockname()[1] for s in self.socks)
        self.targets = [(LOOPBACK, to_b), (LOOPBACK, to_a)]
        self.queues: list[collections.deque[bytes]] = [collections.deque(), collections.deque()]
        self.queued = [0, 0]            # bytes waiting, per way
        self.tokens = [float(self.BURST_BYTES)] * 2
        self.delay_s: dict[tuple[int, int], float] = {}
        self.held: list[tuple[float, int, int, bytes]] = []     # a heap: (due, n, way, data)
        self.serial = itertools.count()
        self.filled = time.monotonic()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def port(self, side: str) -> int:
        """Where side `a` or `b` sends."""
        return self.port_a if side == "a" else self.port_b

    def route(self, to_a: int, to_b: int) -> None:
        """Forward to these ports (when they weren't known at the start)."""
        with self.lock:
            self.targets = [(LOOPBACK, to_b), (LOOPBACK, to_a)]

    def set_cap(self, kbps: float | None, way: int | None = None) -> None:
        with self.lock:
            for w in (0, 1) if way is None else (way,):
                self.cap_kbps[w] = kbps

    def _run(self) -> None:
        while not self.stopping.is_set():
            with self.lock:
                now = time.monotonic()
                while self.held and self.held[0][0] <= now:
                    _, _, way, data = heapq.heappop(self.held)
                    self._arrive(way, data, held=True)
                self._drain()
                wait = 0.2 if not any(self.queues) else 0.002
                if self.held:
                    wait = max(0.0, min(wait, self.held[0][0] - now))
            for sock in select.select(self.socks, [], [], wait)[0]:
                try:
                    data = sock.recv(65536)
                except OSError:                     # ICMP from a port that just closed
                    continue
                with self.lock:
                    self._arrive(self.socks.index(sock), data)

    def _arrive(self, way: int, data: bytes, held: bool = False) -> None:
        delay = self.delay_s.get((way, data[1])) if len(data) > 1 and not held else None
        if delay:
            heapq.heappush(self.held, (time.monotonic() + delay, next(self.serial), way, data))
            return
        cap = self.cap_kbps[way]
        if self.cut or self.random.random() < self.loss:
            self.counts[1] += 1
            return
        limit = max(self.QUEUE_MIN_BYTES, cap * 125 * self.QUEUE_S) if cap else 0
        if cap and self.queued[way] + len(data) > limit:
            self.counts[1] += 1
            self.overflow[way] += 1
            return
        self.queues[way].append(data)
        self.queued[way] += len(data)
        self._drain()

    def _drain(self) -> None:
        now = time.monotonic()
        for way in (0, 1):
            cap = self.cap_kbps[way]
            if cap:
                self.tokens[way] = min(self.BURST_BYTES,
                                       self.tokens[way] + (now - self.filled) * cap * 125)
            queue = self.queues[way]
            while queue and (not cap or self.tokens[way] >= len(queue[0])):
                data = queue.popleft()
                self.queued[way] -= len(data)
                if cap:
                    self.tokens[way] -= len(data)
                self.counts[0] += 1
                with contextlib.suppress(OSError):
                    self.socks[way].sendto(data, self.targets[way])
        self.filled = now

    def take_dropped_pct(self) -> float:
        """Percent of packets dropped since the last call."""
        with self.lock:
            (forwarded, dropped), self.counts = self.counts, [0, 0]
        return 100 * dropped / max(1, forwarded + dropped)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(2)
        for sock in self.socks:
            sock.close()


def baseline(codec: str, frames: int = 90) -> dict:
    """The codec alone in this process, before any client runs: draw, encode and
    decode 640x480 test-pattern frames; ms per frame for each step, and kb/s."""
    pattern = chatroom.TestPattern("baseline")
    encoder, decoder = chatroom.make_video_encoder(codec), chatroom.make_video_decoder(codec)
    marks = [time.perf_counter()]
    images = [pattern.frame(n) for n in range(frames)]
    marks.append(time.perf_counter())
    packets = [out[0] for out in map(encoder.encode, images) if out is not None]
    marks.append(time.perf_counter())
    if any(decoder.decode(packet) is None for packet in packets):
        raise SetupError(f"{codec}: the baseline's decoder refused a frame")
    marks.append(time.perf_counter())
    draw, enc, dec = (1000 * (b - a) / frames for a, b in itertools.pairwise(marks))
    # Each client of a call draws and encodes its own stream and decodes the other's.
    return {"type": "baseline", "codec": codec, "draw_ms": round(draw, 2),
            "encode_ms": round(enc, 2), "decode_ms": round(dec, 2),
            "cpu_pct_per_call": round(2 * (draw + enc + dec) * FPS / 10, 1),
            "kbps": round(sum(map(len, packets)) / frames * FPS * 8 / 1000)}


def capture_fps(folder: Path, peer: str, start: float, end: float) -> float | None:
    """The sender's real capture rate: (last counter - first) / (last write - first)
    over the pictures `--record` wrote in the window (about one a second)."""
    seen = []
    for png in folder.glob(f"{peer}-*.png"):
        written = png.stat().st_mtime
        image = cv2.imread(str(png)) if start <= written <= end else None
        if image is not None and (n := chatroom.read_stamp(image)) is not None:
            seen.append((written, n))
    seen.sort()
    if len(seen) < 2 or seen[-1][0] - seen[0][0] < 2:
        return None                     # too few to tell: the row assumes 30 fps
    return (seen[-1][1] - seen[0][1]) / (seen[-1][0] - seen[0][0])


class Run:
    """The host, the clients of the current phase and a temp folder; close() ends all."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="chatroom-media-"))
        self.clients: list[Proc] = []
        self.host: Proc | None = None
        try:
            self.host = Proc("host", ["--host", "--json", "--port", "0", "--interface",
                                      LOOPBACK, "--no-advertise", "--call-timeout", "20"])
            self.port = self.host.events[self.host.wait_for(
                lambda e: e.get("type") == "listening", timeout=15)][1]["port"]
        except BaseException:
            self.close()
            raise

    def join(self, codec: str, users: list[tuple[str, str]],
             flags: tuple[str, ...] = (), cpus: set[int] | None = None) -> list[Proc]:
        """Start (user, room) clients at once (on `cpus` only, if given), then
        wait until each is in its room."""
        started = [Proc(user, ["--cli", "--json", "--server", f"{LOOPBACK}:{self.port}",
                               "--room", room, "--user", user, "--camera", "test", "--audio",
                               "tone", "--video-codec", codec, "--call-timeout", "20",
                               "--record", str(self.tmp / user), *flags], cpus)
                   for user, room in users]
        self.clients += started
        for client in started:
            client.wait_for(lambda e: e.get("type") == "ready")
        return started

    def stop_clients(self) -> None:
        for client in self.clients:
            client.stop()
        self.clients = []

    def close(self) -> None:
        self.stop_clients()
        if self.host is not None:
            self.host.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def connect(a: Proc, b: Proc, codec: str, lines: tuple[str, str] | None = None) -> None:
    """A /CHECK call (a calls, b calls back), or a direct one: each types its line."""
    marks = len(a.events), len(b.events)
    if lines is None:
        a.send(f"/CHECK {b.name}")
        b.wait_for(lambda e: e.get("type") == "call_invite" and e.get("from") == a.name, marks[1])
        b.send(f"/CHECK {a.name}")
    else:
        a.send(lines[0])
        b.send(lines[1])
    for me, other, mark in ((a, b, marks[0]), (b, a, marks[1])):
        event = me.events[me.wait_for(lambda e, p=other.name: e.get("type") == "call_connected"
                                      and e.get("peer") == p, mark)][1]
        if event.get("codec") != codec:
            raise SetupError(me.failure(f"the call with {other.name} uses {event.get('codec')}"))


def warm_up(links: list[tuple[Proc, Proc]]) -> None:
    """Wait until every (receiver, sender) stream shows video, then one more stats
    line each: the window starts after a whole second of steady flow."""
    for recv, send in links:
        index = recv.wait_for(lambda e, p=send.name: is_stats(e, p) and e["video_fps"] > 0,
                              len(recv.events))
        recv.wait_for(lambda e, p=send.name: is_stats(e, p), index + 1)


def measure(run: Run, links: list, seconds: float, base: dict, row: dict,
            proxy: Proxy | None = None) -> dict:
    """One window over the (receiver, sender) streams in `links`; fills in `row`."""
    clients = list({id(p): p for link in links for p in link}.values())
    pids = [c.proc.pid for c in clients] + [run.host.proc.pid]
    try:
        before = [cpu_s(pid) for pid in pids] + [sum(os.times()[:2]), machine_busy_s()]
        t0, wall0 = time.monotonic(), time.time()
        if proxy is not None:
            proxy.take_dropped_pct()    # its counts start with the window
        time.sleep(seconds)             # the window: the clients run on their own
        t1, wall1 = time.monotonic(), time.time()
        dropped = proxy.take_dropped_pct() if proxy is not None else None
        spent = [after - was for after, was in zip(
            [cpu_s(pid) for pid in pids] + [sum(os.times()[:2]), machine_busy_s()], before)]
    except OSError:                     # a /proc/PID is gone: who died is said below
        spent = []
    dead = [c for c in clients + [run.host] if c.proc.poll() is not None]
    if dead or not spent:
        raise SetupError(dead[0].failure("died") if dead else "can't read /proc")
    fps, sent, lines = [], [], []
    for recv, send in links:
        got = recv.stats(send.name, t0, t1)
        if not got:
            raise SetupError(recv.failure(f"no media_stats about {send.name} in the window"))
        lines += got
        fps.append(statistics.mean(e["video_fps"] for e in got))
        sent.append(capture_fps(run.tmp / recv.name, send.name, wall0, wall1))
    mean, span, cores = statistics.mean, t1 - t0, os.cpu_count() or 1
    latencies = sorted(e["latency_ms"] for e in lines if e["latency_ms"] is not None)
    p50 = round(statistics.median(latencies), 1) if latencies else None
    kbps, cpu_call = mean(e["kbps"] for e in lines), 100 * sum(spent[:-3]) / span / row["calls"]
    row.update({
        "type": "row", "window_s": round(span, 1), "streams": len(links),
        "media_path": "/".join(sorted({e["path"] for e in lines})),
        "recv_fps": round(mean(fps), 1),
        "sent_fps": round(mean(s for s in sent if s), 1) if any(sent) else None,
        "shown_pct": round(mean(100 * f / (s or FPS) for f, s in zip(fps, sent)), 1),
        "loss_seen_pct": round(100 * mean(e["loss"] for e in lines), 2),
        "proxy_dropped_pct": dropped and round(dropped, 2),
        "latency_p50_ms": p50,
        "latency_p99_ms": latencies[math.ceil(0.99 * len(latencies)) - 1] if latencies else None,
        "cpu_pct_per_call": round(cpu_call, 1), "codec_cpu_pct_per_call": base["cpu_pct_per_call"],
        "cpu_vs_codec": round(cpu_call / base["cpu_pct_per_call"], 2),
        "kbps_per_stream": round(kbps), "kbps_vs_target": round(kbps / TARGET_KBPS, 2),
        "codec_kbps": base["kbps"], "audio_frames_per_s": round(mean(
            e["audio_frames"] for e in lines), 1),
        # Concealments: counted by a chatroom.py whose media_stats has `concealed`, else
        # estimated from the frames that didn't arrive.
        "concealed_per_s": round(mean(e["concealed"] for e in lines), 1)
        if all("concealed" in e for e in lines) else None,
        "concealed_per_s_est": round(mean(max(0, AUDIO_FPS - e["audio_frames"])
                                          for e in lines), 1),
        "host_cpu_pct": round(100 * spent[-3] / span, 1),
        "bench_cpu_pct": round(100 * spent[-2] / span, 1),
        # The whole machine's busy time, and the part no process of this benchmark used.
        "machine_busy_pct": round(100 * spent[-1] / span / cores),
        "others_busy_pct": round(100 * (2 * spent[-1] - sum(spent)) / span / cores)})
    verdict = {"fps": row["recv_fps"] >= TARGET_FPS if row["loss_pct"] == 0 else None,
               "p50": p50 is not None and p50 < TARGET_P50_MS, "kbps": kbps <= TARGET_KBPS,
               "shown": row["shown_pct"] >= TARGET_SHOWN if row["loss_pct"] == 2 else None}
    row["verdict"] = {k: None if v is None else "PASS" if v else "MISS"
                      for k, v in verdict.items()}
    return row


def check_rows(run: Run, codec: str, counts: list[int], seconds: float, base: dict) -> list:
    """1, then 3 simultaneous calls: new pairs join the ones already talking."""
    pairs: list[tuple[Proc, Proc]] = []
    rows = []
    for calls in sorted(counts):
        print(f"  {codec}: {calls} call(s) through the host", file=sys.stderr, flush=True)
        new = run.join(codec, [(f"{codec}-{side}{i}", f"{codec}-{i}")
                               for i in range(len(pairs), calls) for side in "ab"])
        for a, b in zip(new[::2], new[1::2]):
            connect(a, b, codec)
            pairs.append((a, b))
        links = [(b, a) for a, b in pairs] + [(a, b) for a, b in pairs]
        warm_up(links)
        rows.append(measure(run, links, seconds, base, {
            "codec": codec, "calls": calls, "loss_pct": 0, "via": "host"}))
    run.stop_clients()
    return rows


def loss_rows(run: Run, codec: str, losses: list[float], seconds: float, base: dict) -> list:
    """One direct call through the lossy proxy; its loss changes between windows."""
    print(f"  {codec}: a direct call through the proxy", file=sys.stderr, flush=True)
    a, b = run.join(codec, [(f"{codec}-x", f"{codec}-direct"), (f"{codec}-y", f"{codec}-direct")])
    pa, pb = free_udp_port(), free_udp_port()
    proxy, rows = Proxy(to_a=pa, to_b=pb), []
    try:
        connect(a, b, codec, (f"/call {LOOPBACK} {pa} {proxy.port_a}",
                              f"/call {LOOPBACK} {pb} {proxy.port_b}"))
        for loss in losses:
            proxy.loss = loss / 100
            warm_up([(b, a), (a, b)])       # the first line after a change straddles it
            rows.append(measure(run, [(b, a), (a, b)], seconds, base, proxy=proxy, row={
                "codec": codec, "calls": 1, "loss_pct": loss, "via": "proxy"}))
    finally:
        proxy.stop()
        run.stop_clients()
    return rows


# --- issue 12: repair, bursts and a bandwidth cap ------------------------------------------

REPAIR_MODES = ("none", "parity", "nack", "both")   # --video-repair; parity: before issue 12
FULL_KBPS = chatroom.VIDEO_BITRATE // 1000


def direct_pair(run: Run, codec: str, name: str, flags: tuple[str, ...]
                ) -> tuple[Proc, Proc, Proc | None, Proxy]:
    """Two clients in a direct call through a new Proxy: (a, b, None, proxy)."""
    a, b = run.join(codec, [(f"{name}-a", name), (f"{name}-b", name)], flags)
    pa, pb = free_udp_port(), free_udp_port()
    proxy = Proxy(to_a=pa, to_b=pb)
    try:
        connect(a, b, codec, (f"/call {LOOPBACK} {pa} {proxy.port_a}",
                              f"/call {LOOPBACK} {pb} {proxy.port_b}"))
    except BaseException:
        proxy.stop()
        raise
    return a, b, None, proxy


def per_s(lines: list[dict], key: str) -> float | None:
    """The mean per stats line (about one a second) of a counter, if the lines have it."""
    return round(statistics.mean(e[key] for e in lines), 2) if all(
        key in e for e in lines) and lines else None


def repair_rows(run: Run, codec: str, modes: list[str], losses: list[float],
                seconds: float, base: dict) -> list[dict]:
    """Per repair mode: a direct call through the proxy, its loss changing between
    windows. Both clients have --video-repair MODE and --no-video-adapt (the rate
    stays put, so only the repair differs)."""
    rows = []
    for mode in modes:
        print(f"  {codec}: repair {mode}", file=sys.stderr, flush=True)
        a, b, _, proxy = direct_pair(run, codec, f"{codec}-{mode}",
                                     ("--video-repair", mode, "--no-video-adapt"))
        try:
            for loss in losses:
                proxy.loss = loss / 100
                warm_up([(b, a), (a, b)])
                t0 = time.monotonic()
                row = measure(run, [(b, a), (a, b)], seconds, base, proxy=proxy, row={
                    "codec": codec, "calls": 1, "loss_pct": loss, "via": "proxy",
                    "repair": mode})
                t1 = time.monotonic()
                got = b.stats(a.name, t0, t1) + a.stats(b.name, t0, t1)
                row.update({f"{key}_per_s": per_s(got, key) for key in (
                    "repaired", "video_lost", "nacks", "resent", "keyframes")})
                rows.append(row)
        finally:
            proxy.stop()
            run.stop_clients()
    return rows


def burst_rows(run: Run, codec: str, modes: list[str], bursts_ms: list[float],
               repeats: int) -> list[dict]:
    """Per repair mode and burst length: cut a direct call both ways for that long,
    `repeats` times 3 s apart (no other loss), and read how long the receivers'
    pictures stood still around each cut (media_stats' freeze_ms, the longest gap
    between frames shown): recovery = that, less the cut itself."""
    rows = []
    for mode in modes:
        print(f"  {codec}: bursts, repair {mode}", file=sys.stderr, flush=True)
        a, b, _, proxy = direct_pair(run, codec, f"{codec}-burst-{mode}",
                                     ("--video-repair", mode, "--no-video-adapt"))
        try:
            warm_up([(b, a), (a, b)])
            for length in bursts_ms:
                freezes, marks = [], []
                for _ in range(repeats):
                    start = time.monotonic()
                    proxy.cut = True
                    time.sleep(length / 1000)       # the cut; the clients run on their own
                    proxy.cut = False
                    time.sleep(3.0)
                    marks.append((start, time.monotonic()))
                for recv, send in ((b, a), (a, b)):
                    for t0, t1 in marks:
                        got = recv.stats(send.name, t0, t1 + 1.5)
                        frozen = [e["freeze_ms"] for e in got if e.get("freeze_ms") is not None]
                        if frozen:
                            freezes.append(max(frozen))
                got = [e for recv, send in ((b, a), (a, b))
                       for e in recv.stats(send.name, marks[0][0], marks[-1][1] + 1.5)]
                rows.append({
                    "type": "burst", "codec": codec, "repair": mode, "burst_ms": length,
                    "bursts": len(marks) * 2,
                    "freeze_p50_ms": round(statistics.median(freezes)) if freezes else None,
                    "freeze_max_ms": max(freezes) if freezes else None,
                    "recovery_p50_ms": round(statistics.median(freezes) - length)
                    if freezes else None,
                    "keyframes_per_burst": round(sum(e.get("keyframes", 0) for e in got)
                                                 / (2 * len(marks)), 2),
                    "lost_frames_per_burst": round(sum(e.get("video_lost", 0) for e in got)
                                                   / (2 * len(marks)), 1)})
        finally:
            proxy.stop()
            run.stop_clients()
    return rows


def cap_rows(run: Run, codec: str, caps: list[float], seconds: float) -> list[dict]:
    """A direct call through the proxy whose a -> b way gets a bandwidth cap for
    `seconds` and then none, the sender adapting (the default) and, as the baseline
    in the same run, not (--no-video-adapt). What b sees under the cap (the last
    two thirds of it: settled), how long a took to get under the cap, and how long
    to climb back to the full rate once it lifted (at most 90 s)."""
    rows = []
    for adapt in (True, False):
        for cap in caps:
            label = f"{codec}-cap{cap:g}-{'adapt' if adapt else 'fixed'}"
            print(f"  {codec}: {cap:g} kb/s cap, {'adapting' if adapt else 'fixed rate'}",
                  file=sys.stderr, flush=True)
            a, b, _, proxy = direct_pair(run, codec, label,
                                         () if adapt else ("--no-video-adapt",))
            try:
                warm_up([(b, a)])
                start = time.monotonic()
                proxy.set_cap(cap, way=0)
                time.sleep(seconds)
                lifted = time.monotonic()
                proxy.set_cap(None)
                back = None
                if adapt:
                    index = a.wait_for(lambda e, p=b.name: is_stats(e, p) and e.get(
                        "send_kbps") == FULL_KBPS, len(a.events), timeout=90)
                    back = round(a.events[index][0] - lifted, 1)
                settled = start + seconds / 3
                seen = b.stats(a.name, settled, lifted)
                sent = a.stats(b.name, start, lifted)
                under = next((t for t, e in a.events if start < t <= lifted and is_stats(
                    e, b.name) and (e.get("send_kbps") or FULL_KBPS) <= cap), None)
                latencies = sorted(e["latency_ms"] for e in seen if e["latency_ms"] is not None)
                freezes = [e["freeze_ms"] for e in seen if e.get("freeze_ms") is not None]
                rows.append({
                    "type": "cap", "codec": codec, "cap_kbps": cap, "adapt": adapt,
                    "shown_fps": round(statistics.mean(e["video_fps"] for e in seen), 1),
                    "received_kbps": round(statistics.mean(e["kbps"] for e in seen)),
                    "loss_pct": round(100 * statistics.mean(e["loss"] for e in seen), 1),
                    "latency_p50_ms": latencies[len(latencies) // 2] if latencies else None,
                    "latency_p95_ms": latencies[int(0.95 * (len(latencies) - 1))]
                    if latencies else None,
                    "freeze_max_ms": max(freezes) if freezes else None,
                    "send_kbps_settled": round(statistics.mean(
                        e["send_kbps"] for e in a.stats(b.name, settled, lifted)
                        if e.get("send_kbps") is not None)),
                    "send_kbps_min": min((e["send_kbps"] for e in sent
                                          if e.get("send_kbps") is not None), default=None),
                    "under_cap_s": None if under is None else round(under - start, 1),
                    "back_to_full_s": back})
            finally:
                proxy.stop()
                run.stop_clients()
    return rows


def sync_rows(run: Run, codec: str, holds_ms: list[float], seconds: float) -> list[dict]:
    """Lip sync: a direct call through the proxy, which holds a's video (or a's
    sound: a negative hold) back |hold| ms on its way to b; b plays in sync (the
    default) and, as the baseline in the same run, not (--no-lip-sync). Per
    row, over the window once video flows: b's av_skew_ms (median of the
    per-second medians; positive: the sound came first), the share of seconds
    within ITU-R BT.1359's +45/-125 ms, and b's capture-to-shown delay (lip
    sync's wait for the sound included: delay_ms) and capture-to-decode
    latency (without it: latency_ms)."""
    rows = []
    for synced in (True, False):
        for hold in holds_ms:
            label = f"{codec}-sync{hold:g}-{'on' if synced else 'off'}"
            print(f"  {codec}: {'video' if hold >= 0 else 'sound'} held {abs(hold):g} ms, "
                  f"lip sync {'on' if synced else 'off'}", file=sys.stderr, flush=True)
            a, b, _, proxy = direct_pair(run, codec, label.replace(".", "_"),
                                         () if synced else ("--no-lip-sync",))
            try:
                kind = chatroom.KIND_VIDEO if hold >= 0 else chatroom.KIND_AUDIO
                if hold:
                    proxy.delay_s[(0, kind)] = abs(hold) / 1000
                warm_up([(b, a)])
                b.wait_for(lambda e, p=a.name: is_stats(e, p) and e.get("av_skew_ms")
                           is not None, len(b.events))
                t0 = time.monotonic()
                time.sleep(seconds)             # the window: the clients run on their own
                seen = [e for e in b.stats(a.name, t0, time.monotonic())
                        if e.get("av_skew_ms") is not None]
                if not seen:
                    raise SetupError(b.failure("no av_skew_ms in the window"))
                skews = sorted(e["av_skew_ms"] for e in seen)
                latencies = sorted(e["latency_ms"] for e in seen if e["latency_ms"] is not None)
                delays = sorted(e["delay_ms"] for e in seen if e.get("delay_ms") is not None)
                rows.append({
                    "type": "sync", "codec": codec, "hold_ms": hold, "lip_sync": synced,
                    "skew_p50_ms": skews[len(skews) // 2], "skew_min_ms": skews[0],
                    "skew_max_ms": skews[-1],
                    "in_range_pct": round(100 * sum(-125 <= x <= 45 for x in skews)
                                          / len(skews)),
                    "latency_p50_ms": latencies[len(latencies) // 2] if latencies else None,
                    "delay_p50_ms": delays[len(delays) // 2] if delays else None,
                    "shown_fps": round(statistics.mean(e["video_fps"] for e in seen), 1)})
            finally:
                proxy.stop()
                run.stop_clients()
    return rows


def report_sync(syncs: list[dict]) -> None:
    if not syncs:
        return
    base = {(r["codec"], r["hold_ms"]): r for r in syncs if not r["lip_sync"]}
    print(f"\nlip sync (one direct call; the proxy holds a's video, or its sound: a "
          f"negative hold):\n{'codec':<5}{'held':>7} {'sync':<5}|{'skew p50':>9}{'min':>6}"
          f"{'max':>6} ms |{'in range':>9} |{'delay p50':>10}{'x off':>6} |"
          f"{'decode p50':>11} |{'fps':>6}")
    for r in syncs:
        b = base.get((r["codec"], r["hold_ms"]))
        ratio = (f"{r['delay_p50_ms'] / b['delay_p50_ms']:.2f}"
                 if b and r.get("delay_p50_ms") and b.get("delay_p50_ms") else "-")
        print(f"{r['codec']:<5}{r['hold_ms']:>5g}ms {'on' if r['lip_sync'] else 'off':<5}|"
              f"{r['skew_p50_ms']:>9.0f}{r['skew_min_ms']:>6.0f}{r['skew_max_ms']:>6.0f}    |"
              f"{r['in_range_pct']:>8}% |{show(r.get('delay_p50_ms'), digits=0, unit=' ms'):>10}"
              f"{ratio:>6} |{show(r['latency_p50_ms'], digits=0, unit=' ms'):>11} |"
              f"{r['shown_fps']:>6.1f}")
    print("""
lip sync: b's av_skew_ms (shown - played, per-second medians: positive = the sound first),
  in range = share of seconds within ITU-R BT.1359's -125..+45 ms; delay p50: capture to
  shown of b's frames (a frame waits for its sound: media_stats' delay_ms); x off = over
  the same hold with lip sync off (--no-lip-sync, the baseline); decode p50: capture to
  decode, that wait left out (latency_ms).""")


def chat_rows(run: Run, codec: str, counts: list[int], lines: int, file_mib: int,
              pinned: bool = False) -> list:
    """Do chat and files keep their speed during calls? Two members of a room
    of their own, with no camera or sound, pass `lines` chat lines one at a
    time (each timed from typing to the other's `message`) and one file of
    `file_mib` MiB (typing /send to the other's `file_received`), first with
    no call anywhere (the baseline, same run), then with 1 and 3 calls at
    once through the same host. `pinned`: the two members on the first
    core, the calls on the others, so that what calls cost the CPU is not
    what is measured (on a LAN each person's computer is their own)."""
    cores = sorted(os.sched_getaffinity(0))
    chat_cpus, call_cpus = ({cores[0]}, set(cores[1:])) if pinned and len(cores) > 1 \
        else (None, None)
    print(f"  {codec}: chat and a file, with and without calls"
          f"{' (pinned)' if chat_cpus else ''}", file=sys.stderr, flush=True)
    a, b = run.join(codec, [(f"chat-a{'-p' * pinned}", "chat"),
                            (f"chat-b{'-p' * pinned}", "chat")],
                    ("--camera", "none", "--audio", "null",
                     "--downloads", str(run.tmp / "chat-downloads")), chat_cpus)
    path = run.tmp / "payload.bin"
    with open(path, "wb") as out:
        for _ in range(file_mib):
            out.write(os.urandom(1 << 20))
    pairs: list[tuple[Proc, Proc]] = []
    rows = []
    for calls in [0, *sorted(counts)]:
        new = run.join(codec, [(f"{codec}-c{side}{i}", f"{codec}-call{i}")
                               for i in range(len(pairs), calls) for side in "ab"],
                       cpus=call_cpus)
        for x, y in zip(new[::2], new[1::2]):
            connect(x, y, codec)
            pairs.append((x, y))
        warm_up([(y, x) for x, y in pairs] + [(x, y) for x, y in pairs])
        waits, busy0, w0 = [], machine_busy_s(), time.monotonic()
        for n in range(lines):
            text, mark, t0 = f"line {calls}.{n}", len(b.events), time.monotonic()
            a.send(text)
            got = b.wait_for(lambda e, t=text: e.get("type") == "message" and e.get("text") == t,
                             mark)
            waits.append(1000 * (b.events[got][0] - t0))
            # Type under the host's rate limit (10 lines a second; our client
            # keeps to 9), or the timing is our own pacing, not the network.
            time.sleep(max(0.0, t0 + CHAT_EVERY_S - time.monotonic()))
        mark, t0 = len(b.events), time.monotonic()
        a.send(f"/send {path}")
        got = b.wait_for(lambda e: e.get("type") == "file_received", mark, timeout=300)
        spent = b.events[got][0] - t0
        busy = 100 * (machine_busy_s() - busy0) / (time.monotonic() - w0) / (os.cpu_count() or 1)
        with contextlib.suppress(OSError):          # room for the next one
            os.unlink(b.events[got][1]["path"])
        waits.sort()
        rows.append({"type": "chat", "codec": codec, "calls": calls,
                     "pinned": chat_cpus is not None,
                     "chat_p50_ms": round(statistics.median(waits), 1),
                     "chat_p99_ms": round(waits[math.ceil(0.99 * len(waits)) - 1], 1),
                     "file_mb_s": round(file_mib * 1.048576 / spent, 1),
                     "machine_busy_pct": round(busy)})
    run.stop_clients()
    return rows


def report_chat(chats: list[dict]) -> None:
    if not chats:
        return
    print(f"\nchat and a file during calls (baseline: no call, same run):\n"
          f"{'codec':<5}{'calls':>6} |{'chat p50':>9}{'p99':>7} ms{'x none':>7} |"
          f"{'file MB/s':>10}{'x none':>7} |{'CPU busy':>9}")
    base = {(r["codec"], r["pinned"]): r for r in chats if r["calls"] == 0}
    for r in chats:
        b = base[r["codec"], r["pinned"]]
        codec = r["codec"] + "*" * r["pinned"]
        print(f"{codec:<5}{r['calls']:>6} |{r['chat_p50_ms']:>9.1f}{r['chat_p99_ms']:>7.1f}"
              f"   {r['chat_p50_ms'] / b['chat_p50_ms']:>7.2f} |{r['file_mb_s']:>10.1f}"
              f"{r['file_mb_s'] / b['file_mb_s']:>7.2f} |{r['machine_busy_pct']:>8}%")
    print("""
chat: typing a line to the other member's `message`, a line every 0.15 s; file: /send to
  the other's `file_received` (written, SHA-256 checked); calls run in other rooms of the
  same host, through it (host-arranged, direct UDP); CPU busy: the whole machine's, all
  cores, over the row (what else runs on it counts too). *: pinned, the two members on
  one core, the calls on the others (--pin), as on a LAN where each computer is its own.""")


def report_issue12(repairs: list[dict], bursts: list[dict], caps: list[dict]) -> None:
    if repairs:
        base = {(r["codec"], r["loss_pct"]): r for r in repairs if r["repair"] == "none"}
        print(f"\nrepair (one direct call through the proxy, --no-video-adapt):\n"
              f"{'codec':<5}{'loss':>5} {'repair':<7}|{'shown':>8}{'fps':>6} |{'kb/s':>6}"
              f"{'x none':>7} |{'repaired':>9}{'lost':>6}{'nacks':>6}{'resent':>7}"
              f"{'keys':>6} /s |{'p50 ms':>7}")
        for r in repairs:
            b = base.get((r["codec"], r["loss_pct"]))
            ratio = f"{r['kbps_per_stream'] / b['kbps_per_stream']:.2f}" if b else "-"
            counts = "".join(f"{show(r[k + '_per_s'], digits=2):>{w}}" for k, w in (
                ("repaired", 9), ("video_lost", 6), ("nacks", 6), ("resent", 7),
                ("keyframes", 6)))
            print(f"{r['codec']:<5}{r['loss_pct']:>4g}% {r['repair']:<7}|"
                  f"{r['shown_pct']:>7.1f}%{r['recv_fps']:>6.1f} |{r['kbps_per_stream']:>6}"
                  f"{ratio:>7} |{counts}    |{show(r['latency_p50_ms']):>7}")
    if bursts:
        print(f"\nbursts (the link cut both ways, then 3 s of nothing lost):\n"
              f"{'codec':<5}{'burst':>7} {'repair':<7}| {'picture still, p50':>18}"
              f"{'max':>7} | {'recovery p50':>12} | {'keys':>5}{'lost':>6} per burst")
        for r in bursts:
            print(f"{r['codec']:<5}{r['burst_ms']:>5g}ms {r['repair']:<7}|"
                  f" {show(r['freeze_p50_ms'], digits=0, unit=' ms'):>18}"
                  f"{show(r['freeze_max_ms'], digits=0):>7} |"
                  f" {show(r['recovery_p50_ms'], digits=0, unit=' ms'):>12} |"
                  f"{r['keyframes_per_burst']:>5}{r['lost_frames_per_burst']:>6}")
    if caps:
        print(f"\nbandwidth cap on one way (token bucket, queue of "
              f"{Proxy.QUEUE_S * 1000:g} ms, drops when full); b's side, settled:\n"
              f"{'codec':<5}{'cap':>6} {'sender':<8}|{'fps':>6}{'kb/s':>6}{'loss':>6}"
              f"{'p50':>6}{'p95 ms':>8}{'still':>7} | {'sends':>6}{'min':>5} |"
              f" {'under cap':>9} {'back to full':>12}")
        for r in caps:
            sender = "adapts" if r["adapt"] else "fixed"
            p50, p95 = show(r["latency_p50_ms"], digits=0), show(r["latency_p95_ms"], digits=0)
            under, back = show(r["under_cap_s"], unit=" s"), show(r["back_to_full_s"], unit=" s")
            print(f"{r['codec']:<5}{r['cap_kbps']:>6g} {sender:<8}|"
                  f"{r['shown_fps']:>6.1f}{r['received_kbps']:>6}{r['loss_pct']:>5.1f}%"
                  f"{p50:>6}{p95:>8}{show(r['freeze_max_ms'], digits=0):>7} |"
                  f"{r['send_kbps_settled']:>6}{show(r['send_kbps_min'], digits=0):>5} |"
                  f" {under:>9} {back:>12}")
    if repairs or bursts or caps:
        print("""
repair: shown = frames shown / frames captured; kb/s received per stream; x none: over no
  repair at the same loss. Per second (both streams): frames repaired (parity or sent
  again), frames given up (lost), Nacks sent, fragments sent again (resent), keyframes
  asked for. p50: capture to decode.
bursts: 'picture still' is media_stats' freeze_ms around each cut (the longest time
  between two frames shown); recovery = that less the cut. keys, lost: keyframes asked
  for and frames given up per cut and stream.
cap: b's frames shown a second, kb/s received, loss, capture-to-decode latency and the
  longest still picture, over the last two thirds of the cap; sends: a's send_kbps then
  (the encoder's target), min: its lowest; under cap: seconds until a's target first went
  under the cap; back to full: seconds from the cap's end until a sent 1000 kb/s again.""")


def show(value, verdict: str | None = None, digits: int = 1, unit: str = "") -> str:
    text = "-" if value is None else f"{value:.{digits}f}{unit}"
    return f"{text} {verdict}" if verdict else text


def report(bases: list[dict], rows: list[dict], codecs: list[str]) -> None:
    print("baseline, the codec alone in this process (640x480 test pattern, ms per frame):")
    for b in bases:
        print(f"  {b['codec']:<4} draw {b['draw_ms']} + encode {b['encode_ms']} + decode "
              f"{b['decode_ms']} = {b['cpu_pct_per_call']}% of a core per call at {FPS} fps "
              f"(2 clients); {b['kbps']} kb/s of video")
    print(f"\n{'codec':<5}{'calls':>6}{'loss':>5} {'via':<6}|{'fps':>10}{'sent':>6}"
          f"{'shown':>12} |{'p50 ms':>11}{'p99':>5} |{'CPU/call':>9}{'codec':>6}{'x':>5} |"
          f"{'kb/s':>10}{'/1.5M':>6} |{'audio/s':>8}{'conc/s':>7} | busy others")
    order = {codec: i for i, codec in enumerate(codecs)}
    for r in sorted(rows, key=lambda r: (r["via"], r["calls"], r["loss_pct"],
                                         order[r["codec"]])):
        v, counted = r["verdict"], r["concealed_per_s"]
        conceal = f"~{r['concealed_per_s_est']:.1f}" if counted is None else f"{counted:.1f}"
        print(f"{r['codec']:<5}{r['calls']:>6}{r['loss_pct']:>4g}% {r['via']:<6}|"
              f"{show(r['recv_fps'], v['fps']):>10}{show(r['sent_fps']):>6}"
              f"{show(r['shown_pct'], v['shown'], unit='%'):>12} |"
              f"{show(r['latency_p50_ms'], v['p50']):>11}{show(r['latency_p99_ms'], None, 0):>5}"
              f" |{r['cpu_pct_per_call']:>8.0f}%{r['codec_cpu_pct_per_call']:>5.0f}%"
              f"{r['cpu_vs_codec']:>5.1f} |{show(r['kbps_per_stream'], v['kbps'], 0):>10}"
              f"{r['kbps_vs_target']:>6.2f} |{r['audio_frames_per_s']:>8.1f}{conceal:>7}"
              f" |{r['machine_busy_pct']:>4}%"
              f"{r['others_busy_pct']:>6}%")
    print(f"""
targets: fps >= {TARGET_FPS:g} at 0% loss; p50 < {TARGET_P50_MS} ms; <= {TARGET_KBPS} kb/s per \
stream; shown >= {TARGET_SHOWN}% at 2% loss.
via host: /CHECK calls; proxy: one direct call through the lossy proxy in this process.
fps: mean of the receivers' per-second video_fps. sent: the sender's capture rate, counter
  difference / time difference over the stamped pictures --record kept in the window (about
  one a second; '-': too few, 30 assumed). shown = fps / sent (+-1% is noise).
p50, p99: of the per-second median capture-to-decode latencies, all streams together.
CPU/call: both clients, % of one core. codec: the baseline's share (draw + encode + decode
  at 30 fps, twice). x = CPU/call / codec.
kb/s: received per stream (video, audio, parity, packet headers). /1.5M = kb/s / 1500.
audio/s: audio frames received a second (50 sent). conc/s: audio frames played by loss
  concealment a second (media_stats' `concealed`); '~': estimated as 50 - audio/s, for a
  chatroom.py whose events don't count them (an upper bound: Opus FEC repairs some).
busy: the whole machine, all cores. others: the part no process of this run used (+-5%:
  the kernel counts processes and cores apart). --json adds host, bench and proxy figures.""")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="measuring window per row (default 10)")
    parser.add_argument("--calls", default=[1, 3], help="simultaneous calls (default 1,3)",
                        type=lambda text: [int(x) for x in text.split(",") if x])
    parser.add_argument("--loss", default=[0, 2, 5], help="percent lost on the direct call "
                        "(default 0,2,5; '' for none)",
                        type=lambda text: [float(x) for x in text.split(",") if x])
    parser.add_argument("--codecs", type=lambda t: t.split(","), default=["vp8", "jpeg"],
                        help="default vp8,jpeg")
    parser.add_argument("--phases", type=lambda t: t.split(","),
                        default=["calls", "loss", "repair", "burst", "cap", "sync", "chat"],
                        help="which parts (default calls,loss,repair,burst,cap,sync,chat)")
    parser.add_argument("--chat-lines", type=int, default=40,
                        help="chat lines timed per row of the chat phase (default 40)")
    parser.add_argument("--pin", action="store_true",
                        help="also run the chat phase with the members and the calls on "
                        "separate cores")
    parser.add_argument("--file-mib", type=int, default=64,
                        help="the file sent in each row of the chat phase (default 64 MiB)")
    parser.add_argument("--holds", default=[0.0, 150.0, 300.0, -300.0],
                        type=lambda text: [float(x) for x in text.split(",") if x],
                        help="ms the proxy holds a's video back in the sync rows, negative: "
                        "its sound (default 0,150,300,-300)")
    parser.add_argument("--repair", type=lambda t: t.split(","), default=list(REPAIR_MODES),
                        help="repair modes compared (default none,parity,nack,both)")
    parser.add_argument("--repair-loss", default=[2.0, 5.0],
                        type=lambda text: [float(x) for x in text.split(",") if x],
                        help="percent lost in the repair rows (default 2,5)")
    parser.add_argument("--bursts", default=[200.0, 1000.0],
                        type=lambda text: [float(x) for x in text.split(",") if x],
                        help="burst losses in ms (default 200,1000), 5 of each")
    parser.add_argument("--caps", default=[500.0, 250.0],
                        type=lambda text: [float(x) for x in text.split(",") if x],
                        help="bandwidth caps in kb/s (default 500,250)")
    parser.add_argument("--cap-seconds", type=float, default=30.0,
                        help="how long each cap lasts (default 30)")
    parser.add_argument("--json", action="store_true", help="JSON lines instead of the table")
    args = parser.parse_args()
    if not set(args.codecs) <= {"vp8", "jpeg"}:
        parser.error("--codecs takes vp8 and/or jpeg")
    run = None
    try:
        bases = [baseline(codec) for codec in args.codecs]
        run, rows = Run(), []
        repairs: list[dict] = []
        bursts: list[dict] = []
        caps: list[dict] = []
        syncs: list[dict] = []
        chats: list[dict] = []
        phases = set(args.phases)
        for codec, base in zip(args.codecs, bases):
            if "calls" in phases:
                rows += check_rows(run, codec, args.calls, args.seconds, base)
            if "loss" in phases and args.loss:
                rows += loss_rows(run, codec, args.loss, args.seconds, base)
            if "repair" in phases:
                repairs += repair_rows(run, codec, args.repair, args.repair_loss,
                                       args.seconds, base)
            if "burst" in phases:
                bursts += burst_rows(run, codec, args.repair, args.bursts, 5)
            if "cap" in phases:
                caps += cap_rows(run, codec, args.caps, args.cap_seconds)
            if "sync" in phases:
                syncs += sync_rows(run, codec, args.holds, args.seconds)
            if "chat" in phases:
                chats += chat_rows(run, codec, args.calls, args.chat_lines, args.file_mib)
                if args.pin:
                    chats += chat_rows(run, codec, args.calls, args.chat_lines,
                                       args.file_mib, pinned=True)
    except (SetupError, chatroom.ChatError) as exc:
        print(f"bench/media.py: the setup broke: {exc}", file=sys.stderr)
        return 1
    finally:
        if run is not None:
            run.close()
    for line in bases + rows + repairs + bursts + caps + syncs + chats if args.json else []:
        print(json.dumps(line))
    if not args.json:
        if rows:
            report(bases, rows, args.codecs)
        report_issue12(repairs, bursts, caps)
        report_sync(syncs)
        report_chat(chats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
