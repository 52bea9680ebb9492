#!/usr/bin/env python3
"""bench/messages.py -- how fast does a host fan chat messages out to a room?

N clients join one room; each sends M messages of B bytes as fast as the host
takes them; every client must receive every message (its own included, as
the host's confirmation). Prints deliveries per second, latency from send to
delivery (p50/p99/max), and the host's CPU per delivery, for the real
`chatroom.py --host` and, measured in the same run with the same clients, for
a plain relay: a 40-line asyncio server that copies each length-prefixed
frame to every connection without parsing anything. The ratio says what
checking and routing every message costs.

    python bench/messages.py --clients 20 --messages 200 --size 100

Loopback only; every process it starts, it stops.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import chatroom  # noqa: E402  (the real protocol, for the clients)

HEADER = struct.Struct(">I")
STAMP = re.compile(rb"\d{5} \d{7} (\d{20}) ")

PLAIN_RELAY = r"""
import asyncio, struct, sys
HEADER = struct.Struct(">I")
writers = set()
async def member(reader, writer):
    writers.add(writer)
    try:
        while True:
            header = await reader.readexactly(4)
            body = await reader.readexactly(HEADER.unpack(header)[0])
            frame = header + body
            for other in list(writers):
                other.write(frame)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writers.discard(writer)
        writer.close()
async def main():
    server = await asyncio.start_server(member, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Member:
    """One benchmark client speaking either chatroom's protocol or plain frames."""

    def __init__(self, index: int, plain: bool) -> None:
        self.index = index
        self.plain = plain
        self.latencies: list[float] = []
        self.received = 0

    async def connect(self, port: int) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        if self.plain:
            return
        self.wire = chatroom.Wire(chatroom.Role.CLIENT)
        self.writer.write(self.wire.send(chatroom.Hello(
            chatroom.PROTOCOL_VERSION, "bench", f"user{self.index}")))
        # Read exactly the welcome frame; what follows is left for _stamps.
        header = await self.reader.readexactly(4)
        body = await self.reader.readexactly(HEADER.unpack(header)[0])
        if not isinstance(self.wire.receive(header + body)[0], chatroom.Welcome):
            raise RuntimeError(body.decode())

    def frame(self, seq: int, size: int) -> bytes:
        text = f"{self.index:05d} {seq:07d} {time.perf_counter_ns():020d} "
        text += "x" * (size - len(text))
        if self.plain:
            body = text.encode()
            return HEADER.pack(len(body)) + body
        return self.wire.send(chatroom.Say(f"m{seq}", text))

    async def send_all(self, count: int, size: int) -> None:
        for seq in range(count):
            self.writer.write(self.frame(seq, size))
            await self.writer.drain()

    def _stamps(self, data: bytes) -> list[int]:
        """Send times in the frames received. Both kinds of client split
        frames and find the stamp the same cheap way, so the clients cost
        the same and the comparison measures the servers."""
        self._buffer += data
        stamps, start = [], 0
        while len(self._buffer) - start >= 4:
            (length,) = HEADER.unpack_from(self._buffer, start)
            end = start + 4 + length
            if len(self._buffer) < end:
                break
            match = STAMP.search(self._buffer, start + 4, end)
            if match:                       # (enter notices have none)
                stamps.append(int(match.group(1)))
            start = end
        del self._buffer[:start]
        return stamps

    async def receive_all(self, expected: int) -> None:
        self._buffer = bytearray()
        while self.received < expected:
            data = await self.reader.read(256 * 1024)
            if not data:
                raise RuntimeError(f"user{self.index}: connection closed")
            now = time.perf_counter_ns()
            for stamp in self._stamps(data):
                self.latencies.append((now - stamp) / 1e6)
                self.received += 1


async def run(port: int, pid: int, plain: bool, clients: int, count: int,
              size: int) -> dict:
    members = [Member(i, plain) for i in range(clients)]
    for member in members:
        await member.connect(port)
    await asyncio.sleep(0.3)                # let the enter notices pass
    expected = clients * count              # every member receives every message
    cpu_before = cpu_s(pid)
    started = time.perf_counter()
    receivers = [asyncio.create_task(m.receive_all(expected)) for m in members]
    await asyncio.gather(*(m.send_all(count, size) for m in members))
    await asyncio.wait_for(asyncio.gather(*receivers), 120)
    elapsed = time.perf_counter() - started
    host_cpu = cpu_s(pid) - cpu_before
    for member in members:
        member.writer.close()
    latencies = sorted(x for m in members for x in m.latencies)
    deliveries = sum(m.received for m in members)
    return {
        "server": "plain relay" if plain else "chatroom host",
        "deliveries": deliveries,
        "lost": clients * expected - deliveries,   # must be 0
        "deliveries_per_s": round(deliveries / elapsed),
        "latency_ms_p50": round(statistics.median(latencies), 2),
        "latency_ms_p99": round(latencies[int(len(latencies) * 0.99) - 1], 2),
        "latency_ms_max": round(latencies[-1], 2),
        "host_cpu_us_per_delivery": round(host_cpu / deliveries * 1e6, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--messages", type=int, default=200, help="per client")
    parser.add_argument("--size", type=int, default=100, help="bytes per message")
    args = parser.parse_args()
    results = []
    for plain in (True, False):
        command = ([sys.executable, "-c", PLAIN_RELAY] if plain else
                   [sys.executable, str(ROOT / "chatroom.py"), "--host", "--json", "--port",
                    "0", "--interface", "127.0.0.1", "--no-advertise",
                    "--rate-limit", "0"])    # as fast as the host takes them: no flood control
        server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        try:
            line = server.stdout.readline()
            port = int(line) if plain else json.loads(line)["port"]
            results.append(asyncio.run(run(port, server.pid, plain, args.clients,
                                           args.messages, args.size)))
        finally:
            server.terminate()
            server.wait(10)
        print(json.dumps(results[-1]))
    plain, ours = results
    print(json.dumps({
        "ratio_deliveries_per_s": round(ours["deliveries_per_s"] / plain["deliveries_per_s"], 2),
        "ratio_host_cpu_per_delivery": round(ours["host_cpu_us_per_delivery"]
                                             / plain["host_cpu_us_per_delivery"], 2)}))


if __name__ == "__main__":
    main()
