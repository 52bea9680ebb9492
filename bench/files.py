#!/usr/bin/env python3
"""bench/files.py -- how fast does a file cross the host, and at what memory cost?

Sends one file (default 1 GiB) from a sender through a host to 1 and then to 4
recipients, all on 127.0.0.1, every side a real `chatroom.py` process, and
prints for each run: MB/s per recipient (from the sender's /send to that
recipient's file_received, the file verified by SHA-256), and the peak RSS of
the host and the clients. For comparison, measured in the same run on the same
file: a plain asyncio socket copy over loopback (with and without SHA-256 at
the receiver) and hashlib SHA-256 alone, with the ratios against them.

    python bench/files.py                 # 1 GiB
    python bench/files.py --size 256M --recipients 1 4

Needs about (2 + recipients) times the file size of free disk in --dir.
Loopback only; every process it starts, it stops.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHATROOM = ROOT / "chatroom.py"
sys.path.insert(0, str(ROOT))
from chatroom import parse_size  # noqa: E402  (the same size syntax as the flags)

MB = 1e6


def _status_mib(pid: int, field: str) -> float:
    """A memory field of /proc/PID/status (Linux), in MiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib(pid: int) -> float:
    """Peak resident set (VmHWM) of a live process, in MiB."""
    return _status_mib(pid, "VmHWM")


def rss_mib(pid: int) -> float:
    return _status_mib(pid, "VmRSS")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a live process has used (Linux)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Proc:
    """A chatroom.py subprocess whose JSON events are read on a thread."""

    def __init__(self, *args: str, stdin: bool = True) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(CHATROOM), *args], stdin=subprocess.PIPE if stdin else
            subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.events: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            event = json.loads(line)
            event["_at"] = time.perf_counter()
            self.events.put(event)

    def wait_for(self, kind: str, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            event = self.events.get(timeout=max(0.1, deadline - time.monotonic()))
            if event["type"] == kind:
                return event
            if event["type"] in ("file_failed", "closed"):
                raise RuntimeError(f"waiting for {kind}: {event}")

    def send(self, line: str) -> float:
        at = time.perf_counter()
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()
        return at

    def stop(self) -> None:
        if self.proc.poll() is None:
            if self.proc.stdin:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_chatroom(path: Path, size: int, recipients: int, workdir: Path) -> dict:
    spool = workdir / "spool"
    spool.mkdir(exist_ok=True)
    host = Proc("--host", "--json", "--port", "0", "--interface", "127.0.0.1",
                "--no-advertise", "--spool-dir", str(spool),
                "--max-file-size", str(size + 1), stdin=False)
    port = host.wait_for("listening", 30)["port"]
    host_rss_before = rss_mib(host.proc.pid)
    server = f"127.0.0.1:{port}"
    receivers = []
    try:
        for index in range(recipients):
            folder = workdir / f"r{index}"
            shutil.rmtree(folder, ignore_errors=True)
            client = Proc("--cli", "--json", "--server", server, "--room", "bench",
                          "--user", f"r{index}", "--downloads", str(folder))
            client.wait_for("ready", 30)
            receivers.append(client)
        sender = Proc("--cli", "--json", "--server", server, "--room", "bench",
                      "--user", "sender", "--downloads", str(workdir / "s"))
        sender.wait_for("ready", 30)
        cpu_before = {name: cpu_s(p.proc.pid) for name, p in
                      [("host", host), ("sender", sender), ("recipient", receivers[0])]}
        started = sender.send(f"/send {path}")
        received = [r.wait_for("file_received") for r in receivers]
        sender.wait_for("file_sent")
        times = [event["_at"] - started for event in received]
        result = {
            "recipients": recipients,
            "mb_per_s_each": [round(size / t / MB, 1) for t in times],
            "slowest_mb_per_s": round(size / max(times) / MB, 1),
            "host_peak_rss_mib": round(peak_rss_mib(host.proc.pid), 1),
            "host_rss_growth_mib": round(peak_rss_mib(host.proc.pid) - host_rss_before, 1),
            "sender_peak_rss_mib": round(peak_rss_mib(sender.proc.pid), 1),
            "recipient_peak_rss_mib": round(max(peak_rss_mib(r.proc.pid)
                                                for r in receivers), 1),
            "verified": all(e["size"] == size for e in received),
            "cpu_s_per_gb": {name: round((cpu_s(p.proc.pid) - cpu_before[name])
                                         / (size / 1e9), 2) for name, p in
                             [("host", host), ("sender", sender),
                              ("recipient", receivers[0])]},
        }
        sender.stop()
        for event in received:
            os.unlink(event["path"])
        return result
    finally:
        for client in receivers:
            client.stop()
        host.proc.send_signal(2)
        host.stop()


_RECEIVER = r"""
import asyncio, hashlib, os, sys, time
mode, out = sys.argv[1], sys.argv[2]
async def main():
    done = asyncio.get_running_loop().create_future()
    async def receive(reader, writer):
        digest = hashlib.sha256()
        sink = open(out, "wb", buffering=0) if mode == "write" else None
        got = 0
        while data := await reader.read(256 * 1024):
            got += len(data)
            if mode != "discard":
                digest.update(data)
            if sink:
                sink.write(data)
        if sink:
            sink.close()
        writer.close()
        done.set_result(got)
    server = await asyncio.start_server(receive, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    print(await done, time.perf_counter(), flush=True)
asyncio.run(main())
"""


def plain_copy(path: Path, size: int, mode: str, workdir: Path) -> float:
    """MB/s of a plain asyncio stream copy of the file to another process
    over loopback; the receiver discards, hashes, or hashes and writes."""
    out = workdir / "plain-copy.bin"
    receiver = subprocess.Popen([sys.executable, "-c", _RECEIVER, mode, str(out)],
                                stdout=subprocess.PIPE, text=True)
    port = int(receiver.stdout.readline())

    async def send() -> float:
        started = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        with open(path, "rb", buffering=0) as source:
            while data := source.read(1024 * 1024):
                writer.write(data)
                await writer.drain()
        writer.close()
        return started

    started = asyncio.run(send())
    got, finished = receiver.stdout.readline().split()
    receiver.wait()
    out.unlink(missing_ok=True)
    assert int(got) == size
    return size / (float(finished) - started) / MB


def sha256_speed(path: Path, size: int) -> float:
    digest = hashlib.sha256()
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as source:
        while data := source.read(1024 * 1024):
            digest.update(data)
    return size / (time.perf_counter() - started) / MB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("1G"))
    parser.add_argument("--recipients", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--dir", default=tempfile.gettempdir(),
                        help="where the file, the spool and the downloads go")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="chatroom-bench-", dir=args.dir))
    try:
        path = workdir / "payload.bin"
        with open(path, "wb") as out:       # random, so nothing can compress it
            left = args.size
            while left:
                block = os.urandom(min(left, 4 * 1024 * 1024))
                out.write(block)
                left -= len(block)
        sha256_speed(path, args.size)       # warm the page cache
        baseline = {
            "plain_copy_mb_per_s": round(plain_copy(path, args.size, "discard",
                                                    workdir), 1),
            "plain_copy_hashing_mb_per_s": round(plain_copy(path, args.size, "hash",
                                                            workdir), 1),
            "plain_copy_hashing_writing_mb_per_s": round(plain_copy(
                path, args.size, "write", workdir), 1),
            "sha256_mb_per_s": round(sha256_speed(path, args.size), 1),
        }
        print(json.dumps({"file_bytes": args.size, **baseline}))
        for count in args.recipients:
            result = run_chatroom(path, args.size, count, workdir)
            for name in ("plain_copy", "plain_copy_hashing", "plain_copy_hashing_writing"):
                result[f"ratio_to_{name}"] = round(
                    result["slowest_mb_per_s"] / baseline[f"{name}_mb_per_s"], 2)
            print(json.dumps(result))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
