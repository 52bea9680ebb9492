#!/usr/bin/env python3
"""bench/tls.py -- what does TLS cost a file and a chat line?

Runs the same two measurements twice on 127.0.0.1, every side a real
`chatroom.py` process: once as shipped (TLS 1.3) and once with --insecure
on both sides (plain TCP), and prints both with their ratio:

- file: one file (default 256 MiB) from a sender through the host to one
  recipient, MB/s from the sender's /send to the recipient's
  file_received (the file verified by SHA-256), and the host's CPU
  seconds per GB;
- latency: chat lines one at a time, each from the sender's stdin to the
  recipient's `message` event, p50 and p99 in ms.

    python bench/tls.py                    # 256 MiB, 300 lines
    python bench/tls.py --size 1G --lines 1000

Loopback only; every process it starts, it stops.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from files import MB, Proc, cpu_s  # the file bench (which puts chatroom on the path)

from chatroom import parse_size


def run(mode: str, path: Path, size: int, lines: int, workdir: Path) -> dict:
    workdir.mkdir(parents=True)
    security = ["--insecure"] if mode == "insecure" else []
    host = Proc("--host", "--json", "--port", "0", "--interface", "127.0.0.1",
                "--no-advertise", "--spool-dir", str(workdir), "--max-file-size",
                str(size + 1), "--state-dir", str(workdir / "host"), *security, stdin=False)
    port = host.wait_for("listening", 30)["port"]
    server = f"127.0.0.1:{port}"

    def client(user: str) -> Proc:
        proc = Proc("--cli", "--json", "--server", server, "--room", "bench", "--user", user,
                    "--downloads", str(workdir / user), "--known-hosts",
                    str(workdir / "known.json"), *security)
        proc.wait_for("ready", 30)
        return proc

    receiver = sender = None
    try:
        receiver, sender = client("receiver"), client("sender")
        delays = []
        for index in range(lines):
            started = sender.send(f"line {index} {'x' * 80}")
            delays.append(receiver.wait_for("message", 30)["_at"] - started)
        host_cpu = cpu_s(host.proc.pid)
        started = sender.send(f"/send {path}")
        received = receiver.wait_for("file_received")
        took = received["_at"] - started
        os.unlink(received["path"])
        delays.sort()
        return {"mb_per_s": size / took / MB,
                "host_cpu_s_per_gb": (cpu_s(host.proc.pid) - host_cpu) / (size / 1e9),
                "p50_ms": 1000 * statistics.median(delays),
                "p99_ms": 1000 * delays[min(len(delays) - 1, int(0.99 * len(delays)))]}
    finally:
        for proc in (sender, receiver):
            if proc is not None:
                proc.stop()
        host.proc.send_signal(2)
        host.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("256M"))
    parser.add_argument("--lines", type=int, default=300)
    parser.add_argument("--runs", type=int, default=2, help="alternating, best kept")
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="chatroom-bench-tls-", dir=args.dir))
    try:
        path = workdir / "payload.bin"
        with open(path, "wb") as out:
            for _ in range(0, args.size, 1 << 20):
                out.write(os.urandom(min(1 << 20, args.size - out.tell())))
        results: dict[str, list[dict]] = {"tls": [], "insecure": []}
        for _ in range(args.runs):
            for mode in results:
                results[mode].append(run(mode, path, args.size, args.lines,
                                         workdir / f"{mode}-{time.monotonic_ns()}"))
        best = {mode: {"mb_per_s": max(r["mb_per_s"] for r in runs),
                       "host_cpu_s_per_gb": min(r["host_cpu_s_per_gb"] for r in runs),
                       "p50_ms": min(r["p50_ms"] for r in runs),
                       "p99_ms": min(r["p99_ms"] for r in runs)} for mode, runs in
                results.items()}
        print(f"{args.size / 2**20:.0f} MiB file, {args.lines} lines, best of {args.runs} "
              f"runs each, {os.cpu_count()} CPUs")
        print(f"{'':10} {'file MB/s':>10} {'host CPU s/GB':>14} {'line p50 ms':>12} "
              f"{'line p99 ms':>12}")
        for mode, r in best.items():
            print(f"{mode:10} {r['mb_per_s']:10.1f} {r['host_cpu_s_per_gb']:14.2f} "
                  f"{r['p50_ms']:12.2f} {r['p99_ms']:12.2f}")
        tls, plain = best["tls"], best["insecure"]
        print(f"{'tls/plain':10} {tls['mb_per_s'] / plain['mb_per_s']:10.2f} "
              f"{tls['host_cpu_s_per_gb'] / plain['host_cpu_s_per_gb']:14.2f} "
              f"{tls['p50_ms'] / plain['p50_ms']:12.2f} {tls['p99_ms'] / plain['p99_ms']:12.2f}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
