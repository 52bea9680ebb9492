#!/usr/bin/env python3
"""bench/faults.py -- is anything lost or doubled when connections break?

A host and three terminal clients (`chatroom.py --cli --json`), every one a
real process on 127.0.0.1: alice and bob each reach the host through a
FaultProxy (tests/faults.py), carol directly. All three talk at a steady
pace in three phases, and the bench prints, for each, the messages sent and
delivered to the other members, the lost, the doubled, the out of order,
and the delivery time (from the line written to the sender's stdin to the
`message` event on a recipient's stdout) p50/p99:

1. baseline: the same flow, nothing broken (the figures to compare with);
2. faults: N forced disconnects of alice's or bob's connection (cuts, resets,
   cuts with the proxy refusing new connections for a while) at random
   moments, seeded, with short pauses (stalls) between them; each one waits
   until its client is back, and the time from the fault to the client's
   `resumed` (or a fresh `ready`) is the time to resume, p50/p99;
3. file: a file from alice to the room while the flow goes on and alice's
   upload and bob's download are cut and stalled (the proxies are slowed to
   make the transfer last a few seconds); whether each recipient got it
   whole (SHA-256 of the saved file against the original) or what failed,
   the file events each side saw, and the bytes re-sent if the proxies'
   byte counts say so.

Zero lost and zero doubled is the bar: the last lines say whether it was
met, and the exit status is 1 when it was not. No figure here is a pass or
fail on time.

    python bench/faults.py                    # 10 disconnects, about a minute
    python bench/faults.py --disconnects 30 --seed 7
    python bench/faults.py --quick            # a few seconds of each phase

Loopback only, no mDNS (`--server`, a host with --no-advertise); every
process it starts, it stops (by its Popen handle).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CHATROOM = ROOT / "chatroom.py"
LOOPBACK = "127.0.0.1"
ROOM = "bench"
FILE_NAME = "faults-bench.bin"
FRAME_OVERHEAD = 16                 # bytes per file data frame beyond the data, at most
DATA_FRAME = 64 * 1024              # file data per frame, at most

# tests/faults.py by its path: this file is also called faults.py.
_spec = importlib.util.spec_from_file_location("fault_proxy", ROOT / "tests" / "faults.py")
assert _spec is not None and _spec.loader is not None
fault_proxy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fault_proxy)


class Proxy(fault_proxy.FaultProxy):
    """A FaultProxy that also counts the bytes it carries each way (its
    `rate`, bytes/s per direction and connection, 0 = no cap, as there)."""

    def __init__(self, upstream_port: int) -> None:
        self.up_bytes = 0                   # client -> host
        self.down_bytes = 0                 # host -> client
        self._count_lock = threading.Lock()
        super().__init__(upstream_port)

    def live(self) -> int:
        """Connections through the proxy now."""
        with self._lock:
            return len(self._pairs)

    def counts(self) -> tuple[int, int]:
        with self._count_lock:
            return self.up_bytes, self.down_bytes

    def _pump(self, source, sink) -> None:  # FaultProxy._pump, counting and paced
        up = threading.current_thread().name == "proxy-up"
        try:
            while not self._closed.is_set():
                wait = self._paused_until - time.monotonic()
                if wait > 0:
                    time.sleep(min(wait, fault_proxy._POLL_S))
                    continue
                readable, _, _ = select.select([source], [], [], fault_proxy._POLL_S)
                if not readable:
                    continue
                rate = self.rate
                data = source.recv(max(1024, int(rate * 0.02)) if rate else 65536)
                if not data:
                    break
                sink.sendall(data)
                with self._count_lock:
                    if up:
                        self.up_bytes += len(data)
                    else:
                        self.down_bytes += len(data)
                if rate:
                    time.sleep(len(data) / rate)
        except (OSError, ValueError):
            pass
        finally:
            for sock in (source, sink):
                fault_proxy._quietly(sock.shutdown, 2)
                fault_proxy._quietly(sock.close)


class Proc:
    """A chatroom.py process whose JSON stdout lines are kept with the
    monotonic time each was read; stderr goes to a file in the work dir."""

    def __init__(self, args: list[str], label: str, workdir: Path) -> None:
        self.label = label
        self.err_path = workdir / f"{label}.stderr"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, str(CHATROOM), *args],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err, env=env)
        self.events: list[tuple[float, dict]] = []
        self.state = "starting"             # "in" (ready, resumed), "away", "closed"
        self.back_at = 0.0                  # when it was last "in" again
        self._cond = threading.Condition()
        self._stdin_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True, name=label)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            now = time.monotonic()
            try:
                event = json.loads(raw)
            except ValueError:
                event = {"type": "<not json>", "raw": raw.decode("utf-8", "replace")}
            if not isinstance(event, dict):
                event = {"type": "<not json>", "raw": repr(event)}
            with self._cond:
                kind = event.get("type")
                if kind in ("ready", "resumed"):
                    self.state, self.back_at = "in", now
                elif kind == "reconnecting":
                    self.state = "away"
                elif kind == "closed":
                    self.state = "closed"
                self.events.append((now, event))
                self._cond.notify_all()
        with self._cond:
            self.state = "closed" if self.state != "closed" else self.state
            self._cond.notify_all()

    def wait(self, predicate, timeout: float, since: int = 0) -> tuple[float, dict] | None:
        """The first (time, event) from index `since` that matches, or None."""
        deadline = time.monotonic() + timeout
        index = since
        with self._cond:
            while True:
                while index < len(self.events):
                    item = self.events[index]
                    index += 1
                    if predicate(item[1]):
                        return item
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and index >= len(self.events)):
                    return None
                self._cond.wait(min(left, 0.2))

    def wait_state(self, state: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.state != state:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))
            return True

    def snapshot(self) -> list[tuple[float, dict]]:
        with self._cond:
            return list(self.events)

    def send(self, line: str) -> float:
        """Write one line to stdin; the time it was written."""
        assert self.proc.stdin is not None
        with self._stdin_lock:
            self.proc.stdin.write(line.encode("utf-8") + b"\n")
            self.proc.stdin.flush()
            return time.monotonic()

    def stop(self) -> None:
        """/quit (a client) or SIGINT (the host); then terminate, kill."""
        if self.proc.poll() is None:
            try:
                if self.label == "host":
                    self.proc.send_signal(signal.SIGINT)
                else:
                    self.send("/quit")
                    self.proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
        for stop in (None, self.proc.terminate, self.proc.kill):
            if stop is not None and self.proc.poll() is None:
                stop()
            try:
                self.proc.wait(5)
                break
            except subprocess.TimeoutExpired:
                continue
        self._reader.join(5)


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile, or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


# --- the message flow -----------------------------------------------------------

class Flow:
    """Every client says a numbered line once per `interval` (round robin)
    until `stop`, or `per_client` lines each; keeps when each was written."""

    def __init__(self, phase: str, clients: dict[str, Proc], interval: float,
                 per_client: int | None = None) -> None:
        self.phase = phase
        self.clients = clients
        self.interval = interval
        self.per_client = per_client
        self.sent: dict[str, list[float]] = {user: [] for user in clients}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"flow-{phase}")

    def text(self, user: str, n: int) -> str:
        return f"{self.phase}:{user}:{n:05d}"

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set() and (self.per_client is None or n < self.per_client):
            for user, client in self.clients.items():
                self.sent[user].append(client.send(self.text(user, n)))
            n += 1
            self.stop.wait(self.interval)

    def start(self) -> Flow:
        self.thread.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(30)

    def settle(self, timeout: float) -> bool:
        """Once everyone is back: each says one last line, and it waits until
        each member has every last line (its own as the confirmation)."""
        deadline = time.monotonic() + timeout
        for client in self.clients.values():
            if not client.wait_state("in", max(0.1, deadline - time.monotonic())):
                return False
        for user, client in self.clients.items():
            self.sent[user].append(client.send(self.text(user, len(self.sent[user]))))
        for client in self.clients.values():
            for user in self.clients:
                last = self.text(user, len(self.sent[user]) - 1)
                if client.wait(lambda e, last=last: e.get("type") == "message"
                               and e.get("text") == last,
                               max(0.1, deadline - time.monotonic())) is None:
                    return False
        return True

    def measure(self) -> dict[str, Any]:
        """Lost, doubled, out of order and delivery times, over every
        (sender, other member) pair; own lines count as confirmations."""
        lost = doubled = out_of_order = unconfirmed = confirmations_doubled = 0
        delivered = 0
        times: list[float] = []
        prefix = f"{self.phase}:"
        for receiver, client in self.clients.items():
            got: dict[str, list[tuple[int, float]]] = {user: [] for user in self.clients}
            for t, event in client.snapshot():
                text = event.get("text", "")
                if event.get("type") != "message" or not text.startswith(prefix):
                    continue
                _, sender, number = text.split(":")
                if sender in got and event.get("from") == sender:
                    got[sender].append((int(number), t))
            for sender, items in got.items():
                sent = self.sent[sender]
                counts = Counter(n for n, _ in items)
                extra = sum(c - 1 for c in counts.values())
                missing = sum(1 for n in range(len(sent)) if n not in counts)
                if sender == receiver:
                    unconfirmed += missing
                    confirmations_doubled += extra
                    continue
                lost += missing
                doubled += extra
                delivered += len(counts)
                seen: set[int] = set()
                highest = -1
                for n, t in items:
                    if n in seen:
                        continue
                    seen.add(n)
                    if n < highest:
                        out_of_order += 1
                    highest = max(highest, n)
                    if n < len(sent):
                        times.append(t - sent[n])
        sent_total = sum(len(v) for v in self.sent.values())
        return {
            "sent": sent_total,
            "deliveries_expected": sent_total * (len(self.clients) - 1),
            "delivered": delivered, "lost": lost, "doubled": doubled,
            "out_of_order": out_of_order, "unconfirmed": unconfirmed,
            "confirmations_doubled": confirmations_doubled,
            "delivery_ms_p50": ms(percentile(times, 50)),
            "delivery_ms_p99": ms(percentile(times, 99)),
            "delivery_ms_max": ms(max(times) if times else None),
        }


# --- faults ---------------------------------------------------------------------

class Chaos:
    """Breaks alice's and bob's connections at random moments (seeded):
    up to `disconnects` cuts and resets, each when its client is in the
    room and has been back for a random while, with stalls in between;
    stops at `deadline` or `stop`. Keeps what it did, with the time."""

    def __init__(self, rng: random.Random, targets: dict[str, tuple[Proc, Proxy]],
                 disconnects: int, seconds: float, gap: tuple[float, float]) -> None:
        self.rng = rng
        self.targets = targets
        self.disconnects = disconnects
        self.deadline = time.monotonic() + seconds
        self.gap = gap
        self.done: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="chaos")

    def start(self) -> Chaos:
        self.thread.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(30)

    def _run(self) -> None:
        rng = self.rng
        forced = 0
        last_fault: dict[str, float] = dict.fromkeys(self.targets, 0.0)
        while forced < self.disconnects and time.monotonic() < self.deadline:
            if self.stop.wait(rng.uniform(*self.gap)):
                return
            ready = [user for user, (client, proxy) in sorted(self.targets.items())
                     if client.state == "in" and client.back_at > last_fault[user]
                     and proxy.live() > 0]
            if not ready:
                continue
            user = rng.choice(ready)
            client, proxy = self.targets[user]
            roll = rng.random()
            now = time.monotonic()
            if roll < 0.25:                 # a stall: the connection lives on
                seconds = rng.uniform(0.1, 1.0)
                proxy.pause(seconds)
                self.done.append({"kind": "pause", "user": user, "t": now,
                                  "seconds": seconds})
                continue
            kind = "cut" if roll < 0.6 else "reset" if roll < 0.85 else "cut+refuse"
            if kind == "reset":
                proxy.reset()
            else:
                proxy.cut()
            forced += 1
            last_fault[user] = now
            self.done.append({"kind": kind, "user": user, "t": now})
            if kind == "cut+refuse":        # the host unreachable for a while
                proxy.refusing = True
                self.stop.wait(rng.uniform(0.5, 2.0))
                proxy.refusing = False

    def measure(self) -> dict[str, Any]:
        """Disconnects by kind, and the time from each to its client's
        `resumed` (or fresh `ready`)."""
        kinds = Counter(f["kind"] for f in self.done)
        resume_s: list[float] = []          # after a cut or a reset
        refused_s: list[float] = []         # after a cut, the proxy refusing a while
        resumed = fresh = never = reconnecting = lost_by_host = 0
        for fault in self.done:
            if fault["kind"] == "pause":
                continue
            client = self.targets[fault["user"]][0]
            back = None
            for t, event in client.snapshot():
                if t <= fault["t"]:
                    continue
                kind = event.get("type")
                if kind == "reconnecting" and back is None:
                    reconnecting += 1
                if kind in ("resumed", "ready"):
                    back = (t, event)
                    break
            if back is None:
                never += 1
                continue
            (refused_s if fault["kind"] == "cut+refuse" else resume_s).append(
                back[0] - fault["t"])
            if back[1]["type"] == "resumed":
                resumed += 1
                lost_by_host += back[1].get("lost", 0)
            else:
                fresh += 1
        return {
            "disconnects": sum(c for k, c in kinds.items() if k != "pause"),
            "cuts": kinds["cut"], "resets": kinds["reset"],
            "cuts_then_refused": kinds["cut+refuse"],
            "pauses": kinds["pause"], "reconnecting_events": reconnecting,
            "back_resumed": resumed, "back_fresh_ready": fresh, "never_back": never,
            "resumed_lost_field_total": lost_by_host,
            "resume_ms_p50": ms(percentile(resume_s, 50)),
            "resume_ms_p99": ms(percentile(resume_s, 99)),
            "resume_ms_max": ms(max(resume_s) if resume_s else None),
            "resume_after_refused_ms_p50": ms(percentile(refused_s, 50)),
            "resume_after_refused_ms_max": ms(max(refused_s) if refused_s else None),
        }


# --- the run --------------------------------------------------------------------

def file_phase(args: argparse.Namespace, rng: random.Random, clients: dict[str, Proc],
               proxies: dict[str, Proxy], workdir: Path) -> dict[str, Any]:
    """A file from alice to the room while the flow goes on and alice's and
    bob's connections break; what became of it for each recipient."""
    source = workdir / FILE_NAME
    digest = hashlib.sha256()
    with open(source, "wb") as out:
        left = args.file_bytes
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            digest.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    sha = digest.hexdigest()
    rate = args.file_bytes / args.file_seconds
    for proxy in proxies.values():
        proxy.rate = rate
    before = {user: proxy.counts() for user, proxy in proxies.items()}
    marks = {user: len(client.snapshot()) for user, client in clients.items()}
    flow = Flow("file", clients, args.interval).start()
    alice = clients["alice"]
    started = alice.send(f"/send {source}")
    offered = clients["bob"].wait(lambda e: e.get("type") == "file_offer"
                                  and e.get("name") == FILE_NAME, 30, marks["bob"])
    chaos = Chaos(rng, {u: (clients[u], proxies[u]) for u in proxies}, args.file_faults,
                  args.file_seconds * 1.5, (0.3, max(0.4, args.file_seconds / 3))).start()

    def outcome(user: str, wanted: tuple[str, ...]) -> tuple[float, dict] | None:
        return clients[user].wait(lambda e: e.get("type") in wanted and e.get("name")
                                  == FILE_NAME, args.file_seconds * 4 + 60, marks[user])

    ends = {"alice": alice.wait(lambda e: e.get("name") == FILE_NAME and (
        e.get("type") == "file_sent"
        or (e.get("type") == "file_failed" and not e.get("user"))),
        args.file_seconds * 4 + 60, marks["alice"])}
    for user in ("bob", "carol"):
        ends[user] = outcome(user, ("file_received", "file_failed"))
    chaos.finish()
    for proxy in proxies.values():
        proxy.rate = 0
    flow.finish()
    settled = flow.settle(60)
    after = {user: proxy.counts() for user, proxy in proxies.items()}

    result: dict[str, Any] = {"file_bytes": args.file_bytes, "offered_to_bob": bool(offered)}
    for user in ("bob", "carol"):
        received = [e for _, e in clients[user].snapshot()[marks[user]:]
                    if e.get("type") == "file_received" and e.get("name") == FILE_NAME]
        if received:                        # whole? read it back and hash it
            path = Path(received[-1]["path"])
            whole = path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == sha
            result[user] = "whole (sha256 matches)" if whole else "CORRUPT (sha256 differs)"
            result[f"{user}_seconds"] = round(next(
                t for t, e in clients[user].snapshot()[marks[user]:] if e is received[-1])
                - started, 2)
        elif ends[user] is not None:
            failed = ends[user][1]
            result[user] = f"failed: {failed.get('code')} ({failed.get('reason')})"
        else:
            result[user] = "no outcome in time"
    said = []                               # what the sender was told, in order
    for _, e in alice.snapshot()[marks["alice"]:]:
        if e.get("name") == FILE_NAME and e.get("type") in (
                "file_sent", "file_delivered", "file_failed"):
            said.append(" ".join(str(x) for x in (
                e["type"], e.get("code") or "", e.get("user") or "") if x))
    result["alice"] = said or ["no outcome in time"]
    for user in ("alice", "bob"):           # every file event, whatever it is called
        result[f"{user}_file_events"] = dict(Counter(
            e["type"] for _, e in clients[user].snapshot()[marks[user]:]
            if e.get("type", "").startswith("file") or e.get("type") not in KNOWN_EVENTS))
    # Bytes: what crossed alice's proxy up and bob's down, less the file and
    # its framing; the rest is chat (small) and bytes sent more than once.
    framing = math.ceil(args.file_bytes / DATA_FRAME) * FRAME_OVERHEAD
    up = after["alice"][0] - before["alice"][0]
    down = after["bob"][1] - before["bob"][1]
    result["alice_up_bytes"] = up
    result["bob_down_bytes"] = down
    chat_allowance = 256 * sum(len(v) for v in flow.sent.values())
    for user, crossed in (("alice", up), ("bob", down)):
        delivered = ("whole" in result["bob"]) if user == "bob" else \
            any(line.startswith("file_sent") for line in result["alice"])
        extra = crossed - args.file_bytes - framing - chat_allowance
        result[f"{user}_re_sent_bytes_est"] = max(0, extra) if delivered else \
            "n/a (not completed)"
    result["settled"] = settled
    return {"flow": flow.measure(), "chaos": chaos.measure(), "file": result}


KNOWN_EVENTS = {"ready", "resumed", "reconnecting", "message", "system", "help", "members",
                "error", "closed", "media_state", "call_invite", "call_missed"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--disconnects", type=int, default=None,
                        help="forced disconnects in the faults phase (default 10; --quick 4)")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--quick", action="store_true", help="a short run of each phase")
    parser.add_argument("--messages", type=int, default=None,
                        help="lines per client in the baseline (default 150; --quick 40)")
    parser.add_argument("--interval", type=float, default=0.04,
                        help="seconds between one client's lines (default 0.04)")
    parser.add_argument("--file-faults", type=int, default=None,
                        help="disconnects while the file moves (default 4; --quick 2)")
    args = parser.parse_args()
    quick = args.quick
    if args.disconnects is None:
        args.disconnects = 4 if quick else 10
    if args.messages is None:
        args.messages = 40 if quick else 150
    args.file_bytes = (8 if quick else 48) * 1024 * 1024
    args.file_seconds = 3.0 if quick else 6.0     # the slowed proxies' pace
    if args.file_faults is None:
        args.file_faults = 2 if quick else 4
    fault_seconds = 20.0 if quick else 60.0      # the faults phase, at most
    rng = random.Random(args.seed)

    workdir = Path(tempfile.mkdtemp(prefix="chatroom-faults-"))
    procs: list[Proc] = []
    proxies: dict[str, Proxy] = {}
    failures: list[str] = []
    try:
        host = Proc(["--host", "--json", "--port", "0", "--interface", LOOPBACK,
                     "--no-advertise", "--grace", "60"], "host", workdir)
        procs.append(host)
        listening = host.wait(lambda e: True, 30)
        if not listening or listening[1].get("type") != "listening":
            raise SystemExit(f"the host did not start: {listening}; see {host.err_path}")
        port = listening[1]["port"]
        proxies = {"alice": Proxy(port), "bob": Proxy(port)}
        clients: dict[str, Proc] = {}
        for user in ("alice", "bob", "carol"):
            downloads = workdir / f"downloads-{user}"
            downloads.mkdir()
            through = proxies[user].port if user in proxies else port
            client = Proc(["--cli", "--json", "--server", f"{LOOPBACK}:{through}",
                           "--room", ROOM, "--user", user, "--downloads", str(downloads)],
                          user, workdir)
            procs.append(client)
            if client.wait(lambda e: e.get("type") in ("ready", "closed"), 30) is None \
                    or client.state != "in":
                raise SystemExit(f"{user} did not get in; see {client.err_path}")
            clients[user] = client
        for user in ("alice", "bob"):       # carol, the last, is seen by all
            clients[user].wait(lambda e: e.get("type") == "system"
                               and e.get("user") == "carol", 10)
        setup = {"clients": list(clients), "behind_fault_proxy": list(proxies),
                 "seed": args.seed, "interval_s": args.interval, "grace_s": 60}
        print(json.dumps({"setup": setup}), flush=True)

        # 1. baseline
        flow = Flow("baseline", clients, args.interval, args.messages).start()
        flow.thread.join()
        if not flow.settle(60):
            failures.append("baseline did not settle")
        baseline = flow.measure()
        print(json.dumps({"phase": "baseline", **baseline}), flush=True)

        # 2. faults
        flow = Flow("faults", clients, args.interval).start()
        chaos = Chaos(rng, {u: (clients[u], proxies[u]) for u in proxies},
                      args.disconnects, fault_seconds, (0.2, 1.2)).start()
        chaos.thread.join()
        flow.finish()
        if not flow.settle(60):
            failures.append("faults phase did not settle (someone not back, or lines missing)")
        faults = {**flow.measure(), **chaos.measure()}
        print(json.dumps({"phase": "faults", **faults}), flush=True)

        # 3. a file during faults
        filed = file_phase(args, rng, clients, proxies, workdir)
        if not filed["file"]["settled"]:
            failures.append("file phase did not settle")
        print(json.dumps({"phase": "file", **filed["flow"], **filed["chaos"]}), flush=True)
        print(json.dumps({"file": filed["file"]}), flush=True)

        base50, base99 = baseline["delivery_ms_p50"], baseline["delivery_ms_p99"]
        print(json.dumps({
            "ratio_delivery_p50_faults_vs_baseline":
                round(faults["delivery_ms_p50"] / base50, 2) if base50 else None,
            "ratio_delivery_p99_faults_vs_baseline":
                round(faults["delivery_ms_p99"] / base99, 2) if base99 else None,
        }), flush=True)
        phases = {"baseline": baseline, "faults": faults, "file": filed["flow"]}
        lost = sum(p["lost"] for p in phases.values())
        doubled = sum(p["doubled"] + p["confirmations_doubled"] for p in phases.values())
        disorder = sum(p["out_of_order"] for p in phases.values())
        unconfirmed = sum(p["unconfirmed"] for p in phases.values())
        forced = faults["disconnects"] + filed["chaos"]["disconnects"]
        print(f"messages: {sum(p['sent'] for p in phases.values())} sent, "
              f"{sum(p['delivered'] for p in phases.values())} of "
              f"{sum(p['deliveries_expected'] for p in phases.values())} deliveries made, "
              f"across {forced} forced disconnects")
        print(f"lost {lost}, doubled {doubled}, out of order {disorder}, "
              f"unconfirmed {unconfirmed}")
        print(f"file: bob {filed['file']['bob']}; carol {filed['file']['carol']}; "
              f"alice was told: {', '.join(filed['file']['alice'])}")
        met = lost == 0 and doubled == 0 and not failures
        for failure in failures:
            print(f"note: {failure}")
        print("BAR MET: zero lost, zero doubled" if met else
              f"BAR MISSED: {lost} lost, {doubled} doubled")
        return 0 if met else 1
    finally:
        for proc in reversed(procs):
            proc.stop()
        for proxy in proxies.values():
            proxy.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
